"""The summary of an evaluate.py `-m` grid (or of a study): one table and bar chart per stage (zero-shot,
after fine-tuning) with every model's score and its interval on every task and, when a baseline task is set,
the drop from it (with sampled completions, a pass@k / maj@k curve per run too); and one table of paired
comparisons per stage (every two models on each task, and each model's baseline task against each other task),
with verdicts Holm-adjusted across the table.

The scores are each run's Pass@1 (strict and flexible) for generation tasks, else its headline metric
(accuracy, corpus BLEU). The baseline task comes from config: `task.grid_baseline` of the evaluated tasks (the
GSM8K tasks name clean `gsm8k`, so a noise grid reports each noisy set's drop), or the study's."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from evaluation import predictions
from figures import runs as figures
from runtime.results import job_results
from runtime.session import Session
from runtime.sweeps import MultirunSummary
from stats import comparisons, tables

log = logging.getLogger(__name__)


def headline_metric(metrics: dict[str, float]) -> str:
    """The headline metric of an evaluation: flexible Pass@1 (GSM8K), accuracy (classification) or corpus
    BLEU."""
    return next(
        (key for key in ("pass@1_flexible", "accuracy", "corpus_bleu") if key in metrics), next(iter(metrics))
    )


def score_keys(metrics: dict[str, float]) -> list[str]:
    """The metrics a grid reports for a run: its `pass@1_*` scores, else its headline metric."""
    return [key for key in metrics if key.startswith("pass@1_")] or [headline_metric(metrics)]


def grid_baseline(results: list[dict[str, Any]]) -> str | None:
    """The baseline task the evaluated tasks agree on (`task.grid_baseline`, saved in results.json), or
    None."""
    named = {r.get("grid_baseline") for r in results}
    return named.pop() if len(named) == 1 else None


def performance_table(results: list[dict[str, Any]], baseline: str | None) -> list[dict[str, Any]]:
    """Rows (model, dataset, examples, each score with its interval bounds and method, its absolute /
    relative drop from `baseline`) for one stage."""
    reference = {r["model"]: r["metrics"] for r in results if r["task"] == baseline}
    rows = []
    for result in sorted(results, key=lambda r: (r["model"], r["task"] != baseline, r["task"])):
        metrics, intervals = result["metrics"], result.get("intervals", {})
        row = {
            "model": result["model"],
            "dataset": result["task"],
            "num_problems": metrics.get("num_problems", metrics.get("num_examples")),
        }
        for key in score_keys(metrics):
            name = key.removeprefix("pass@1_")
            interval = intervals.get(key, {})
            row |= {key: metrics[key], f"{key}_low": interval.get("low"), f"{key}_high": interval.get("high")}
            row["interval"] = interval.get("method")
            if baseline is None:
                continue
            base = reference.get(result["model"], {}).get(key)
            drop = None if base is None or result["task"] == baseline else base - metrics[key]
            row[f"drop_abs_{name}"] = drop
            row[f"drop_rel_{name}"] = None if drop is None or base == 0 else drop / base
        rows.append(row)
    return rows


def comparison_table(
    results: list[dict[str, Any]], baseline: str | None, settings: DictConfig
) -> list[dict[str, Any]]:
    """Paired comparisons of one stage on its headline metric: every two models on each task, and each
    model's `baseline` task against each other task (the drop, items paired by problem); Holm across all."""
    metric = headline_metric(results[0]["metrics"])
    runs = {(r["model"], r["task"]): predictions.read(Path(r["run_dir"]), metric) for r in results}
    models = list(dict.fromkeys(r["model"] for r in results))
    tasks = list(dict.fromkeys(r["task"] for r in results))
    pairs, labels = [], []
    for task in tasks:
        for i, first in enumerate(models):
            for second in models[i + 1 :]:
                if (first, task) in runs and (second, task) in runs:
                    pairs.append((runs[first, task], runs[second, task]))
                    labels.append((f"{first} on {task}", f"{second} on {task}"))
    for model in models:
        for task in tasks:
            if baseline and task != baseline and (model, baseline) in runs and (model, task) in runs:
                pairs.append((runs[model, baseline], runs[model, task]))
                labels.append((f"{model} on {baseline}", f"{model} on {task}"))
    return comparisons.table(pairs, labels, settings)


def write_grid(
    results: list[dict[str, Any]], out_dir: Path, baseline: str | None, settings: DictConfig
) -> list[Path]:
    """`<stage>_performance.csv` / `.md` / `.png` and `<stage>_comparisons.csv` / `.md` in `out_dir` for every
    stage (zero_shot, sft, edited) among `results`."""
    written = []
    for stage in sorted({r["stage"] for r in results}):
        staged = [r for r in results if r["stage"] == stage]
        rows = performance_table(staged, baseline)
        metric = headline_metric(staged[0]["metrics"])
        level = f"{settings.confidence:.0%}"
        note = f"Each score with its {level} interval [low, high] over the n problems (method: `interval`)."
        path, shown = Path(out_dir) / f"{stage}_performance.csv", [_display(row) for row in rows]
        written += tables.write(rows, path, f"{stage} performance", note, shown)
        written.append(figures.grid_bars(rows, metric, Path(out_dir) / f"{stage}_performance.png", stage))
        sampled = {
            f"{r['model']} on {r['task']}": (r["metrics"], r.get("intervals", {}))
            for r in staged
            if any(key.startswith("maj@") for key in r["metrics"])
        }
        if sampled:
            written.append(figures.pass_at_k_curves(sampled, Path(out_dir) / f"{stage}_pass_at_k.png", stage))
        try:
            if not all(r.get("run_dir") for r in staged):
                raise FileNotFoundError("the results name no run dirs to read per-item scores from")
            compared = comparison_table(staged, baseline, settings)
        except (FileNotFoundError, ValueError) as error:
            log.warning("%s: no paired comparisons (%s)", stage, error)
            continue
        if compared:
            path = Path(out_dir) / f"{stage}_comparisons.csv"
            written += tables.write(compared, path, f"{stage} comparisons", comparisons.note(settings))
    return written


def _display(row: dict[str, Any]) -> dict[str, Any]:
    """A performance row for markdown: each score as `value [low, high]`, its bounds folded in."""
    shown = {}
    for key, value in row.items():
        if key.endswith(("_low", "_high")):
            continue
        if f"{key}_low" in row:
            value = tables.with_interval(value, row[f"{key}_low"], row[f"{key}_high"])
        shown[key] = value
    return shown


class EvaluationGrid(MultirunSummary):
    """Hydra callback: after an evaluate.py `-m` grid, the sweep summary plus the per-stage tables and charts
    (one W&B table per stage in the sweep's summary run). `baseline_task` overrides the tasks'
    `grid_baseline`."""

    def __init__(self, baseline_task: str | None = None) -> None:
        super().__init__()
        self.baseline_task = baseline_task

    def report(self, sweep_dir: Path, session: Session, config: DictConfig) -> None:
        results = job_results(sweep_dir)
        baseline = self.baseline_task or grid_baseline(results)
        for path in write_grid(results, sweep_dir, baseline, config.statistics):
            if path.suffix == ".md":
                continue
            if path.suffix == ".csv":
                with path.open() as handle:
                    session.log_table(path.stem, list(csv.DictReader(handle)))
            else:
                session.log_images({path.stem: path})
