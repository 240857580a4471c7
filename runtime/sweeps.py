"""What a `-m` sweep leaves in its directory: `summary.csv` (overrides -> final metrics, one row per job),
`summary_by_config.csv` (jobs that differ only in `seed` grouped: mean, s.d., t interval and number of seeds
per configuration, and whether each is tied with the best), `summary.md` with both tables, the figure
`sweep.png` (every job's validation loss curve; the optimised metric against each swept parameter), and,
when the jobs logged to W&B, one `summary` run in the sweep's group holding them."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from figures import runs as figures
from runtime.checkpointing import write_atomically
from runtime.results import RESULTS_FILE, logged_rows
from runtime.session import Session, metric_direction, start_report
from stats import seed_statistics, tables

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


def configuration(overrides: str) -> str:
    """A job's overrides without its seed: the configuration it is one seed of."""
    return " ".join(o for o in overrides.split() if o.split("=", 1)[0].lstrip("+~") != "seed")


def seed_of(overrides: str) -> str | None:
    """The `seed=` override of a job, None when it ran the config's seed."""
    return next(
        (o.split("=", 1)[1] for o in overrides.split() if o.split("=", 1)[0].lstrip("+~") == "seed"), None
    )


def by_configuration(rows: list[dict[str, Any]], metric: str, settings: DictConfig) -> list[dict[str, Any]]:
    """One row per configuration (jobs that differ only in seed; named by the overrides that set it apart
    from the other jobs): for every metric all its jobs report, the
    mean, s.d. and t interval over seeds; for `metric`, whether the configuration is tied with the best one
    (paired t over common seeds, else Welch; Holm-adjusted over the configurations compared), that its
    seed variance is not estimated (one seed), or that its jobs did not report `metric`."""
    shared = set.intersection(*(set(configuration(row["overrides"]).split()) for row in rows))
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["status"] == "ok":
            differing = " ".join(o for o in configuration(row["overrides"]).split() if o not in shared)
            groups.setdefault(differing, []).append(row)
    values = {  # configuration -> {seed: metric} over the jobs that report the metric
        config: {
            seed_of(job["overrides"]) or job["job"]: job[metric] for job in jobs if _finite(job.get(metric))
        }
        for config, jobs in groups.items()
    }
    measured = [config for config in groups if values[config]]
    pick = min if metric_direction(metric) == "minimize" else max
    best = pick(measured, key=lambda c: sum(values[c].values()) / len(values[c])) if measured else None
    adjusted = seed_statistics.against_reference({c: values[c] for c in measured}, best) if measured else {}
    alpha = 1 - settings.confidence
    table = []
    for config, jobs in groups.items():
        row: dict[str, Any] = {"configuration": config or "(every job's)", "seeds": len(jobs)}
        row["seed_values"] = " ".join(seed_of(job["overrides"]) or "config's" for job in jobs)
        for key in [k for k in jobs[0] if all(_finite(job.get(k)) for job in jobs) and k not in _NOT_METRICS]:
            summary = seed_statistics.over_seeds([job[key] for job in jobs], settings.confidence)
            row |= {key: summary["mean"], f"{key}_std": summary["std"]}
            row |= {f"{key}_low": summary["low"], f"{key}_high": summary["high"]}
        row["interval"] = seed_statistics.over_seeds([job.get(metric) for job in jobs], settings.confidence)[
            "method"
        ]
        if not values[config]:
            row["tied_with_best"] = f"no {metric}"
        elif config == best:
            row["tied_with_best"] = "best"
        elif config in adjusted:
            row["tied_with_best"] = "yes" if adjusted[config] >= alpha else "no"
            row["p_holm_vs_best"] = adjusted[config]
        else:
            row["tied_with_best"] = "seed variance not estimated"
        table.append(row)
    return table


