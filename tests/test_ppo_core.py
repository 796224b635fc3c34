"""PPO mathematics against values computed by hand (the arithmetic is in the comments)."""

import math

import pytest
import torch

from preftune.ppo.core import (
    AdaptiveKLController,
    FixedKLController,
    entropy_from_logits,
    final_scores,
    gae_advantages,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    per_token_rewards,
    policy_loss,
    value_loss,
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


def test_logprobs_and_entropy_use_temperature():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # probs 1/4, 3/4
    assert close(logprobs_from_logits(logits, torch.tensor([1]), 1.0), [math.log(0.75)])
    # logits [0, ln 9] at temperature 2 are [0, ln 3]: the same distribution
    assert close(logprobs_from_logits(torch.tensor([[0.0, math.log(9.0)]]), torch.tensor([1]), 2.0),
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
    with pytest.raises(ValueError):
        kl_penalty(logp, ref, "k2")


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
