"""Online RL mathematics (PPO, RLOO, GRPO, REINFORCE++) against values computed by hand (the arithmetic is in
the comments)."""

import math
import threading

import pytest
import torch

from preftune.models.logits import token_logprobs
from preftune.rl.core import (
    AdaptiveKLController,
    FixedKLController,
    aggregate,
    discounted_returns,
    entropy_from_logits,
    final_scores,
    gae_advantages,
    group_advantages,
    kl_penalty,
    leave_one_out_advantages,
    masked_mean,
    masked_var,
    minibatch_shares,
    per_token_rewards,
    policy_loss,
    sequence_policy_loss,
    sequence_to_tokens,
    truncated_importance_weights,
    value_loss,
    varied_groups,
    whiten,
)

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # real values: 1, 2, 4


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
                          atol=tol)


def test_masked_statistics_ignore_padding():
    assert close(masked_mean(X, M), 7 / 3)
    # deviations -4/3, -1/3, 5/3 -> squares sum 42/9 = 14/3; /(n-1) = 7/3, /n = 14/9
    assert close(masked_var(X, M), 7 / 3)
    assert close(masked_var(X, M, unbiased=False), 14 / 9)


def test_whiten_masked():
    std = math.sqrt(7 / 3)
    expected = torch.tensor([[(1 - 7 / 3) / std, (2 - 7 / 3) / std, 0.0], [(4 - 7 / 3) / std, 0.0, 0.0]])
    assert close(whiten(X, M), expected, 1e-4)
    # without shifting the mean, the mean is added back: a positive reward stays positive
    kept = torch.tensor([[(1 - 7 / 3) / std + 7 / 3, (2 - 7 / 3) / std + 7 / 3, 0.0],
                         [(4 - 7 / 3) / std + 7 / 3, 0.0, 0.0]])
    assert close(whiten(X, M, shift_mean=False), kept, 1e-4)


def test_masked_mean_with_an_external_count():
    # masked sum 1 + 2 + 4 = 7, divided by the given count instead of the mask's 3
    assert close(masked_mean(X, M, count=10), 0.7)
    # rows as two parts of one batch of 3 tokens: (1 + 2) / 3 + 4 / 3 = 7 / 3, the whole batch's mean
    parts = [masked_mean(X[i:i + 1], M[i:i + 1], count=3) for i in range(2)]
    assert close(parts[0], 1.0) and close(parts[1], 4 / 3)
    assert close(parts[0] + parts[1], masked_mean(X, M))
    # the losses' shares add up the same way: (-1.2 - 0.5) / 3 + 2.2 / 3 = the loss of the three tokens
    old, logp = torch.zeros(1, 3), torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    adv, mask = torch.tensor([[1.0, 1.0, -2.0]]), torch.ones(1, 3)
    whole, _ = policy_loss(logp, old, adv, mask, 0.2)
    first, _ = policy_loss(logp[:, :2], old[:, :2], adv[:, :2], mask[:, :2], 0.2, count=3)
    second, _ = policy_loss(logp[:, 2:], old[:, 2:], adv[:, 2:], mask[:, 2:], 0.2, count=3)
    assert close(first, (-1.2 - 0.5) / 3) and close(second, 2.2 / 3) and close(first + second, whole)


def test_statistics_over_processes_use_reduced_sums_and_counts():
    # Two processes holding the same values: the mean is unchanged; the variance sees 6 values
    # with squared deviations 2 x 14/3 = 28/3, Bessel-corrected by 6 - 1: 28/15.
    twice = lambda t: 2 * t  # noqa: E731  (an all-reduce over two identical processes)
    assert close(masked_mean(X, M, reduce=twice), 7 / 3)
    assert close(masked_var(X, M, reduce=twice), 28 / 15)
    assert close(masked_var(X, M, unbiased=False, reduce=twice), 14 / 9)


