"""FSDP against DDP on two CPU processes: the same losses at every step, and the speed of each.

Runs train.py twice with the same seed, data and steps (tiny_llama by default, 2 CPU processes over gloo,
float32): `trainer=ddp` (the baseline) and `trainer=fsdp` (one unit per decoder layer, activation
checkpointing), for `--method` full and lora. A step's losses agree when they are equal to a relative 1e-5
(the two reduce gradients in a different order, which moves float32 sums in the last bits). Steps/s is the
number of optimizer steps after the first (warm-up) divided by the time between their log rows.
Prints each step's two losses, the steps/s of both and their quotient (FSDP gathers every unit's weights
for the forward and again for the backward pass: on CPU it is expected to be slower; no goal), then:
    ratio fsdp_vs_ddp_loss_match = <share of steps whose losses agree> (goal >= 1.0)

    python bench/fsdp_vs_ddp.py [--steps 12] [--model tiny_llama] [--methods full,lora]
    python bench/fsdp_vs_ddp.py --quick   # two steps, LoRA only: checks the script
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from helpers import quick  # noqa: E402

COMMON = [
    "task.source=bundled",
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "print_config=false",
    "data.max_length=512",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.precision=32-true",
    "test_after_fit=false",
    "trainer.max_epochs=1000",
]
TOLERANCE = 1e-5


def run(strategy: str, method: str, model: str, steps: int, run_dir: Path) -> tuple[list[float], float]:
    """Per-step training losses of one train.py run and its wall time (seconds)."""
    command = [
        "train.py",
        *COMMON,
        f"trainer={strategy}",
        f"method={method}",
        f"model={model}",
        f"trainer.max_steps={steps}",
        f"data.max_train_samples={8 * steps}",
        f"hydra.run.dir={run_dir}",
        f"paths.cache_dir={run_dir.parent / 'cache'}",
    ]
    started = time.perf_counter()
    result = quick.run_python(command, env={"WANDB_MODE": "offline"}, check=False)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{strategy} {method} failed:\n{result.stderr[-3000:]}")
    with (run_dir / "metrics" / "metrics.csv").open() as handle:
        losses = [
            float(row["train/loss_step"]) for row in csv.DictReader(handle) if row.get("train/loss_step")
        ]
    return losses, elapsed


def steps_per_second(run_dir: Path) -> float:
    """Optimizer steps per second after the first step, from ThroughputMonitor's per-step time."""
    with (run_dir / "metrics" / "metrics.csv").open() as handle:
        times = [float(row["train/time"]) for row in csv.DictReader(handle) if row.get("train/time")]
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--model", default="tiny_llama")
    parser.add_argument("--methods", default="full,lora")
    args = quick.parse(parser, steps=2, methods="lora")
    agree = total = 0
    speeds: dict[str, list[float]] = {"ddp": [], "fsdp": []}
    with tempfile.TemporaryDirectory() as scratch:
        for method in args.methods.split(","):
            losses = {}
            for strategy in ("ddp", "fsdp"):
                run_dir = Path(scratch) / f"{method}-{strategy}"
                losses[strategy], elapsed = run(strategy, method, args.model, args.steps, run_dir)
                speeds[strategy].append(steps_per_second(run_dir))
                print(
                    f"{method:5s} {strategy:4s}: {len(losses[strategy])} steps, {speeds[strategy][-1]:.2f} "
                    f"steps/s ({elapsed:.1f} s with start-up)"
                )
            for step, (ddp, fsdp) in enumerate(zip(losses["ddp"], losses["fsdp"], strict=True)):
                same = abs(fsdp - ddp) <= TOLERANCE * abs(ddp)
                agree, total = agree + same, total + 1
                print(
                    f"  {method} step {step:2d}: ddp {ddp:.7f} fsdp {fsdp:.7f} "
                    f"{'agree' if same else 'DIFFER'}"
                )
    ddp_speed, fsdp_speed = (sum(speeds[s]) / len(speeds[s]) for s in ("ddp", "fsdp"))
    print(
        f"steps/s (mean over {args.methods}): ddp {ddp_speed:.2f}, fsdp {fsdp_speed:.2f}, fsdp/ddp "
        f"{fsdp_speed / ddp_speed:.3f}"
    )
    print(f"ratio fsdp_vs_ddp_loss_match = {agree / total:.3f} (goal >= 1.0)")


if __name__ == "__main__":
    main()
