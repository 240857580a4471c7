"""The summary of an evaluate.py `-m` grid (or of a study): one table and bar chart per stage (zero-shot,
after fine-tuning) with every model's score on every task and, when a baseline task is set, the drop from it.

The scores are each run's Pass@1 (strict and flexible) for generation tasks, else its headline metric
(accuracy, corpus BLEU). The baseline task comes from config: `task.grid_baseline` of the evaluated tasks
(the GSM8K tasks name clean `gsm8k`, so a noise grid reports each noisy set's drop), or the study's.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from runtime.results import RESULTS_FILE
from runtime.session import Session
from runtime.sweeps import MultirunSummary


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
    """Rows (model, dataset, examples, each score and its absolute / relative drop from `baseline`) for one
    stage."""
    reference = {r["model"]: r["metrics"] for r in results if r["task"] == baseline}
    rows = []
    for result in sorted(results, key=lambda r: (r["model"], r["task"] != baseline, r["task"])):
        metrics = result["metrics"]
        row = {
            "model": result["model"],
            "dataset": result["task"],
            "num_problems": metrics.get("num_problems", metrics.get("num_examples")),
        }
        for key in score_keys(metrics):
            name = key.removeprefix("pass@1_")
            row[key] = metrics[key]
            if baseline is None:
                continue
            base = reference.get(result["model"], {}).get(key)
            drop = None if base is None or result["task"] == baseline else base - metrics[key]
            row[f"drop_abs_{name}"] = drop
            row[f"drop_rel_{name}"] = None if drop is None or base == 0 else drop / base
        rows.append(row)
    return rows


def write_grid(results: list[dict[str, Any]], out_dir: Path, baseline: str | None) -> list[Path]:
    """`<stage>_performance.csv` and `.png` in `out_dir` for every stage (zero_shot, sft) among `results`."""
    written = []
    for stage in sorted({r["stage"] for r in results}):
        rows = performance_table([r for r in results if r["stage"] == stage], baseline)
        path = Path(out_dir) / f"{stage}_performance.csv"
        fields = list(dict.fromkeys(key for row in rows for key in row))
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        metric = headline_metric(next(r["metrics"] for r in results if r["stage"] == stage))
        written += [path, _bar_chart(rows, metric, path.with_suffix(".png"), stage)]
    return written


def _bar_chart(rows: list[dict[str, Any]], metric: str, path: Path, stage: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    model_names = list(dict.fromkeys(r["model"] for r in rows))
    width = 0.8 / len(model_names)
    figure, axis = plt.subplots(figsize=(1.6 + 1.4 * len(datasets), 3.6))
    for i, model_name in enumerate(model_names):
        scores = {r["dataset"]: r.get(metric) or 0.0 for r in rows if r["model"] == model_name}
        axis.bar(
            [d + i * width for d in range(len(datasets))],
            [scores.get(d, 0.0) for d in datasets],
            width,
            label=model_name,
        )
    axis.set_xticks([d + width * (len(model_names) - 1) / 2 for d in range(len(datasets))], datasets)
    axis.set_ylim(0, max(0.05, 1.15 * max(r.get(metric) or 0.0 for r in rows)))
    axis.set_ylabel(metric)
    axis.set_title(f"{metric} per dataset ({stage.replace('_', '-')})")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


class EvaluationGrid(MultirunSummary):
    """Hydra callback: after an evaluate.py `-m` grid, the sweep summary plus the per-stage tables and charts
    (one W&B table per stage in the sweep's summary run). `baseline_task` overrides the tasks'
    `grid_baseline`."""

    def __init__(self, baseline_task: str | None = None) -> None:
        super().__init__()
        self.baseline_task = baseline_task

    def report(self, sweep_dir: Path, session: Session) -> None:
        results = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob(f"*/{RESULTS_FILE}"))]
        for path in write_grid(results, sweep_dir, self.baseline_task or grid_baseline(results)):
            if path.suffix == ".csv":
                with path.open() as handle:
                    session.log_table(path.stem, list(csv.DictReader(handle)))
            else:
                session.log_images({path.stem: path})
