"""DPO losses on sequence log-probabilities (pure functions)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_STATS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
"""The batch means ``dpo_loss`` reports, named as other libraries name them."""

def sequence_logprobs(token_logprobs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Sum of per-token log-probabilities [N] (row-major over the selected response positions)
    into one value per sequence, given how many positions each sequence has ([B])."""
    seq = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    return torch.zeros(len(counts), dtype=token_logprobs.dtype, device=token_logprobs.device).index_add(
        0, seq, token_logprobs)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict]:
    """``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`` averaged over pairs.

    ``label_smoothing`` eps assumes labels are flipped with probability eps (conservative DPO):
    ``-(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``. Also returns the implicit rewards
    ``beta * (pi - ref)`` that users know from other libraries."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    margin = chosen_reward - rejected_reward
    loss = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    stats = {"rewards/chosen": chosen_reward.mean().item(), "rewards/rejected": rejected_reward.mean().item(),
             "rewards/margins": margin.mean().item(), "rewards/accuracies": (margin > 0).float().mean().item()}
    return loss.mean(), stats
