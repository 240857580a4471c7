"""The GSM8K noise-robustness study as one command: zero-shot -> SFT -> re-evaluation -> attention -> report.

    python -m analysis.noise_study                              # DiffLlama-375M vs Llama-375M
    python -m analysis.noise_study study=diffllama_noise_quick  # tiny models, CPU, a few minutes
    python -m analysis.noise_study study.sft=false study.attention=false   # zero-shot Pass@1 only

Every step is an ordinary train.py / evaluate.py / analysis.attention job composed from the same config
groups, with its own run dir under the study dir. The study dir gets `zero_shot_performance.csv`,
`sft_performance.csv` and their charts, `study_summary.csv` (Pass@1 per model and dataset before and
after SFT), `attention_allocation.csv` + `attention_allocation.png` (KMI / NI / OC shares of every model,
base and fine-tuned, on every noisy set) and `study_report.md`, which states per stage and noise type
whether the first model (differential attention) was more robust than the second: the drop from clean
to noisy Pass@1 of each, the difference of the drops with a paired interval over problems (the clean and
noisy versions of a problem stay together), its p-value Holm-adjusted over the rows, the number of problems
and a verdict only where the data support one (stats/estimates.py); every Pass@1 with its interval.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra import compose
from omegaconf import DictConfig, open_dict

from analysis import allocation, attention
from analysis.noise_report import report
from evaluation import evaluate, predictions, task_grid
from figures import analysis as plots
from runtime import training
from runtime.session import overrides, start
from stats import estimates, item_scores

log = logging.getLogger(__name__)


def _job(config_name: str, overrides: list[str], run_dir: Path) -> DictConfig:
    cfg = compose(config_name=config_name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    return cfg


def _stage(study: DictConfig, study_dir: Path, stage: str, model: str, ckpt: list[str]) -> tuple[list, list]:
    """Evaluate `model` (base or `ckpt`) on every task, then analyse its attention on the noisy ones."""
    common = list(study.common)
    results = [
        evaluate.run(
            _job(
                "evaluate",
                [*common, *study.evaluate, f"model={model}", f"task={task}", *ckpt],
                study_dir / stage / model / task,
            )
        )
        for task in study.tasks
    ]
    allocations = []
    if study.attention:
        for task in [t for t in study.tasks if t != study.baseline_task]:
            cfg = _job(
                "attention",
                [*common, *study.attention_overrides, f"model={model}", f"task={task}", *ckpt],
                study_dir / stage / model / f"attention_{task}",
            )
            allocations.append({"stage": stage, **attention.analyse(cfg)})
    return results, allocations


def run_study(study: DictConfig, study_dir: Path, settings: DictConfig) -> list[dict[str, Any]]:
    """Run every stage of `study` under `study_dir`; write the tables, figures and report; return the summary
    rows."""
    results: list[dict[str, Any]] = []
    allocations: list[dict[str, Any]] = []
    for model in study.models:
        stages = [("zero_shot", [])]
        if study.sft:
            trained = training.run(
                _job(
                    "train",
                    [*study.common, *study.train, f"model={model}", "task=gsm8k"],
                    study_dir / "sft" / model / "train",
                )
            )
            stages.append(("sft", [f"ckpt={trained['final_dir']}"]))
        for stage, ckpt in stages:
            stage_results, stage_allocations = _stage(study, study_dir, stage, model, ckpt)
            results += stage_results
            allocations += stage_allocations
    rows = write_tables(results, study_dir, study.baseline_task, settings)
    if allocations:
        write_allocations(allocations, study_dir)
    comparisons = robustness(results, list(study.models), study.report.mode, study.baseline_task, settings)
    (study_dir / "study_report.md").write_text(report(study, rows, comparisons, allocations, settings))
    return rows


def write_tables(
    results: list[dict[str, Any]], study_dir: Path, baseline: str, settings: DictConfig
) -> list[dict[str, Any]]:
    """Per-stage performance tables, comparisons and charts (drops from `baseline`), and the before/after
    `study_summary.csv`."""
    task_grid.write_grid(results, study_dir, baseline, settings)
    rows = []
    for result in results:
        bounds = {}
        for key, interval in result.get("intervals", {}).items():
            bounds |= {f"{key}_low": interval["low"], f"{key}_high": interval["high"]}
        rows.append(
            {
                "stage": result["stage"],
                "model": result["model"],
                "dataset": result["task"],
                **result["metrics"],
            }
            | bounds
        )
    with (study_dir / "study_summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def robustness(
    results: list[dict[str, Any]], models: list[str], mode: str, baseline: str, settings: DictConfig
) -> list[dict[str, Any]]:
    """Per stage and noise type: each model's drop from the clean `baseline` task to the noisy one, and the
    first model's advantage with its interval, test and verdict (Holm-adjusted over the rows).

    advantage = drop(second model) - drop(first model): positive when the first model loses less to the
    noise. Problems are paired by item id (a clean problem and its noisy version share it), so the interval
    is the paired t interval over problems of the per-problem advantage (stats/estimates.py).
    """
    if len(models) < 2:
        return []
    first, second = models[:2]
    by_key = {(r["stage"], r["model"], r["task"]): r for r in results}
    rows, compared = [], []
    for stage in dict.fromkeys(r["stage"] for r in results):
        for task in dict.fromkeys(r["task"] for r in results if r["task"] != baseline):
            keys = [(stage, m, t) for m in (first, second) for t in (baseline, task)]
            if not all(k in by_key for k in keys):
                continue
            clean_a, noisy_a, clean_b, noisy_b = (
                predictions.read(Path(by_key[k]["run_dir"]), f"pass@1_{mode}") for k in keys
            )
            kept_a, lost_a, clusters = (np.array(v) for v in item_scores.aligned(clean_a, noisy_a))
            kept_b = np.array(item_scores.aligned(clean_a, clean_b)[1])
            lost_b = np.array(item_scores.aligned(clean_a, noisy_b)[1])
            # per problem: how much less of its clean score each model keeps under noise (the negative drop)
            comparison = estimates.paired(
                lost_a - kept_a, lost_b - kept_b, clusters, settings.confidence, settings.power
            )
            compared.append(comparison)
            rows.append(
                {
                    "stage": stage,
                    "noise": task,
                    "problems": comparison.n,
                    f"drop_{first}": float((kept_a - lost_a).mean()),
                    f"drop_{second}": float((kept_b - lost_b).mean()),
                    "advantage": comparison.difference,
                    "ci_low": comparison.low,
                    "ci_high": comparison.high,
                    "test": comparison.test,
                    "p": comparison.p,
                    "mde": comparison.mde,
                }
            )
    names = [(first, second)] * len(compared)
    for row, verdict in zip(
        rows, estimates.verdicts(compared, names, 1 - settings.confidence, "more robust"), strict=True
    ):
        row |= {"p_holm": verdict["p_holm"], "verdict": verdict["verdict"]}
    return rows


def write_allocations(allocations: list[dict[str, Any]], study_dir: Path) -> Path:
    """`attention_allocation.csv` (mean KMI / NI / OC ratio per model, stage, noisy set) and its bar chart."""
    rows = []
    for result in allocations:
        name, entry = next(iter(result["maps"].items()))
        rows.append(
            {
                "stage": result["stage"],
                "model": result["model"],
                "dataset": result["task"],
                "map": name,
                "problems": result["num_problems"],
                **{f"{c}_ratio": entry["ratio"][c]["mean"] for c in allocation.CLASSES},
                **{
                    f"{c}_ratio_{end}": entry["ratio"][c][end]
                    for c in allocation.CLASSES
                    for end in ("low", "high")
                },
                "kmi_to_ni_score": entry["kmi_vs_ni"]["kmi_to_ni"],
            }
        )
    with (study_dir / "attention_allocation.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    labelled = [{**r, "model": f"{r['model']} ({r['stage']})"} for r in allocations]
    return plots.allocation_comparison(labelled, study_dir / "attention_allocation.png")


@hydra.main(version_base="1.3", config_path="../conf", config_name="noise_study")
def main(cfg: DictConfig) -> None:
    """Hydra entrypoint of the study driver."""
    with start(cfg, job_type="analysis") as session:
        rows = run_study(cfg.study, session.run_dir, cfg.statistics)
        mode = cfg.study.report.mode
        headline = {
            f"{r['stage']}/{r['model']}/{r['dataset']}/pass@1_{mode}": r[f"pass@1_{mode}"]
            for r in rows
            if f"pass@1_{mode}" in r
        }
        session.log_metrics(headline)
        session.log_table("study_summary", rows)
        session.log_images({path.stem: path for path in sorted(session.run_dir.glob("*.png"))})
        session.finish({"study": cfg.study.name, "overrides": overrides(), "metrics": headline})


if __name__ == "__main__":
    main()
