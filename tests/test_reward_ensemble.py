"""Reward-model ensembles: the aggregations by hand, the scorer grammar, training, save and load."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from test_reward_train import _small_data, config, synthetic_model_dir  # noqa: F401  (the fixture)

from preftune.cli import cli
from preftune.errors import PreftuneError
from preftune.models.reward_ensemble import (
    RewardEnsemble,
    aggregate,
    member_std,
    member_variance,
    uncertainty_weighted,
    worst_case,
)
from preftune.models.reward_model import RewardModel
from preftune.reward.data import bootstrap_resample
from preftune.reward.ensemble import train_ensemble
from preftune.rl.config import RLOOConfig
from preftune.rl.trainer import train_rl
from preftune.scoring import load_scorer, parse_scorer

# Three members (rows) scoring two responses (columns).
MEMBERS = torch.tensor([[1.0, 2.0], [3.0, -2.0], [2.0, 0.0]])


def test_aggregations_by_hand():
    assert aggregate(MEMBERS, "mean").tolist() == [2.0, 0.0]
    assert worst_case(MEMBERS).tolist() == [1.0, -2.0]
    # population variance: ((1-2)^2 + (3-2)^2 + 0) / 3 = 2/3 and (4 + 4 + 0) / 3 = 8/3
    assert member_variance(MEMBERS).tolist() == pytest.approx([2 / 3, 8 / 3])
    assert member_std(MEMBERS).tolist() == pytest.approx([(2 / 3) ** 0.5, (8 / 3) ** 0.5])
    assert uncertainty_weighted(MEMBERS, 0.5).tolist() == pytest.approx([2 - 1 / 3, 0 - 4 / 3])
    assert torch.equal(aggregate(MEMBERS, "uwo", 0.0), aggregate(MEMBERS, "mean"))  # UWO with 0 is the mean
    with pytest.raises(PreftuneError, match="unknown ensemble aggregation 'max'"):
        aggregate(MEMBERS, "max")


def test_bootstrap_resample_is_seeded_and_keeps_the_size():
    groups = list(range(20))
    a, b = bootstrap_resample(groups, 3), bootstrap_resample(groups, 3)
    assert a == b and len(a) == 20 and set(a) <= set(groups) and len(set(a)) < 20
    assert bootstrap_resample(groups, 4) != a


def test_ensemble_specs_parse_and_bad_ones_say_why(tmp_path):
    (term,) = parse_scorer("uwo(runs/ens, 0.5)")
    assert (term.kind, term.target, term.args) == ("reward_model", "runs/ens", {"aggregate": "uwo", "coef": 0.5})
    assert term.atom == "uwo(runs/ens,0.5)" and parse_scorer(term.atom) == [term]
    assert parse_scorer("uwo(rm:runs/ens, coef=1)")[0].args == {"aggregate": "uwo", "coef": 1.0}
    wco, ends = parse_scorer("0.5*wco(runs/ens) + ends")
    assert (wco.weight, wco.args, ends.target) == (0.5, {"aggregate": "wco"}, "ends")
    for spec, message in [("uwo(runs/ens)", "needs one coefficient"), ("uwo(runs/ens, -1)", "needs one coefficient"),
                          ("uwo(runs/ens, lots)", "needs one coefficient"), ("wco(runs/ens, 2)", "takes only"),
                          ("mean()", "needs the ensemble's directory")]:
        with pytest.raises(PreftuneError, match=message):
            parse_scorer(spec)


def test_ensemble_trains_saves_loads_and_scores(tmp_path, synthetic_model_dir):  # noqa: F811
    from transformers import AutoModelForSequenceClassification

    _small_data(tmp_path, n=64)
    cfg = config(tmp_path, synthetic_model_dir, out=str(tmp_path / "ens"), ensemble=3, max_steps=3, batch_size=8,
                 eval_split=0.25)
    summary = train_ensemble(cfg, quiet=True)
    manifest = json.loads((tmp_path / "ens" / "ensemble.json").read_text())
    assert manifest["members"] == ["member-0", "member-1", "member-2"] and manifest["seeds"] == [0, 1, 2]
    assert manifest["bootstrap"] is True and len(summary["member_eval_accuracy"]) == 3
    held = {json.loads((tmp_path / "ens" / m / "metrics.json").read_text())["eval_groups"] for m in manifest["members"]}
    assert held == {summary["eval_groups"]}  # one held-out split for every member
    references = {json.loads((tmp_path / "ens" / m / "metrics.json").read_text())["normalisation"]["count"]
                  for m in manifest["members"]}
    assert len(references) == 1  # every member normalised on the same responses, not on its own resample
    for key in ("eval_accuracy", "eval_accuracy_wco", "eval_accuracy_uwo_0.5", "eval_ece", "eval_disagreement"):
        assert 0 <= summary[key] <= 1 or key == "eval_disagreement"

    # Each member is a plain Hugging Face model and a preftune reward model.
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "ens" / "member-1")
    assert hf.config.num_labels == 1
    members = [RewardModel.load(tmp_path / "ens" / m, device="cpu", dtype="fp32") for m in manifest["members"]]
    prompts, responses = ["Write a review."] * 3, ["great happy day", "awful sad film", "the cat"]
    by_member = torch.stack([m.score(prompts, responses) for m in members])
    assert not torch.allclose(by_member[0], by_member[1])  # seeds and resamples differ
    assert torch.allclose(RewardEnsemble.load(tmp_path / "ens", "cpu", "fp32").member_scores(prompts, responses),
                          by_member)

    # Scorers: rm:DIR is the mean; wco and uwo; each reports the members' spread.
    ens = str(tmp_path / "ens")
    for spec, expected in [(f"rm:{ens}", by_member.mean(0)), (f"wco({ens})", by_member.min(0).values),
                           (f"uwo({ens}, 2)", by_member.mean(0) - 2 * by_member.var(0, unbiased=False))]:
        scorer = load_scorer(spec, "cpu", "fp32")
        assert torch.allclose(scorer(prompts, responses), expected, atol=1e-5), spec
        assert torch.allclose(scorer.last_uncertainty, by_member.std(0, unbiased=False), atol=1e-5)
    combined = load_scorer(f"0.5*wco({ens}) + length", "cpu", "fp32")
    combined(prompts, responses)
    assert torch.allclose(combined.last_uncertainty, 0.5 * by_member.std(0, unbiased=False), atol=1e-5)
    assert load_scorer("length")(prompts, responses) is not None and load_scorer("length").last_uncertainty is None
    with pytest.raises(PreftuneError, match="is not an ensemble"):
        load_scorer(f"wco({tmp_path / 'ens' / 'member-0'})")
    with pytest.raises(PreftuneError, match="--value-model reward needs --reward to be one reward-model"):
        from preftune.rl.config import PPOConfig
        from preftune.rl.trainer import build_value_function

        build_value_function(PPOConfig(policy=str(synthetic_model_dir), reward=ens, prompts="p", out="o",
                                       value_model="reward"), None, None, "cpu", "fp32")

    # The ensemble's disagreement reaches the online trainers' metrics and samples, and eval's outputs.
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Write a review {i}."}) + "\n" for i in range(8)))
    rl = RLOOConfig(policy=str(synthetic_model_dir), reward=f"uwo({ens}, 0.5)", prompts=str(prompts),
                    eval_prompts=str(prompts), eval_every=2, out=str(tmp_path / "rloo"), steps=2, batch_size=8,
                    response_length=6, lora=False, threads=1, device="cpu", dtype="fp32")
    train_rl(rl, quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "rloo" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["objective/reward_uncertainty"] > 0 for r in rows) and rows[-1]["eval/proxy_uncertainty"] > 0
    samples = [json.loads(line) for line in (tmp_path / "rloo" / "samples.jsonl").read_text().splitlines()]
    assert all(r["uncertainty"] >= 0 for r in samples)
    result = CliRunner().invoke(cli, ["eval", "--model", str(synthetic_model_dir), "--prompts", str(prompts),
                                      "--judge", f"rm:{ens}", "--out", str(tmp_path / "eval"), "--max-new-tokens", "6",
                                      "--dtype", "fp32", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    row = json.loads((tmp_path / "eval" / "samples.jsonl").read_text().splitlines()[0])
    assert row["uncertainty"][f"rm:{ens}"][0] > 0
    judged = json.loads((tmp_path / "eval" / "eval.json").read_text())["judges"][0]
    assert judged["uncertainty"]["A"] > 0

    # --resume keeps finished members (their weights untouched) and rewrites the manifest.
    before = (tmp_path / "ens" / "member-0" / "model.safetensors").stat().st_mtime_ns
    again = train_ensemble(cfg.model_copy(update={"resume": True}), quiet=True)
    assert (tmp_path / "ens" / "member-0" / "model.safetensors").stat().st_mtime_ns == before
    assert again["member_eval_accuracy"] == summary["member_eval_accuracy"]


def test_a_broken_manifest_is_a_one_line_error(tmp_path):
    ens = tmp_path / "ens"
    ens.mkdir()
    for text, message in [("{not json", "invalid ensemble manifest"), ('{"members": []}', "has no members"),
                          ('{"members": ["member-0"], "colour": 1}', "invalid ensemble manifest"),
                          ('{"members": ["member-0"]}', "not a preftune reward model")]:
        (ens / "ensemble.json").write_text(text)
        with pytest.raises(PreftuneError, match=message):
            load_scorer(f"wco({ens})")
