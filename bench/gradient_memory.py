"""Peak memory of full fine-tuning through train.py with the gradients freed right after each optimiser step
(lmlab) against Lightning's own order, which frees them only after the next step's forward.

Same model (experiment ablation/baseline by default: Llama 384/6/12, 40.1M parameters, float32), same packed
blocks, `--warmup` + `--steps` optimiser steps. Each side runs in its own fresh process (`--side`), the two in
an order shuffled per round; the baseline side is lmlab with its `optimizer_step` override removed, i.e.
Lightning's order. Measured per side: the peak over training minus the memory held just before it (on CUDA
`torch.cuda.max_memory_allocated`, on CPU the resident set sampled every 5 ms), median over the rounds.

    ratio peak_training_memory_vs_lightning_order = <lmlab peak increase / Lightning order's> (goal <= 1.0)
    ratio gradient_memory_freed_share = <(Lightning order's peak - lmlab's) / gradient bytes> (goal >= 0.5)

python bench/gradient_memory.py [--experiment ablation/baseline] [--steps 3] [--rounds 3] [--batch 2]
python bench/gradient_memory.py --quick   # ablation_tiny, two steps, one round: checks the script"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from helpers import quick  # noqa: E402
from helpers.memory import PeakMemory, resident_mib  # noqa: E402
from helpers.sides import lmlab_fit, report, run_rounds  # noqa: E402
from pretrain_throughput import setup  # noqa: E402

from lightning_modules.base import OptimisedModule  # noqa: E402

SIDES = ["lmlab", "lightning_order"]


def side(args: argparse.Namespace, run_dir: str) -> None:
    if args.side == "lightning_order":
        del OptimisedModule.optimizer_step  # Lightning's own LightningModule.optimizer_step
    cfg, model, datamodule = setup(args, run_dir)
    gradients = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    if torch.cuda.is_available():
        model.cuda()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        lmlab_fit(cfg, model, datamodule, args.warmup)
        increase = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        before = resident_mib()
        with PeakMemory() as memory:
            lmlab_fit(cfg, model, datamodule, args.warmup)
        increase = memory.peak - before
    report(args.out, increase_mib=increase, gradient_mib=gradients / 2**20)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--experiment", default="ablation/baseline")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--side", choices=SIDES)
    parser.add_argument("--out")
    args = quick.parse(parser, experiment="ablation_tiny/baseline", steps=2, warmup=1, rounds=1)
    if args.side:
        with tempfile.TemporaryDirectory() as run_dir:
            side(args, run_dir)
        return
    shared = ["--experiment", args.experiment, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    reports = run_rounds(Path(__file__), SIDES, args.rounds, args.seed, [*shared, "--batch", str(args.batch)])
    peaks = {}
    for name, runs in reports.items():
        increases = [run["increase_mib"] for run in runs]
        peaks[name] = statistics.median(increases)
        listed = ", ".join(f"{value:.0f}" for value in increases)
        print(f"{name}: peak over training {peaks[name]:.0f} MiB above the start (median; rounds: {listed})")
    gradient_mib = reports["lmlab"][0]["gradient_mib"]
    print(f"experiment={args.experiment} batch={args.batch}, gradients {gradient_mib:.0f} MiB")
    ratio = peaks["lmlab"] / peaks["lightning_order"]
    freed = (peaks["lightning_order"] - peaks["lmlab"]) / gradient_mib
    print(f"ratio peak_training_memory_vs_lightning_order = {ratio:.3f} (goal <= 1.0)")
    print(f"ratio gradient_memory_freed_share = {freed:.3f} (goal >= 0.5)")


if __name__ == "__main__":
    main()