def write_summary(
    sweep_dir: Path, rows: list[dict[str, Any]], grouped: list[dict[str, Any]] | None = None
) -> Path:
    """Write `summary.csv` (one row per job), `summary_by_config.csv` (one per configuration over its seeds)
    and `summary.md` with both, in the multirun directory."""
    text = "# Sweep summary\n\n## Jobs\n\n" + tables.markdown(rows)
    if grouped:
        metric = next((row["optimized_metric"] for row in rows if row.get("optimized_metric")), "")
        shown = [
            "configuration",
            "seeds",
            "seed_values",
            metric,
            f"{metric}_std",
            "interval",
            "tied_with_best",
        ]
        cells = [
            {
                **row,
                metric: tables.with_interval(
                    row.get(metric), row.get(f"{metric}_low"), row.get(f"{metric}_high"), 4
                ),
                "p_holm_vs_best": row.get("p_holm_vs_best"),
            }
            for row in grouped
        ]
        text += (
            f"\n## Configurations over seeds ({metric})\n\n"
            "Mean [t interval] over seeds; tied_with_best: not told apart from the best configuration at "
            "p_holm >= 1 - confidence (paired t over common seeds, else Welch; Holm over the "
            "configurations). A configuration with one seed has no interval: its seed variance is not "
            "estimated.\n\n" + tables.markdown(cells, [*shown, "p_holm_vs_best"])
        )
        # jobs of a parallel launcher rewrite these as they end: replace, never half-write
        grouped_text = tables.csv_text(grouped)
        write_atomically(
            Path(sweep_dir) / "summary_by_config.csv", lambda handle: handle.write(grouped_text.encode())
        )
    csv_path = Path(sweep_dir) / "summary.csv"
    per_job = tables.csv_text(rows)
    write_atomically(csv_path, lambda handle: handle.write(per_job.encode()))
    write_atomically(Path(sweep_dir) / "summary.md", lambda handle: handle.write(text.encode()))
    return csv_path


def swept_parameters(rows: list[dict[str, Any]]) -> dict[str, list[str | None]]:
    """The override keys whose values differ between jobs, each with its value per row."""
    per_row = [dict(o.split("=", 1) for o in row["overrides"].split() if "=" in o) for row in rows]
    keys = dict.fromkeys(k for overrides in per_row for k in overrides)
    return {k: [o.get(k) for o in per_row] for k in keys if len({o.get(k) for o in per_row}) > 1}


def sweep_figure(sweep_dir: Path, rows: list[dict[str, Any]]) -> Path | None:
    """`sweep.png`: every job's validation loss curve on one axis, then the optimised metric against each
    swept parameter (figures/runs.py); None when the sweep has nothing to plot."""
    curves = {row["job"]: _curve(Path(sweep_dir) / row["job"]) for row in rows}
    curves = {job: points for job, points in curves.items() if points}
    metric = next((row["optimized_metric"] for row in rows if row.get("optimized_metric")), CURVE)
    swept = swept_parameters(rows)
    parameters = swept if any(metric in row for row in rows) else {}
    if not curves and not parameters:
        return None
    labelled = {}
    for index, row in enumerate(rows):
        if row["job"] in curves:
            label = ", ".join(f"{key}={_short(values[index])}" for key, values in swept.items())
            labelled[f"{row['job']}: {label}"[:70]] = curves[row["job"]]
    panels = []
    for key, values in parameters.items():
        kept = [
            (value, row[metric]) for value, row in zip(values, rows, strict=True) if _finite(row.get(metric))
        ]
        numbers = [_number(value) for value, _ in kept]
        numeric = all(number is not None for number in numbers)
        xs = numbers if numeric else [str(value) for value, _ in kept]
        panels.append((key, xs, [y for _, y in kept], numeric))
    return figures.sweep(Path(sweep_dir) / "sweep.png", labelled, CURVE, panels, metric)


class MultirunSummary(Callback):
    """Hydra callback: after a `-m` sweep, write the summary table and figure, and log both to the sweep's W&B
    group (a `summary` run) when its jobs logged to W&B. Subclasses add their own reports with `report`."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = summarize(sweep_dir)
        if not rows:
            return
        grouped = _write(sweep_dir, rows, config)
        figure = sweep_figure(sweep_dir, rows)
        with start_report(sweep_dir, config.get("logger"), "summary", f"summary {sweep_dir.name}") as session:
            session.log_table("summary", rows)
            if grouped:
                session.log_table("summary_by_config", grouped)
            session.log_images({"sweep": figure})
            self.report(sweep_dir, session, config)

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
            _write(job_dir.parent, rows, config)

    def report(self, sweep_dir: Path, session: Session, config: DictConfig) -> None:
        """Further tables and figures of this kind of sweep (none here); `config` is the sweep's."""


def _write(sweep_dir: Path, rows: list[dict[str, Any]], config: DictConfig) -> list[dict[str, Any]]:
    """Write the summary tables of `rows`, grouped over seeds by the optimised metric; return the groups."""
    metric = next((row["optimized_metric"] for row in rows if row.get("optimized_metric")), CURVE)
    grouped = by_configuration(rows, metric, config.statistics)
    log.info("Multirun summary: %s", write_summary(sweep_dir, rows, grouped))
    return grouped


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


# summary columns that describe a job rather than measure it
_NOT_METRICS = {"job", "status", "overrides", "error", "trainable_params", "diverged", "optimized_metric"}


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _job_number(name: str) -> int:
    return int(name) if name.isdigit() else -1
