"""lmlab's GSM8K evaluation vs lm-evaluation-harness's HF backend: same prompts, same model, same outputs,
time.

Needs the optional `bench` extra (`pip install -e .[bench]`, which `make bench` does); installs nothing
itself. On the first `--problems` problems of `--data DIR`/gsm8k/test.jsonl (exemplars from train.jsonl
beside it; the bundled sample's files without `--data`):
1. lm-eval builds its `gsm8k` task's 5-shot requests (its own yaml, data read from those files) and lmlab
  builds
   `evaluate.py prompt.style=lm_eval prompt.num_fewshot=5` prompts; the count of identical prompts is
   printed.
2. Both generate greedily from lm-eval's prompt strings with one model object (SmolLM2-135M-Instruct by
  default),
   batch 8, 256 new tokens, lm-eval's stop strings: `HFLM(pretrained=model, batch_size=8).generate_until` and
   lmlab's `generate`, in alternating order, best of 2 each.
Prints the identical-completion count and
    ratio lmlab_vs_lm_eval = <lm-eval seconds / lmlab seconds> (goal >= 1.5)

    python bench/eval_vs_lm_eval.py [--problems 32] [--model smollm2_135m] [--rounds 2]
    python bench/eval_vs_lm_eval.py --quick   # tiny_llama, two bundled problems: checks the script
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
from datamodules.sources import SAMPLES_DIR  # noqa: E402
from modeling import models  # noqa: E402
from modeling.generation import generate  # noqa: E402

BATCH, SHOTS = 8, 5


def lm_eval_requests(gsm8k: Path, problems: int) -> list:
    """lm-eval's own gsm8k task (its yaml), reading the local GSM8K files, with its requests built."""
    import lm_eval.tasks
    import yaml
    from lm_eval.api.task import ConfigurableTask

    config = yaml.safe_load((Path(lm_eval.tasks.__file__).parent / "gsm8k" / "gsm8k.yaml").read_text())
    files = {"train": str(gsm8k / "train.jsonl"), "test": str(gsm8k / "test.jsonl")}
    config |= {"dataset_path": "json", "dataset_name": None, "dataset_kwargs": {"data_files": files}}
    config.pop("tag", None)
    task = ConfigurableTask(config=config)
    task.set_fewshot_seed(1234)  # simple_evaluate's default fewshot_random_seed
    task.build_all_requests(limit=problems)
    return sorted(task.instances, key=lambda instance: instance.doc_id)


def lmlab_prompts(gsm8k: Path, model_name: str, problems: int) -> tuple:
    """The model and tokenizer of `model_name`, lmlab's lm_eval-style 5-shot prompts and its stop strings."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "evaluate",
            overrides=[
                f"model={model_name}",
                "task=gsm8k",
                "prompt.style=lm_eval",
                f"prompt.num_fewshot={SHOTS}",
                # lm-eval's plain-text prompts (its run below applies no chat template)
                "prompt.chat_template=false",
                f"task.data_files={{train: {gsm8k / 'train.jsonl'}, test: {gsm8k / 'test.jsonl'}}}",
            ],
        )
    model, tokenizer = models.build(cfg.model, cache_dir=cfg.paths.cache_dir)
    task = datamodules.build_task(cfg, tokenizer)
    records = task.evaluation_records()[:problems]
    exemplars = task.prompt_format.fewshot_exemplars(records, SHOTS, cfg.prompt.fewshot_seed)
    prompts = [task.prompt_format.prompt(r, shots) for r, shots in zip(records, exemplars, strict=True)]
    stops = task.prompt_format.stop_strings(list(cfg.generation.stop_strings))
    return model, tokenizer, prompts, stops


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--problems", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    bench_data.add_option(parser)
    args = quick.parse(parser, model="tiny_llama", problems=2, rounds=1, max_new_tokens=4)
    bench_data.announce("GSM8K")
    try:
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        sys.exit("bench/eval_vs_lm_eval.py needs lm-eval: pip install -e '.[bench]'")
    gsm8k = bench_data.path("gsm8k") or SAMPLES_DIR / "gsm8k"

    requests = lm_eval_requests(gsm8k, args.problems)
    model, tokenizer, prompts, stops = lmlab_prompts(gsm8k, args.model, args.problems)
    theirs = [r.args[0] for r in requests]
    print(f"identical prompts: {sum(a == b for a, b in zip(prompts, theirs, strict=True))}/{len(prompts)}")
    print(f"stop strings: lmlab {stops}, lm-eval {requests[0].args[1]['until']}")
    harness = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=BATCH, max_gen_toks=args.max_new_tokens)

    def run_lm_eval() -> list[str]:
        return harness.generate_until(requests, disable_tqdm=True)

    def run_lmlab() -> list[str]:
        return [c[0] for c in generate(model, tokenizer, theirs, BATCH, args.max_new_tokens, stops)]

    seconds: dict[str, list[float]] = {"lm_eval": [], "lmlab": []}
    outputs: dict[str, list[str]] = {}
    for round_index in range(args.rounds):
        order = [("lm_eval", run_lm_eval), ("lmlab", run_lmlab)]
        for name, job in order if round_index % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            outputs[name] = job()
            seconds[name].append(time.perf_counter() - start)
            print(f"round {round_index + 1}: {name} {seconds[name][-1]:.1f} s", flush=True)

    same = sum(a == b for a, b in zip(outputs["lmlab"], outputs["lm_eval"], strict=True))
    best = {name: min(times) for name, times in seconds.items()}
    print(
        f"model={args.model} problems={len(prompts)} batch={BATCH} max_new_tokens={args.max_new_tokens} "
        f"threads={torch.get_num_threads()}"
    )
    print(
        f"lm-eval HFLM.generate_until: {best['lm_eval']:.1f} s; lmlab generate: {best['lmlab']:.1f} s (best "
        f"of {args.rounds})"
    )
    print(f"identical completions: {same}/{len(prompts)}")
    print(f"ratio lmlab_vs_lm_eval = {best['lm_eval'] / best['lmlab']:.2f} (goal >= 1.5)")


if __name__ == "__main__":
    main()
