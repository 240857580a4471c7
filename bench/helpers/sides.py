"""Not a benchmark: run the sides of a comparison each in a fresh process, in a shuffled order per round, time
their steps (the train.py stack, HF Trainer or a hand loop) and summarise the per-step times (median and
quartiles)."""

from __future__ import annotations

import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from helpers import quick
from omegaconf import DictConfig
from transformers import TrainerCallback


class StepTimes:
    """Wall time of every step from its start to the end of its optimiser step; the first `warmup` steps are
    dropped."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.times = warmup, 0.0, []
        self.step = 0

    def begin(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.start = time.perf_counter()

    def end(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if self.step >= self.warmup:
            self.times.append(time.perf_counter() - self.start)
        self.step += 1


class LightningTimes(L.Callback):
    """StepTimes inside a Lightning Trainer."""

    def __init__(self, times: StepTimes) -> None:
        self.times = times

    def on_train_batch_start(self, *unused) -> None:
        self.times.begin()

    def on_train_batch_end(self, *unused) -> None:
        self.times.end()


class HFTimes(TrainerCallback):
    """StepTimes inside an HF Trainer."""

    def __init__(self, times: StepTimes) -> None:
        self.times = times

    def on_step_begin(self, *unused, **kwargs) -> None:
        self.times.begin()

    def on_step_end(self, *unused, **kwargs) -> None:
        self.times.end()


def lmlab_fit(
    cfg: DictConfig, model: torch.nn.Module, datamodule: L.LightningDataModule, warmup: int
) -> list[float]:
    """Per-step times of the train.py stack (causal-LM module, Trainer, callbacks, loggers) fitting `model` on
    `datamodule`, the first `warmup` steps dropped."""
    from lightning_modules.base import module_settings
    from lightning_modules.task_modules import task_module_class
    from runtime.session import build_loggers
    from runtime.training import build_trainer

    times = StepTimes(warmup)
    trainer = build_trainer(cfg, model, build_loggers(cfg, "train", None))
    trainer.callbacks.append(LightningTimes(times))
    trainer.fit(task_module_class("causal_lm")(model, **module_settings(cfg)), datamodule=datamodule)
    return times.times


def report(path: str, **values: object) -> None:
    """Write a side's results (JSON) where the orchestrating process reads them."""
    Path(path).write_text(json.dumps(values))


def run_rounds(script: Path, sides: list[str], rounds: int, seed: int, args: list[str]) -> dict[str, list]:
    """Each side of `script` once per round, each run as `script --side NAME --out FILE *args` in a fresh
    process (forked in quick mode: helpers/quick.py), the sides in an order shuffled per round (seeded); each
    side's reports, one per round."""
    order = random.Random(seed)
    reports: dict[str, list] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as tmp:
        for round_number in range(rounds):
            shuffled = order.sample(sides, len(sides))
            walls = []
            for side in shuffled:
                out = Path(tmp) / f"{side}-{round_number}.json"
                start = time.perf_counter()
                done = quick.run_python([str(script), "--side", side, "--out", str(out), *args], check=False)
                if done.returncode != 0 or not out.exists():
                    raise RuntimeError(f"side {side} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
                walls.append(f"{side} {time.perf_counter() - start:.0f} s")
                reports[side].append(json.loads(out.read_text()))
            print(f"round {round_number}, each side's process start to exit: {', '.join(walls)}", flush=True)
    return reports


def summary(times: list[float]) -> tuple[float, float, float]:
    """(median, first quartile, third quartile) of per-step times."""
    first, median, third = statistics.quantiles(times, n=4, method="inclusive")
    return median, first, third


def paired_ratios(reports: dict[str, list], numerator: str, denominator: str) -> list[float]:
    """Per-step ratios `numerator` time / `denominator` time, step k of a round against step k of the same
    round: the same batch on both sides, so the batches' differing sizes cancel."""
    return [
        slow / fast
        for a, b in zip(reports[numerator], reports[denominator], strict=True)
        for slow, fast in zip(a["step_times"], b["step_times"], strict=True)
    ]


def round_ratios(reports: dict[str, list], numerator: str, denominator: str) -> list[float]:
    """Per round, `numerator`'s median step time over `denominator`'s: each round runs every side in a fresh
    process, so the rounds are the independent repeats and their spread is the ratio's uncertainty."""
    return [
        statistics.median(a["step_times"]) / statistics.median(b["step_times"])
        for a, b in zip(reports[numerator], reports[denominator], strict=True)
    ]


def paired_ratio(reports: dict[str, list], numerator: str, denominator: str) -> float | None:
    """The median of the paired per-step ratios `numerator` / `denominator` (None unless both sides ran),
    printed with its quartiles and the ratio of the two sides' medians in each round. Pairing cancels the
    batches' differing sizes and a round's machine state, which the medians pooled over rounds do not."""
    if not all(reports.get(side) and "step_times" in reports[side][0] for side in (numerator, denominator)):
        return None
    median, first, third = summary(paired_ratios(reports, numerator, denominator))
    rounds = ", ".join(f"{ratio:.3f}" for ratio in round_ratios(reports, numerator, denominator))
    spread = f"quartiles {first:.3f}..{third:.3f}"
    print(f"  {numerator} / {denominator}, paired per step: median {median:.3f} ({spread})")
    print(f"    ratio of the medians per round: {rounds}")
    return median


def print_sides(reports: dict[str, list], label: str) -> dict[str, float]:
    """Print each side's median step time with its quartiles and range over every timed step of every round;
    return the medians of the sides that ran."""
    medians = {}
    for side, runs in reports.items():
        if any("skipped" in run for run in runs):
            print(f"{label} {side}: not run: {runs[0]['skipped']}")
            continue
        times = [t for run in runs for t in run["step_times"]]
        median, first, third = summary(times)
        rounds = ", ".join(f"{statistics.median(run['step_times']):.3f}" for run in runs)
        print(
            f"{label} {side}: median {median:.3f} s/step (quartiles {first:.3f}..{third:.3f}, "
            f"range {min(times):.3f}..{max(times):.3f}, {len(times)} steps; per-round medians {rounds})"
        )
        medians[side] = median
    return medians
