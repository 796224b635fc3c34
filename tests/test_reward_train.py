"""`preftune reward` end to end on tiny models: the noise ceiling, resume, determinism, bad input."""

import json
import random

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import write_lines
from preftune.annotators.simulated import noise_ceiling, simulate_labels
from preftune.cli import cli
from preftune.data.records import CandidateSet
from preftune.errors import PreftuneError
from preftune.models.reward_model import RewardModel
from preftune.models.tiny import save_tiny
from preftune.reward.config import RewardConfig
from preftune.reward.trainer import train_reward

GOOD, BAD = ("great", "happy", "love"), ("bad", "sad", "awful")
NEUTRAL = ("the", "cat", "dog", "a", "river", "city", "film", "day", "book", "tree")
PROMPT = [{"role": "user", "content": "Write a review."}]


def gold_count(text: str) -> int:
    """The synthetic gold: good words minus bad words (a tiny transformer can learn to count)."""
    words = text.split()
    return sum(w in GOOD for w in words) - sum(w in BAD for w in words)


def synthetic_items(n: int, seed: int) -> list[CandidateSet]:
    rng = random.Random(seed)
    vocab = GOOD + BAD + NEUTRAL
    return [CandidateSet(PROMPT, [" ".join(rng.choice(vocab) for _ in range(8)) for _ in range(2)], ["x", "x"],
                         id=f"s{seed}-{i}") for i in range(n)]


def labeled(path, items, temperature, annotators, seed):
    gold = [np.array([gold_count(r) for r in it.responses], dtype=float) for it in items]
    rows, stats = simulate_labels(items, gold, "comparisons", [temperature] * annotators, seed=seed)
    write_lines(path, rows)
    return rows, stats


@pytest.fixture(scope="module")
def synthetic_model_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("synth") / "model", [" ".join(GOOD + BAD + NEUTRAL) + " Write a review."])


def config(tmp_path, model_dir, **kw) -> RewardConfig:
    base = dict(model=str(model_dir), data=str(tmp_path / "train.jsonl"), out=str(tmp_path / "rm"),
                lr=1e-3, batch_size=16, max_length=64, device="cpu", dtype="fp32")  # exact normalisation checks
    return RewardConfig(**{**base, **kw})


