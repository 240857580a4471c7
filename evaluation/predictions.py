"""An evaluation run's per-item outcomes file (predictions.jsonl): written by evaluate.py, read back as
`ItemScores` for paired comparisons (stats/comparisons.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from runtime.results import RESULTS_FILE, read_results
from stats.item_scores import ItemScores

ITEMS_FILE = "predictions.jsonl"


def write(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    """One JSON line per scored item."""
    with (run_dir / ITEMS_FILE).open("w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def item_metrics(run_dir: Path) -> list[str]:
    """The metrics of an evaluation run that have per-item scores."""
    intervals = read_results(Path(run_dir)).get("intervals", {})
    return [metric for metric, entry in intervals.items() if entry.get("item_field")]


def read(run_dir: Path, metric: str | None = None) -> ItemScores:
    """The per-item scores of `metric` (default: the run's optimized metric, else its first metric with
    per-item scores) from an evaluation run's results.json and predictions.jsonl."""
    run_dir = Path(run_dir)
    results_path, items_path = run_dir / RESULTS_FILE, run_dir / ITEMS_FILE
    for path in (results_path, items_path):
        if not path.exists():
            raise FileNotFoundError(f"{path}: not found; is {run_dir} an evaluate.py run dir?")
    results = read_results(run_dir)
    per_item = {k: v["item_field"] for k, v in results.get("intervals", {}).items() if v.get("item_field")}
    if not per_item:
        raise ValueError(f"{results_path}: no metric with per-item scores (written by an older lmlab?)")
    chosen = metric or (
        results.get("optimized_metric")
        if results.get("optimized_metric") in per_item
        else next(iter(per_item))
    )
    if chosen not in per_item:
        raise ValueError(
            f"{results_path}: metric {chosen!r} has no per-item scores; those that do: {sorted(per_item)}"
        )
    field = per_item[chosen]
    rows = []
    for number, line in enumerate(items_path.read_text().splitlines(), start=1):
        try:
            row = json.loads(line) if line.strip() else {}
        except json.JSONDecodeError as error:
            raise ValueError(f"{items_path}:{number}: not a JSON line ({error})") from error
        if row.get(field) is not None:
            if "item_id" not in row or "cluster" not in row:
                raise ValueError(f"{items_path}:{number}: no item_id / cluster (written by an older lmlab?)")
            rows.append(row)
    return ItemScores(
        run_dir,
        chosen,
        [row["item_id"] for row in rows],
        [row["cluster"] for row in rows],
        [float(row[field]) for row in rows],
    )
