"""Scores of a problem from n sampled completions: pass@k by the unbiased estimator of Chen et al. (2021) and
maj@k (self-consistency, Wang et al. 2023), each for every k of `generation.k`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence

import numpy as np


def ks(samples: int, configured: Sequence[int] | None) -> list[int]:
    """The k of pass@k and maj@k: `configured` (each 1 <= k <= samples), else 1 and every power of 2 up to
    `samples`, and `samples` itself."""
    if configured is None:
        powers = [2**e for e in range(samples.bit_length()) if 2**e <= samples]
        return sorted({*powers, samples})
    bad = [k for k in configured if not 1 <= k <= samples]
    if bad:
        raise ValueError(
            f"generation.k={list(configured)}: each k must be in 1..generation.num_samples={samples}"
        )
    return sorted(set(configured))


def pass_at_k(samples: int, correct: int, k: int) -> float:
    """The probability that at least one of k completions drawn without replacement from `samples`, `correct`
    of them right, is right: 1 - C(n-c, k) / C(n, k), as the product 1 - prod_{i=n-c+1}^{n} (1 - k/i), which
    stays exact in floating point where the binomials overflow."""
    if samples - correct < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(samples - correct + 1, samples + 1)))


def majority_at_k(answers: Sequence[Hashable | None], correct: Sequence[float], k: int) -> float:
    """maj@k: whether the most frequent answer among the first k samples (None: no answer extracted, no vote)
    is right; a tie goes to the tied answer that came first among the k; no answer at all scores 0."""
    votes = Counter(answer for answer in answers[:k] if answer is not None)
    if not votes:
        return 0.0
    most = max(votes.values())
    first = next(i for i, answer in enumerate(answers[:k]) if answer is not None and votes[answer] == most)
    return float(correct[first])