def test_tiny_reward_model_reaches_the_noise_ceiling(tmp_path, synthetic_model_dir):
    temperature = 1.0
    labeled(tmp_path / "train.jsonl", synthetic_items(1600, seed=1), temperature, 1, seed=1)
    eval_rows, stats = labeled(tmp_path / "eval.jsonl", synthetic_items(300, seed=2), temperature, 2, seed=2)
    # The ceiling: accuracy of the gold itself on the held-out labels (gold ties count as half),
    # which the Bradley-Terry analysis predicts before any label is drawn.
    gold_diffs = np.array([gold_count(r["chosen"]) - gold_count(r["rejected"]) for r in eval_rows])
    realised = float(np.mean((gold_diffs > 0) + 0.5 * (gold_diffs == 0)))
    analytic = noise_ceiling([gold_count(a) - gold_count(b) for a, b in
                              (it.responses for it in synthetic_items(300, seed=2))], temperature)
    assert stats["noise_ceiling"] == pytest.approx(analytic)
    assert abs(realised - analytic) < 0.04  # 600 labels: a few points of sampling noise

    summary = train_reward(config(tmp_path, synthetic_model_dir, eval_data=str(tmp_path / "eval.jsonl"),
                                  epochs=1.5), quiet=True)
    assert summary["initial_eval_accuracy"] < 0.6
    print(f"eval accuracy {summary['eval_accuracy']:.4f}, gold on labels {realised:.4f}, expected ceiling {analytic:.4f}")
    assert summary["eval_accuracy"] >= realised - 0.03, (summary["eval_accuracy"], realised, analytic)
    assert set(summary["eval_accuracy_by_annotator"]) == {"sim-1", "sim-2"}
    assert summary["eval_ece"] < 0.1

    # normalisation: the training responses (the reference by default) score mean 0, std 1
    rm = RewardModel.load(tmp_path / "rm", device="cpu", dtype="fp32")
    rows = [json.loads(l) for l in (tmp_path / "train.jsonl").read_text().splitlines()]
    texts = list(dict.fromkeys(t for r in rows for t in (r["chosen"], r["rejected"])))
    scores = rm.score(["Write a review."] * len(texts), texts)
    assert abs(scores.mean().item()) < 0.1 and abs(scores.std().item() - 1) < 0.1
    metrics = [json.loads(l) for l in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == summary["steps"] and "loss" in metrics[0]


def _small_data(tmp_path, n=48):
    labeled(tmp_path / "train.jsonl", synthetic_items(n, seed=3), 0.5, 1, seed=3)


def _weights(directory):
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


def test_held_out_split_keeps_every_prompt_on_one_side_when_its_comparisons_share_no_response(tmp_path):
    """Found by a reading of the code: such comparisons stay separate groups, and the split was of
    groups, so a prompt could train and be held out at once."""
    from preftune.reward.data import read_preferences

    rows = [{"prompt": f"p{i}", "chosen": f"a{i}{k}", "rejected": f"b{i}{k}"} for i in range(10) for k in range(2)]
    write_lines(tmp_path / "train.jsonl", rows)
    train, held, _ = read_preferences(RewardConfig(model="m", data=str(tmp_path / "train.jsonl"), out="o",
                                                   eval_split=0.3, seed=0))
    prompts = lambda groups: {g.messages[0]["content"] for g in groups}  # noqa: E731
    assert len(train) + len(held) == 20 and len(held) == 6  # 3 of the 10 prompts, with both their groups
    assert not prompts(train) & prompts(held)


def test_held_out_split_of_too_few_prompts_holds_out_groups_and_says_so(tmp_path):
    """One prompt (a single instruction judged many times) left nothing held out once the split was
    over prompts: held-out metrics vanished without a word."""
    from preftune.reward.data import read_preferences

    rows = [{"prompt": "p", "chosen": f"a{k}", "rejected": f"b{k}"} for k in range(20)]
    write_lines(tmp_path / "train.jsonl", rows)
    train, held, notes = read_preferences(RewardConfig(model="m", data=str(tmp_path / "train.jsonl"), out="o",
                                                       eval_split=0.25, seed=0))
    assert len(train) == 15 and len(held) == 5
    assert any("too few to hold out whole prompts" in n for n in notes)


def test_resume_gives_the_same_model_as_an_uninterrupted_run(tmp_path, synthetic_model_dir):
    _small_data(tmp_path)
    kw = dict(eval_split=0.25, save_every=2, epochs=2, batch_size=8)
    full = train_reward(config(tmp_path, synthetic_model_dir, out=str(tmp_path / "full"), **kw), quiet=True)
    cut = config(tmp_path, synthetic_model_dir, out=str(tmp_path / "cut"), **kw)
    assert train_reward(cut, stop_after=3, quiet=True) == {"stopped_at": 3}
    resumed = train_reward(cut.model_copy(update={"resume": True}), quiet=True)
    assert resumed["eval_accuracy"] == full["eval_accuracy"]
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(l)["step"] for l in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, full["steps"] + 1))


def test_lora_reward_model_saves_merged_and_loads(tmp_path, synthetic_model_dir):
    _small_data(tmp_path)
    summary = train_reward(config(tmp_path, synthetic_model_dir, lora=True, lora_r=4, max_steps=2,
                                  eval_split=0.25), quiet=True)
    assert summary["steps"] == 2
    rm = RewardModel.load(tmp_path / "rm", device="cpu", dtype="fp32")
    assert not any("lora" in k for k in _weights(tmp_path / "rm"))
    assert rm.score(["Write a review."], ["great day"]).shape == (1,)


