"""Effects of interventions with their uncertainty: each effect is a mean over facts or problems, with n,
a 95% interval and its method (a paired t interval over problems, stats/estimates.py `paired`), and a verdict
only where the Holm-adjusted interval across the table's effects excludes 0."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from stats.estimates import POWER, holm, paired


def effect_table(
    effects: Mapping[str, Sequence[float]],
    clusters: Sequence[Any] | None = None,
    confidence: float = 0.95,
    raises: str = "raises",
    lowers: str = "lowers",
) -> dict[str, dict[str, Any]]:
    """Per named effect (per-item values, the same items for every name): mean, interval, p against 0, the
    Holm-adjusted interval across the table and the verdict (`raises` / `lowers` where that interval
    excludes 0, else 'no detectable effect (MDE x)'). With fewer than 2 items or clusters: the mean only."""
    names = list(effects)
    rows: dict[str, dict[str, Any]] = {}
    comparisons = {}
    for name in names:
        values = np.asarray(effects[name], dtype=np.float64)
        if len(values) < 2 or (clusters is not None and len(set(clusters)) < 2):
            mean = float(values.mean()) if len(values) else None
            rows[name] = {"mean": mean, "n": len(values), "verdict": "too few items for an interval"}
            continue
        comparisons[name] = paired(values, np.zeros_like(values), clusters, confidence)
    adjusted = dict(zip(comparisons, holm([c.p for c in comparisons.values()]), strict=True))
    order = sorted(comparisons, key=lambda name: comparisons[name].p)
    alpha = 1 - confidence
    for rank, name in enumerate(order):
        comparison = comparisons[name]
        low, high = comparison.interval(1 - alpha / (len(order) - rank))
        if adjusted[name] < alpha and low > 0:
            verdict = raises
        elif adjusted[name] < alpha and high < 0:
            verdict = lowers
        else:
            verdict = f"no detectable effect (MDE {_mde(comparison.standard_error, confidence):.3g})"
        rows[name] = {
            "mean": comparison.difference,
            "low": comparison.low,
            "high": comparison.high,
            "n": comparison.n,
            "clusters": comparison.clusters,
            "method": f"paired t interval over {comparison.clusters} clusters",
            "p": comparison.p,
            "p_holm": adjusted[name],
            "holm_low": low,
            "holm_high": high,
            "verdict": verdict,
        }
    return {name: rows[name] for name in names}


def _mde(standard_error: float, confidence: float) -> float:
    """The smallest |mean effect| detected with power POWER at the two-sided level 1 - confidence, from the
    effects' own spread (a continuous effect has no binomial floor)."""
    return float((stats.norm.ppf(0.5 + confidence / 2) + stats.norm.ppf(POWER)) * standard_error)
