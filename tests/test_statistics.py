"""stats/estimates.py on synthetic data with a known truth: coverage of the intervals, the paired and
clustered intervals against their naive counterparts, McNemar's type-I rate, Holm, seeds, determinism."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from scipy import stats

from stats import estimates, seed_statistics
from tests.conftest import ROOT

SIMULATIONS = 1000
PROPORTIONS = (0.02, 0.1, 0.5, 0.9)
SIZES = (30, 200, 1319)


def exact_wilson_coverage(p: float, n: int) -> float:
    """P(the Wilson interval of Binomial(n, p) covers p), summed over every outcome."""
    covered = 0.0
    for k in range(n + 1):
        estimate = estimates.wilson(k, n)
        if estimate.low <= p <= estimate.high:
            covered += stats.binom.pmf(k, n, p)
    return covered


@pytest.mark.parametrize("p", PROPORTIONS)
@pytest.mark.parametrize("n", SIZES)
def test_wilson_interval_covers_the_true_proportion(p: float, n: int) -> None:
    """1,000 simulated Bernoulli samples: the 95% Wilson interval covers p in 93-98.5% of them (97.8% is its
    exact coverage at p=0.02, n=30, 93.3% at p=0.02, n=200: a discrete binomial cannot be covered at exactly
    95%), and the simulated rate agrees with the exact one."""
    rng = np.random.default_rng(int(p * 1000) + n)
    successes = rng.binomial(n, p, size=SIMULATIONS)
    covers = {k: estimates.wilson(k, n).low <= p <= estimates.wilson(k, n).high for k in set(successes)}
    covered = np.mean([covers[k] for k in successes])
    assert 0.93 <= covered <= 0.985
    assert covered == pytest.approx(exact_wilson_coverage(p, n), abs=0.025)


def test_wald_interval_fails_where_wilson_holds() -> None:
    """The test can tell a bad interval: Wald's p +- 1.96 sqrt(p(1-p)/n) covers p = 0.02 at n = 30 about
    half the time (an all-zero sample gives [0, 0])."""
    rng = np.random.default_rng(0)
    successes = rng.binomial(30, 0.02, size=SIMULATIONS)
    rates = successes / 30
    half = 1.96 * np.sqrt(rates * (1 - rates) / 30)
    wald = np.mean((rates - half <= 0.02) & (rates + half >= 0.02))
    wilson = np.mean([estimates.wilson(k, 30).low <= 0.02 <= estimates.wilson(k, 30).high for k in successes])
    assert wald < 0.6 and wilson > 0.93


# the percentile bootstrap of a proportion needs some successes and failures in most samples (n p (1-p) >= 5);
# below that it fails like Wald does, which is why 0/1 scores get Wilson's interval
BOOTSTRAP_CASES = [(p, n) for p in PROPORTIONS for n in SIZES if n * p * (1 - p) >= 5]


@pytest.mark.parametrize(("p", "n"), BOOTSTRAP_CASES)
def test_bootstrap_interval_covers_the_true_mean(p: float, n: int) -> None:
    rng = np.random.default_rng(int(p * 1000) + n)
    covered = 0
    for simulation in range(SIMULATIONS):
        scores = (rng.random(n) < p).astype(float)
        estimate = estimates.mean_estimate(scores, method="bootstrap", resamples=250, seed=simulation)
        covered += estimate.low <= p <= estimate.high
    assert 0.93 <= covered / SIMULATIONS <= 0.97


def test_bootstrap_fails_on_rare_successes_so_binary_scores_get_wilson() -> None:
    rng = np.random.default_rng(1)
    samples = [(rng.random(30) < 0.02).astype(float) for _ in range(300)]
    booted = [estimates.mean_estimate(s, method="bootstrap", resamples=200) for s in samples]
    bootstrap = np.mean([e.low <= 0.02 <= e.high for e in booted])
    chosen = [estimates.mean_estimate(s) for s in samples]
    assert bootstrap < 0.6
    assert {e.method for e in chosen} == {"wilson"}
    assert np.mean([e.low <= 0.02 <= e.high for e in chosen]) > 0.93


def test_general_bootstrap_agrees_with_the_vectorised_mean() -> None:
    """`bootstrap(statistic)` draws the same resamples as `mean_estimate` for the same seed."""
    rng = np.random.default_rng(2)
    scores = rng.random(60)
    clusters = np.repeat(np.arange(20), 3)
    general = estimates.bootstrap(lambda index: scores[index].mean(), 60, clusters, 300, seed=4)
    vectorised = estimates.mean_estimate(scores, clusters, 300, seed=4)
    assert (general.low, general.high) == pytest.approx((vectorised.low, vectorised.high), abs=1e-12)
    assert general.clusters == vectorised.clusters == 20 and general.n == 60


def test_clustered_interval_is_wider_on_duplicated_clusters_and_equal_with_singletons() -> None:
    rng = np.random.default_rng(3)
    problems = rng.random(100)  # one score per problem
    duplicated = np.repeat(problems, 4)  # four identical items per problem (e.g. four turns scored alike)
    naive = estimates.mean_estimate(duplicated, method="bootstrap")
    clustered = estimates.mean_estimate(duplicated, np.repeat(np.arange(100), 4))
    assert clustered.high - clustered.low > 1.7 * (naive.high - naive.low)  # ~ sqrt(4) = 2 times wider
    assert clustered.clusters == 100 and naive.clusters == 400
    singletons = estimates.mean_estimate(problems, np.arange(100))
    plain = estimates.mean_estimate(problems)
    assert (singletons.low, singletons.high, singletons.method) == (plain.low, plain.high, plain.method)


def test_the_same_seed_gives_the_same_interval_and_another_seed_another() -> None:
    scores = np.random.default_rng(5).random(200)
    first, again = estimates.mean_estimate(scores, seed=7), estimates.mean_estimate(scores, seed=7)
    other = estimates.mean_estimate(scores, seed=8)
    assert (first.low, first.high) == (again.low, again.high) != (other.low, other.high)


def correlated_pair(rng: np.random.Generator, n: int, p: float, flip: float) -> tuple[np.ndarray, np.ndarray]:
    """Two models' 0/1 scores on the same n items: B copies A except on a `flip` share of items, where both
    are drawn afresh (so they agree far more often than independent runs would)."""
    a = (rng.random(n) < p).astype(float)
    b = a.copy()
    redrawn = rng.random(n) < flip
    a[redrawn] = rng.random(redrawn.sum()) < p
    b[redrawn] = rng.random(redrawn.sum()) < p
    return a, b


def test_paired_interval_is_narrower_than_the_unpaired_one_on_correlated_pairs() -> None:
    rng = np.random.default_rng(6)
    a, b = correlated_pair(rng, 500, 0.3, 0.2)
    paired = estimates.paired(a, b)
    unpaired = stats.ttest_ind(a, b).confidence_interval(0.95)
    assert paired.high - paired.low < 0.6 * (unpaired.high - unpaired.low)
    assert paired.test == "exact McNemar"
    assert paired.difference == pytest.approx(a.mean() - b.mean())
    assert (paired.a_only, paired.b_only) == (
        int(((a == 1) & (b == 0)).sum()),
        int(((a == 0) & (b == 1)).sum()),
    )


def test_paired_comparison_has_about_five_percent_false_positives_at_no_difference() -> None:
    """Two runs with the same accuracy: McNemar rejects at 5% in at most ~5% of 1,000 simulations (exact tests
    are conservative), and the paired t interval excludes 0 about 5% of the time."""
    rng = np.random.default_rng(7)
    rejected, excluded = 0, 0
    for _ in range(SIMULATIONS):
        a, b = correlated_pair(rng, 300, 0.4, 0.5)
        comparison = estimates.paired(a, b)
        rejected += comparison.p < 0.05
        excluded += comparison.low > 0 or comparison.high < 0
    assert 0.02 <= rejected / SIMULATIONS <= 0.065
    assert 0.03 <= excluded / SIMULATIONS <= 0.07


def test_paired_comparison_detects_a_real_difference_and_names_the_winner() -> None:
    rng = np.random.default_rng(8)
    a, b = correlated_pair(rng, 1319, 0.5, 0.3)
    b[rng.random(1319) < 0.1] = 0.0  # B loses 10% of its answers
    comparison = estimates.paired(a, b)
    (verdict,) = estimates.verdicts([comparison], [("A", "B")])
    assert comparison.low > 0 and verdict["verdict"] == "A better" and verdict["p_holm"] < 0.05
    (reverse,) = estimates.verdicts([estimates.paired(b, a)], [("B", "A")])
    assert reverse["verdict"] == "A better"


def test_no_detectable_difference_quotes_the_minimum_detectable_effect() -> None:
    a = np.array([1.0, 0.0] * 50)
    comparison = estimates.paired(a, a.copy())
    (verdict,) = estimates.verdicts([comparison], [("A", "B")])
    assert comparison.p == 1.0 and comparison.low == comparison.high == 0.0
    assert verdict["verdict"] == f"no detectable difference (MDE {comparison.mde:.3f})" and comparison.mde > 0


def test_minimum_detectable_effect_has_80_percent_power() -> None:
    """Simulated at the MDE the paired t test rejects about 80% of the time."""
    rng = np.random.default_rng(9)
    n, spread = 400, 0.5
    mde = estimates.paired(rng.normal(0, spread, n), np.zeros(n)).mde
    rejected = np.mean(
        [estimates.paired(rng.normal(mde, spread, n), np.zeros(n)).p < 0.05 for _ in range(SIMULATIONS)]
    )
    assert 0.74 <= rejected <= 0.86


def test_planning_mde_matches_the_two_proportion_formula() -> None:
    assert estimates.planning_mde(500, 0.3) == pytest.approx(
        (1.959964 + 0.841621) * math.sqrt(2 * 0.21 / 500)
    )
    assert (
        estimates.planning_mde(1319, 0.5)
        < estimates.planning_mde(500, 0.5)
        < estimates.planning_mde(100, 0.5)
    )
    assert estimates.planning_mde(500, 0.3, correlation=0.75) == pytest.approx(
        estimates.planning_mde(500, 0.3) / 2
    )


def test_holm_adjusts_step_down_and_keeps_order() -> None:
    assert estimates.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert estimates.holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    assert estimates.holm([0.9, 0.8]) == pytest.approx([1.0, 1.0])


def flips(a_only: int, b_only: int, both: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """0/1 scores of two runs: `a_only` items only A got right, `b_only` only B, `both` that both got."""
    a = np.array([1.0] * a_only + [0.0] * b_only + [1.0] * both)
    b = np.array([0.0] * a_only + [1.0] * b_only + [1.0] * both)
    return a, b


def test_holm_withholds_a_verdict_that_one_comparison_alone_would_get() -> None:
    borderline = estimates.paired(*flips(30, 14))
    assert borderline.p == pytest.approx(stats.binomtest(30, 44).pvalue) and 0.01 < borderline.p < 0.05
    null = [estimates.paired(*flips(10, 10)) for _ in range(9)]
    (alone,) = estimates.verdicts([borderline], [("A", "B")])
    in_table = estimates.verdicts([borderline, *null], [("A", "B")] * 10)
    assert alone["verdict"] == "A better"
    assert in_table[0]["verdict"].startswith("no detectable difference")
    assert in_table[0]["p_holm"] == pytest.approx(10 * borderline.p)
    assert in_table[0]["holm_low"] < borderline.low  # the adjusted interval is wider


def test_clustered_pairs_are_compared_per_cluster() -> None:
    rng = np.random.default_rng(11)
    a, b = rng.random(90), rng.random(90)
    clusters = np.repeat(np.arange(30), 3)
    comparison = estimates.paired(a, b, clusters)
    per_cluster = (a - b).reshape(30, 3).mean(1)
    interval = stats.ttest_1samp(per_cluster, 0).confidence_interval(0.95)
    assert comparison.clusters == 30 and comparison.test == "paired t" and comparison.a_only is None
    assert (comparison.low, comparison.high) == pytest.approx((interval.low, interval.high))


def test_seed_summary_is_a_t_interval_and_one_seed_says_so() -> None:
    values = [0.31, 0.35, 0.29]
    summary = seed_statistics.over_seeds(values)
    expected = stats.ttest_1samp(values, 0).confidence_interval(0.95)
    assert (summary["low"], summary["high"]) == pytest.approx((expected.low, expected.high))
    assert summary["seeds"] == 3 and summary["std"] == pytest.approx(np.std(values, ddof=1))
    single = seed_statistics.over_seeds([0.3])
    assert single["low"] is None and single["method"] == "seed variance not estimated"


def test_seed_test_pairs_common_seeds_and_falls_back_to_welch() -> None:
    a = {0: 1.0, 1: 1.2, 2: 1.1}
    b = {0: 1.5, 1: 1.8, 2: 1.55}
    p, test = seed_statistics.seed_test(a, b)
    assert test == "paired t over seeds" and p == pytest.approx(
        stats.ttest_rel([1.0, 1.2, 1.1], [1.5, 1.8, 1.55]).pvalue
    )
    p, test = seed_statistics.seed_test(a, {5: 1.5, 6: 1.8})
    assert test == "Welch t over seeds"
    assert p == pytest.approx(stats.ttest_ind([1.0, 1.2, 1.1], [1.5, 1.8], equal_var=False).pvalue)
    assert seed_statistics.seed_test({0: 1.0}, b) is None


def test_the_numbers_docs_statistics_states() -> None:
    """docs/statistics.md's MDE table and examples are what the module computes."""
    page = (ROOT / "docs" / "statistics.md").read_text()
    table = re.search(
        r"\| n \| p = 0.1 \| p = 0.3 \| p = 0.5 \|\n\|---\|---\|---\|---\|\n((?:\|.*\|\n)+)", page
    )
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.group(1).splitlines()]
    assert [int(row[0]) for row in rows] == [100, 500, 1319]
    for row in rows:
        assert [float(cell) for cell in row[1:]] == [
            pytest.approx(estimates.planning_mde(int(row[0]), p), abs=5e-4) for p in (0.1, 0.3, 0.5)
        ]
    example = estimates.wilson(90, 300)  # "a Pass@1 of 0.30 has a 95% interval of [0.25, 0.35]"
    assert (round(example.low, 2), round(example.high, 2)) == (0.25, 0.35) and "[0.25, 0.35]" in page
    assert round(exact_wilson_coverage(0.02, 30), 3) == 0.978 and "97.8%" in page


def test_configurations_against_a_reference_are_holm_adjusted_seed_tests() -> None:
    values = {
        "base": {0: 1.0, 1: 1.1, 2: 1.05},
        "worse": {0: 1.5, 1: 1.62, 2: 1.55},
        "same": {0: 1.01, 1: 1.09, 2: 1.07},
        "one_seed": {0: 2.0},
    }
    adjusted = seed_statistics.against_reference(values, "base")
    raw = [seed_statistics.seed_test(values[name], values["base"])[0] for name in ("worse", "same")]
    assert set(adjusted) == {"worse", "same"}  # one seed: nothing to test
    assert [adjusted["worse"], adjusted["same"]] == pytest.approx(estimates.holm(raw))
