"""Report of a pre-training ablation sweep: curves, final comparison, efficiency, convergence, tables.

    python train.py -m task=cosmopedia
    experiment=ablation/baseline,ablation/high_lr,ablation/low_lr,ablation/large_batch,ablation/short_seq,ablation/small_model
    python -m analysis.ablation multirun/cosmopedia/<time>     # the report, written into that directory

(ablation_tiny/*: the same six at CPU scale.)

Reads every job's metrics from its CSV log (`metrics/metrics.csv`) or, when there is none, from its
offline W&B run file, and its config from `config.yaml`. Writes `training_loss_curves.png`,
`final_performance.png`, `efficiency.png`, `convergence.png`, `results.md`, `performance_metrics.csv`
and `research_data.json` (every run's config, final metrics and curves, for re-plotting elsewhere).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from analysis.plots import ablation_figures
from runtime.results import logged_rows
from runtime.session import start_report

CURVES = (
    "train/loss_step",
    "val/loss",
    "val/token_acc",
    "train/grad_norm",
    "train/device/batches_per_sec",
    "train/device/items_per_sec",
)


def read_run(job_dir: Path) -> dict[str, Any]:
    """One run: its name, config, curves (metric -> [(step, value)]) and final metrics."""
    config = yaml.safe_load((job_dir / "config.yaml").read_text())
    curves: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for row in logged_rows(job_dir):
        for key in CURVES:
            if key in row and math.isfinite(row[key]):
                curves[key].append((row["step"], row[key]))

    def last(key: str) -> float | None:
        return curves[key][-1][1] if curves.get(key) else None

    def mean(key: str) -> float | None:
        return sum(v for _, v in curves[key]) / len(curves[key]) if curves.get(key) else None

    val_loss = last("val/loss")
    final = {
        "train_loss": last("train/loss_step"),
        "val_loss": val_loss,
        "val_token_acc": last("val/token_acc"),
        "val_perplexity": math.exp(min(val_loss, 50.0)) if val_loss is not None else None,
        "steps_per_s": mean("train/device/batches_per_sec"),
        "tokens_per_s": mean("train/device/items_per_sec"),
    }
    name = str(config.get("run_name", job_dir.name)).split("-", 1)[-1]
    settings = {
        "model": config["model"]["name"],
        "lr": config["optim"]["lr"],
        "batch_size": config["data"]["batch_size"],
        "seq_len": config["data"]["max_length"],
        "max_steps": config["trainer"]["max_steps"],
    }
    return {
        "name": name,
        "job_dir": str(job_dir),
        "settings": settings,
        "config": config,
        "final": final,
        "curves": {k: [list(p) for p in v] for k, v in curves.items()},
    }


def write_report(sweep_dir: Path) -> list[Path]:
    """Read every job of `sweep_dir` and write the figures and tables into it."""
    jobs = sorted((p for p in sweep_dir.iterdir() if (p / "config.yaml").exists()), key=lambda p: p.name)
    if not jobs:
        raise FileNotFoundError(
            f"{sweep_dir}: no job directories with a config.yaml (is this a multirun dir?)"
        )
    runs = [read_run(job) for job in jobs]
    columns = [
        "config",
        "model",
        "lr",
        "batch_size",
        "seq_len",
        "train_loss",
        "val_loss",
        "val_token_acc",
        "val_perplexity",
        "steps_per_s",
        "tokens_per_s",
    ]
    rows = [{"config": r["name"], **r["settings"], **r["final"]} for r in runs]
    table = sweep_dir / "performance_metrics.csv"
    with table.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    shown = ["config", "train_loss", "val_token_acc", "val_perplexity", "steps_per_s"]
    lines = ["| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in shown) + " |" for row in rows]
    markdown = sweep_dir / "results.md"
    markdown.write_text(f"# Pre-training ablation ({len(runs)} runs)\n\n" + "\n".join(lines) + "\n")
    research = sweep_dir / "research_data.json"
    research.write_text(json.dumps({"runs": runs}, indent=1, default=str) + "\n")
    return [table, markdown, research, *ablation_figures(runs, sweep_dir)]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main() -> None:
    """Command line: write the ablation report of a multirun directory (and log it to the sweep's W&B group
    when its jobs logged to W&B)."""
    parser = argparse.ArgumentParser(description="Report of a pre-training ablation multirun.")
    parser.add_argument("sweep_dir", type=Path)
    sweep_dir = parser.parse_args().sweep_dir
    paths = write_report(sweep_dir)
    for path in paths:
        print(path)
    first_job = min(p for p in sweep_dir.iterdir() if (p / "config.yaml").exists())
    logger_cfg = OmegaConf.load(first_job / "config.yaml").get("logger")
    with start_report(sweep_dir, logger_cfg, "analysis", f"ablation {sweep_dir.name}") as session:
        with (sweep_dir / "performance_metrics.csv").open() as handle:
            session.log_table("ablation", list(csv.DictReader(handle)))
        session.log_images({path.stem: path for path in paths if path.suffix == ".png"})


if __name__ == "__main__":
    main()
