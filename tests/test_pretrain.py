"""Pre-training ablation: packing, the six experiment configs at both scales, the report from a real sweep."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

import datamodules
from analysis.ablation import main as ablation_main
from analysis.ablation import read_run, write_report
from datamodules.cosmopedia import concatenate_into_blocks
from figures.analysis import banded
from runtime.wandb_offline import find_run_files
from runtime.wandb_offline import read_run as read_wandb
from tests.conftest import compose_config, launch

EXPERIMENTS = ["baseline", "high_lr", "low_lr", "large_batch", "short_seq", "small_model"]
SPEC = {  # (lr, batch, sequence, small model) from the study
    "baseline": (3e-4, 8, 512, False),
    "high_lr": (1e-3, 8, 512, False),
    "low_lr": (1e-4, 8, 512, False),
    "large_batch": (5e-4, 16, 512, False),
    "short_seq": (3e-4, 12, 256, False),
    "small_model": (3e-4, 12, 512, True),
}


def test_packing_yields_full_blocks_without_losing_or_duplicating_tokens() -> None:
    documents = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10], [11]]
    blocks = concatenate_into_blocks(documents, block_size=4, separator=0)
    stream = [1, 2, 3, 0, 4, 5, 0, 6, 7, 8, 9, 10, 0, 11, 0]
    assert all(len(block) == 4 for block in blocks)
    assert [t for block in blocks for t in block] == stream[: len(blocks) * 4]
    assert len(stream) - len(blocks) * 4 < 4  # only the final remainder is dropped


def test_pretrain_datamodule_holds_out_validation_documents() -> None:
    cfg = compose_config("experiment=ablation_tiny/baseline", "data.val_size=6")
    from modeling import models

    _, tokenizer = models.build(cfg.model)
    datamodule = datamodules.build(cfg, tokenizer)
    datamodule.setup("fit")
    train, val = datamodule.datasets["train"], datamodule.datasets["val"]
    assert all(
        len(b["input_ids"]) == cfg.data.max_length and b["labels"] == b["input_ids"] for b in train + val
    )
    task = datamodule.task
    train_docs = {task.document(r) for r in task.records("train")}
    val_docs = {task.document(r) for r in task.records("val")}
    assert len(val_docs) == 6 and not train_docs & val_docs


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_full_scale_experiments_pin_the_study_settings(name: str) -> None:
    cfg = compose_config(f"experiment=ablation/{name}")
    lr, batch, sequence, small = SPEC[name]
    assert (cfg.optim.lr, cfg.data.batch_size, cfg.data.max_length) == (lr, batch, sequence)
    scratch = cfg.model.architecture
    assert (scratch.hidden_size, scratch.num_attention_heads, scratch.num_hidden_layers) == (
        (256, 4, 8) if small else (384, 6, 12)
    )
    assert (cfg.trainer.max_steps, cfg.trainer.val_check_interval, cfg.trainer.precision) == (
        2000,
        400,
        "bf16-mixed",
    )
    assert cfg.task.name == "cosmopedia" and cfg.model.tokenizer == "gguf"


def test_report_from_a_real_sweep_from_csv_and_from_wandb(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    launch(
        "train.py",
        "-m",
        "experiment=ablation_tiny/baseline,ablation_tiny/small_model",
        "seed=0,1",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "logger=wandb",
        "print_config=false",
        "trainer.enable_progress_bar=false",
        f"hydra.sweep.dir={tmp_path}",
    )
    before = set(find_run_files(tmp_path))  # the sweep's summary run
    monkeypatch.setattr(sys, "argv", ["analysis.ablation", str(tmp_path)])
    ablation_main()
    (report_file,) = set(find_run_files(tmp_path)) - before
    report_run, jobs = (
        read_wandb(report_file, wait=60),
        [read_wandb(find_run_files(tmp_path / n)[0]) for n in ("0", "1")],
    )
    assert report_run.job_type == "analysis" and report_run.group == jobs[0].group == jobs[1].group
    assert jobs[0].run_id != jobs[1].run_id
    assert {"training_loss_curves", "convergence"} <= {
        p.name.rsplit("_", 2)[0] for p in report_file.parent.glob("files/media/images/*.png")
    }
    paths = write_report(tmp_path)
    assert {p.name for p in paths} == {
        "performance_metrics.csv",
        "results.md",
        "research_data.json",
        "training_loss_curves.png",
        "final_performance.png",
        "efficiency.png",
        "convergence.png",
    }
    assert all(p.stat().st_size > 100 for p in paths)
    table = [line for line in (tmp_path / "results.md").read_text().splitlines() if line.startswith("| ")]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in table[1:]]
    assert [(row[0], row[1]) for row in cells] == [("baseline", "2"), ("small_model", "2")]
    configs = {row["config"]: row for row in csv.DictReader((tmp_path / "performance_metrics.csv").open())}
    seeds = [read_run(tmp_path / n) for n in ("0", "1")]  # the baseline's two seeds
    losses = [run["final"]["val_loss"] for run in seeds]
    assert {run["seed"] for run in seeds} == {0, 1} and losses[0] != losses[1]
    assert float(configs["baseline"]["val_loss"]) == pytest.approx(sum(losses) / 2)
    assert (
        float(configs["baseline"]["val_loss_low"])
        < min(losses)
        <= max(losses)
        < float(configs["baseline"]["val_loss_high"])
    )
    assert configs["baseline"]["verdict_vs_baseline"] == "baseline"
    assert configs["small_model"]["verdict_vs_baseline"] in {
        "no detectable difference",
        "lower val loss than baseline",
        "higher val loss than baseline",
    }
    research = json.loads((tmp_path / "research_data.json").read_text())
    assert len(research["runs"][0]["curves"]["train/loss_step"]) == 4
    assert [p[0] for p in research["runs"][0]["curves"]["val/loss"]] == [1.0, 3.0]
    figure, axis = plt.subplots()
    banded(axis, research["runs"], "val/loss")  # the convergence figure's curves: a band per configuration
    bands = [collection.get_paths()[0].vertices for collection in axis.collections]
    assert len(bands) == 2 and all(np.ptp(vertices[:, 1]) > 0 for vertices in bands)
    plt.close(figure)

    from_csv = read_run(tmp_path / "0")
    (tmp_path / "0" / "metrics" / "metrics.csv").unlink()
    from_wandb = read_run(tmp_path / "0")
    assert from_wandb["final"]["train_loss"] == pytest.approx(from_csv["final"]["train_loss"])
    assert from_wandb["final"]["val_loss"] == pytest.approx(from_csv["final"]["val_loss"])
