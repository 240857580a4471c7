"""Per-item outcomes of an evaluation: each scored item's id and cluster, the interval of every metric
computed from them, and one run's scores of one metric (`ItemScores`, read back by evaluation/predictions.py)
paired with another's.

An item's id is where its record came from (`file:line` with the file's folder and name only, so runs made
in another checkout pair too; `hub_id[split][i]`), so the clean and noisy versions of a GSM8K problem share
it, and `#k` is appended when one record yields several items (the teacher turns of a Socratic dialogue, a
HotpotQA question's pieces). Its cluster is that record: items of one record are resampled together, since
they are not independent.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from stats import estimates


def assign_ids(rows: list[dict[str, Any]]) -> None:
    """Give every row its `item_id` and `cluster` (the record it came from, else its position)."""
    seen: dict[str, int] = {}
    for row in rows:
        cluster = _portable(row["where"]) if row.get("where") else f"#{row['index']}"
        seen[cluster] = seen.get(cluster, 0) + 1
        row["cluster"] = cluster
        row["item_id"] = cluster if seen[cluster] == 1 else f"{cluster}#{seen[cluster]}"


def _portable(where: str) -> str:
    """`where` with a file path shortened to its folder and name (`.../gsm8k/test.jsonl:5` ->
    `gsm8k/test.jsonl:5`)."""
    match = re.fullmatch(r"(.*?)((?::\d+|\[\d+\])+)", where)
    if not match or "/" not in match.group(1):
        return where
    return "/".join(Path(match.group(1)).parts[-2:]) + match.group(2)


def intervals(
    rows: list[dict[str, Any]],
    metrics: dict[str, float],
    item_fields: dict[str, str],
    corpus: dict[str, Callable[[np.ndarray], float]],
    settings: DictConfig,
) -> dict[str, dict[str, Any]]:
    """The interval of each metric in `metrics`: a mean over the rows' `item_fields[metric]` (rows where it is
    None do not count), or `corpus[metric](row indices)` bootstrapped over clusters. Each entry records the
    per-item field it was computed from (`item_field`, None for corpus statistics)."""
    result = {}
    for metric, field in item_fields.items():
        scored = [row for row in rows if row.get(field) is not None]
        if metric not in metrics or not scored:
            continue
        estimate = estimates.mean_estimate(
            [row[field] for row in scored],
            [row["cluster"] for row in scored],
            settings.resamples,
            settings.seed,
            settings.confidence,
        )
        result[metric] = {**estimate.as_dict(), "item_field": field}
    for metric, statistic in corpus.items():
        if metric not in metrics:
            continue
        estimate = estimates.bootstrap(
            statistic,
            len(rows),
            [row["cluster"] for row in rows],
            settings.resamples,
            settings.seed,
            settings.confidence,
        )
        result[metric] = {**estimate.as_dict(), "item_field": None}
    return result


def flat(intervals_by_metric: dict[str, dict[str, Any]]) -> dict[str, float]:
    """`<metric>/ci_low`, `<metric>/ci_high` and `<metric>/n` of every interval, for loggers' summaries."""
    values = {}
    for metric, entry in intervals_by_metric.items():
        if entry.get("low") is not None:
            values |= {f"{metric}/ci_low": entry["low"], f"{metric}/ci_high": entry["high"]}
        values[f"{metric}/n"] = entry["n"]
    return values


@dataclass(frozen=True)
class ItemScores:
    """One run's per-item scores of one metric, in the run's item order."""

    run_dir: Path
    metric: str
    ids: list[str]
    clusters: list[str]
    scores: list[float]

    def by_id(self) -> dict[str, float]:
        """Item id -> score."""
        return dict(zip(self.ids, self.scores, strict=True))


def aligned(first: ItemScores, second: ItemScores) -> tuple[list[float], list[float], list[str]]:
    """Both runs' scores on the same items, in the first run's order, with the clusters; a ValueError naming
    both runs when their item ids differ (different data, limit or split)."""
    if set(first.ids) != set(second.ids) or len(first.ids) != len(second.ids):
        only_first = sorted(set(first.ids) - set(second.ids))
        only_second = sorted(set(second.ids) - set(first.ids))
        raise ValueError(
            f"cannot pair {first.run_dir} and {second.run_dir}: their item ids differ "
            f"({len(only_first)} only in the first, e.g. {only_first[:3]}; "
            f"{len(only_second)} only in the second, e.g. {only_second[:3]}); "
            "compare runs evaluated on the same items (same data files, split and limit)"
        )
    other = second.by_id()
    return first.scores, [other[i] for i in first.ids], first.clusters
