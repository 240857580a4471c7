"""pass@k (the unbiased estimator) and maj@k (self-consistency) of a problem's sampled completions."""

from __future__ import annotations

import itertools
from fractions import Fraction
from math import comb

import pytest

from stats import sampled


@pytest.mark.parametrize("samples", range(1, 8))
def test_pass_at_k_is_the_share_of_k_subsets_with_a_right_completion(samples: int) -> None:
    for correct in range(samples + 1):
        outcomes = [1] * correct + [0] * (samples - correct)
        for k in range(1, samples + 1):
            subsets = list(itertools.combinations(outcomes, k))
            exact = sum(any(subset) for subset in subsets) / len(subsets)
            assert sampled.pass_at_k(samples, correct, k) == pytest.approx(exact, abs=1e-12)


def test_pass_at_k_stays_exact_where_the_binomials_overflow_a_float() -> None:
    samples, correct, k = 2000, 3, 600
    exact = 1 - Fraction(comb(samples - correct, k), comb(samples, k))
    assert comb(samples, k) > 2**1024  # no float holds C(n, k)
    assert sampled.pass_at_k(samples, correct, k) == pytest.approx(float(exact), rel=1e-12)


def test_majority_vote_with_ties_and_unanswered_samples() -> None:
    answers = ["7", None, "5", "5", "7", "7"]
    right = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    assert sampled.majority_at_k(answers, right, 1) == 1.0
    # first four: "5" twice, "7" once, None abstains
    assert sampled.majority_at_k(answers, right, 4) == 0.0
    # first five: "7" and "5" tie at two; "7" came first
    assert sampled.majority_at_k(answers, right, 5) == 1.0
    assert sampled.majority_at_k(["5", "7", "7", "5"], [0.0, 1.0, 1.0, 0.0], 4) == 0.0  # tie: "5" first
    assert sampled.majority_at_k([None, None], [0.0, 0.0], 2) == 0.0


def test_default_ks_are_the_powers_of_two_up_to_the_sample_count() -> None:
    assert sampled.ks(1, None) == [1]
    assert sampled.ks(4, None) == [1, 2, 4]
    assert sampled.ks(6, None) == [1, 2, 4, 6]
    assert sampled.ks(8, [3, 1]) == [1, 3]
    with pytest.raises(
        ValueError, match=r"generation.k=\[9\]: each k must be in 1..generation.num_samples=8"
    ):
        sampled.ks(8, [9])