class ThreadGroup:
    """An all-reduce (sum) among threads standing in for processes."""

    def __init__(self, world: int) -> None:
        self.barrier, self.slots = threading.Barrier(world), [None] * world

    def reduce(self, rank: int):
        def summed(t: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = t
            self.barrier.wait()
            total = sum(self.slots)
            self.barrier.wait()
            return total

        return summed


def test_whitening_in_shares_equals_whitening_the_whole_batch():
    x = torch.tensor([[0.5, -1.0, 2.0, 0.0], [3.0, 1.0, 0.0, 0.0], [-2.0, 4.0, 1.5, 0.5]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    shares = [(x[:1], mask[:1]), (x[1:], mask[1:])]  # rank 0 holds one episode, rank 1 two
    group, results = ThreadGroup(2), [None, None]

    def rank(r: int) -> None:
        xs, ms = shares[r]
        results[r] = (whiten(xs, ms, reduce=group.reduce(r)), whiten(xs, ms, shift_mean=False, reduce=group.reduce(r)))

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert close(torch.cat([results[0][0], results[1][0]]), whiten(x, mask), 1e-6)
    assert close(torch.cat([results[0][1], results[1][1]]), whiten(x, mask, shift_mean=False), 1e-6)


def test_minibatch_shares():
    # Global positions 0-3 live on rank 0, 4-7 on rank 1. Members in the mini-batch's order:
    # rank 0 holds 0, 3, 2 (local 0, 3, 2); rank 1 holds 5, 7 (local 1, 3). Micro-batches of 2:
    # rank 0 needs 2, so rank 1 gets an empty second one.
    assert minibatch_shares([5, 0, 3, 2, 7], per_rank=4, world=2, micro_size=2) == [[[0, 3], [2]], [[1, 3], []]]
    # a rank may hold no member at all; it still runs one (empty) micro-batch per micro-batch of the others
    assert minibatch_shares([4, 5], per_rank=4, world=2, micro_size=1) == [[[], []], [[0], [1]]]
    # one process: the mini-batch itself, in micro-batches
    assert minibatch_shares([2, 0, 1], per_rank=3, world=1, micro_size=2) == [[[2, 0], [1]]]


def test_logprobs_and_entropy_use_temperature():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # probs 1/4, 3/4
    assert close(token_logprobs(logits, torch.tensor([1]), 1.0), [math.log(0.75)])
    # logits [0, ln 9] at temperature 2 are [0, ln 3]: the same distribution
    assert close(token_logprobs(torch.tensor([[0.0, math.log(9.0)]]), torch.tensor([1]), 2.0),
                 [math.log(0.75)])
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))  # 0.562335
    assert close(entropy_from_logits(logits), [h])
    assert close(entropy_from_logits(torch.tensor([[0.0, math.log(9.0)]]), 2.0), [h])
    assert close(entropy_from_logits(torch.zeros(1, 2)), [math.log(2)])


def test_kl_estimators():
    logp = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-1.5, -1.0])
    assert close(kl_penalty(logp, ref, "k1"), [0.5, -1.0])
    # k3 = (r - 1) - log r, r = ref/pi: log r = -0.5 -> e^-0.5 - 1 + 0.5; log r = 1 -> e - 1 - 1
    assert close(kl_penalty(logp, ref, "k3"), [math.exp(-0.5) - 0.5, math.e - 2])
    assert close(kl_penalty(logp, ref, "k2"), [0.125, 0.5])  # (0.5^2) / 2, (1^2) / 2
    with pytest.raises(ValueError):
        kl_penalty(logp, ref, "k4")


