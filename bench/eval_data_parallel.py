"""evaluate.py with `devices=N` (N processes, each with a share of the problems) against `devices=1`.

Each side is a whole `python evaluate.py` command in a fresh process (model load, generation, scoring), on
`--model` (SmolLM2-135M-Instruct) and the first `--problems` GSM8K test problems (greedy, `--max-new-tokens`),
the sides in an order shuffled per round (seeded), `--rounds` rounds; the median wall time of each side with
its spread, and how many predictions are identical. On CPU both sides share the machine's cores (N processes
of cores/N threads against one process with all of them); on a GPU node each process takes one GPU and the
goal is 0.9 x N.

    ratio data_parallel_vs_one_process = <one-process seconds / N-process seconds> (goal >= <g>)

    python bench/eval_data_parallel.py [--devices 2] [--problems 16] [--max-new-tokens 128] [--rounds 3]
    python bench/eval_data_parallel.py --quick   # tiny_llama, four problems, one round: checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from helpers import bench_data, quick

ROOT = Path(__file__).resolve().parents[1]


def evaluate(
    devices: int,
    problems: int,
    max_new_tokens: int,
    run_dir: Path,
    model: str = "smollm2_135m",
    overrides: tuple[str, ...] = (),
    python: str = sys.executable,
    env: dict[str, str] | None = None,
) -> tuple[float, list[str]]:
    """Wall seconds of one evaluate.py run with `devices` processes (and `overrides`, by `python`, with `env`
    added; forked in quick mode) and its completions, in problem order."""
    test = bench_data.path("gsm8k", "test.jsonl")
    data = f"task.data_files={{test: {test}}}" if test else "task.source=bundled"
    command = [
        "evaluate.py",
        f"model={model}",
        data,
        f"limit={problems}",
        f"generation.max_new_tokens={max_new_tokens}",
        f"devices={devices}",
        "print_config=false",
        f"hydra.run.dir={run_dir}",
        f"paths.output_dir={run_dir}",
        *overrides,
    ]
    start = time.perf_counter()
    quick.run_python(command, ROOT, {"WANDB_MODE": "offline", **(env or {})}, python)
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    return seconds, [row["generation"] for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--devices", type=int, default=max(2, torch.cuda.device_count()))
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    bench_data.add_option(parser)
    args = quick.parse(parser, model="tiny_llama", devices=2, problems=4, max_new_tokens=4, rounds=1)
    bench_data.announce("GSM8K")

    order = random.Random(args.seed)
    seconds: dict[int, list[float]] = {1: [], args.devices: []}
    completions: dict[int, list[str]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for round_number in range(args.rounds):
            sides = [1, args.devices]
            order.shuffle(sides)
            for devices in sides:
                run_dir = Path(scratch) / f"round{round_number}_devices{devices}"
                wall, completions[devices] = evaluate(
                    devices, args.problems, args.max_new_tokens, run_dir, args.model
                )
                seconds[devices].append(wall)
                print(f"round {round_number}: devices={devices} {wall:.1f} s", flush=True)
    gpu = torch.cuda.is_available()
    where = f"{args.devices} GPUs" if gpu else f"CPU, {os.cpu_count()} cores shared by the processes"
    print(
        f"model={args.model}, {args.problems} GSM8K problems, greedy, "
        f"max_new_tokens {args.max_new_tokens}, {args.rounds} rounds, {where}"
    )
    for devices, times in seconds.items():
        print(
            f"devices={devices}: median {statistics.median(times):.1f} s "
            f"(min {min(times):.1f}, max {max(times):.1f})"
        )
    same = sum(a == b for a, b in zip(completions[1], completions[args.devices], strict=True))
    print(f"identical completions: {same}/{len(completions[1])}")
    ratio = statistics.median(seconds[1]) / statistics.median(seconds[args.devices])
    goal = 0.9 * args.devices if gpu else 1.0
    print(f"ratio data_parallel_vs_one_process = {ratio:.2f} (goal >= {goal:.1f})")


if __name__ == "__main__":
    main()
