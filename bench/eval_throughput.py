"""Generated tokens/s of lmlab's batched evaluation vs one-problem-at-a-time `model.generate`.

Both decode greedily with the same prompts (zero-shot CoT GSM8K prompts of the task config), the same
stop strings and max_new_tokens, on the same model (SmolLM2-135M-Instruct by default) and the first
`--problems` GSM8K test problems (`--data DIR`: DIR/gsm8k/test.jsonl; the bundled sample without it).
Prints both rates, how many completions are identical, and:
    ratio batched_vs_one_by_one = <x> (goal >= 3.0)

    python bench/eval_throughput.py [--problems 32] [--batch-size 16] [--max-new-tokens 128]
    python bench/eval_throughput.py --quick   # tiny_llama, two problems, four tokens: checks the script
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from helpers import bench_data, quick  # noqa: E402

import datamodules  # noqa: E402
from modeling import models  # noqa: E402
from modeling.generation import generate, truncate_at_stop  # noqa: E402


def one_by_one(model, tokenizer, prompts, max_new_tokens, stop_strings) -> list[str]:
    """The way simple scripts evaluate: one prompt, one generate call, no padding."""
    outputs = []
    for prompt in prompts:
        encoded = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                stop_strings=stop_strings,
                tokenizer=tokenizer,
                pad_token_id=tokenizer.pad_token_id,
            )
        text = tokenizer.decode(output[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
        outputs.append(truncate_at_stop(text, stop_strings))
    return outputs


def count_tokens(tokenizer, texts: list[str]) -> int:
    return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--problems", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    bench_data.add_option(parser)
    args = quick.parse(parser, model="tiny_llama", problems=2, batch_size=2, max_new_tokens=4)
    bench_data.announce("GSM8K")

    test = bench_data.path("gsm8k", "test.jsonl")
    data = [f"task.data_files={{train: {test}, test: {test}}}"] if test else []
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=[f"model={args.model}", "task.source=bundled", *data])
    model, tokenizer = models.build(cfg.model, cache_dir=cfg.paths.cache_dir)
    task = datamodules.build_task(cfg, tokenizer)
    prompts = [task.prompt_format.prompt(r, []) for r in task.records("test")[: args.problems]]
    stops = list(cfg.generation.stop_strings)

    start = time.perf_counter()
    batched = [c[0] for c in generate(model, tokenizer, prompts, args.batch_size, args.max_new_tokens, stops)]
    batched_seconds = time.perf_counter() - start
    start = time.perf_counter()
    single = one_by_one(model, tokenizer, prompts, args.max_new_tokens, stops)
    single_seconds = time.perf_counter() - start

    batched_rate = count_tokens(tokenizer, batched) / batched_seconds
    single_rate = count_tokens(tokenizer, single) / single_seconds
    same = sum(a == b for a, b in zip(batched, single, strict=True))
    print(
        f"model={args.model} problems={len(prompts)} batch={args.batch_size} "
        f"max_new_tokens={args.max_new_tokens} "
        f"threads={torch.get_num_threads()}"
    )
    print(f"batched: {batched_rate:.1f} tokens/s ({batched_seconds:.1f} s)")
    print(f"one by one: {single_rate:.1f} tokens/s ({single_seconds:.1f} s)")
    print(f"identical completions: {same}/{len(prompts)}")
    print(f"ratio batched_vs_one_by_one = {batched_rate / single_rate:.2f} (goal >= 3.0)")


if __name__ == "__main__":
    main()
