"""Not a benchmark: the train.py config the bench scripts time, offline on the CPU."""

from __future__ import annotations

from pathlib import Path

from helpers import bench_data
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[2]
OFFLINE_CPU = [
    "trainer=cpu",
    "logger=csv",
    "print_config=false",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "test_after_fit=false",
]


def gsm8k_train() -> list[str]:
    """Overrides that train (and validate) on the real GSM8K train file of `--data` (bench_data.py); none
    without it (the task's bundled sample)."""
    train = bench_data.path("gsm8k", "train.jsonl")
    return [f"task.data_files={{train: {train}, test: {train}}}"] if train else []


def bench_config(overrides: list[str], run_dir: str) -> DictConfig:
    """A train.py config for timing: CPU, CSV logger, only the LR monitor callback, run dir `run_dir`."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[*OFFLINE_CPU, *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = run_dir
        cfg.callbacks = {"lr_monitor": cfg.callbacks.lr_monitor}
    return cfg
