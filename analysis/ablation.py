"""Report of a pre-training ablation sweep: curves, final comparison, efficiency, convergence, tables, over
seeds.

    python train.py -m task=cosmopedia
    experiment=ablation/baseline,ablation/high_lr,ablation/low_lr,ablation/large_batch,ablation/short_seq,ablation/small_model
    seed=0,1,2,3,4
    python -m analysis.ablation multirun/cosmopedia/<time>     # the report, written into that directory

(ablation_tiny/*: the same six at CPU scale, seed=0,1,2.)

Reads every job's metrics from its CSV log (`metrics/metrics.csv`) or, when there is none, from its
offline W&B run file, and its config from `config.yaml`. Jobs of one configuration (its run name) with
different seeds are one row: each final metric's mean with its t interval over seeds, and a verdict on the
validation loss against the baseline (paired t over common seeds, else Welch; Holm-adjusted over the
configurations; stats/estimates.py). Writes `training_loss_curves.png` and `convergence.png` (mean over
seeds with a band of one s.d.), `final_performance.png` (means with their intervals), `efficiency.png`,
`results.md`, `performance_metrics.csv` and `research_data.json` (every run's config, final metrics and
curves, for re-plotting elsewhere).
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
from omegaconf import DictConfig, OmegaConf

from figures.analysis import ablation_figures
from runtime.results import logged_rows
from runtime.session import start_report
from stats import comparisons, seed_statistics, tables

CURVES = (
    "train/loss_step",
    "val/loss",
    "val/token_acc",
    "train/grad_norm",
    "train/device/batches_per_sec",
    "train/device/items_per_sec",
)


def read_run(job_dir: Path) -> dict[str, Any]:
    """One run: its name (its configuration's), seed, config, curves (metric -> [(step, value)]) and final
    metrics."""
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
        "seed": config.get("seed"),
        "job_dir": str(job_dir),
        "settings": settings,
        "config": config,
        "final": final,
        "curves": {k: [list(p) for p in v] for k, v in curves.items()},
    }


FINAL = ("train_loss", "val_loss", "val_token_acc", "val_perplexity", "steps_per_s", "tokens_per_s")
VERDICT_METRIC = "val_loss"  # lower is better


def configurations(runs: list[dict[str, Any]], settings: DictConfig, baseline: str) -> list[dict[str, Any]]:
    """One row per configuration: its settings, seeds, each final metric's mean, s.d. and t interval over
    seeds, and the verdict on the validation loss against `baseline`."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        groups[run["name"]].append(run)
    by_seed = {
        name: {
            run["seed"]: run["final"][VERDICT_METRIC]
            for run in members
            if run["final"][VERDICT_METRIC] is not None
        }
        for name, members in groups.items()
    }
    adjusted = seed_statistics.against_reference(by_seed, baseline)
    rows = []
    for name, members in groups.items():
        row: dict[str, Any] = {"config": name, **members[0]["settings"], "seeds": len(members)}
        for key in FINAL:
            values = [run["final"][key] for run in members if run["final"][key] is not None]
            summary = seed_statistics.over_seeds(values, settings.confidence) if values else {}
            row |= {key: summary.get("mean"), f"{key}_std": summary.get("std")}
            row |= {f"{key}_low": summary.get("low"), f"{key}_high": summary.get("high")}
        rows.append(row)
    reference = next(row[VERDICT_METRIC] for row in rows if row["config"] == baseline)
    for row in rows:
        p_holm = adjusted.get(row["config"])
        if row["config"] == baseline:
            verdict = "baseline"
        elif row[VERDICT_METRIC] is None or reference is None:
            verdict = "no validation loss"
        elif p_holm is None:
            verdict = "seed variance not estimated"
        elif p_holm >= 1 - settings.confidence:
            verdict = "no detectable difference"
        else:
            verdict = f"{'lower' if row[VERDICT_METRIC] < reference else 'higher'} val loss than baseline"
        row |= {"verdict_vs_baseline": verdict, "p_holm_vs_baseline": p_holm}
    return rows


def write_report(sweep_dir: Path, settings: DictConfig | None = None) -> list[Path]:
    """Read every job of `sweep_dir` and write the figures and tables into it."""
    settings = settings or comparisons.default_settings()
    jobs = sorted((p for p in sweep_dir.iterdir() if (p / "config.yaml").exists()), key=lambda p: p.name)
    if not jobs:
        raise FileNotFoundError(
            f"{sweep_dir}: no job directories with a config.yaml (is this a multirun dir?)"
        )
    runs = [read_run(job) for job in jobs]
    names = list(dict.fromkeys(run["name"] for run in runs))
    baseline = "baseline" if "baseline" in names else names[0]
    rows = configurations(runs, settings, baseline)
    table = sweep_dir / "performance_metrics.csv"
    note = (
        f"{len(runs)} runs in {len(rows)} configurations. Each metric: mean "
        f"[{settings.confidence:.0%} t interval] over the configuration's seeds (none with one seed: its "
        f"seed variance is not estimated). verdict_vs_baseline compares the validation loss with "
        f"{baseline}'s (paired t over common seeds, else Welch; Holm-adjusted over the configurations)."
    )
    shown = [
        {
            "config": row["config"],
            "seeds": row["seeds"],
            **{
                key: tables.with_interval(row[key], row[f"{key}_low"], row[f"{key}_high"], 4)
                for key in FINAL[:4]
            },
            "steps_per_s": row["steps_per_s"],
            "verdict_vs_baseline": row["verdict_vs_baseline"],
        }
        for row in rows
    ]
    paths = tables.write(rows, table, "Pre-training ablation", note, shown, sweep_dir / "results.md")
    research = sweep_dir / "research_data.json"
    research.write_text(json.dumps({"runs": runs}, indent=1, default=str) + "\n")
    return [*paths, research, *ablation_figures(runs, rows, sweep_dir)]


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
