"""One run lifecycle for every entrypoint: W&B runs per job and per sweep, grouped and flat-configured, the
same run after a resume, headline numbers equal to results.json (hyperparameter search:
test_hparams_search.py)."""

from __future__ import annotations

import csv
import json
import signal
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from runtime import session as lifecycle
from runtime import wandb_runs
from runtime.results import read_results
from tests.conftest import TINY, compose_config, launch, only_run


def wandb_table(run_dir: Path, key: str) -> list[dict]:
    (path,) = run_dir.glob(f"wandb/offline-run-*/files/media/table/{key}_[0-9]*.table.json")
    table = json.loads(path.read_text())
    return [dict(zip(table["columns"], row, strict=True)) for row in table["data"]]


def test_train_sweep_in_one_process_logs_one_wandb_run_per_job_in_one_group(tmp_path: Path) -> None:
    launch(
        "train.py",
        "-m",
        *TINY,
        "model=tiny_llama",
        "logger=wandb",
        "optim.lr=1e-4,3e-4",
        "data.batch_size=4,8",
        "data.max_train_samples=8",
        f"hydra.sweep.dir={tmp_path}",
        f"paths.cache_dir={tmp_path / 'cache'}",
    )
    jobs = [tmp_path / str(n) for n in range(4)]
    runs = [only_run(job) for job in jobs]
    assert len({run.run_id for run in runs}) == 4
    group = wandb_runs.sweep_group(tmp_path)
    assert {run.group for run in runs} == {group} and {run.job_type for run in runs} == {"train"}
    assert [(run.config["optim.lr"], run.config["data.batch_size"]) for run in runs] == [
        (1e-4, 4),
        (1e-4, 8),
        (3e-4, 4),
        (3e-4, 8),
    ]
    assert runs[0].tags == ["tiny_llama", "gsm8k", "lora"]
    for job, run in zip(jobs, runs, strict=True):
        assert run.summary["val/loss"] == pytest.approx(read_results(job)["metrics"]["val/loss"], rel=1e-6)
        assert read_results(job)["wandb_run_id"] == run.run_id == (job / "wandb_run_id").read_text().strip()
        assert run.exit_code == 0
    summary = only_run(tmp_path)
    assert summary.job_type == "summary" and summary.group == group
    table = wandb_table(tmp_path, "summary")
    assert [row["job"] for row in table] == ["0", "1", "2", "3"]
    assert [row["val/loss"] for row in table] == pytest.approx(
        [read_results(job)["metrics"]["val/loss"] for job in jobs]
    )
    with (tmp_path / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {"optim.lr=0.0003", "data.batch_size=8"} <= set(rows[3]["overrides"].split())
    with (tmp_path / "summary_by_config.csv").open() as handle:
        grouped = list(csv.DictReader(handle))
    # one seed per configuration: no interval, and no claim about which configurations tie with the best
    assert [row["seeds"] for row in grouped] == ["1"] * 4
    assert sorted(row["tied_with_best"] for row in grouped) == ["best"] + ["seed variance not estimated"] * 3
    assert {row["val/loss_low"] for row in grouped} == {""}
    assert [row["configuration"] for row in wandb_table(tmp_path, "summary_by_config")] == [
        row["configuration"] for row in grouped
    ]
    grouped_section = (tmp_path / "summary.md").read_text().split("## Configurations over seeds")[1]
    assert grouped_section.count("| 1 | config's |") == 4
    assert (tmp_path / "sweep.png").stat().st_size > 10_000


def test_evaluate_sweep_in_one_process_logs_metrics_and_predictions_per_job(tmp_path: Path) -> None:
    launch(
        "evaluate.py",
        "-m",
        "model=tiny_llama",
        "task=classification",
        "task.source=bundled",
        "logger=wandb",
        "print_config=false",
        "limit=2,4",
        f"hydra.sweep.dir={tmp_path}",
        f"paths.cache_dir={tmp_path / 'cache'}",
    )
    runs = [only_run(tmp_path / str(n)) for n in range(2)]
    assert len({run.run_id for run in runs}) == 2
    assert {run.group for run in runs} == {wandb_runs.sweep_group(tmp_path)} and {
        run.job_type for run in runs
    } == {"evaluate"}
    assert [run.config["limit"] for run in runs] == [2, 4]
    for job, run, size in zip((tmp_path / "0", tmp_path / "1"), runs, (2, 4), strict=True):
        result = read_results(job)
        assert result["optimized_metric"] == "accuracy"
        assert run.summary["accuracy"] == pytest.approx(result["metrics"]["accuracy"])
        assert run.summary["eval/macro_f1"] == pytest.approx(result["metrics"]["macro_f1"])
        for key in ("accuracy", "macro_f1"):  # the W&B summary carries each interval and its n
            interval = result["intervals"][key]
            assert run.summary[f"{key}/ci_low"] == pytest.approx(interval["low"])
            assert run.summary[f"{key}/ci_high"] == pytest.approx(interval["high"])
            assert run.summary[f"{key}/n"] == interval["n"] == size
        predictions = [json.loads(line) for line in (job / "predictions.jsonl").read_text().splitlines()]
        table = wandb_table(job, "predictions")
        assert len(table) == size
        assert [(r["text"], r["gold"], r["predicted"], r["correct"]) for r in table] == [
            (p["text"], p["gold"], p["predicted"], p["correct"]) for p in predictions
        ]
    summary = only_run(tmp_path)
    assert summary.job_type == "summary" and [
        row["accuracy"] for row in wandb_table(tmp_path, "summary")
    ] == [pytest.approx(read_results(tmp_path / str(n))["metrics"]["accuracy"]) for n in range(2)]


ANALYSES = {
    "attention": [
        "model=tiny_diffllama",
        "task=gsm8k_inf",
        "task.source=bundled",
        "analysis.num_problems=2",
        "analysis.maps=[diff]",
    ],
    "gradsim": ["model=tiny_llama", "task.source=bundled", "analysis.max_pieces=6"],
    "ripple": [
        "model=tiny_gpt2",
        "task.source=bundled",
        "analysis.memit.stats.source.kind=bundled",
        "analysis.memit.stats.text_field=question",
        "analysis.memit.mom2_n_samples=30",
        "analysis.num_edits=2",
        "statistics.resamples=20",
        "analysis.gradsim.max_pieces=6",
    ],
}


@pytest.mark.parametrize("name", list(ANALYSES))
def test_analysis_entrypoint_logs_its_headline_numbers_and_figures_to_wandb(
    name: str, tmp_path: Path
) -> None:
    import importlib

    cfg = compose_config(*ANALYSES[name], "logger=wandb", config_name=name)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        cfg.paths.cache_dir = str(tmp_path / "cache")
    runner = importlib.import_module(f"analysis.{name}")
    (runner.analyse if name == "attention" else runner.run)(cfg)
    run, headline = only_run(tmp_path), read_results(tmp_path)["metrics"]
    assert headline and run.job_type == "analysis" and run.group == cfg.task.name and run.exit_code == 0
    for key, value in headline.items():
        assert run.summary[key] == pytest.approx(value), key
    images = list(tmp_path.glob("wandb/offline-run-*/files/media/images/*.png"))
    assert images and all(image.stat().st_size > 1000 for image in images)


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()], ids=["error", "ctrl_c"])
def test_a_failing_run_still_ends_its_wandb_run(error: BaseException, tmp_path: Path) -> None:
    import wandb

    cfg = compose_config(
        "logger=wandb",
        "print_config=false",
        "model=tiny_llama",
        "task.source=bundled",
        config_name="evaluate",
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    with pytest.raises(type(error)), lifecycle.start(cfg, "evaluate") as session:
        session.log_metrics({"eval/partial": 1.0})
        raise error
    assert wandb.run is None
    run = only_run(tmp_path)
    assert run.exit_code == 1 and run.summary["eval/partial"] == 1.0
    assert not (tmp_path / "results.json").exists()


def test_a_logger_config_error_is_raised_before_any_model_loads(tmp_path: Path, monkeypatch) -> None:
    from evaluation import evaluate
    from modeling import models

    monkeypatch.setattr(
        models, "build", lambda *a, **k: pytest.fail("the model was loaded before the loggers")
    )
    cfg = compose_config(
        "logger=wandb",
        "model=tiny_llama",
        "task.source=bundled",
        "logger.wandb.name=${missing_key}",
        config_name="evaluate",
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    with pytest.raises(Exception, match="missing_key"):
        evaluate.run(cfg)


def test_a_resumed_run_continues_the_same_wandb_run(tiny_config, tmp_path: Path) -> None:
    from runtime.training import run
    from tests.test_resume import DROPOUT, RESUMABLE, interrupted_run

    overrides = [*RESUMABLE, *DROPOUT["lora"], "logger=wandb"]
    last = interrupted_run(tiny_config, overrides, tmp_path / "interrupted", step=7)
    first = only_run(tmp_path / "interrupted")
    assert first.exit_code == 1
    assert torch.load(last, weights_only=True)[wandb_runs.CHECKPOINT_RUN_ID_KEY] == first.run_id
    resumed = run(tiny_config(*overrides, f"ckpt_path={last}", run_dir=tmp_path / "resumed"))
    second = only_run(tmp_path / "resumed")
    assert second.run_id == first.run_id == resumed["wandb_run_id"]
    assert second.exit_code == 0
    steps = [row["trainer/global_step"] for row in second.history if "train/loss_step" in row]
    assert steps and min(steps) >= 6  # the resumed run logs the steps after the checkpoint, not from 0
    # a checkpoint copied away from its run dir still names the run
    copied = tmp_path / "elsewhere" / "checkpoints" / "last.ckpt"
    copied.parent.mkdir(parents=True)
    copied.write_bytes(last.read_bytes())
    assert wandb_runs._resumed_run_id(str(copied)) == first.run_id


def test_flat_config_has_dotted_keys_for_dashboards(tiny_config) -> None:
    flat = lifecycle.flat_config(tiny_config("optim.lr=0.123"))
    assert flat["optim.lr"] == 0.123 and flat["data.batch_size"] == 4 and flat["optim.betas"] == [0.9, 0.999]
    assert not any(isinstance(value, dict) for value in flat.values())


def test_ctrl_c_exit_code_is_not_a_success(tmp_path: Path) -> None:
    """SIGINT in a real train.py process: the W&B run ends as failed, and the run dir is named in the
    output."""
    result = launch(
        "train.py",
        *TINY,
        "model=tiny_llama",
        "logger=wandb",
        "data.max_train_samples=8",
        "+callbacks.stop._target_=tests.helpers.InterruptAtStep",
        "+callbacks.stop.step=1",
        f"hydra.run.dir={tmp_path}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        check=False,
    )
    assert result.returncode not in (0, -signal.SIGKILL)
    assert only_run(tmp_path).exit_code == 1
    assert f"run dir: {tmp_path}" in result.stdout + result.stderr


@pytest.mark.parametrize(
    "config_name", ["train", "evaluate", "attention", "gradsim", "ripple", "noise_study"]
)
@pytest.mark.parametrize("logger", ["wandb", "tensorboard"])
def test_every_entrypoint_config_resolves_its_loggers(config_name: str, logger: str, tmp_path: Path) -> None:
    """`logger=wandb` / `logger=tensorboard` compose and resolve in every entrypoint's config (names, group,
    tags)."""
    cfg = compose_config(f"logger={logger}", config_name=config_name)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    resolved = OmegaConf.to_container(cfg.logger, resolve=True)
    assert set(resolved) == {"csv", logger}
    if logger == "wandb":
        assert resolved["wandb"]["name"] == cfg.run_name and resolved["wandb"]["tags"] == list(cfg.tags)
        # no sweep: the task
        assert resolved["wandb"]["group"] == cfg.get("task", {}).get("name", cfg.run_name)
