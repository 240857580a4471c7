"""Run results: the one-line `results.json` of a run and the summary table of a multirun."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"


def write_results(run_dir: Path, results: dict[str, Any]) -> Path:
    """Write `results` as one JSON line to `<run_dir>/results.json`."""
    path = Path(run_dir) / RESULTS_FILE
    path.write_text(json.dumps(results, sort_keys=True) + "\n")
    return path


def summarize(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job of a multirun: its overrides, then its final metrics."""
    rows = []
    for path in sorted(Path(sweep_dir).glob(f"*/{RESULTS_FILE}"), key=lambda p: _job_number(p.parent.name)):
        result = json.loads(path.read_text())
        row = {"job": path.parent.name, "overrides": " ".join(result.get("overrides", []))}
        row.update(result.get("metrics", {}))
        row["trainable_params"] = result.get("trainable_params")
        if "diverged" in result:
            row["diverged"] = result["diverged"]
        rows.append(row)
    return rows


def write_summary(sweep_dir: Path) -> Path | None:
    """Write `summary.csv` and `summary.md` (overrides -> final metrics) in the multirun directory."""
    rows = summarize(sweep_dir)
    if not rows:
        return None
    columns = list(dict.fromkeys(key for row in rows for key in row))
    csv_path = Path(sweep_dir) / "summary.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(column)) for column in columns) + " |" for row in rows]
    (Path(sweep_dir) / "summary.md").write_text("\n".join(lines) + "\n")
    return csv_path


class MultirunSummary(Callback):
    """Hydra callback: after a `-m` sweep, write the summary table into the sweep directory."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        path = write_summary(Path(config.hydra.sweep.dir))
        if path is not None:
            log.info("Multirun summary: %s", path)


def _job_number(name: str) -> int:
    return int(name) if name.isdigit() else -1


def _cell(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
