"""Hyperparameter search: an Optuna sweep reports its best trial and TensorBoard shows every trial; the value
a sweeper gets is the metric `optimized_metric` names."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from runtime import session as lifecycle
from runtime.results import read_results
from tests.conftest import TINY, launch, only_run


def test_optuna_search_reports_its_best_trial_and_tensorboard_shows_every_trial(tmp_path: Path) -> None:
    launch(
        "train.py",
        "hparams_search=lora_lr_bs",
        *TINY,
        "model=tiny_llama",
        "logger=[wandb,tensorboard]",
        "data.max_train_samples=8",
        "trainer.max_steps=2",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.sampler.n_startup_trials=2",
        f"hydra.sweep.dir={tmp_path}",
        f"paths.cache_dir={tmp_path / 'cache'}",
    )
    jobs = sorted(p.parent for p in tmp_path.glob("*/results.json"))
    assert [job.name for job in jobs] == ["0", "1", "2"]
    losses = [read_results(job)["metrics"]["val/loss"] for job in jobs]
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(min(losses), rel=1e-6)
    best_job = jobs[losses.index(min(losses))]
    assert best["best_params"]["optim.lr"] == pytest.approx(
        yaml.safe_load((best_job / "config.yaml").read_text())["optim"]["lr"]
    )
    assert len({only_run(job).run_id for job in jobs}) == 3
    for job, loss in zip(jobs, losses, strict=True):
        events = EventAccumulator(str(job / "tensorboard"))
        events.Reload()
        assert {"train/loss_step", "val/loss"} <= set(events.Tags()["scalars"])
        assert events.Scalars("final/val/loss")[-1].value == pytest.approx(loss, rel=1e-6)
        start = plugin_data_pb2.HParamsPluginData.FromString(
            events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        ).session_start_info
        lr = yaml.safe_load((job / "config.yaml").read_text())["optim"]["lr"]
        assert start.hparams["optim.lr"].number_value == pytest.approx(lr)
        assert start.hparams["data.batch_size"].number_value in (4, 8, 16)


def test_optimized_metric_names_the_value_a_sweeper_gets(caplog: pytest.LogCaptureFixture) -> None:
    assert lifecycle.optimized_value({"metrics": {"val/loss": 2.5}}, "val/loss") == 2.5
    assert math.isnan(lifecycle.optimized_value({"metrics": {"val/loss": 2.5}, "run_dir": "x"}, "val/los"))
    assert "optimized_metric='val/los' is not among this run's metrics (val/loss)" in caplog.text
    assert [
        lifecycle.metric_direction(m) for m in ("val/loss", "val/ppl", "accuracy", "pass@1_flexible")
    ] == ["minimize", "minimize", "maximize", "maximize"]
