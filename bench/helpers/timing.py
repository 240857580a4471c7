"""Not a benchmark: step timing and the train.py stack under a clock, shared by the bench scripts."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[2]
OFFLINE_CPU = [
    "trainer=cpu",
    "logger=csv",
    "print_config=false",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "test_after_fit=false",
]


class StepClock:
    """Wall time between the start of step `warmup` and the end of the last step."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.steps = warmup, 0.0, 0.0, 0

    def step_begin(self, step: int) -> None:
        if step == self.warmup:
            self.start = time.perf_counter()

    def step_end(self, step: int) -> None:
        if step >= self.warmup:
            self.end, self.steps = time.perf_counter(), self.steps + 1

    def rate(self) -> float:
        return self.steps / (self.end - self.start)


class HFClock(TrainerCallback):
    """The step clock inside an HF Trainer."""

    def __init__(self, clock: StepClock) -> None:
        self.clock = clock

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        self.clock.step_begin(state.global_step)

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.clock.step_end(state.global_step - 1)


class LightningClock(L.Callback):
    def __init__(self, clock: StepClock) -> None:
        self.clock = clock

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.clock.step_begin(trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.clock.step_end(trainer.global_step - 1)


def bench_config(overrides: list[str], run_dir: str) -> DictConfig:
    """A train.py config for timing: CPU, CSV logger, only the LR monitor callback, run dir `run_dir`."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*OFFLINE_CPU, *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = run_dir
        cfg.callbacks = {"lr_monitor": cfg.callbacks.lr_monitor}
    return cfg


def lmlab_steps_per_second(cfg: DictConfig, model, datamodule, warmup: int) -> float:
    """Steady-state steps/s of the train.py stack (module, Trainer, callbacks, loggers) on `datamodule`."""
    from lightning_modules.base import module_settings
    from lightning_modules.task_modules import task_module_class
    from runtime.session import build_loggers
    from runtime.training import build_trainer

    clock = StepClock(warmup)
    trainer = build_trainer(cfg, model, build_loggers(cfg, "train", None))
    trainer.callbacks.append(LightningClock(clock))
    trainer.fit(task_module_class("causal_lm")(model, **module_settings(cfg)), datamodule=datamodule)
    return clock.rate()
