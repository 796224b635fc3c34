"""Data formats: parsing, validation errors naming file and line, round trips."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import write_lines
from preftune.data import (
    Comparison,
    Demonstration,
    PromptRecord,
    Ranking,
    Rating,
    read_jsonl,
    to_json,
    write_jsonl,
)
from preftune.data.split import random_split, read_train_eval, train_eval_split
from preftune.errors import DataError


def test_prompt_forms(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [
        {"prompt": "Hi", "id": 1},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
         "split": "eval"},
    ])
    recs = read_jsonl(path, "prompts").records
    assert recs[0] == PromptRecord(messages=[{"role": "user", "content": "Hi"}], id=1)  # as the file gave it
    assert recs[1].messages[0]["role"] == "system" and recs[1].split == "eval"
    assert recs[1].source.line == 2


def test_demonstration_messages_form_takes_last_assistant_turn(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [{"messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}])
    (demo,) = read_jsonl(path, "demonstrations").records
    assert demo.completion == "d" and [m["content"] for m in demo.messages] == ["a", "b", "c"]


def test_comparison_forms(tmp_path):
    hh_prefix = "\n\nHuman: What is 2+2?\n\nAssistant: Let me think.\n\nHuman: Well?"
    path = write_lines(tmp_path / "c.jsonl", [
        {"prompt": "Q", "chosen": "good", "rejected": "bad", "strength": 2, "annotator": "ann1"},
        {"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "good"}],
         "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "bad"}]},
        {"chosen": hh_prefix + "\n\nAssistant: 4", "rejected": hh_prefix + "\n\nAssistant: 5"},
        {"prompt": [{"role": "user", "content": "Q"}], "chosen": [{"role": "assistant", "content": "good"}],
         "rejected": [{"role": "assistant", "content": "bad"}]},
    ])
    a, b, hh, d = read_jsonl(path, "comparisons").records
    assert (a.chosen, a.rejected, a.strength, a.annotator) == ("good", "bad", 2.0, "ann1")
    assert b.messages == [{"role": "user", "content": "Q"}] and b.chosen == "good"
    assert hh.messages == [{"role": "user", "content": "What is 2+2?"},
                           {"role": "assistant", "content": "Let me think."},
                           {"role": "user", "content": "Well?"}]
    assert (hh.chosen, hh.rejected) == ("4", "5")
    assert d == Comparison(messages=[{"role": "user", "content": "Q"}], chosen="good", rejected="bad")


def test_ranking_with_ties_and_rating(tmp_path):
    path = write_lines(tmp_path / "r.jsonl", [{"prompt": "Q", "responses": ["a", "b", "c"], "ranking": [2, [0, 1]]}])
    (rank,) = read_jsonl(path, "rankings").records
    assert rank.ranking == [[2], [0, 1]]
    path = write_lines(tmp_path / "t.jsonl", [{"prompt": "Q", "response": "a", "rating": 1, "flags": ["harmful"]}])
    (rating,) = read_jsonl(path, "ratings").records
    assert (rating.rating, rating.scale, rating.flags) == (1, 3, ["harmful"])


@pytest.mark.parametrize("kind,record,message", [
    ("demonstrations", {"prompt": "Q", "completion": 5}, '"completion" must be a string'),
    ("demonstrations", {"prompt": "Q"}, 'missing "completion"'),
    ("demonstrations", {"prompt": "", "completion": "x"}, '"prompt" must not be empty'),
    ("comparisons", {"prompt": "Q", "chosen": "same", "rejected": "same"}, "identical"),
    ("comparisons", {"prompt": "Q", "chosen": "", "rejected": "b"}, '"chosen" must not be empty'),
    ("comparisons", {"prompt": "Q", "chosen": "a", "rejected": "b", "strength": -1}, '"strength" must be'),
    ("rankings", {"prompt": "Q", "responses": ["a", "b"], "ranking": [0, 2]}, "index 2 is out of range"),
    ("rankings", {"prompt": "Q", "responses": ["a", "b"], "ranking": [0, 0]}, "more than once"),
    ("ratings", {"prompt": "Q", "response": "a", "rating": 4}, "outside the scale 1..3"),
    ("ratings", {"prompt": "Q", "response": "a", "rating": 2, "flags": ["rude"]}, 'unknown flag "rude"'),
    ("prompts", {"messages": [{"role": "robot", "content": "x"}]}, '["role"] must be one of'),
])
def test_invalid_records_name_file_line_and_field(tmp_path, kind, record, message):
    path = write_lines(tmp_path / "in.jsonl", [_valid(kind), record])
    with pytest.raises(DataError) as err:
        read_jsonl(path, kind)
    text = str(err.value)
    assert text.startswith(f"{path}:2: ") and message in text
    assert "\n" not in text


def _valid(kind: str) -> dict:
    return {"prompts": {"prompt": "ok"}, "demonstrations": {"prompt": "ok", "completion": "fine"},
            "comparisons": {"prompt": "ok", "chosen": "a", "rejected": "b"},
            "rankings": {"prompt": "ok", "responses": ["a", "b"], "ranking": [1, 0]},
            "ratings": {"prompt": "ok", "response": "a", "rating": 3}}[kind]


def test_file_level_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: file is empty"):
        read_jsonl(empty, "prompts")
    array = tmp_path / "array.jsonl"
    array.write_text(json.dumps([{"prompt": "a"}]))
    with pytest.raises(DataError, match=r"array\.jsonl:1: this is a JSON array"):
        read_jsonl(array, "prompts")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin\.jsonl:2: not valid UTF-8 \(byte 0xe9"):
        read_jsonl(latin, "prompts")
    dup = write_lines(tmp_path / "dup.jsonl", [{"id": "x", "prompt": "a"}, {"id": "y", "prompt": "b"},
                                               {"id": "x", "prompt": "c"}])
    with pytest.raises(DataError, match=r'dup\.jsonl:3: duplicate id "x" \(first on line 1\)'):
        read_jsonl(dup, "prompts")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"broken\.jsonl:2: invalid JSON"):
        read_jsonl(broken, "prompts")
    with pytest.raises(DataError, match="no such file"):
        read_jsonl(tmp_path / "missing.jsonl", "prompts")


def test_skip_invalid_counts_and_reports(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [
        {"prompt": "a", "completion": "b"}, {"prompt": "a"}, "not json", {"prompt": "c", "completion": "d"}])
    result = read_jsonl(path, "demonstrations", skip_invalid=True)
    assert len(result.records) == 2
    assert [s.line for s in result.skipped] == [2, 3]
    summary = result.summary()
    assert "2 records" in summary and "skipped 2 invalid" in summary and "line 2" in summary


def test_skip_invalid_with_nothing_left_is_an_error(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [{"prompt": "a"}])
    with pytest.raises(DataError, match="no valid records"):
        read_jsonl(path, "demonstrations", skip_invalid=True)


def test_preferences_kind_tells_formats_apart(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [_valid("comparisons"), _valid("rankings"), _valid("ratings")])
    types = [type(r) for r in read_jsonl(path, "preferences").records]
    assert types == [Comparison, Ranking, Rating]


texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30).filter(
    lambda s: s.strip())


@settings(max_examples=40, deadline=None)
@given(prompt=texts, a=texts, b=texts, strength=st.none() | st.floats(0, 5), ident=st.none() | texts)
def test_round_trip(tmp_path_factory, prompt, a, b, strength, ident):
    if a == b:
        return
    path = tmp_path_factory.mktemp("rt") / "c.jsonl"
    records = [Comparison(messages=[{"role": "user", "content": prompt}], chosen=a, rejected=b,
                          strength=strength, id=ident),
               Demonstration(messages=[{"role": "system", "content": "s"}, {"role": "user", "content": prompt}],
                             completion=a),
               Ranking(messages=[{"role": "user", "content": prompt}], responses=[a, b], ranking=[[1], [0]]),
               Rating(messages=[{"role": "user", "content": prompt}], response=a, rating=2, flags=["other"])]
    for rec, kind in zip(records, ["comparisons", "demonstrations", "rankings", "ratings"]):
        write_jsonl(path, [rec])
        (back,) = read_jsonl(path, kind).records
        assert back == rec
        assert to_json(back) == to_json(rec)


def test_split_uses_split_field_else_seeded_fraction():
    recs = [PromptRecord(messages=[{"role": "user", "content": str(i)}]) for i in range(20)]
    train, held = train_eval_split(recs, 0.25, seed=1)
    assert len(held) == 5 and len(train) == 15 and not set(map(id, train)) & set(map(id, held))
    assert train_eval_split(recs, 0.25, seed=1) == (train, held)
    recs[3].split = "eval"
    train, held = train_eval_split(recs, 0.25, seed=1)
    assert held == [recs[3]] and len(train) == 19


def test_split_tags_in_any_case_and_unknown_ones_refused(tmp_path):
    """Found by a reading of the code: a record tagged "dev" or "Train" went to neither side."""
    recs = [PromptRecord(messages=[{"role": "user", "content": str(i)}], split=tag)
            for i, tag in enumerate(["train", "Train", "dev", "VAL", None, "held_out"])]
    train, held = train_eval_split(recs, 0.25, seed=1)
    assert [r.messages[0]["content"] for r in train] == ["0", "1", "4"]
    assert [r.messages[0]["content"] for r in held] == ["2", "3", "5"]
    path = write_lines(tmp_path / "p.jsonl", [{"prompt": "a", "split": "train"}, {"prompt": "b", "split": "later"}])
    with pytest.raises(DataError, match=r"p\.jsonl:2: unknown \"split\" 'later': \"train\", or one of eval"):
        read_jsonl(path, "prompts")


def test_sft_and_dpo_hold_out_whole_prompts(tmp_path):
    """Found by a reading of the code: SFT's and DPO's --eval-split drew records, not prompts, so a
    prompt with several demonstrations or judgements was trained on and held out at once (the
    reward model's split was already over prompts)."""
    comparisons = [{"prompt": f"q{i % 10}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(60)]
    path = write_lines(tmp_path / "c.jsonl", comparisons)
    train, held, notes = read_train_eval(str(path), None, "comparisons", eval_split=0.2, seed=3, skip_invalid=False)
    prompts = lambda recs: {r.messages[0]["content"] for r in recs}  # noqa: E731
    assert len(prompts(held)) == 2 and len(held) == 12 and len(train) == 48
    assert not prompts(train) & prompts(held) and not notes
    # one prompt only: holding it out would leave nothing to train on, so records are drawn, and said
    demos = write_lines(tmp_path / "d.jsonl", [{"prompt": "q", "completion": f"a{i}"} for i in range(10)])
    train, held, notes = read_train_eval(str(demos), None, "demonstrations", eval_split=0.2, seed=3,
                                         skip_invalid=False)
    assert (len(train), len(held)) == (8, 2)
    assert notes == [f"{demos}: 1 prompt(s), too few to hold out whole prompts at eval_split=0.2: "
                     "held out by records (a prompt may be on both sides)"]


def test_byte_order_mark_huge_numbers_deep_nesting_and_lone_surrogates(tmp_path):
    """Found by a reading of the code: a UTF-8 byte-order mark made line 1 "invalid JSON"; a
    number of 5,000 digits, 100,000 nested brackets and a lone surrogate escape ended in a
    traceback (the last one only when writing)."""
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"prompt": "first"}\n{"prompt": "second"}\n')
    assert [r.messages[0]["content"] for r in read_jsonl(bom, "prompts").records] == ["first", "second"]
    pair = write_lines(tmp_path / "pair.jsonl", [r'{"prompt": "smile \ud83d\ude00"}'])  # a valid pair
    assert read_jsonl(pair, "prompts").records[0].messages[0]["content"] == "smile \U0001F600"
    for name, line, message in (("huge", '{"prompt": "a", "n": ' + "9" * 5000 + "}", "more than 4,300 digits"),
                                ("deep", '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
                                ("lone", r'{"prompt": "x \ud800 y"}', "lone UTF-16 surrogate")):
        path = write_lines(tmp_path / f"{name}.jsonl", ['{"prompt": "ok"}', line])
        with pytest.raises(DataError, match=rf"{name}\.jsonl:2: .*{message}"):
            read_jsonl(path, "prompts")


def test_convert_tells_the_kind_from_the_first_valid_record(tmp_path):
    """Found by a reading of the code: a bad first line made the file look like prompts, and with
    --skip-invalid every comparison lost its answers."""
    from click.testing import CliRunner

    from preftune.cli import cli

    src = write_lines(tmp_path / "c.jsonl", ["not json", {"prompt": "q", "chosen": "yes", "rejected": "no"}])
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(cli, ["convert", str(src), "--to", "preftune", "--out", str(out), "--skip-invalid"])
    assert result.exit_code == 0, result.output
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    assert (row["chosen"], row["rejected"]) == ("yes", "no")


def test_integer_ids_are_written_back_as_integers(tmp_path):
    """Found by a reading of the code: `"id": 7` came back from preftune convert (and every data
    file the main job writes again) as `"id": "7"`."""
    from click.testing import CliRunner

    from preftune.cli import cli

    rows = [{"id": 7, "prompt": "q", "chosen": "yes", "rejected": "no"},
            {"id": "8", "prompt": "r", "chosen": "yes", "rejected": "no"}]
    src, out = write_lines(tmp_path / "c.jsonl", rows), tmp_path / "out.jsonl"
    result = CliRunner().invoke(cli, ["convert", str(src), "--to", "preftune", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [7, "8"]
    dup = write_lines(tmp_path / "dup.jsonl", [{"id": 7, "prompt": "a"}, {"id": "7", "prompt": "b"}])
    with pytest.raises(DataError, match=r'dup\.jsonl:2: duplicate id "7" \(first on line 1\)'):
        read_jsonl(dup, "prompts")


def test_random_split_of_plain_items_is_the_untagged_split():
    keys = [f"prompt {i}" for i in range(20)]  # strings: no split field (str.split is a method)
    train, held = random_split(keys, 0.25, seed=1)
    assert len(held) == 5 and sorted(train + held) == sorted(keys)
    recs = [PromptRecord(messages=[{"role": "user", "content": k}]) for k in keys]
    assert [r.messages[0]["content"] for r in train_eval_split(recs, 0.25, seed=1)[1]] == held
    assert random_split(keys, 0.0, seed=1) == (keys, [])
