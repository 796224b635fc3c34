"""The mathematics of online RL for language models (PPO, RLOO, GRPO, REINFORCE++), as small pure
functions on tensors.

Shapes: ``[B, T]`` tensors run over the *response* tokens of B episodes (right-padded);
``mask`` is 1.0 on real response tokens (the EOS token included) and 0.0 on padding. Nothing
here touches a model, so each function is tested against hand-computed values.

Statistics over the batch (``masked_mean``/``masked_var``) are the only places where episodes
are mixed. Under data parallelism each process holds a share of the episodes, and these functions
take ``reduce``, a function that sums a tensor over the processes (an all-reduce; None in one
process): the sums and counts are reduced before dividing, so the statistics are those of the
whole batch. Losses of a mini-batch split across processes (and micro-batches) divide their sums by
the mini-batch's global count (``count``), so the parts add up to the mean over the whole.
"""

from __future__ import annotations

import math
from typing import Callable, Literal, Sequence

import torch

from preftune.models.logits import last_token_index

KLEstimator = Literal["k1", "k2", "k3"]
# How a loss's per-token terms become one number (GRPO's --loss-type): "token_mean" divides the sum
# by the tokens of the batch (DAPO; PPO's choice), "sequence_mean" averages each sequence's tokens,
# then the sequences (GRPO's paper), "constant" divides the sum by sequences x the response length
# (Dr. GRPO: no length bias from the normalisation).
Aggregation = Literal["token_mean", "sequence_mean", "constant"]
Reduce = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------- masked statistics


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum()


def masked_sum_rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B]: each row's sum over its masked positions."""
    return (x * mask).sum(1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, count: float | torch.Tensor | None = None,
                reduce: Reduce | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1.

    ``count``: divide the masked sum by this number instead of the mask's own count (for a part of a
    larger batch whose count is ``count``: the parts' results add up to the mean of the whole).
    ``reduce``: sum and count are first summed over the processes (the mean of every process's
    positions)."""
    if count is not None:
        return masked_sum(x, mask) / max(float(count), 1.0)
    if reduce is None:
        return masked_sum(x, mask) / mask.sum().clamp(min=1)
    total = reduce(torch.stack([masked_sum(x, mask), mask.sum().to(x.dtype)]))
    return total[0] / total[1].clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True,
               reduce: Reduce | None = None) -> torch.Tensor:
    """Variance of ``x`` over the masked positions (Bessel-corrected by default); with ``reduce``
    over every process's positions (two passes: the global mean, then the squared deviations)."""
    mean = masked_mean(x, mask, reduce=reduce)
    if reduce is None:
        squares, n = masked_sum((x - mean) ** 2, mask), mask.sum()
    else:
        squares, n = reduce(torch.stack([masked_sum((x - mean) ** 2, mask), mask.sum().to(x.dtype)]))
    var = squares / n.clamp(min=1)
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
           reduce: Reduce | None = None) -> torch.Tensor:
    """Scale ``x`` to unit variance over the masked positions (and zero mean when ``shift_mean``);
    padding positions come out as 0. Rewards are whitened without shifting the mean, so a
    positive reward stays positive (lm-human-preferences / TRL). With ``reduce`` the mean and
    variance are those of every process's positions."""
    mean, var = masked_mean(x, mask, reduce=reduce), masked_var(x, mask, reduce=reduce)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


# ---------------------------------------------------------------- entropy
# Log-probabilities: ``preftune.models.logits.token_logprobs``, under the full-vocabulary
# softmax(logits / temperature), identically at rollout and at update time: top-p/top-k only shape
# sampling, never the PPO ratio.


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of ``softmax(logits / temperature)`` per position (nats)."""
    scaled = logits.float() if temperature in (0, 1) else logits.float() / temperature
    logp = torch.log_softmax(scaled, -1)
    return -(logp.exp() * logp).sum(-1)


# ---------------------------------------------------------------- KL and rewards


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman 2020).

    k1 = log pi - log pi_ref (unbiased, can be negative per token);
    k2 = (log pi - log pi_ref)^2 / 2 (biased, never negative);
    k3 = (r - 1) - log r with r = pi_ref / pi (unbiased, never negative, lower variance).

    As a loss term on sampled tokens (``kl_in = "loss"``) they differ in what they pull: k1's
    expected gradient is zero (E_pi[grad log pi] = 0), k2's is the gradient of KL(pi || pi_ref),
    k3's that of the reverse KL(pi_ref || pi) (GRPO's leash)."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (use k1, k2 or k3)")


def final_scores(scores: torch.Tensor, ended: torch.Tensor, missing_eos_penalty: float | None) -> torch.Tensor:
    """The score each episode receives: the reward's, or ``missing_eos_penalty`` for a response
    that never ended (EOS or stop string) within the length limit (the "EOS trick")."""
    if missing_eos_penalty is None:
        return scores
    return torch.where(ended, scores, torch.full_like(scores, missing_eos_penalty))


def per_token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                      kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards, non_score_rewards), both [B, T]: ``-kl_coef * KL_t`` on every response token,
    plus the episode's score at its last real token (the EOS itself, never the pad after it)."""
    non_score = -kl_coef * kl * mask
    rewards = non_score.clone()
    rows = torch.arange(scores.shape[0], device=scores.device)
    rewards[rows, last_token_index(mask)] += scores
    return rewards, non_score