def test_what_each_kl_estimator_pulls_as_a_loss_term():
    """The exact expected gradient over a 5-token distribution, E_pi[grad k(x)] = sum_x pi(x) grad
    k(x): zero for k1, the gradient of KL(pi || ref) for k2, of KL(ref || pi) for k3."""
    theta = torch.tensor([0.5, -0.3, 0.2, 0.0, -0.1], dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.tensor([0.1, 0.4, -0.2, 0.3, 0.0], dtype=torch.float64), -1)

    def expected_grad(estimator):
        logp = torch.log_softmax(theta, -1)
        (grad,) = torch.autograd.grad((logp.exp().detach() * kl_penalty(logp, ref, estimator)).sum(), theta)
        return grad

    def grad_of(kl):
        logp = torch.log_softmax(theta, -1)
        (grad,) = torch.autograd.grad(kl(logp), theta)
        return grad

    forward = grad_of(lambda logp: (logp.exp() * (logp - ref)).sum())  # KL(pi || ref)
    reverse = grad_of(lambda logp: (ref.exp() * (ref - logp)).sum())  # KL(ref || pi)
    assert forward.abs().max() > 0.05 and reverse.abs().max() > 0.05
    assert torch.allclose(expected_grad("k1"), torch.zeros(5, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(expected_grad("k2"), forward, atol=1e-12)
    assert torch.allclose(expected_grad("k3"), reverse, atol=1e-12)


def test_k1_as_a_loss_term_is_refused():
    from pydantic import ValidationError

    from preftune.rl.config import GRPOConfig, RLOOConfig

    paths = dict(policy="p", reward="r", prompts="q", out="o")
    with pytest.raises(ValidationError, match="k1 pulls nothing as a loss term"):
        RLOOConfig(**paths, kl_in="loss")
    with pytest.raises(ValidationError, match="k1 pulls nothing as a loss term"):
        GRPOConfig(**paths, kl_estimator="k1")
    assert RLOOConfig(**paths, kl_in="loss", kl_estimator="k2").kl_estimator == "k2"
    assert GRPOConfig(**paths, kl_estimator="k1", kl_in="reward").kl_in == "reward"  # k1 in the reward is fine


def test_missing_eos_penalty_replaces_the_score():
    scores = torch.tensor([1.0, 2.0, 3.0])
    ended = torch.tensor([True, False, True])
    assert close(final_scores(scores, ended, -1.0), [1.0, -1.0, 3.0])
    assert close(final_scores(scores, ended, None), [1.0, 2.0, 3.0])


def test_score_lands_on_the_last_real_token_not_the_first_pad():
    kl = torch.full((2, 5), 0.5)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    rewards, non_score = per_token_rewards(torch.tensor([2.0, 3.0]), kl, mask, kl_coef=0.1)
    # -0.1 * 0.5 = -0.05 per real token; score at index 2 (the EOS) of row 0, index 4 of row 1
    assert close(non_score, [[-0.05, -0.05, -0.05, 0, 0], [-0.05] * 5])
    assert close(rewards, [[-0.05, -0.05, 1.95, 0, 0], [-0.05, -0.05, -0.05, -0.05, 2.95]])
    assert rewards[0, 3] == 0  # the first pad token after EOS gets nothing (the peer bug)


def test_gae_over_response_tokens_only():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.4, 9.0]])  # 9.0 sits on padding and must not leak in
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    # t=2: delta = 1 + 0 - 0.4 = 0.6                      A = 0.6
    # t=1: delta = 0 + 0.9*0.4 - 0.2 = 0.16               A = 0.16 + 0.72*0.6 = 0.592
    # t=0: delta = 0 + 0.9*0.2 - 0.5 = -0.32              A = -0.32 + 0.72*0.592 = 0.10624
    assert close(adv, [[0.10624, 0.592, 0.6, 0.0]])
    assert close(ret, [[0.60624, 0.792, 1.0, 0.0]])


