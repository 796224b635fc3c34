"""The statistics of an evaluation, as small pure functions.

Every number an evaluation reports comes with its uncertainty: labelers agree only about 73 % of
the time and a few hundred prompts leave win rates several points wide, so a bare number would
invite conclusions the data cannot carry.

* ``wilson_interval`` -- a binomial proportion's 95 % interval (good near 0 and 1 and for small n,
  unlike the normal approximation).
* ``bootstrap_mean_ci`` -- percentile bootstrap interval of a mean, reproducible from a seed.
* ``win_rate`` -- A vs B from paired scores, ties counted as half a win (and reported).
* ``length_controlled_win_rate`` -- the win rate with response length regressed out.
* ``sequence_kl`` / ``mean_and_se`` -- the sampled KL(A || B) estimate and its standard error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

Z95 = 1.959963984540054  # two-sided 95 % normal quantile


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` (``successes`` may be fractional,
    e.g. wins + ties / 2). An empty sample gives the uninformative [0, 1]."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_mean_ci(values: Sequence[float], *, seed: int = 0, resamples: int = 2000,
                      level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean: resample ``values`` with replacement
    ``resamples`` times (numpy's PCG64 seeded with ``seed``) and take the (1-level)/2 and
    (1+level)/2 quantiles of the resampled means (numpy's default linear interpolation)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return (float(low), float(high))


def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    """Sample mean and its standard error ``std(ddof=1) / sqrt(n)`` (SE is NaN for n < 2)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return (math.nan, math.nan)
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else math.nan
    return (float(x.mean()), se)


@dataclass
class WinRate:
    wins: int
    ties: int
    losses: int
    rate: float  # (wins + ties / 2) / n
    ci: tuple[float, float]  # Wilson interval of ``rate``

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses


def pairwise_outcomes(scores_a: Sequence[float], scores_b: Sequence[float],
                      tie_margin: float = 0.0) -> np.ndarray:
    """Per pair: 1 when A scores higher than B by more than ``tie_margin``, 0 when lower, 0.5 for a tie."""
    a, b = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired scores differ in length: {a.size} vs {b.size}")
    diff = a - b
    return np.where(diff > tie_margin, 1.0, np.where(diff < -tie_margin, 0.0, 0.5))


def win_rate(outcomes: Sequence[float]) -> WinRate:
    """Win rate of A over B from per-pair outcomes (1 win, 0.5 tie, 0 loss); ties count as half."""
    o = np.asarray(outcomes, dtype=np.float64)
    wins, ties, losses = int((o == 1).sum()), int((o == 0.5).sum()), int((o == 0).sum())
    n = wins + ties + losses
    if n != o.size:
        raise ValueError("outcomes must be 1 (A wins), 0.5 (tie) or 0 (B wins)")
    successes = wins + ties / 2
    return WinRate(wins, ties, losses, successes / n if n else math.nan, wilson_interval(successes, n))


def length_controlled_win_rate(outcomes: Sequence[float], length_diff: Sequence[float],
                               iterations: int = 50) -> float:
    """The win rate A would have if its responses were as long as B's.

    Fits a logistic regression ``P(A wins) = sigmoid(a + b * x)`` of the outcomes (ties as 0.5:
    the fractional-target likelihood) on ``x = length_diff / std(length_diff)`` (the per-pair
    length difference A - B) by Newton's method, and returns ``sigmoid(a)``: the predicted win
    rate at equal length. When the lengths never differ the regression has nothing to remove and
    this equals the plain win rate. A judge that simply prefers longer answers gives A a high
    plain win rate but a length-controlled one near 0.5 (the idea of AlpacaEval's LC win rate,
    with the length term alone)."""
    y = np.asarray(outcomes, dtype=np.float64)
    d = np.asarray(length_diff, dtype=np.float64)
    if y.size == 0:
        return math.nan
    scale = d.std()
    if scale == 0:
        return float(y.mean())
    X = np.stack([np.ones_like(d), d / scale], axis=1)
    w = np.zeros(2)
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-np.clip(X @ w, -30, 30)))
        grad = X.T @ (y - p)
        # A tiny ridge keeps Newton finite when length separates wins from losses perfectly.
        hess = X.T @ (X * (p * (1 - p))[:, None]) + 1e-6 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w += step
        if np.abs(step).max() < 1e-10:
            break
    return float(1 / (1 + math.exp(-w[0])))


def sequence_kl(logp_a: torch.Tensor, logp_b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence sampled KL estimate: ``sum_t (log pA(y_t) - log pB(y_t))`` over the response
    tokens (``mask`` [B, T] 1 on response tokens) of sequences sampled from A. Its mean over
    sequences is an unbiased estimate of KL(A || B) for the sampling distribution."""
    return ((logp_a - logp_b) * mask).sum(-1)


def length_stats(lengths: Sequence[float]) -> dict[str, float]:
    """Mean, standard deviation, median and range of response lengths."""
    x = np.asarray(lengths, dtype=np.float64)
    if x.size == 0:
        return {"mean": math.nan, "std": math.nan, "median": math.nan, "min": math.nan, "max": math.nan}
    return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if x.size > 1 else 0.0,
            "median": float(np.median(x)), "min": float(x.min()), "max": float(x.max())}


def rate_with_ci(flags: Sequence[bool]) -> dict[str, float | list[float] | int]:
    """``{"rate", "ci", "k", "n"}`` of a list of yes/no outcomes (Wilson interval)."""
    n, k = len(flags), int(sum(bool(f) for f in flags))
    return {"rate": k / n if n else math.nan, "ci": list(wilson_interval(k, n)), "k": k, "n": n}


def distinct_ngrams(texts: Sequence[str], n: int) -> float:
    """distinct-n: unique word n-grams / all word n-grams over ``texts`` (1.0: no n-gram repeats;
    low values: the texts repeat each other)."""
    grams = [tuple(words[i:i + n]) for t in texts for words in [t.lower().split()]
             for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else math.nan
