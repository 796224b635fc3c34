"""Evaluation statistics against hand-computed values."""

import math

import numpy as np
import pytest
import torch

from preftune.evaluation.stats import (
    bootstrap_mean_ci,
    distinct_ngrams,
    length_controlled_win_rate,
    length_stats,
    mean_and_se,
    pairwise_outcomes,
    rate_with_ci,
    sequence_kl,
    wilson_interval,
    win_rate,
)


def test_wilson_interval_matches_hand_computed_values():
    # 8/10: p = 0.8, z^2 = 3.841459; centre = (0.8 + 0.192073) / 1.384146 = 0.716743,
    # half = 1.959964 * sqrt(0.016 + 0.009604) / 1.384146 = 0.226578.
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.490165, abs=1e-5)
    assert high == pytest.approx(0.943321, abs=1e-5)
    # 0/10: centre = half = 0.192073 / 1.384146 = 0.138768 -> [0, 0.277535].
    low, high = wilson_interval(0, 10)
    assert low == 0.0
    assert high == pytest.approx(0.277535, abs=1e-5)
    # Symmetry: 10/10 mirrors 0/10.
    assert wilson_interval(10, 10)[0] == pytest.approx(1 - 0.277535, abs=1e-5)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_win_rate_counts_ties_as_half():
    outcomes = pairwise_outcomes([3, 2, 1, 5], [1, 2, 4, 4])
    assert outcomes.tolist() == [1.0, 0.5, 0.0, 1.0]
    wr = win_rate(outcomes)
    assert (wr.wins, wr.ties, wr.losses, wr.n) == (2, 1, 1, 4)
    assert wr.rate == 0.625  # (2 + 1/2) / 4
    assert wr.ci == wilson_interval(2.5, 4)


def test_tie_margin_turns_close_scores_into_ties():
    outcomes = pairwise_outcomes([1.0, 1.05, 2.0], [1.02, 1.0, 1.0], tie_margin=0.1)
    assert outcomes.tolist() == [0.5, 0.5, 1.0]
    with pytest.raises(ValueError):
        pairwise_outcomes([1, 2], [1])


def test_length_controlled_win_rate_removes_a_length_preference():
    # Length difference +2 on four pairs (A wins 3 of 4) and -1 on four pairs (A wins 2 of 4).
    # Two x levels saturate the logistic model: logit P = c + k d with c + 2k = log 3 and
    # c - k = 0, so P(win | d = 0) = sigmoid(log(3) / 3) = 3^(1/3) / (1 + 3^(1/3)) = 0.590541,
    # below the plain win rate 5/8 = 0.625.
    outcomes = [1, 1, 1, 0, 1, 1, 0, 0]
    diff = [2, 2, 2, 2, -1, -1, -1, -1]
    assert length_controlled_win_rate(outcomes, diff) == pytest.approx(0.590541, abs=1e-5)
    # No length difference at all: nothing to remove.
    assert length_controlled_win_rate([1, 0.5, 0, 1], [0, 0, 0, 0]) == pytest.approx(0.625)


def test_length_controlled_win_rate_of_a_pure_length_judge_is_near_half():
    # A noisy judge that only looks at length: P(A wins) = sigmoid(diff); A is usually longer.
    rng = np.random.default_rng(0)
    diff = rng.normal(1.0, 2.0, size=2000)
    outcomes = (rng.random(diff.size) < 1 / (1 + np.exp(-diff))).astype(float)
    assert outcomes.mean() > 0.6
    assert abs(length_controlled_win_rate(outcomes, diff) - 0.5) < 0.05


def test_sequence_kl_sums_masked_log_ratio_and_se():
    logp_a = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])
    logp_b = torch.tensor([[-1.5, -2.0, -1.0], [-2.0, -3.0, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    kl = sequence_kl(logp_a, logp_b, mask)
    assert kl.tolist() == [1.0, 3.0]  # 0.5 + 0 + 0.5; 1 + 2 (third token is padding)
    mean, se = mean_and_se(kl.tolist())
    assert mean == 2.0
    assert se == pytest.approx(1.0)  # std([1, 3], ddof=1) = sqrt(2), / sqrt(2)


def test_mean_and_se_hand_computed():
    mean, se = mean_and_se([1, 2, 3, 4])
    assert mean == 2.5
    assert se == pytest.approx(math.sqrt(5 / 3) / 2)  # 0.645497
    assert math.isnan(mean_and_se([7.0])[1])


def test_bootstrap_ci_is_reproducible_and_sensible():
    assert bootstrap_mean_ci([3.0] * 10, seed=1) == (3.0, 3.0)
    # Two points: resampled means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4, so the 2.5 %
    # and 97.5 % quantiles are exactly 0 and 1.
    assert bootstrap_mean_ci([0.0, 1.0], seed=0, resamples=4000) == (0.0, 1.0)
    x = np.random.default_rng(5).normal(0, 1, size=200)
    a = bootstrap_mean_ci(x, seed=7)
    assert a == bootstrap_mean_ci(x, seed=7)
    assert a != bootstrap_mean_ci(x, seed=8)
    # Close to the normal-theory interval mean +- 1.96 * s / sqrt(n).
    half = 1.96 * x.std(ddof=1) / math.sqrt(x.size)
    assert a[0] == pytest.approx(x.mean() - half, abs=0.02)
    assert a[1] == pytest.approx(x.mean() + half, abs=0.02)


def test_small_helpers():
    assert rate_with_ci([True, False, False, True]) == {"rate": 0.5, "ci": list(wilson_interval(2, 4)),
                                                        "k": 2, "n": 4}
    assert distinct_ngrams(["a b a b"], 1) == 0.5
    assert distinct_ngrams(["a b a b"], 2) == pytest.approx(2 / 3)
    s = length_stats([1, 2, 3, 10])
    assert (s["mean"], s["median"], s["min"], s["max"]) == (4.0, 2.5, 1.0, 10.0)
