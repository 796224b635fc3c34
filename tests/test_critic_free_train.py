"""RLOO, GRPO and REINFORCE++ end to end on tiny models: each raises a programmatic reward, with the
options that set the methods apart; resume is exact; the commands take their own options."""

import json

import pytest
import torch
from click.testing import CliRunner

from preftune.cli import cli
from preftune.errors import ConfigError
from preftune.models.loading import load_causal_lm
from preftune.rl.config import GRPOConfig, ReinforceConfig, RLOOConfig
from preftune.rl.trainer import train_rl
from tests.test_ppo_train import files, read_metrics  # noqa: F401 (a fixture)

CONFIGS = {"rloo": RLOOConfig, "grpo": GRPOConfig, "reinforce": ReinforceConfig}


def config(name, tiny_model_dir, tmp_path, prompts, rewards, **overrides):
    base = dict(policy=str(tiny_model_dir), reward=f"{rewards}:e_count", prompts=str(prompts),
                out=str(tmp_path / name), steps=4, batch_size=8, response_length=8, temperature=1.0,
                lora=False, lr=3e-3, threads=1)
    base.update(overrides)
    return CONFIGS[name](**base)


def learns(rows) -> bool:
    scores = [r["objective/scores"] for r in rows]
    first, last = sum(scores[:4]) / 4, sum(scores[-4:]) / 4
    return last > 2 * first + 1


@pytest.mark.parametrize("name, options", [
    ("rloo", {}),
    ("rloo", {"kl_in": "loss", "kl_estimator": "k3", "normalize_advantages": True}),
    ("grpo", {}),
    ("grpo", {"loss_type": "grpo", "scale_rewards": "batch", "kl_coef": 0.0}),
    ("grpo", {"loss_type": "dr_grpo", "scale_rewards": "none", "clip_ratio_high": 0.28, "dynamic_sampling": True}),
    ("reinforce", {}),
    ("reinforce", {"samples_per_prompt": 2}),
])
def test_each_method_raises_the_reward(name, options, tiny_model_dir, files):  # noqa: F811
    tmp, prompts, rewards = files
    cfg = config(name, tiny_model_dir, tmp, prompts, rewards, steps=24, **options)
    summary = train_rl(cfg, quiet=True)
    rows = read_metrics(cfg.out)
    assert learns(rows), [r["objective/scores"] for r in rows]
    assert summary["steps"] == 24 and "loss/value_avg" not in rows[-1]  # no critic
    assert rows[0]["val/ratio_first_max_dev"] == 0.0  # the trainer's own old log-probs: ratio exactly 1
    assert ("loss/kl_avg" in rows[-1]) == (cfg.kl_in == "loss" and cfg.kl_coef > 0)
    if options.get("dynamic_sampling"):
        assert all(0 <= r["val/groups_dropped"] <= 2 for r in rows)  # 8 episodes = 2 prompts x 4
    assert json.loads((tmp / name / "run_config.json").read_text())["stage"] == name


def test_grpo_with_equal_rewards_does_not_move_and_dynamic_sampling_counts_them(tiny_model_dir, files):  # noqa: F811
    """A constant reward gives every group advantage 0: without a KL term the policy's loss has no
    gradient, and dynamic sampling drops every group."""
    tmp, prompts, rewards = files
    (tmp / "flat.py").write_text("def flat(prompts, responses):\n    return [1.0] * len(responses)\n")
    cfg = config("grpo", tiny_model_dir, tmp, prompts, rewards, steps=2, reward=f"{tmp / 'flat.py'}:flat",
                 kl_coef=0.0, dynamic_sampling=True)
    train_rl(cfg, quiet=True)
    rows = read_metrics(cfg.out)
    assert all(r["val/groups_dropped"] == 2 and r["val/groups_dropped_frac"] == 1.0 for r in rows)
    assert all(r["loss/policy_avg"] == 0.0 for r in rows)
    tuned, _ = load_causal_lm(cfg.out, dtype="fp32")  # nothing to learn: no weight moved
    sft, _ = load_causal_lm(tiny_model_dir, dtype="fp32")
    assert all(torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), sft.state_dict().values()))


@pytest.mark.parametrize("name", ["rloo", "grpo", "reinforce"])
def test_resume_is_exact(name, tiny_model_dir, files):  # noqa: F811
    tmp, prompts, rewards = files
    common = dict(steps=4, save_every=2, lora=True, lr=1e-2)
    straight = config(name, tiny_model_dir, tmp, prompts, rewards, out=str(tmp / "straight"), **common)
    train_rl(straight, quiet=True)
    broken = config(name, tiny_model_dir, tmp, prompts, rewards, out=str(tmp / "broken"), **common)
    assert train_rl(broken, stop_after=3, quiet=True) == {"stopped_at": 3}
    train_rl(broken.model_copy(update={"resume": True}), quiet=True)

    def comparable(out):
        return [{k: v for k, v in r.items() if not k.startswith("time/") and k != "eps"} for r in read_metrics(out)]

    assert comparable(straight.out) == comparable(broken.out)


def test_batch_must_hold_whole_groups(tiny_model_dir, files):  # noqa: F811
    tmp, prompts, rewards = files
    with pytest.raises(ValueError, match="not a multiple of --samples-per-prompt"):
        config("rloo", tiny_model_dir, tmp, prompts, rewards, batch_size=6)
    with pytest.raises(ValueError, match="greater than or equal to 2"):
        config("grpo", tiny_model_dir, tmp, prompts, rewards, samples_per_prompt=1)


def test_commands_take_their_options(tiny_model_dir, files):  # noqa: F811
    tmp, prompts, rewards = files
    runner = CliRunner()
    assert "--loss-type [grpo|dr_grpo|dapo]" in runner.invoke(cli, ["grpo", "--help"]).output
    assert "--samples-per-prompt" in runner.invoke(cli, ["rloo", "--help"]).output
    assert "--value-model" not in runner.invoke(cli, ["reinforce", "--help"]).output
    result = runner.invoke(cli, ["grpo", "--policy", str(tiny_model_dir), "--reward", f"{rewards}:e_count",
                                 "--prompts", str(prompts), "--out", str(tmp / "cli"), "--steps", "1",
                                 "--batch-size", "4", "--response-length", "4", "--beta", "0", "--no-lora",
                                 "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp / "cli" / "run_config.json").read_text())["kl_coef"] == 0.0
    bad = runner.invoke(cli, ["rloo", "--policy", "x", "--reward", "y", "--prompts", "z", "--out", "o",
                              "--batch-size", "6"])
    assert bad.exit_code != 0 and "not a multiple" in bad.output and "Traceback" not in bad.output


def test_a_config_file_spells_beta_too(tmp_path):
    from preftune.config import build_config

    (tmp_path / "c.toml").write_text('[grpo]\npolicy = "p"\nreward = "r"\nprompts = "q"\nout = "o"\nbeta = 0.02\n')
    assert build_config(GRPOConfig, file=tmp_path / "c.toml", section="grpo").kl_coef == 0.02
    with pytest.raises(ConfigError, match="unknown option"):
        (tmp_path / "d.toml").write_text('policy = "p"\nreward = "r"\nprompts = "q"\nout = "o"\ngamma = 1\n')
        build_config(GRPOConfig, file=tmp_path / "d.toml")
