"""DPO: loss against hand-computed values, and learning a preference on the tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import write_lines
from preftune.dpo.losses import dpo_loss, sequence_logprobs
from preftune.dpo.trainer import DPOConfig, train_dpo


def test_sequence_logprobs_sums_each_rows_positions():
    token_lp = torch.tensor([-1.0, -2.0, -0.5, -3.0, -0.25])
    assert sequence_logprobs(token_lp, torch.tensor([2, 0, 3])).tolist() == [-3.0, 0.0, -3.75]


def test_dpo_loss_matches_hand_computation():
    pc, pr = torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0])
    rc, rr = torch.tensor([-1.5, -2.0]), torch.tensor([-2.5, -1.5])
    beta = 0.5
    # pair 1: h = (-1 + 1.5) - (-3 + 2.5) = 1.0 -> beta h = 0.5; pair 2: h = 0 - 0.5 = -0.5 -> -0.25
    expected = (-math.log(1 / (1 + math.exp(-0.5))) - math.log(1 / (1 + math.exp(0.25)))) / 2
    loss, stats = dpo_loss(pc, pr, rc, rr, beta)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["rewards/accuracies"] == 0.5
    assert stats["rewards/margins"] == pytest.approx((0.5 - 0.25) / 2)
    smoothed, _ = dpo_loss(pc, pr, rc, rr, beta, label_smoothing=0.1)
    exp_s = sum(-0.9 * math.log(1 / (1 + math.exp(-m))) - 0.1 * math.log(1 / (1 + math.exp(m))) for m in (0.5, -0.25)) / 2
    assert smoothed.item() == pytest.approx(exp_s, rel=1e-6)


def test_dpo_learns_a_preference_on_the_tiny_model(tmp_path, tiny_model_dir):
    topics = ["apple", "river", "song", "book", "garden", "city", "movie", "mountain", "cake", "dog"]
    rows = [{"prompt": f"Tell me about a {t} {i}.", "chosen": f"What a lovely {t}! I love it.",
             "rejected": f"The {t} is bad and boring."} for i in range(6) for t in topics]
    data = write_lines(tmp_path / "cmp.jsonl", rows)
    cfg = DPOConfig(model=str(tiny_model_dir), data=str(data), out=str(tmp_path / "out"), epochs=2, lr=3e-3,
                    batch_size=8, beta=0.5, eval_split=0.2, seed=1)
    summary = train_dpo(cfg, quiet=True)
    assert summary["initial_eval_loss"] == pytest.approx(math.log(2), rel=1e-3)  # policy == reference at start
    assert summary["eval_loss"] < 0.5 * math.log(2) and summary["eval_accuracy"] == 1.0
    rows = [json.loads(l) for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= rows[0].keys()
    assert (tmp_path / "out" / "model.safetensors").exists()
