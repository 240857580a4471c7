"""Paired comparisons of evaluation runs on the same items, as one table: per pair the difference of means
with its interval, the test's p-value, the items that flipped each way, the minimum detectable effect, and a
verdict after a Holm adjustment across the table (stats/estimates.py). evaluate.py grids, the noise study
and `python -m analysis.compare` write these tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from stats import estimates, item_scores
from stats.item_scores import ItemScores

SETTINGS_FILE = Path(__file__).resolve().parents[1] / "conf" / "statistics" / "default.yaml"


def table(
    pairs: list[tuple[ItemScores, ItemScores]],
    labels: list[tuple[str, str]],
    settings: DictConfig,
) -> list[dict[str, Any]]:
    """One row per (A, B) pair: A - B on the items both scored (a ValueError where their item ids differ),
    Holm-adjusted over all rows; the verdict reads '<A> better', '<B> better' or 'no detectable difference
    (MDE x)'."""
    if not pairs:
        return []
    compared = []
    for first, second in pairs:
        a, b, clusters = item_scores.aligned(first, second)
        compared.append((a, b, estimates.paired(a, b, clusters, settings.confidence, settings.power)))
    judged = estimates.verdicts([c for _, _, c in compared], labels, 1 - settings.confidence)
    rows = []
    for (first, _), (label_a, label_b), (a, b, comparison), verdict in zip(
        pairs, labels, compared, judged, strict=True
    ):
        rows.append(
            {
                "a": label_a,
                "b": label_b,
                "metric": first.metric,
                "n": comparison.n,
                "clusters": comparison.clusters,
                "mean_a": sum(a) / len(a),
                "mean_b": sum(b) / len(b),
                "difference": comparison.difference,
                "low": comparison.low,
                "high": comparison.high,
                "test": comparison.test,
                "p": comparison.p,
                "p_holm": verdict["p_holm"],
                "a_only": comparison.a_only,
                "b_only": comparison.b_only,
                "mde": comparison.mde,
                "verdict": verdict["verdict"],
            }
        )
    return rows


def default_settings() -> DictConfig:
    """conf/statistics/default.yaml, for the command lines that are not Hydra apps (analysis.compare,
    analysis.ablation)."""
    return OmegaConf.load(SETTINGS_FILE)


def note(settings: DictConfig) -> str:
    """What a comparison table's columns mean, for the top of its markdown file."""
    level = f"{settings.confidence:.0%}"
    return (
        f"difference = mean of a - mean of b on the same items, with its paired {level} t interval over "
        f"clusters [low, high]; p: exact McNemar for 0/1 scores (a_only / b_only: items only a / only b got "
        "right), else the paired t test; p_holm: Holm-adjusted across this table; mde: the smallest "
        f"difference this n detects with {settings.power:.0%} power. A verdict is given only "
        "where the Holm-adjusted interval excludes 0 (docs/statistics.md)."
    )