def test_rankings_and_ratings_train_together(tmp_path, synthetic_model_dir):
    rows = [{"prompt": "Write a review.", "responses": ["great day", "sad day", "the cat", "love love"],
             "ranking": [3, 0, [2, 1]], "annotator": "a"},
            {"prompt": "Write a review.", "response": "happy book", "rating": 3, "annotator": "b"},
            {"prompt": "Write a review.", "response": "awful film", "rating": 1, "annotator": "b"},
            {"prompt": "Write a review.", "response": "the tree", "rating": 1, "annotator": "b"},
            {"prompt": "Write a review.", "chosen": "love it", "rejected": "bad it", "strength": 1.0, "split": "eval"}]
    write_lines(tmp_path / "train.jsonl", rows)
    summary = train_reward(config(tmp_path, synthetic_model_dir, epochs=1), quiet=True)
    # ranking: 6 pairs minus 1 tie = 5; ratings: 2 pairs (one tie skipped); the comparison is held out
    assert (summary["train_groups"], summary["train_pairs"], summary["eval_pairs"]) == (2, 7, 1)


def test_reference_file_sets_the_normalisation(tmp_path, synthetic_model_dir):
    _small_data(tmp_path)
    write_lines(tmp_path / "ref.jsonl", [{"prompt": "Write a review.", "completion": c}
                                         for c in ("great day", "sad cat", "the love book")])
    train_reward(config(tmp_path, synthetic_model_dir, max_steps=1, eval_split=0, reference=str(tmp_path / "ref.jsonl")),
                 quiet=True)
    rm = RewardModel.load(tmp_path / "rm", device="cpu", dtype="fp32")
    s = rm.score(["Write a review."] * 3, ["great day", "sad cat", "the love book"])
    assert rm.meta.normalisation["count"] == 3
    assert s.mean().item() == pytest.approx(0.0, abs=1e-4) and s.std().item() == pytest.approx(1.0, abs=1e-4)


BAD_RECORDS = [
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "identical"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "must not be empty"),
    ({"prompt": "q", "responses": ["a", "b"], "ranking": [0, 2]}, "out of range"),
    ({"prompt": "q", "response": "a", "rating": 4, "scale": 3}, "outside the scale"),
]


