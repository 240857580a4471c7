"""Run results: the one-line `results.json` of a run, and the metric rows a run logged."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from runtime.wandb_offline import find_run_files, read_run

RESULTS_FILE = "results.json"


def write_results(run_dir: Path, results: dict[str, Any]) -> Path:
    """Write `results` as one JSON line to `<run_dir>/results.json`."""
    path = Path(run_dir) / RESULTS_FILE
    path.write_text(json.dumps(results, sort_keys=True) + "\n")
    return path


def read_results(run_dir: Path) -> dict[str, Any]:
    """The results.json of a run; FileNotFoundError naming the file when the run wrote none."""
    path = Path(run_dir) / RESULTS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found; did the run in {run_dir} finish?")
    return json.loads(path.read_text())


def job_results(sweep_dir: Path) -> list[dict[str, Any]]:
    """The results.json of every job of a multirun that finished, in job-folder order."""
    return [read_results(path.parent) for path in sorted(Path(sweep_dir).glob(f"*/{RESULTS_FILE}"))]


def logged_rows(job_dir: Path) -> list[dict[str, float]]:
    """The metric rows a run logged (each with a `step` key): from its CSV log, else from its offline W&B
    run."""
    csv_path = Path(job_dir) / "metrics" / "metrics.csv"
    if csv_path.exists():
        with csv_path.open() as handle:
            return [
                {k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(handle)
            ]
    run_files = find_run_files(job_dir)
    if not run_files:
        raise FileNotFoundError(f"{job_dir}: no metrics/metrics.csv and no offline W&B run")
    history = read_run(run_files[0]).history
    return [{**row, "step": row.get("trainer/global_step", row.get("_step", 0))} for row in history]