def test_gae_gamma_one_lambda_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[-0.1, -0.1, 2.0]])
    values = torch.tensor([[0.3, 0.1, -0.2]])
    adv, ret = gae_advantages(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert close(ret, [[1.8, 1.9, 2.0]])
    assert close(adv, [[1.5, 1.8, 2.2]])


def test_clipped_policy_loss():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 7.0]]))
    adv = torch.tensor([[1.0, 1.0, -2.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, stats = policy_loss(logp, old, adv, mask, clip_ratio=0.2)
    # token 0: r=1.5, A=1: max(-1.5, -1.2) = -1.2 (clipped)
    # token 1: r=0.5, A=1: max(-0.5, -0.8) = -0.5
    # token 2: r=1.1, A=-2: max(2.2, 2.2) = 2.2
    assert close(loss, (-1.2 - 0.5 + 2.2) / 3)
    assert close(stats["clipfrac"], 1 / 3)
    assert close(stats["approxkl"], 0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2 + math.log(1.1) ** 2) / 3)
    assert close(stats["ratio"], (1.5 + 0.5 + 1.1) / 3)


def test_truncated_importance_weights_correct_the_sampler_and_cap():
    old = torch.log(torch.tensor([[0.5, 0.2, 0.9]]))
    sampler = torch.log(torch.tensor([[0.4, 0.05, 0.9]]))
    weights = truncated_importance_weights(old, sampler, cap=2.0)
    # pi_old / mu: 0.5 / 0.4 = 1.25; 0.2 / 0.05 = 4 -> capped at 2; 0.9 / 0.9 = 1
    assert torch.allclose(weights, torch.tensor([[1.25, 2.0, 1.0]]))
    # in the loss: each token's surrogate scaled by its weight (ratio 1, A = 1: surrogate -1)
    adv, mask = torch.ones(1, 3), torch.ones(1, 3)
    loss, _ = policy_loss(old, old, adv, mask, 0.2, weights=weights)
    assert close(loss, -(1.25 + 2.0 + 1.0) / 3)


def test_policy_loss_gradient_vanishes_when_clipped():
    logp = torch.log(torch.tensor([[1.5]])).requires_grad_()
    loss, _ = policy_loss(logp, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.2)
    loss.backward()
    assert logp.grad.abs().item() == 0.0


def test_clipped_value_loss():
    old = torch.zeros(1, 4)
    values = torch.tensor([[0.5, -0.1, 0.3, 5.0]])
    returns = torch.tensor([[1.0, 0.0, -1.0, -5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, stats = value_loss(values, old, returns, mask, clip_value=0.2)
    # t0: clipped V 0.2: max(0.25, 0.64) = 0.64 (clipped); t1: 0.01; t2: clipped V 0.2: max(1.69, 1.44) = 1.69
    assert close(loss, 0.5 * (0.64 + 0.01 + 1.69) / 3)
    assert close(stats["clipfrac"], 1 / 3)


def test_adaptive_kl_controller():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl.update(9.0, 100)  # error 0.5 clipped to 0.2: 0.1 * (1 + 0.2 * 100 / 10000)
    assert ctl.value == pytest.approx(0.1 * 1.002)
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl.update(6.6, 256)  # error 0.1
    assert ctl.value == pytest.approx(0.1 * (1 + 0.1 * 256 / 10_000))
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    ctl.update(0.0, 256)  # error -1 clipped to -0.2
    assert ctl.value == pytest.approx(0.1 * (1 - 0.2 * 256 / 10_000))
    ctl.update(float("nan"), 256)  # a NaN KL leaves beta alone
    assert ctl.value == pytest.approx(0.1 * (1 - 0.2 * 256 / 10_000))
    restored = AdaptiveKLController(1.0, 6.0, 10_000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value


def test_fixed_kl_controller_stays():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 64)
    assert ctl.value == 0.05


# ---------------------------------------------------------------- critic-free methods


def test_discounted_returns_are_the_reward_to_go():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # row 0: G = (1+2+3, 2+3, 3) = (6, 5, 3); row 1: the padded 9 never counts: (4+5, 5, 0)
    assert close(discounted_returns(rewards, mask), [[6.0, 5.0, 3.0], [9.0, 5.0, 0.0]])
    # gamma 0.5, row 0: G_2 = 3, G_1 = 2 + 1.5 = 3.5, G_0 = 1 + 1.75 = 2.75
    assert close(discounted_returns(rewards, mask, 0.5)[0], [2.75, 3.5, 3.0])
    # the same as GAE with zero values and lambda 1
    _, returns = gae_advantages(rewards, torch.zeros_like(rewards), mask, 0.5, 1.0)
    assert close(discounted_returns(rewards, mask, 0.5), returns)


def test_leave_one_out_baseline():
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.5, 0.5])  # two prompts x 3 samples
    # prompt 0: 1 - (2+6)/2 = -3, 2 - (1+6)/2 = -1.5, 6 - (1+2)/2 = 4.5; prompt 1: 0 - 0.5 = -0.5, 0.5 - 0.25 = 0.25
    assert close(leave_one_out_advantages(rewards, 3), [-3.0, -1.5, 4.5, -0.5, 0.25, 0.25])
    # K = 2: each sample against the other one
    assert close(leave_one_out_advantages(torch.tensor([1.0, 4.0]), 2), [-3.0, 3.0])
    with pytest.raises(ValueError):
        leave_one_out_advantages(rewards, 1)


def test_group_advantages_normalise_within_each_prompt():
    rewards = torch.tensor([1.0, 3.0, 2.0, 2.0])  # two prompts x 2 samples; the second group is all equal
    # group 0: mean 2, unbiased std sqrt(((1-2)^2 + (3-2)^2) / 1) = sqrt(2)
    s2 = math.sqrt(2.0)
    assert close(group_advantages(rewards, 2, "group", eps=0.0)[:2], [-1 / s2, 1 / s2])
    # the all-equal group gets 0, not 0/0 (eps keeps the division finite)
    assert close(group_advantages(rewards, 2, "group")[2:], [0.0, 0.0])
    assert close(group_advantages(rewards, 2, "none"), [-1.0, 1.0, 0.0, 0.0])
    # batch: centred by the group, scaled by the batch's std: mean 2, unbiased var (1 + 1 + 0 + 0) / 3
    batch_std = math.sqrt(2 / 3)
    assert close(group_advantages(rewards, 2, "batch", eps=0.0), [-1 / batch_std, 1 / batch_std, 0.0, 0.0])


def test_batch_scale_over_processes_equals_the_whole_batch():
    rewards = torch.tensor([0.0, 1.0, 5.0, 2.0, 4.0, 4.0, 3.0, 9.0])
    whole = group_advantages(rewards, 2, "batch")
    parts = [rewards[:4], rewards[4:]]
    barrier, sums, lock = threading.Barrier(2), [], threading.Lock()

    def reduce(t):  # an all-reduce between the two "processes" (threads)
        with lock:
            sums.append(t)
        barrier.wait()
        total = sum(sums[-2:])
        barrier.wait()
        return total

    out = [None, None]

    def work(k):
        out[k] = group_advantages(parts[k], 2, "batch", reduce=reduce)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert close(torch.cat(out), whole)


def test_dynamic_sampling_drops_groups_by_their_scores_even_with_the_kl_in_the_reward():
    """Found by a reading of the code: with --kl-in reward the filter looked at score - beta * KL,
    which differs within every group, so no group was ever dropped."""
    from preftune.rl.config import GRPOConfig
    from preftune.rl.rollout import Rollout
    from preftune.rl.trainer import advantages

    cfg = GRPOConfig(policy="p", reward="r", prompts="q", out="o", samples_per_prompt=2, batch_size=4,
                     kl_in="reward", dynamic_sampling=True)
    mask = torch.ones(4, 2)
    episodes = Rollout(prompt_ids=torch.zeros(4, 1, dtype=torch.long), prompt_mask=torch.ones(4, 1),
                       response_ids=torch.zeros(4, 2, dtype=torch.long), response_mask=mask.clone(),
                       logprobs=torch.zeros(4, 2))
    scores = torch.tensor([1.0, 1.0, 0.0, 1.0])  # group 0: equal scores; group 1: different
    kl = torch.tensor([[0.1, 0.0], [0.3, 0.1], [0.0, 0.0], [0.2, 0.0]])  # the KL differs in both
    adv, _, _, stats = advantages(cfg, episodes, scores, kl, 0.05, None)
    assert episodes.response_mask[:, 0].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert stats["val/groups_dropped"] == 1


def test_dynamic_sampling_keeps_groups_with_different_rewards():
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.5, 2.0, 2.0, 2.0])  # 3 prompts x 3 samples
    assert varied_groups(rewards, 3).tolist() == [False] * 3 + [True] * 3 + [False] * 3


def test_loss_aggregations():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    # token mean (DAPO): (1 + 2 + 3 + 4) / 4 tokens
    assert close(aggregate(per_token, mask, "token_mean"), 2.5)
    # sequence mean (GRPO): ((1 + 2 + 3) / 3 + 4 / 1) / 2 = (2 + 4) / 2
    assert close(aggregate(per_token, mask, "sequence_mean"), 3.0)
    # constant (Dr. GRPO): 10 / (2 sequences x 4 tokens)
    assert close(aggregate(per_token, mask, "constant", max_tokens=4), 1.25)
    # a part of a larger mini-batch divides by the whole's counts: the parts add up
    parts = [aggregate(per_token[k:k + 1], mask[k:k + 1], "sequence_mean", sequences=2) for k in range(2)]
    assert close(sum(parts), 3.0)
    parts = [aggregate(per_token[k:k + 1], mask[k:k + 1], "constant", sequences=2, max_tokens=4) for k in range(2)]
    assert close(sum(parts), 1.25)


def test_asymmetric_clip():
    old = torch.zeros(1, 3)
    logp = torch.log(torch.tensor([[1.3, 1.3, 0.7]]))
    adv = torch.tensor([[1.0, -1.0, -1.0]])
    loss, _ = policy_loss(logp, old, adv, torch.ones(1, 3), clip_ratio=0.2, clip_ratio_high=0.28)
    # t0: r 1.3, A 1: max(-1.3, -1.28) = -1.28 (clipped at 1 + 0.28, not 1.2)
    # t1: r 1.3, A -1: max(1.3, 1.28) = 1.3; t2: r 0.7, A -1: max(0.7, 0.8) = 0.8 (low clip stays 0.2)
    assert close(loss, (-1.28 + 1.3 + 0.8) / 3)
    symmetric, _ = policy_loss(logp, old, adv, torch.ones(1, 3), clip_ratio=0.2)
    assert close(symmetric, (-1.2 + 1.3 + 0.8) / 3)


def test_sequence_policy_loss_treats_the_response_as_one_action():
    old = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[1.1, 1.2, 5.0], [0.5, 1.0, 1.0]]))
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([1.0, 2.0])
    loss, stats = sequence_policy_loss(logp, old, adv, mask, clip_ratio=0.2)
    # sequence 0: r = 1.1 * 1.2 = 1.32 (the padded 5 not counted), A 1: max(-1.32, -1.2) = -1.2 (clipped)
    # sequence 1: r = 0.5, A 2: max(-1.0, -1.6) = -1.0
    assert close(loss, (-1.2 - 1.0) / 2)
    assert close(stats["clipfrac"], 0.5) and close(stats["ratio"], (1.32 + 0.5) / 2)
    weighted, _ = sequence_policy_loss(logp, old, adv, mask, 0.2, weights=torch.tensor([0.5, 1.0]))
    assert close(weighted, (-0.6 - 1.0) / 2)
    # as two parts of one mini-batch of 2
    parts = [sequence_policy_loss(logp[k:k + 1], old[k:k + 1], adv[k:k + 1], mask[k:k + 1], 0.2, sequences=2)[0]
             for k in range(2)]
    assert close(sum(parts), loss)


def test_sequence_advantages_on_every_response_token():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert close(sequence_to_tokens(torch.tensor([2.0, -1.0]), mask), [[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]])
