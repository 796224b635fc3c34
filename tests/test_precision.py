"""bf16 mixed precision: where autocast is on, what stays fp32, and that bf16 trains like fp32."""

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import QUICK, write_lines
from preftune.errors import ConfigError
from preftune.models.logits import token_logprobs
from preftune.models.precision import cpu_has_bf16, resolve_precision
from preftune.models.reward_model import RewardModel
from preftune.rl.config import PPOConfig
from preftune.rl.models import ValueHead
from preftune.rl.trainer import train_rl
from preftune.reward.config import RewardConfig
from preftune.reward.trainer import train_reward
from preftune.sft.config import SFTConfig
from preftune.sft.trainer import train_sft

CPU = torch.device("cpu")


def test_bf16_hardware_is_read_from_the_cpu_flags():
    assert cpu_has_bf16("processor : 0\nflags : fpu sse2 avx512f avx512_bf16 avx512_vnni\n")
    assert cpu_has_bf16("flags\t\t: fpu amx_bf16 amx_tile\n")
    assert not cpu_has_bf16("flags : fpu sse2 avx2 avx512f\nbugs : avx512_bf16\n")  # only the flags line counts
    assert not cpu_has_bf16("")


def test_what_dtype_means():
    assert resolve_precision("auto", CPU) == ("bf16" if cpu_has_bf16() else "fp32")
    assert [resolve_precision(d, CPU) for d in ("fp32", "bfloat16", "fp16", torch.bfloat16)] == [
        "fp32", "bf16", "fp16", "bf16"]


def test_fp16_training_is_refused_with_one_line(tmp_path, tiny_model_dir):
    cfg = SFTConfig(model=str(tiny_model_dir), data=str(QUICK / "demos.jsonl"), out=str(tmp_path / "o"), dtype="fp16")
    with pytest.raises(ConfigError, match="fp16: training in fp16 needs loss scaling"):
        train_sft(cfg, quiet=True)


# ---------------------------------------------------------------- what runs in bf16, what stays fp32


