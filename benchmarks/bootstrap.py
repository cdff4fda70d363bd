"""Percentile intervals for benchmark scores that vary with two draws: the training seed and the held-out item.

A cell of the quality table is the mean of scores[s, i] over training seeds s and held-out items i (renders or
questions). Both were drawn at random, so the interval resamples both, the way they were drawn (a two-stage
bootstrap): draw S seeds with replacement, then, within each drawn seed, draw N items with replacement, and take
the mean; repeat; the 95% interval is the 2.5th and 97.5th percentiles of those means. A seed-only or item-only
bootstrap would leave out one source of spread.

Quantities measured on the same seeds and items (two columns of one table, or a variant and the paper's
correction) are resampled with the same indices, so a difference or a ratio of them stays paired.
The bootstrap's own generator has a fixed seed, so a table is repeatable.
"""

from __future__ import annotations

import numpy as np

DRAWS = 4000  # bootstrap resamples; the percentile end points move by well under 0.01 between generator seeds


def resampled_means(scores: np.ndarray, draws: int = DRAWS, seed: int = 0) -> np.ndarray:
    """Means of two-stage bootstrap resamples (seeds, then items within each seed).

    `scores` is (seeds, items), or (quantities, seeds, items) for quantities measured on the same seeds and
    items, which are resampled with the same indices. Returns (draws,) or (quantities, draws).
    """
    scores = np.asarray(scores, dtype=float)
    stacked = scores if scores.ndim == 3 else scores[None]
    if stacked.ndim != 3 or 0 in stacked.shape:
        raise ValueError(f"scores must be (seeds, items) or (quantities, seeds, items), non-empty; got {scores.shape}")
    _, n_seeds, n_items = stacked.shape
    rng = np.random.default_rng(seed)
    seed_index = rng.integers(n_seeds, size=(draws, n_seeds))  # (draws, S)
    item_index = rng.integers(n_items, size=(draws, n_seeds, n_items))  # (draws, S, N)
    means = stacked[:, seed_index[:, :, None], item_index].mean(axis=(2, 3))  # (Q, draws, S, N) -> (Q, draws)
    return means if scores.ndim == 3 else means[0]


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central `level` percentile interval of bootstrap values (NaNs, e.g. a ratio over 0 / 0, dropped)."""
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def mean_interval(scores: np.ndarray, level: float = 0.95, draws: int = DRAWS,
                  seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean of (seeds, items) scores and its two-stage bootstrap percentile interval."""
    low, high = percentile_interval(resampled_means(scores, draws, seed), level)
    return float(np.mean(scores)), low, high
