"""The reward model's losses and held-out metrics, as pure functions of scores.

Every preference becomes pairs ``(winner, loser)`` of one prompt. A *group* is one batch element:
the pairs of one comparison (1 pair), one ranking of K (up to C(K,2) pairs) or the ratings of one
prompt. Following InstructGPT, a group's pair losses are averaged, so a ranking weighs as much as
a comparison and its correlated pairs are never shuffled apart (which overfits within an epoch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                       margin: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair ``-log sigmoid(r_chosen - r_rejected - margin)`` (margin 0 when None)."""
    diff = r_chosen.float() - r_rejected.float()
    if margin is not None:
        diff = diff - margin.float()
    return -F.logsigmoid(diff)


def centring_penalty(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair ``(r_chosen + r_rejected)^2``: keeps rewards near zero (TRL's
    ``center_rewards_coefficient`` term, there averaged over pairs)."""
    return (r_chosen.float() + r_rejected.float()) ** 2


def group_mean(values: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Mean of ``values`` [P] within each group id of ``group`` [P] (ids 0..n_groups-1) -> [n_groups]."""
    sums = torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add(0, group, values)
    counts = torch.zeros(n_groups, dtype=values.dtype, device=values.device).index_add(
        0, group, torch.ones_like(values))
    return sums / counts.clamp(min=1)


def grouped_preference_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, group: torch.Tensor,
                            n_groups: int, margin: torch.Tensor | None = None,
                            centre_coef: float = 0.0) -> torch.Tensor:
    """Loss of each group [n_groups]: the mean over its pairs of the Bradley-Terry loss (plus
    ``centre_coef * (r_chosen + r_rejected)^2``). The training loss is the mean over groups."""
    per_pair = bradley_terry_loss(r_chosen, r_rejected, margin)
    if centre_coef:
        per_pair = per_pair + centre_coef * centring_penalty(r_chosen, r_rejected)
    return group_mean(per_pair, group, n_groups)


# ---------------------------------------------------------------- held-out metrics


def pair_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Share of pairs where the chosen response scores higher (a tie counts as half)."""
    wins = (r_chosen > r_rejected).float() + 0.5 * (r_chosen == r_rejected).float()
    return wins.mean()


def expected_calibration_error(r_chosen: torch.Tensor, r_rejected: torch.Tensor, bins: int = 10) -> torch.Tensor:
    """ECE of the Bradley-Terry probability ``p = sigmoid(r_chosen - r_rejected)``.

    The model predicts the side it gives p >= 1/2 with confidence ``max(p, 1 - p)`` (in [0.5, 1]);
    confidences are cut into ``bins`` equal-width bins over [0.5, 1] and ECE is the
    count-weighted mean of ``|accuracy - mean confidence|`` over the bins."""
    p = torch.sigmoid(r_chosen.float() - r_rejected.float())
    confidence = torch.maximum(p, 1 - p)
    correct = (p > 0.5).float() + 0.5 * (p == 0.5).float()
    index = ((confidence - 0.5) * 2 * bins).long().clamp(0, bins - 1)
    ece = confidence.new_zeros(())
    for b in range(bins):
        in_bin = index == b
        if in_bin.any():
            ece = ece + in_bin.float().mean() * (correct[in_bin].mean() - confidence[in_bin].mean()).abs()
    return ece


def pearson_correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of two [N] tensors (0 when either is constant); differentiable."""
    x, y = x.float() - x.float().mean(), y.float() - y.float().mean()
    denominator = (x.pow(2).sum() * y.pow(2).sum()).sqrt()
    return (x * y).sum() / denominator if denominator > 0 else x.new_zeros(())


def length_correlation_loss(quality: torch.Tensor, length_score: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """ODIN's (Chen et al. 2024) disentangling term over a batch of responses:
    ``|corr(quality, lengths)| - corr(length_score, lengths)``; minimising it ties the length head
    to the response length and leaves the quality head (the reward) uncorrelated with it."""
    return pearson_correlation(quality, lengths).abs() - pearson_correlation(length_score, lengths)
