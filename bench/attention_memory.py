"""Peak memory of the attention analysis' per-layer hooks vs plain `output_attentions=True`.

Each mode runs in its own subprocess (peak RSS is per process) on the same model (SmolLM2-135M-Instruct,
eager attention) and the same long prompt (GSM8K problems joined to about `--tokens` tokens): `hooks`
keeps the last prompt token's row of every layer's map (what analysis.attention does); `plain` asks the
model for all layers' full [1, H, T, T] maps and takes the same row afterwards. Both must give the same
rows. Prints the peak RSS of each, the growth over the loaded model, and:
    ratio peak_rss_hooks_vs_output_attentions = <x> (goal <= 0.7)
    ratio attention_growth_hooks_vs_output_attentions = <x> (goal <= 0.2)

    python bench/attention_memory.py [--tokens 2048]
    python bench/attention_memory.py --quick   # tiny_llama, 64 tokens: checks the script
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from helpers import bench_data, quick  # noqa: E402


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(mode: str, model_name: str, tokens: int) -> dict:
    import torch
    from hydra import compose, initialize_config_dir

    from analysis.attention import AttentionCapture
    from datamodules.sources import SAMPLES_DIR, read_file
    from modeling import models

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("attention", overrides=[f"model={model_name}"])
    model, tokenizer = models.build(cfg.model, cache_dir=cfg.paths.cache_dir)
    model.set_attn_implementation("eager")
    model.eval()
    source = bench_data.path("gsm8k", "test.jsonl") or SAMPLES_DIR / "gsm8k" / "test.jsonl"
    text = "\n\n".join(r["question"] for r in read_file(source))
    input_ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :tokens]
    length = input_ids.shape[1]
    loaded = peak_mib()
    if mode == "hooks":
        capture = AttentionCapture(model, ["diff"])
        rows = [layer["standard"][:, 0] for layer in capture.run(model, input_ids, [length - 1], length)]
    else:
        with torch.no_grad():
            attentions = model(input_ids=input_ids, output_attentions=True).attentions
        rows = [a[0, :, length - 1].float() for a in attentions]
    checksum = float(sum(r.double().sum() for r in rows))
    return {
        "mode": mode,
        "tokens": length,
        "loaded_mib": loaded,
        "peak_mib": peak_mib(),
        "checksum": checksum,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--child", choices=["hooks", "plain"])
    bench_data.add_option(parser)
    args = quick.parse(parser, model="tiny_llama", tokens=64)
    bench_data.announce("GSM8K")
    if args.child:
        print(json.dumps(child(args.child, args.model, args.tokens)))
        return
    results = {}
    for mode in ("hooks", "plain"):
        command = [
            __file__,
            "--child",
            mode,
            "--model",
            args.model,
            "--tokens",
            str(args.tokens),
        ]
        output = quick.run_python(command).stdout
        results[mode] = json.loads(output.strip().splitlines()[-1])
        r = results[mode]
        print(
            f"{mode}: {r['tokens']} tokens, peak {r['peak_mib']:.0f} MiB, growth over loaded model "
            f"{r['peak_mib'] - r['loaded_mib']:.0f} MiB"
        )
    hooks, plain = results["hooks"], results["plain"]
    print(
        f"same attention rows: {abs(hooks['checksum'] - plain['checksum']) < 1e-3 * abs(plain['checksum'])}"
    )
    peak = hooks["peak_mib"] / plain["peak_mib"]
    print(f"ratio peak_rss_hooks_vs_output_attentions = {peak:.3f} (goal <= 0.7)")
    growth = (hooks["peak_mib"] - hooks["loaded_mib"]) / max(1e-9, plain["peak_mib"] - plain["loaded_mib"])
    print(f"ratio attention_growth_hooks_vs_output_attentions = {growth:.3f} (goal <= 0.2)")


if __name__ == "__main__":
    main()
