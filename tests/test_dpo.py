"""DPO: loss against hand-computed values, and learning a preference on the tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import write_lines
from preftune.dpo.losses import dpo_loss, sequence_logprobs
from preftune.dpo.config import DPOConfig
from preftune.dpo.trainer import train_dpo


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


# ---------------------------------------------------------------- the shared scaffold


def _pairs(tmp_path, n=24):
    topics = ["apple", "river", "song", "book", "garden", "city"]
    rows = [{"prompt": f"Tell me about a {topics[i % 6]} {i}.", "chosen": f"What a lovely {topics[i % 6]}!",
             "rejected": f"The {topics[i % 6]} is bad."} for i in range(n)]
    return write_lines(tmp_path / "cmp.jsonl", rows)


def _dpo_cfg(tmp_path, model_dir, out="out", **kw) -> DPOConfig:
    base = dict(model=str(model_dir), data=str(_pairs(tmp_path)), out=str(tmp_path / out), epochs=1, lr=3e-3,
                batch_size=8, beta=0.5, eval_split=0.25, seed=1, schedule="constant", warmup_ratio=0.0,
                dtype="fp32")  # the accumulation arithmetic, exact in fp32
    return DPOConfig(**{**base, **kw})


def _decoder_batch_sizes(cfg: DPOConfig) -> list[int]:
    """Train, and return the batch size of every decoder forward pass (a global forward hook)."""
    sizes: list[int] = []

    def hook(module, args, kwargs, output):
        if type(module).__name__ == "LlamaModel":
            sizes.append(int(kwargs.get("input_ids", args[0] if args else None).shape[0]))

    handle = torch.nn.modules.module.register_module_forward_hook(hook, with_kwargs=True)
    try:
        train_dpo(cfg, quiet=True)
    finally:
        handle.remove()
    return sizes


def test_grad_accum_splits_each_step_and_gives_the_same_training(tmp_path, tiny_model_dir):
    whole = _decoder_batch_sizes(_dpo_cfg(tmp_path, tiny_model_dir, "whole"))
    accumulated = _decoder_batch_sizes(_dpo_cfg(tmp_path, tiny_model_dir, "accum", grad_accum=4))
    # 18 training pairs and 6 held out. Both runs first score the reference (18 pairs in batches of
    # 8: 16, 16 and 4 sequences; 6 held-out pairs: 12) and the initial held-out loss (12); at the end
    # the final held-out loss (12). In between, the three steps (8, 8 and 2 pairs): one pass each, or
    # micro-batches of 2 pairs (4 sequences; the last step's 2 pairs as 2 x 1).
    before, after = [16, 16, 4, 12, 12], [12]
    assert whole == before + [16, 16, 4] + after
    assert accumulated == before + [4] * 8 + [2, 2] + after
    rows = {name: [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("whole", "accum")}
    for a, b in zip(rows["whole"], rows["accum"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], rel=1e-4, abs=1e-7)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    train_dpo(_dpo_cfg(tmp_path, tiny_model_dir, "a", epochs=2, save_every=2), quiet=True)
    interrupted = _dpo_cfg(tmp_path, tiny_model_dir, "b", epochs=2, save_every=2)
    assert train_dpo(interrupted, stop_after=3, quiet=True) == {"stopped_at": 3}
    train_dpo(interrupted.model_copy(update={"resume": True}), quiet=True)
    a, b = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("a", "b"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_resume_without_a_checkpoint_warns_and_eval_data_honours_skip_invalid(tmp_path, tiny_model_dir):
    from click.testing import CliRunner

    from preftune.cli import cli

    held = write_lines(tmp_path / "held.jsonl", [{"prompt": "q", "chosen": "good", "rejected": "bad"},
                                                 {"prompt": "q", "chosen": "same", "rejected": "same"}])
    args = ["dpo", "--model", str(tiny_model_dir), "--data", str(_pairs(tmp_path)), "--out", str(tmp_path / "o"),
            "--max-steps", "1", "--eval-data", str(held)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "held.jsonl:2:" in result.output  # an invalid held-out record
    result = CliRunner().invoke(cli, args + ["--skip-invalid", "--resume"])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # rich wraps long lines
    assert "--resume: no checkpoint" in said and "held.jsonl: 1 records, skipped 1 invalid" in said