@pytest.mark.parametrize("record,message", BAD_RECORDS)
def test_bad_input_is_a_one_line_error_naming_file_and_line(tmp_path, synthetic_model_dir, record, message):
    good = {"prompt": "q", "chosen": "great", "rejected": "bad"}
    data = write_lines(tmp_path / "train.jsonl", [good, good | {"chosen": "love"}, record])
    result = CliRunner().invoke(cli, ["reward", "--model", str(synthetic_model_dir), "--data", str(data),
                                      "--out", str(tmp_path / "rm")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {data}:3:") and message in lines[0]


def test_skip_invalid_counts_and_reports(tmp_path, synthetic_model_dir):
    good = [{"prompt": "q", "chosen": f"great {w}", "rejected": f"bad {w}"} for w in NEUTRAL]
    data = write_lines(tmp_path / "train.jsonl", good + [r for r, _ in BAD_RECORDS])
    result = CliRunner().invoke(cli, ["reward", "--model", str(synthetic_model_dir), "--data", str(data),
                                      "--out", str(tmp_path / "rm"), "--skip-invalid", "--max-steps", "1",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "skipped 4 invalid (first on line 11)" in result.output
    assert "reward done" in result.output


def test_over_long_records_error_or_truncate(tmp_path, synthetic_model_dir):
    long = {"prompt": "the cat " * 40, "chosen": "great", "rejected": "bad"}
    data = write_lines(tmp_path / "train.jsonl", [long, long | {"chosen": "love"}])
    with pytest.raises(Exception, match=r"train.jsonl:1: .*over --max-length 32"):
        train_reward(config(tmp_path, synthetic_model_dir, max_length=32, eval_split=0), quiet=True)
    summary = train_reward(config(tmp_path, synthetic_model_dir, max_length=32, eval_split=0, truncate=True),
                           quiet=True)
    assert summary["train_pairs"] == 2
    assert data.exists()


def test_bad_reference_file_is_a_file_line_error(tmp_path):
    from preftune.errors import DataError
    from preftune.reward.data import read_reference

    ref = write_lines(tmp_path / "ref.jsonl", ["{not json", {"prompt": "q", "completion": "a"}])
    with pytest.raises(DataError, match=r"ref.jsonl:1: invalid JSON"):
        read_reference(str(ref), skip_invalid=False)
    cands = write_lines(tmp_path / "c.jsonl", [{"prompt": "q", "responses": ["a", "", "b"]}])
    assert [r for _, r in read_reference(str(cands), skip_invalid=False)] == ["a", "b"]


def test_length_head_takes_the_length_out_of_the_reward(tmp_path, synthetic_model_dir):
    """Labels that prefer longer answers as well as better ones: a plain reward model learns the
    length; with --length-head the second head carries it and the reward is left nearly free of it."""
    from transformers import AutoModelForSequenceClassification

    rng = random.Random(0)
    vocab = GOOD + BAD + NEUTRAL
    text = lambda: " ".join(rng.choice(vocab) for _ in range(rng.randint(2, 14)))  # noqa: E731
    items = [CandidateSet(PROMPT, [text(), text()], ["x", "x"], id=f"i{i}") for i in range(600)]
    gold = [np.array([gold_count(r) + 0.3 * len(r.split()) for r in it.responses]) for it in items]
    write_lines(tmp_path / "train.jsonl", simulate_labels(items, gold, "comparisons", [0.5], seed=0)[0])
    plain = train_reward(config(tmp_path, synthetic_model_dir, out=str(tmp_path / "plain"), epochs=2,
                                eval_split=0.2), quiet=True)
    debiased = train_reward(config(tmp_path, synthetic_model_dir, out=str(tmp_path / "odin"), epochs=2,
                                   eval_split=0.2, length_head=True), quiet=True)
    assert plain["eval_length_correlation"] > 0.4 and "eval_length_head_correlation" not in plain
    assert abs(debiased["eval_length_correlation"]) < 0.25 and debiased["eval_length_head_correlation"] > 0.9
    assert debiased["eval_accuracy_with_length_head"] > debiased["eval_accuracy"]
    # Saved with both heads; the reward is the first output, in preftune and in plain transformers.
    rm = RewardModel.load(tmp_path / "odin", device="cpu", dtype="fp32")
    assert rm.meta.heads == ["quality", "length"]
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "odin").eval()
    texts = [rm.render("Write a review.", r) for r in ("great day", "the cat sat by the river all day long")]
    with torch.no_grad():
        logits = torch.cat([hf(**rm.tokenizer(t, add_special_tokens=False, return_tensors="pt")).logits for t in texts])
    assert logits.shape == (2, 2)
    ours = rm.raw_scores(["Write a review."] * 2, ["great day", "the cat sat by the river all day long"])
    assert torch.allclose(logits[:, 0], ours, atol=1e-5)


def test_head_only_trains_the_head_and_leaves_the_trunk(tmp_path, synthetic_model_dir):
    _small_data(tmp_path)
    summary = train_reward(config(tmp_path, synthetic_model_dir, head_only=True, max_steps=3, eval_split=0.25,
                                  lr=1e-2), quiet=True)
    assert summary["steps"] == 3
    before, after = _weights(synthetic_model_dir), _weights(tmp_path / "rm")
    trunk = [k for k in after if not k.startswith("score")]
    assert trunk and all(torch.equal(after[k], before[k]) for k in trunk)
    assert summary["eval_loss"] != summary["initial_eval_loss"]  # the trunk is frozen: the head moved
    with pytest.raises(PreftuneError, match="choose one"):
        train_reward(config(tmp_path, synthetic_model_dir, head_only=True, lora=True, max_steps=1), quiet=True)
