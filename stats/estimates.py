"""Intervals, paired tests and seed aggregation: the one place every table lmlab writes takes its uncertainty
from (docs/statistics.md says what each number means).

- one run, one metric: `mean_estimate` (Wilson for 0/1 scores with one item per cluster, else a percentile
  bootstrap over clusters) and `bootstrap` (any statistic of the items, e.g. macro-F1 or corpus BLEU);
- two runs on the same items: `paired` (difference of means with a t interval over clusters, exact McNemar
  for 0/1 scores, items flipped each way, the minimum detectable effect); `holm` and `verdicts` over a
  table;
- several seeds of one configuration: stats/seed_statistics.py, on the same footing (`over_seeds`,
  `seed_test`).

scipy.stats does the arithmetic (binomtest's Wilson interval, the t and normal quantiles and tests); the
percentile bootstrap is drawn here with numpy, vectorised for means and clustered (scipy.stats.bootstrap
resamples neither clusters nor fast enough for a grid); what is ours is choosing among them, clustering, and
the verdict rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 2000
SEED = 0
POWER = 0.8


@dataclass(frozen=True)
class Estimate:
    """A value with its interval: `n` scored items in `clusters` independent units (problems, dialogues)."""

    value: float
    low: float | None
    high: float | None
    n: int
    clusters: int
    method: str
    confidence: float

    def as_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)


def _z(probability: float) -> float:
    return float(stats.norm.ppf(probability))


def cluster_index(clusters: Sequence[Any] | None, n: int) -> np.ndarray:
    """Cluster number (0..k-1, in order of first appearance) of each of `n` items; every item its own cluster
    when `clusters` is None."""
    if clusters is None:
        return np.arange(n)
    if len(clusters) != n:
        raise ValueError(f"{len(clusters)} cluster labels for {n} items")
    numbers: dict[Any, int] = {}
    return np.array([numbers.setdefault(label, len(numbers)) for label in clusters], dtype=np.int64)


def is_binary(values: np.ndarray) -> bool:
    """Whether every value is 0 or 1."""
    return bool(np.isin(values, (0.0, 1.0)).all())


def wilson(successes: int, n: int, confidence: float = CONFIDENCE) -> Estimate:
    """The proportion `successes / n` with its Wilson score interval."""
    interval = stats.binomtest(int(successes), int(n)).proportion_ci(confidence, method="wilson")
    return Estimate(successes / n, float(interval.low), float(interval.high), n, n, "wilson", confidence)


def bootstrap(
    statistic: Callable[[np.ndarray], float],
    n: int,
    clusters: Sequence[Any] | None = None,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    confidence: float = CONFIDENCE,
) -> Estimate:
    """`statistic(item indices)` over all `n` items, with a percentile bootstrap interval that resamples
    clusters (whole problems or dialogues, with all their items) or, without clusters, items. Resamples whose
    statistic is undefined (NaN: a correlation of a constant, say) are left out."""
    cluster_of = cluster_index(clusters, n)
    sizes = np.bincount(cluster_of)  # [clusters]; members: each cluster's item indices
    members = np.split(np.argsort(cluster_of, kind="stable"), np.cumsum(sizes)[:-1])
    picks = _resample(len(members), resamples, seed)  # [resamples, clusters]
    values = np.array([statistic(np.concatenate([members[c] for c in picked])) for picked in picks])
    values = values[np.isfinite(values)]
    low, high = _percentiles(values, confidence) if len(values) else (None, None)
    return Estimate(
        float(statistic(np.arange(n))),
        low,
        high,
        n,
        len(members),
        _bootstrap_name(n, len(members), resamples),
        confidence,
    )


def _resample(count: int, resamples: int, seed: int) -> np.ndarray:
    """`resamples` draws of `count` units with replacement, [resamples, count]; the same for the same seed
    in every bootstrap here, so a mean bootstrapped either way gets the same interval."""
    return np.random.default_rng(seed).integers(0, count, size=(resamples, count))


def _percentiles(values: np.ndarray, confidence: float) -> tuple[float, float]:
    low, high = np.percentile(values, [50 * (1 - confidence), 50 * (1 + confidence)])
    return float(low), float(high)


def mean_estimate(
    values: Sequence[float],
    clusters: Sequence[Any] | None = None,
    resamples: int = RESAMPLES,
    seed: int = SEED,
    confidence: float = CONFIDENCE,
    method: str = "auto",
) -> Estimate:
    """The mean of per-item scores with its interval. `method="auto"`: Wilson when every score is 0 or 1 and
    every cluster holds one item, else a percentile bootstrap over clusters (a cluster counts with all its
    items); `"bootstrap"` always bootstraps."""
    scores = np.asarray(values, dtype=np.float64)  # [n]
    n = len(scores)
    if n == 0:
        raise ValueError("no scores to estimate a mean from")
    cluster_of = cluster_index(clusters, n)
    count = int(cluster_of.max()) + 1
    if method not in ("auto", "bootstrap"):
        raise ValueError(f"method={method!r}: expected 'auto' or 'bootstrap'")
    if method == "auto" and count == n and is_binary(scores):
        return wilson(int(scores.sum()), n, confidence)
    sums = np.bincount(cluster_of, weights=scores, minlength=count)  # [clusters]
    sizes = np.bincount(cluster_of, minlength=count).astype(np.float64)  # [clusters]
    # the percentile bootstrap of a mean, vectorised (scipy.stats.bootstrap's general machinery costs 10x
    # more here): each resample's mean is its clusters' summed scores over their summed sizes
    picks = _resample(count, resamples, seed)  # [resamples, clusters]
    resampled_sizes = sizes[picks].sum(axis=1) if count < n else count  # [resamples], or every one n
    means = sums[picks].sum(axis=1) / resampled_sizes  # [resamples]
    low, high = _percentiles(means, confidence)
    return Estimate(
        float(scores.mean()), low, high, n, count, _bootstrap_name(n, count, resamples), confidence
    )


def _bootstrap_name(n: int, clusters: int, resamples: int) -> str:
    unit = "items" if clusters == n else "clusters"
    return f"percentile bootstrap over {unit} ({resamples} resamples)"


@dataclass(frozen=True)
class Comparison:
    """Mean of A minus mean of B on the same items, paired per cluster."""

    difference: float
    low: float
    high: float
    p: float
    test: str
    n: int
    clusters: int
    a_only: int | None  # 0/1 scores: items A got right and B wrong
    b_only: int | None
    mde: float  # the smallest |difference| this n detects with `power` at the two-sided level 1 - confidence
    confidence: float
    standard_error: float

    def interval(self, confidence: float) -> tuple[float, float]:
        """The t interval of the difference at another confidence level (e.g. a Holm-adjusted one)."""
        if self.standard_error == 0:
            return self.difference, self.difference
        half = float(stats.t.ppf(0.5 + confidence / 2, self.clusters - 1)) * self.standard_error
        return self.difference - half, self.difference + half

    def as_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)


def paired(
    a: Sequence[float],
    b: Sequence[float],
    clusters: Sequence[Any] | None = None,
    confidence: float = CONFIDENCE,
    power: float = POWER,
) -> Comparison:
    """Compare two runs' scores on the same items (same order): the mean difference A - B with a paired t
    interval over clusters (each cluster's mean difference is one observation), the p-value of exact McNemar
    for 0/1 scores with one item per cluster (else the paired t test), and the minimum detectable effect."""
    first, second = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)  # [n] each
    if first.shape != second.shape or first.ndim != 1 or len(first) < 2:
        raise ValueError(f"paired scores need two equal-length lists of 2+ items, got {len(a)} and {len(b)}")
    n = len(first)
    cluster_of = cluster_index(clusters, n)
    count = int(cluster_of.max()) + 1
    if count < 2:
        raise ValueError("a paired comparison needs items from at least 2 clusters")
    sizes = np.bincount(cluster_of, minlength=count)
    differences = np.bincount(cluster_of, weights=first - second, minlength=count) / sizes  # [clusters]
    difference = float(differences.mean())
    spread = float(differences.std(ddof=1))
    standard_error = spread / math.sqrt(count)
    binary = count == n and is_binary(first) and is_binary(second)
    a_only = int(((first == 1) & (second == 0)).sum()) if binary else None
    b_only = int(((first == 0) & (second == 1)).sum()) if binary else None
    if binary:
        discordant = a_only + b_only
        p, test = (stats.binomtest(a_only, discordant).pvalue if discordant else 1.0), "exact McNemar"
    elif standard_error == 0:
        p, test = (1.0 if difference == 0 else 0.0), "paired t"
    else:
        p, test = float(stats.ttest_1samp(differences, 0.0).pvalue), "paired t"
    # with no spread in the differences (e.g. no discordant item) the variance of one item differing by 1
    # stands in, so the MDE never reads 0
    floor = math.sqrt((1 / count) * (1 - 1 / count))
    mde = (_z(0.5 + confidence / 2) + _z(power)) * max(spread, floor) / math.sqrt(count)
    comparison = Comparison(
        difference, 0.0, 0.0, float(p), test, n, count, a_only, b_only, mde, confidence, standard_error
    )
    low, high = comparison.interval(confidence)
    return Comparison(**{**asdict(comparison), "low": low, "high": high})


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values (step-down, monotone, at most 1), in the input order."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def verdicts(
    comparisons: Sequence[Comparison],
    names: Sequence[tuple[str, str]],
    alpha: float | None = None,
    better: str = "better",
) -> list[dict[str, Any]]:
    """Holm across a table's comparisons: per comparison its adjusted p, its Holm-adjusted interval (the
    level its step of the procedure tests at) and the verdict '<A> better' / '<B> better' (`better` words
    it) where that interval excludes 0 and the adjusted p is below alpha (default 1 - confidence), else
    'no detectable difference (MDE x)'."""
    alpha = 1 - comparisons[0].confidence if alpha is None and comparisons else alpha
    adjusted = holm([c.p for c in comparisons])
    order = sorted(range(len(comparisons)), key=lambda i: comparisons[i].p)
    rank_of = {i: rank for rank, i in enumerate(order)}
    rows = []
    for i, (comparison, (a, b)) in enumerate(zip(comparisons, names, strict=True)):
        level = 1 - alpha / (len(comparisons) - rank_of[i])
        low, high = comparison.interval(level)
        if adjusted[i] < alpha and low > 0:
            verdict = f"{a} {better}"
        elif adjusted[i] < alpha and high < 0:
            verdict = f"{b} {better}"
        else:
            verdict = f"no detectable difference (MDE {comparison.mde:.3f})"
        rows.append({"p_holm": adjusted[i], "holm_low": low, "holm_high": high, "verdict": verdict})
    return rows


def planning_mde(
    n: int, p: float, confidence: float = CONFIDENCE, power: float = POWER, correlation: float = 0.0
) -> float:
    """The smallest difference of two accuracies near `p` on `n` items that a two-sided test at 1 -
    confidence detects with `power`: (z_a/2 + z_b) sqrt(2 p (1 - p) (1 - correlation) / n); correlation 0
    is two independent item sets (pairing on the same items only lowers it)."""
    return (_z(0.5 + confidence / 2) + _z(power)) * math.sqrt(2 * p * (1 - p) * (1 - correlation) / n)