def _linear_output_dtypes(run) -> set[torch.dtype]:
    """The dtypes of every q_proj output while ``run()`` trains (a global forward hook)."""
    seen: set[torch.dtype] = set()

    def hook(module, args, output):
        if isinstance(module, torch.nn.Linear) and output.requires_grad:
            seen.add(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        run()
    finally:
        handle.remove()
    return seen


def _sft(tmp_path, model_dir, name, **kw) -> SFTConfig:
    return SFTConfig(model=str(model_dir), data=str(QUICK / "demos.jsonl"), out=str(tmp_path / name), epochs=2,
                     batch_size=8, lr=3e-3, eval_split=0.1, seed=0, threads=1, **kw)


def test_sft_computes_in_bf16_keeps_fp32_master_weights_and_learns_as_fp32(tmp_path, tiny_model_dir):
    results = {}
    for dtype in ("fp32", "bf16"):
        cfg = _sft(tmp_path, tiny_model_dir, dtype, dtype=dtype, save_every=6)
        holder = {}
        dtypes = _linear_output_dtypes(lambda: holder.update(train_sft(cfg, quiet=True)))
        assert dtypes == {torch.float32 if dtype == "fp32" else torch.bfloat16}, dtypes
        results[dtype] = holder
        assert json.loads((tmp_path / dtype / "metrics.json").read_text())["precision"] == dtype
    # master weights and optimiser state: fp32 in the checkpoint and in the final model
    state = torch.load(next((tmp_path / "bf16" / "checkpoints").glob("step-*")) / "state.pt", weights_only=False)
    moments = [v for s in state["optimizer"]["state"].values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")]
    assert moments and all(m.dtype == torch.float32 for m in moments)
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(str(tmp_path / "bf16" / "model.safetensors")).values()} == {torch.float32}
    # the same training: held-out loss within 2 % of fp32's, and both learn
    fp32, bf16 = results["fp32"], results["bf16"]
    assert bf16["eval_loss"] == pytest.approx(fp32["eval_loss"], rel=0.02)
    assert bf16["eval_loss"] < 0.8 * bf16["initial_eval_loss"]


def test_log_probabilities_and_scalar_heads_stay_fp32_under_autocast(tiny_model_dir):
    logits = torch.randn(5, 300) * 4
    tokens = torch.randint(0, 300, (5,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = token_logprobs(logits.bfloat16(), tokens)
        head = ValueHead(16)
        torch.nn.init.normal_(head.linear.weight)
        values = head(torch.randn(3, 16).bfloat16())
    expected = torch.log_softmax(logits.bfloat16().float(), -1).gather(-1, tokens[:, None]).squeeze(-1)
    assert inside.dtype == torch.float32 and torch.equal(inside, expected)
    assert values.dtype == torch.float32

    # A reward model: the trunk in bf16, the scalar head in fp32; close scores keep their order.
    rm = RewardModel.from_backbone(str(tiny_model_dir), device="cpu", dtype="fp32")
    torch.nn.init.normal_(rm.model.score.weight, std=1.0)
    prompts = [f"Question {i}?" for i in range(24)]
    responses = [f"Answer number {i} is {'good' if i % 2 else 'bad'}." for i in range(24)]
    ids = [rm.encode(p, r) for p, r in zip(prompts, responses)]
    with torch.no_grad():
        full = rm.forward_ids(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = rm.forward_ids(ids)
    assert mixed.dtype == torch.float32
    pairs = [(i, j) for i in range(24) for j in range(i + 1, 24)]
    agree = sum((full[i] > full[j]) == (mixed[i] > mixed[j]) for i, j in pairs) / len(pairs)
    assert agree >= 0.97, agree
    assert (mixed - full).abs().max() < 0.05 * full.abs().max()


def test_reward_model_in_bf16_learns_as_in_fp32(tmp_path, tiny_model_dir):
    words = ["great", "lovely", "happy", "awful", "sad", "boring"]
    rows = [{"prompt": f"Tell me about thing {i}.", "chosen": f"It is {words[i % 3]} and {words[(i + 1) % 3]}.",
             "rejected": f"It is {words[3 + i % 3]} and {words[3 + (i + 1) % 3]}."} for i in range(60)]
    data = write_lines(tmp_path / "prefs.jsonl", rows)
    results = {}
    for dtype in ("fp32", "bf16"):
        cfg = RewardConfig(model=str(tiny_model_dir), data=str(data), out=str(tmp_path / dtype), epochs=3, lr=3e-3,
                           batch_size=8, eval_split=0.25, seed=0, threads=1, max_length=64, dtype=dtype)
        results[dtype] = train_reward(cfg, quiet=True)
    fp32, bf16 = results["fp32"], results["bf16"]
    assert bf16["precision"] == "bf16" and fp32["eval_accuracy"] == 1.0 and bf16["eval_accuracy"] == 1.0
    assert bf16["eval_loss"] == pytest.approx(fp32["eval_loss"], rel=0.1, abs=0.02)


# ---------------------------------------------------------------- PPO


REWARDS = "def e_count(prompts, responses):\n    return [float(r.count('e')) for r in responses]\n"


def _ppo(tmp_path, model_dir, name, **kw) -> PPOConfig:
    (tmp_path / "rewards.py").write_text(REWARDS)
    prompts = write_lines(tmp_path / "prompts.jsonl", [{"prompt": f"Tell me about the {t}."} for t in
                                                       ["movie", "film", "day", "food", "book", "song", "city", "dog"]])
    base = dict(policy=str(model_dir), reward=f"{tmp_path}/rewards.py:e_count", prompts=str(prompts),
                out=str(tmp_path / name), batch_size=8, response_length=8, temperature=1.0, lr=3e-3, threads=1,
                kl_coef=0.02, mini_batches=2, ppo_epochs=2, seed=0)
    return PPOConfig(**{**base, **kw})


def _rows(cfg) -> list[dict]:
    return [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_ppo_ratio_is_exactly_one_at_the_first_minibatch_and_lora_kl_starts_at_zero(tmp_path, tiny_model_dir, dtype):
    cfg = _ppo(tmp_path, tiny_model_dir, dtype, steps=3, dtype=dtype, lora=True)
    train_rl(cfg, quiet=True)
    rows = _rows(cfg)
    # the old log-probabilities are the trainer's own: the first mini-batch's ratio is 1, exactly
    assert [r["val/ratio_first_max_dev"] for r in rows] == [0.0, 0.0, 0.0]
    # LoRA starts as the identity: policy and reference give the same numbers, KL exactly 0
    assert rows[0]["objective/kl"] == 0.0
    # the sampler (KV cache, bf16 when asked) is close to the trainer (equal when the kernels happen to
    # compute the cached and the full pass alike)
    gap = rows[0]["policy/sampler_logprob_gap"]
    assert 0 <= gap < (0.2 if dtype == "bf16" else 1e-3), gap


def test_ppo_in_bf16_learns_as_in_fp32(tmp_path, tiny_model_dir):
    scores = {}
    for dtype in ("fp32", "bf16"):
        cfg = _ppo(tmp_path, tiny_model_dir, f"learn-{dtype}", steps=24, dtype=dtype, lora=False)
        train_rl(cfg, quiet=True)
        rows = _rows(cfg)
        assert all(math.isfinite(r["objective/kl"]) for r in rows)
        s = [r["objective/scores"] for r in rows]
        scores[dtype] = (sum(s[:4]) / 4, sum(s[-4:]) / 4)
    for dtype, (first, last) in scores.items():
        assert last > 2 * first + 1, (dtype, scores)
    # the same progress within a quarter (sampling diverges after the first update, so not closer)
    assert scores["bf16"][1] == pytest.approx(scores["fp32"][1], rel=0.25), scores


def test_lora_on_a_bf16_base_is_merged_in_fp32(tmp_path, tiny_model_dir):
    """A LoRA update is far smaller than a bf16 rounding step of the weights it is added to."""
    from safetensors.torch import load_file

    from preftune.models.loading import load_causal_lm
    from preftune.models.saving import save_final_model
    from preftune.training.lora import apply_lora

    model, tok = load_causal_lm(tiny_model_dir, dtype="bf16")
    base = {k: v.float().clone() for k, v in model.state_dict().items()}
    model = apply_lora(model, r=2, alpha=2, dropout=0.0, targets=["q_proj"])
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=1e-5)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).float()  # scaling alpha / r = 1
    save_final_model(model, tok, tmp_path / "merged")
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    assert merged[key].dtype == torch.float32
    torch.testing.assert_close(merged[key], base[key] + delta, rtol=0, atol=1e-7)
    assert not torch.equal((base[key] + delta).bfloat16().float(), base[key] + delta)  # bf16 would lose it
