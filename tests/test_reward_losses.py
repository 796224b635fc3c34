"""Reward-model losses and metrics against hand-computed values."""

import pytest
import torch

from preftune.reward.losses import (
    bradley_terry_loss,
    centring_penalty,
    expected_calibration_error,
    group_mean,
    grouped_preference_loss,
    pair_accuracy,
)

# -log sigmoid(x) = log(1 + exp(-x)):  x = 2 -> 0.126928011, x = -1.5 -> 1.701413278, x = 0.5 -> 0.474076984
L2, L_NEG15, L05 = 0.1269280110429726, 1.7014132779827524, 0.4740769841801067


def test_bradley_terry_loss_per_pair():
    loss = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.5]))
    assert loss.tolist() == pytest.approx([L2, L_NEG15])


def test_bradley_terry_margin_is_subtracted():
    # r_c - r_r = 2, margin 1.5 -> -log sigmoid(0.5)
    loss = bradley_terry_loss(torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([1.5]))
    assert loss.item() == pytest.approx(L05)


def test_centring_penalty():
    assert centring_penalty(torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.0])).tolist() == [2.25, 1.0]


def test_group_mean():
    values = torch.tensor([1.0, 3.0, 10.0, 4.0])
    assert group_mean(values, torch.tensor([0, 0, 1, 0]), 2).tolist() == pytest.approx([8 / 3, 10.0])


def test_grouped_loss_averages_pairs_within_a_group():
    # group 0: a ranking with pairs of diff 2 and -1.5; group 1: one comparison with diff 0.5
    r_c = torch.tensor([2.0, 0.0, 0.5])
    r_r = torch.tensor([0.0, 1.5, 0.0])
    loss = grouped_preference_loss(r_c, r_r, torch.tensor([0, 0, 1]), 2)
    assert loss.tolist() == pytest.approx([(L2 + L_NEG15) / 2, L05])


def test_grouped_loss_with_centring():
    # BT(2) + 0.01 * (2 + 0)^2 = 0.126928 + 0.04
    loss = grouped_preference_loss(torch.tensor([2.0]), torch.tensor([0.0]), torch.tensor([0]), 1, centre_coef=0.01)
    assert loss.item() == pytest.approx(L2 + 0.04)


def test_grouped_loss_gradient_flows_to_both_sides():
    r_c = torch.tensor([0.0], requires_grad=True)
    r_r = torch.tensor([0.0], requires_grad=True)
    grouped_preference_loss(r_c, r_r, torch.tensor([0]), 1).sum().backward()
    # d/dx -log sigmoid(x) at 0 = -0.5
    assert r_c.grad.item() == pytest.approx(-0.5)
    assert r_r.grad.item() == pytest.approx(0.5)


def test_pair_accuracy_counts_ties_as_half():
    assert pair_accuracy(torch.tensor([1.0, 0.0, 2.0, 1.0]), torch.tensor([0.0, 1.0, 2.0, 0.5])).item() == 0.625


def test_expected_calibration_error_hand_computed():
    # diffs 2, -1, 0.5, 0: confidences 0.8808 (right), 0.7311 (wrong), 0.6225 (right), 0.5 (half).
    # 2 bins over [0.5, 1]: [0.5, 0.75) holds 3 with accuracy 0.5 and mean confidence 0.61784;
    # [0.75, 1] holds 1 with accuracy 1 and confidence 0.88080.
    # ECE = 3/4 * |0.5 - 0.6178393| + 1/4 * |1 - 0.8807971| = 0.1181802
    ece = expected_calibration_error(torch.tensor([2.0, -1.0, 0.5, 0.0]), torch.zeros(4), bins=2)
    assert ece.item() == pytest.approx(0.11818020796349432, abs=1e-6)


def test_expected_calibration_error_is_zero_when_calibrated():
    # confidence sigmoid(log 3) = 0.75 with 3 of 4 right
    d = torch.log(torch.tensor(3.0))
    ece = expected_calibration_error(torch.stack([d, d, d, -d]), torch.zeros(4))
    assert ece.item() == pytest.approx(0.0, abs=1e-6)


def test_pearson_correlation_by_hand():
    from preftune.reward.losses import pearson_correlation

    # q = [1, 2, 4] against [1, 2, 3]: centred (-4/3, -1/3, 5/3) and (-1, 0, 1); cov sum 3,
    # squares 42/9 and 2 -> 3 / sqrt(84/9) = 9 / sqrt(84)
    lengths = torch.tensor([1.0, 2.0, 3.0])
    assert pearson_correlation(torch.tensor([1.0, 2.0, 4.0]), lengths).item() == pytest.approx(9 / 84 ** 0.5)
    assert pearson_correlation(torch.tensor([5.0, 5.0, 5.0]), lengths).item() == 0.0  # a constant


def test_length_correlation_loss_by_hand():
    from preftune.reward.losses import length_correlation_loss

    lengths = torch.tensor([1.0, 2.0, 3.0])
    # |corr([1, 2, 4], L)| = 9 / sqrt(84); corr([0, 0, 1], L) = 1 / sqrt(4/3) = sqrt(3) / 2
    loss = length_correlation_loss(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0.0, 0.0, 1.0]), lengths)
    assert loss.item() == pytest.approx(9 / 84 ** 0.5 - 3 ** 0.5 / 2)
    # a quality head anti-correlated with length is penalised as much as a correlated one
    assert length_correlation_loss(torch.tensor([3.0, 2.0, 1.0]), lengths, lengths).item() == pytest.approx(0.0)
    assert length_correlation_loss(-lengths, -lengths, lengths).item() == pytest.approx(2.0)
    q = torch.tensor([1.0, 2.0, 4.0], requires_grad=True)
    length_correlation_loss(q, lengths.clone(), lengths).backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
