"""Kill a tiny training run at random points, resume it, and count how often it ends bit-identical.

Baseline: one uninterrupted run. Then `--trials` runs (default 20), each killed once with SIGINT or SIGKILL,
at a seeded random point: in the middle of a checkpoint write (writes are slowed and announced by
bench/helpers/announced_writes.py) or between steps after a write finished. After each kill:
- lost: the run had finished writing `last.ckpt`, and now it is missing or does not load;
- identical: resuming from `last.ckpt` ends with exactly the baseline's trainable weights.
Prints each trial and:
    ratio exact_resume_share = <identical / trials> (goal >= 1.0)
    ratio lost_checkpoint_share = <lost / trials> (goal <= 0.0)

    python bench/fault_tolerance.py [--trials 20] [--seed 0]
    python bench/fault_tolerance.py --quick   # one trial: checks the script
"""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from helpers import forked, quick  # noqa: E402

from runtime.checkpointing import CheckpointError, load_checkpoint_file  # noqa: E402

# tiny_llama + LoRA with dropout on; 20 examples in batches of 4 (5 steps an epoch), 4 epochs, last.ckpt every
# 2 steps, best-*.ckpt after every validation
RUN = [
    "task.source=bundled",
    "trainer=cpu",
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "print_config=false",
    "trainer.enable_model_summary=false",
    "model=tiny_llama",
    "method=lora",
    "method.dropout=0.1",
    "trainer.max_epochs=4",
    "data.max_train_samples=20",
    "data.val_size=8",
    "test_after_fit=false",
    "callbacks.last_checkpoint.every_n_train_steps=2",
]


def train(run_dir: Path, *extra: str, announced: bool = False) -> subprocess.Popen | forked.Started:
    script = ROOT / "bench" / "helpers" / "announced_writes.py" if announced else ROOT / "train.py"
    command = [
        str(script),
        *RUN,
        *extra,
        f"hydra.run.dir={run_dir}",
        f"paths.cache_dir={run_dir.parent / 'cache'}",
    ]
    return quick.start_python(command, {"WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"})


def final_adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "adapter_model.safetensors")


def kill_during_run(run_dir: Path, rng: random.Random) -> tuple[str, str, int, bool]:
    """Start an announced run, kill it at a random point; return (signal, where, writes finished, last.ckpt
    written)."""
    kind = rng.choice([signal.SIGINT, signal.SIGKILL])
    during_write = rng.random() < 0.5
    target = rng.randint(2, 9)  # the n-th write (there are about 20 in the run)
    process = train(run_dir, announced=True)
    finished, last_written, where = 0, False, "the run ended first"
    for line in process.stdout:
        if line.startswith("WROTE "):
            finished += 1
            last_written |= line.strip().endswith("last.ckpt")
        if during_write and line.startswith("WRITING ") and finished >= target and last_written:
            time.sleep(rng.uniform(0.0, 0.4))  # the write pauses 0.5 s half-way
            where = f"during write of {Path(line.split()[1]).name}"
            break
        if not during_write and line.startswith("WROTE ") and finished >= target and last_written:
            time.sleep(rng.uniform(0.0, 1.5))
            where = f"after write {finished}"
            break
    if process.poll() is None:
        process.send_signal(kind)
    threading.Thread(target=process.stdout.read, daemon=True).start()
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    return kind.name, where, finished, last_written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = quick.parse(parser, trials=1)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        baseline = train(root / "baseline")
        baseline.communicate()
        assert baseline.returncode == 0, "the uninterrupted baseline run failed"
        reference = final_adapter(root / "baseline")

        identical = lost = 0
        for trial in range(args.trials):
            rng = random.Random(args.seed * 1000 + trial)
            run_dir = root / f"trial{trial}"
            kind, where, writes, last_written = kill_during_run(run_dir, rng)
            last = run_dir / "checkpoints" / "last.ckpt"
            try:
                step = load_checkpoint_file(last)["global_step"]
            except CheckpointError as error:
                lost += int(last_written)
                print(f"trial {trial:2d}: {kind} {where}: last.ckpt unusable ({error})")
                continue
            resume = train(root / f"resumed{trial}", f"ckpt_path={last}")
            resume.communicate()
            same = resume.returncode == 0 and all(
                torch.equal(reference[k], v) for k, v in final_adapter(root / f"resumed{trial}").items()
            )
            identical += int(same)
            print(
                f"trial {trial:2d}: {kind} {where} (writes finished {writes}): resumed from step {step}, "
                f"{'identical' if same else 'DIFFERENT'} final weights"
            )

    print(f"ratio exact_resume_share = {identical / args.trials:.3f} (goal >= 1.0)")
    print(f"ratio lost_checkpoint_share = {lost / args.trials:.3f} (goal <= 0.0)")


if __name__ == "__main__":
    main()
