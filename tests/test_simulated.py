"""Simulated annotators: Bradley-Terry noise and agreement, hand-computed, and `preftune label`."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import write_lines
from preftune.annotators.simulated import (
    bt_probability,
    calibrate_temperature,
    expected_agreement,
    expected_gold_agreement,
    noise_ceiling,
    noisy_ratings,
    noisy_utilities,
    pairwise_agreement,
    rating_thresholds,
)
from preftune.cli import cli
from preftune.data.jsonl import read_jsonl
from preftune.errors import PreftuneError

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


def test_the_gold_is_scored_once_for_several_kinds_of_label(tmp_path):
    """The main job's label stage draws comparisons and ratings from one scoring of the gold."""
    from preftune.pipeline.config import RunConfig
    from preftune.pipeline.run import Run, stage_label

    counter = tmp_path / "calls.txt"
    (tmp_path / "gold.py").write_text(f"""
def length(prompts, responses):
    with open({str(counter)!r}, "a") as f:
        f.write(f"{{len(responses)}}\\n")
    return [len(r.split()) for r in responses]
""")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "candidates.jsonl").write_text(_candidates(tmp_path).read_text())
    run = Run(RunConfig(out=str(tmp_path), gold=f"{tmp_path}/gold.py:length", noise=0.0, annotators=2), None,
              quiet=True)
    result = stage_label(run, 1)
    # 40 candidate sets x 4 non-empty responses, in one chunk: one call for both kinds.
    assert counter.read_text().split() == ["160"]
    assert result["comparisons"]["records"] == 40 * 6 * 2 and result["ratings"]["records"] == 40 * 4 * 2
