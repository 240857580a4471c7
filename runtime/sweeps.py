"""What a `-m` sweep leaves in its directory: `summary.csv` / `summary.md` (overrides -> final metrics), the
figure `sweep.png` (every job's validation loss curve; the optimised metric against each swept parameter),
and, when the jobs logged to W&B, one `summary` run in the sweep's group holding both."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from runtime.checkpointing import write_atomically
from runtime.results import RESULTS_FILE, logged_rows
from runtime.session import Session, start_report

log = logging.getLogger(__name__)

CURVE = "val/loss"
FAILED_FILE = "failed.json"


def summarize(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job of a multirun: its overrides, then its final metrics; a failed job's row says so and
    why."""
    finished = [*Path(sweep_dir).glob(f"*/{RESULTS_FILE}"), *Path(sweep_dir).glob(f"*/{FAILED_FILE}")]
    rows = []
    for path in sorted(finished, key=lambda p: _job_number(p.parent.name)):
        result = json.loads(path.read_text())
        row = {
            "job": path.parent.name,
            "status": "failed" if path.name == FAILED_FILE else "ok",
            "overrides": " ".join(result.get("overrides", [])),
        }
        if "error" in result:
            row["error"] = result["error"]
        row.update(result.get("metrics", {}))
        row["trainable_params"] = result.get("trainable_params")
        if "diverged" in result:
            row["diverged"] = result["diverged"]
        if result.get("optimized_metric"):
            row["optimized_metric"] = result["optimized_metric"]
        rows.append(row)
    return rows


def write_summary(sweep_dir: Path, rows: list[dict[str, Any]]) -> Path:
    """Write `summary.csv` and `summary.md` (overrides -> final metrics) in the multirun directory."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(column)) for column in columns) + " |" for row in rows]
    csv_path = Path(sweep_dir) / "summary.csv"
    # jobs of a parallel launcher rewrite these as they end: replace, never half-write
    write_atomically(csv_path, lambda handle: handle.write(table.getvalue().encode()))
    write_atomically(
        Path(sweep_dir) / "summary.md", lambda handle: handle.write(("\n".join(lines) + "\n").encode())
    )
    return csv_path


def swept_parameters(rows: list[dict[str, Any]]) -> dict[str, list[str | None]]:
    """The override keys whose values differ between jobs, each with its value per row."""
    per_row = [dict(o.split("=", 1) for o in row["overrides"].split() if "=" in o) for row in rows]
    keys = dict.fromkeys(k for overrides in per_row for k in overrides)
    return {k: [o.get(k) for o in per_row] for k in keys if len({o.get(k) for o in per_row}) > 1}


def sweep_figure(sweep_dir: Path, rows: list[dict[str, Any]]) -> Path | None:
    """`sweep.png`: every job's validation loss curve on one axis, then the optimised metric against each
    swept parameter (log axis for positive numbers spanning 10x or more); None when the sweep has nothing to
    plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {row["job"]: _curve(Path(sweep_dir) / row["job"]) for row in rows}
    curves = {job: points for job, points in curves.items() if points}
    metric = next((row["optimized_metric"] for row in rows if row.get("optimized_metric")), CURVE)
    swept = swept_parameters(rows)
    parameters = swept if any(metric in row for row in rows) else {}
    if not curves and not parameters:
        return None
    panels = (1 if curves else 0) + len(parameters)
    figure, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4), squeeze=False)
    axes = list(axes[0])
    if curves:
        axis = axes.pop(0)
        for index, row in enumerate(rows):
            if row["job"] in curves:
                steps, values = zip(*curves[row["job"]], strict=True)
                label = ", ".join(f"{key}={_short(values_[index])}" for key, values_ in swept.items())
                axis.plot(steps, values, marker=".", label=f"{row['job']}: {label}"[:70])
        axis.set(xlabel="step", ylabel=CURVE, title="validation loss per job")
        axis.legend(fontsize=6)
    for axis, (key, values) in zip(axes, parameters.items(), strict=True):
        points = [
            (_number(v), row.get(metric))
            for v, row in zip(values, rows, strict=True)
            if _finite(row.get(metric))
        ]
        if all(x is not None for x, _ in points):
            axis.scatter([x for x, _ in points], [y for _, y in points])
            xs = [x for x, _ in points]
            if xs and min(xs) > 0 and max(xs) >= 10 * min(xs):
                axis.set_xscale("log")
        else:
            labels = [str(v) for v, row in zip(values, rows, strict=True) if _finite(row.get(metric))]
            axis.scatter(range(len(labels)), [y for _, y in points])
            axis.set_xticks(range(len(labels)), labels, rotation=30, fontsize=7)
        axis.set(xlabel=key, ylabel=metric, title=f"{metric} vs {key}")
    figure.tight_layout()
    path = Path(sweep_dir) / "sweep.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


class MultirunSummary(Callback):
    """Hydra callback: after a `-m` sweep, write the summary table and figure, and log both to the sweep's W&B
    group (a `summary` run) when its jobs logged to W&B. Subclasses add their own reports with `report`."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = summarize(sweep_dir)
        if not rows:
            return
        log.info("Multirun summary: %s", write_summary(sweep_dir, rows))
        figure = sweep_figure(sweep_dir, rows)
        with start_report(sweep_dir, config.get("logger"), "summary", f"summary {sweep_dir.name}") as session:
            session.log_table("summary", rows)
            session.log_images({"sweep": figure})
            self.report(sweep_dir, session)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        """In a sweep, record a failed job (`failed.json`: its overrides and error) and rewrite the summary
        tables, so a failure is reported beside the other jobs even though Hydra then stops before
        `on_multirun_end`."""
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        job_dir = Path(config.hydra.runtime.output_dir)
        if job_return.status == JobStatus.FAILED:
            error = job_return._return_value
            failure = {
                "overrides": list(config.hydra.overrides.task),
                "error": f"{type(error).__name__}: {error}",
            }
            (job_dir / FAILED_FILE).write_text(json.dumps(failure) + "\n")
        rows = summarize(job_dir.parent)
        if rows:
            write_summary(job_dir.parent, rows)

    def report(self, sweep_dir: Path, session: Session) -> None:
        """Further tables and figures of this kind of sweep (none here)."""


def _curve(job_dir: Path) -> list[tuple[float, float]]:
    try:
        rows = logged_rows(job_dir)
    except FileNotFoundError:
        return []
    return [(row["step"], row[CURVE]) for row in rows if CURVE in row and math.isfinite(row[CURVE])]


def _short(value: str | None) -> str:
    number = _number(value)
    return f"{number:.3g}" if number is not None else str(value)


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _job_number(name: str) -> int:
    return int(name) if name.isdigit() else -1


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
