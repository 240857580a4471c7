"""Few-shot evaluation with the shared exemplar prefix prefilled once vs every prompt prefilled in full.

lmlab's k-shot style draws one seeded set of exemplars for every problem, so all prompts start with the same
tokens. Both sides run lmlab's continuous batching on the same prompts (`--model`: SmolLM2-135M-Instruct by
default, the first `--problems` GSM8K test problems, `--shots`-shot, greedy, `--max-new-tokens`, batch
`--batch-size`), alternating order, best of `--rounds`: `generation.prefix_cache` on and off. Prints both wall
times, the prompt and prefix lengths, how many completions are identical, and

    ratio prefix_cache_vs_full_prefill = <full-prefill seconds / prefix-cache seconds> (goal >= 1.5)

    python bench/eval_prefix_cache.py [--problems 32] [--shots 5] [--max-new-tokens 256]
    python bench/eval_prefix_cache.py --quick   # tiny_llama, two problems, four tokens: checks the script
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
from modeling.generation import generate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--problems", type=int, default=32)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    bench_data.add_option(parser)
    args = quick.parse(
        parser, model="tiny_llama", problems=2, shots=1, batch_size=2, max_new_tokens=4, rounds=1
    )
    bench_data.announce("GSM8K")

    data = bench_data.gsm8k_overrides()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "evaluate", overrides=[f"model={args.model}", *data, f"prompt.num_fewshot={args.shots}"]
        )
    model, tokenizer = models.build(cfg.model, cache_dir=cfg.paths.cache_dir)
    task = datamodules.build_task(cfg, tokenizer)
    records = task.evaluation_records()[: args.problems]
    exemplars = task.prompt_format.fewshot_exemplars(records, args.shots, cfg.prompt.fewshot_seed)
    prompts = [task.prompt_format.prompt(r, shots) for r, shots in zip(records, exemplars, strict=True)]
    stops = task.prompt_format.stop_strings(list(cfg.generation.stop_strings))
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    prefix = len(
        tokenizer(task.prompt_format.prompt(records[0], exemplars[0]).rsplit("Question:", 1)[0])["input_ids"]
    )

    seconds: dict[bool, float] = {}
    outputs: dict[bool, list[list[str]]] = {}
    for round_number in range(args.rounds):
        for shared in [True, False] if round_number % 2 == 0 else [False, True]:
            start = time.perf_counter()
            outputs[shared] = generate(
                model, tokenizer, prompts, args.batch_size, args.max_new_tokens, stops, prefix_cache=shared
            )
            seconds[shared] = min(seconds.get(shared, float("inf")), time.perf_counter() - start)
            print(f"round {round_number}: prefix_cache={shared} {time.perf_counter() - start:.1f} s")
    same = sum(a == b for a, b in zip(outputs[True], outputs[False], strict=True))
    print(
        f"model={args.model}, {len(prompts)} problems, {args.shots}-shot, batch {args.batch_size}, "
        f"max_new_tokens {args.max_new_tokens}, threads={torch.get_num_threads()}"
    )
    print(f"prompt tokens: mean {sum(lengths) / len(lengths):.0f}, shared exemplar prefix about {prefix}")
    print(
        f"prefix cache: {seconds[True]:.1f} s; full prefill: {seconds[False]:.1f} s; identical completions "
        f"{same}/{len(prompts)}"
    )
    print(f"ratio prefix_cache_vs_full_prefill = {seconds[False] / seconds[True]:.2f} (goal >= 1.5)")


if __name__ == "__main__":
    main()