# ---------------------------------------------------------------- advantages


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                   lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens only: (advantages, returns).

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}, with
    V and A taken as 0 after the last real token (the episode ends there)."""
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = (delta + gamma * lam * next_advantage) * m
        advantages[:, t] = advantage
        # A padding position passes zeros backwards: the sequence ended before it.
        next_value = values[:, t] * m
        next_advantage = advantage
    returns = (advantages + values) * mask
    return advantages, returns


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """G_t = r_t + gamma * G_{t+1} over the response tokens, 0 after the last real token (REINFORCE++'s
    returns: GAE without a value function, lambda = 1)."""
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        returns[:, t] = running
    return returns


# Critic-free baselines. ``rewards`` is [B] with the K samples of each prompt next to each other
# (episodes g*K .. g*K+K-1 answer the same prompt).


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): each sample's reward minus the mean of the other K - 1 samples of
    its prompt, ``A_i = r_i - (sum_j r_j - r_i) / (K - 1)``."""
    if group_size < 2:
        raise ValueError("the leave-one-out baseline needs at least 2 samples per prompt")
    groups = rewards.view(-1, group_size)
    baseline = (groups.sum(1, keepdim=True) - groups) / (group_size - 1)
    return (groups - baseline).reshape(-1)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: Literal["group", "batch", "none"] = "group",
                     eps: float = 1e-4, reduce: Reduce | None = None) -> torch.Tensor:
    """GRPO (Shao et al. 2024): each sample's reward minus its group's mean, divided by the group's
    standard deviation (``group``), the whole batch's (``batch``, over every process with ``reduce``) or
    not at all (``none``, Dr. GRPO). A group whose K rewards are equal gets advantage 0 (not 0/0)."""
    groups = rewards.view(-1, group_size)
    centred = groups - groups.mean(1, keepdim=True)
    if scale == "group":
        centred = centred / (groups.std(1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / (masked_var(rewards, torch.ones_like(rewards), reduce=reduce).sqrt() + eps)
    elif scale != "none":
        raise ValueError(f"unknown reward scaling {scale!r} (use group, batch or none)")
    return centred.reshape(-1)


def varied_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B] bool, DAPO's dynamic sampling filter: True for the samples of a prompt whose K rewards are
    not all equal (a group of equal rewards has no advantage to learn from)."""
    groups = rewards.view(-1, group_size)
    return (groups.max(1).values > groups.min(1).values).repeat_interleave(group_size)


def sequence_to_tokens(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, T]: a per-sequence value (an advantage) on every response token of its sequence."""
    return values[:, None] * mask


# ---------------------------------------------------------------- losses


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: Aggregation = "token_mean",
              tokens: float | torch.Tensor | None = None, sequences: float | None = None,
              max_tokens: int | None = None) -> torch.Tensor:
    """One number from per-token loss terms (see ``Aggregation``). ``tokens``/``sequences``: the
    counts of the whole mini-batch when this is a part of it (the parts' results add up to the
    whole's); ``max_tokens``: the response length limit, for ``constant``."""
    if how == "token_mean":
        return masked_mean(per_token, mask, tokens)
    n = float(sequences) if sequences is not None else float(per_token.shape[0])
    if how == "sequence_mean":
        per_sequence = masked_sum_rows(per_token, mask) / mask.sum(1).clamp(min=1)
        return per_sequence.sum() / max(n, 1.0)
    if how == "constant":
        if max_tokens is None:
            raise ValueError("the constant aggregation needs max_tokens")
        return masked_sum(per_token, mask) / (max(n, 1.0) * max_tokens)
    raise ValueError(f"unknown loss aggregation {how!r}")



