"""Statistics over seeds, built on stats/estimates.py: one configuration's metric over its seeds (mean,
s.d., t interval) and tests between configurations (paired t over the seeds both ran, else Welch), Holm over
the configurations compared with a reference."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

from stats.estimates import CONFIDENCE, holm


def seed_method(seeds: int, confidence: float = CONFIDENCE) -> str:
    """How `over_seeds` states the uncertainty of a configuration run with `seeds` seeds."""
    return f"t interval over seeds ({confidence:.0%})" if seeds > 1 else "seed variance not estimated"


def over_seeds(values: Sequence[float], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Mean, sample s.d. and t interval of one configuration's metric over its seeds; with one seed the
    s.d. and interval are None and the method says the seed variance is not estimated."""
    array = np.asarray(values, dtype=np.float64)
    seeds, mean = len(array), float(array.mean())
    summary = {"mean": mean, "std": None, "low": None, "high": None, "seeds": seeds}
    if seeds > 1:
        std = float(array.std(ddof=1))
        half = float(stats.t.ppf(0.5 + confidence / 2, seeds - 1)) * std / math.sqrt(seeds)
        summary |= {"std": std, "low": mean - half, "high": mean + half}
    return {**summary, "method": seed_method(seeds, confidence)}


def seed_test(a: dict[Any, float], b: dict[Any, float]) -> tuple[float, str] | None:
    """p-value of 'A and B have the same mean over seeds': paired t over the seeds both ran when they ran
    the same 2+ seeds (same data order and initialisation per seed), else Welch's t; None below 2 seeds."""
    if len(a) < 2 or len(b) < 2:
        return None
    if set(a) == set(b):
        seeds = sorted(a)
        first, second = np.array([a[s] for s in seeds]), np.array([b[s] for s in seeds])
        if np.ptp(first - second) == 0:
            return (1.0 if first[0] == second[0] else 0.0), "paired t over seeds"
        return float(stats.ttest_rel(first, second).pvalue), "paired t over seeds"
    first, second = np.array(list(a.values())), np.array(list(b.values()))
    if first.std() == 0 and second.std() == 0:
        return (1.0 if first[0] == second[0] else 0.0), "Welch t over seeds"
    return float(stats.ttest_ind(first, second, equal_var=False).pvalue), "Welch t over seeds"


def against_reference(values: dict[str, dict[Any, float]], reference: str) -> dict[str, float]:
    """Holm-adjusted p-values of `seed_test` between each configuration's per-seed values and `reference`'s,
    for every configuration but the reference that both have 2+ seeds for."""
    tests = {
        name: seed_test(by_seed, values[reference]) for name, by_seed in values.items() if name != reference
    }
    tested = [name for name, test in tests.items() if test is not None]
    return dict(zip(tested, holm([tests[name][0] for name in tested]), strict=True))