def truncated_importance_weights(old_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor,
                                 cap: float) -> torch.Tensor:
    """min(pi_old / mu, cap) per token, mu = the sampling engine's probability of the token it drew.

    The policy gradient assumes the tokens came from pi_old; a separate engine (vLLM, another
    precision) samples from a slightly different mu. Weighting each token's loss by pi_old / mu
    corrects that, and truncating at ``cap`` bounds the variance (truncated importance sampling,
    as in verl and TRL)."""
    return torch.exp(old_logprobs - sampler_logprobs).clamp(max=cap)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_ratio: float, count: float | torch.Tensor | None = None,
                weights: torch.Tensor | None = None, clip_ratio_high: float | None = None,
                aggregation: Aggregation = "token_mean", sequences: float | None = None,
                max_tokens: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (to minimise) and its diagnostics, per token.

    loss = agg_t w_t * max(-A_t * r_t, -A_t * clip(r_t, 1 - eps, 1 + eps_high)), r_t = pi / pi_old,
    eps_high = ``clip_ratio_high`` (DAPO's asymmetric clip; ``clip_ratio`` when None), w_t =
    ``weights`` (``truncated_importance_weights``; 1 without), agg = ``aggregate(aggregation)``. With
    ``count`` (tokens) and ``sequences`` the loss and diagnostics are this part's share of the
    mini-batch's."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    high = clip_ratio if clip_ratio_high is None else clip_ratio_high
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_ratio, 1.0 + high)
    per_token = torch.maximum(unclipped, clipped)
    loss = aggregate(per_token * weights if weights is not None else per_token, mask, aggregation, count,
                     sequences, max_tokens)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask, count),
                 "approxkl": 0.5 * masked_mean(log_ratio ** 2, mask, count),
                 "ratio": masked_mean(ratio, mask, count)}
    return loss, stats


def sequence_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                         mask: torch.Tensor, clip_ratio: float, sequences: float | None = None,
                         weights: torch.Tensor | None = None,
                         clip_ratio_high: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate with the whole response as one action (RLOO, as TRL's RLOOTrainer):
    ``r = pi(y|x) / pi_old(y|x) = exp(sum_t log r_t)``, loss = mean over sequences of
    ``w * max(-A * r, -A * clip(r, 1 - eps, 1 + eps_high))`` with ``advantages`` per sequence [B] and
    ``weights`` per sequence [B] (1 without). ``sequences``: the mini-batch's count, for a part of it."""
    log_ratio = masked_sum_rows(logprobs - old_logprobs, mask)
    ratio = torch.exp(log_ratio)
    high = clip_ratio if clip_ratio_high is None else clip_ratio_high
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_ratio, 1.0 + high)
    per_sequence = torch.maximum(unclipped, clipped)
    if weights is not None:
        per_sequence = per_sequence * weights
    n = max(float(sequences) if sequences is not None else float(per_sequence.shape[0]), 1.0)
    with torch.no_grad():
        stats = {"clipfrac": (clipped > unclipped).float().sum() / n, "approxkl": 0.5 * (log_ratio ** 2).sum() / n,
                 "ratio": ratio.sum() / n}
    return per_sequence.sum() / n, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_value: float,
               count: float | torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * mean_t max((V - R)^2, (V_old + clip(V - V_old, +-c) - R)^2)
    (with ``count``: this part's share of a mean over ``count`` tokens)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip_value, clip_value)
    unclipped_err = (values - returns) ** 2
    clipped_err = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_err, clipped_err), mask, count)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped_err > unclipped_err).float(), mask, count)}
    return loss, stats


# ---------------------------------------------------------------- mini-batches across processes


def minibatch_shares(members: Sequence[int], per_rank: int, world: int, micro_size: int) -> list[list[list[int]]]:
    """Who computes what of one mini-batch when the step's episodes are spread over processes.

    ``members`` are positions in the step's global batch, in which rank r holds the ``per_rank``
    positions from ``r * per_rank`` on. Returns, for every rank, its members as local indices
    (position - r * per_rank, in the mini-batch's order) cut into micro-batches of at most
    ``micro_size``, every rank padded with empty micro-batches to the same count (a rank with an
    empty one still runs a pass that contributes nothing, so collectives line up)."""
    owned: list[list[int]] = [[] for _ in range(world)]
    for position in members:
        owned[position // per_rank].append(position % per_rank)
    count = max(1, max(-(-len(o) // micro_size) for o in owned))
    return [[o[k * micro_size:(k + 1) * micro_size] for k in range(count)] for o in owned]


# ---------------------------------------------------------------- KL coefficient


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float, n_episodes: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. (2019): move beta towards the KL target, proportionally to the error
    clipped to +-20 %, at a rate set by the horizon in episodes:
    ``e = clip(KL / target - 1, -0.2, 0.2); beta <- beta * (1 + e * n / horizon)``."""

    def __init__(self, kl_coef: float, target: float, horizon: int) -> None:
        super().__init__(kl_coef)
        self.target, self.horizon = target, horizon

    def update(self, current_kl: float, n_episodes: int) -> None:
        if not math.isfinite(current_kl):
            return
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_episodes / self.horizon
