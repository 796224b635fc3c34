"""TRL's dataset formats read unchanged, and written back with our meaning (docs/data-formats.md).

The example records are TRL's own, from its dataset-formats documentation."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from preftune.cli import cli
from preftune.data.chat import encode_pair, render_conversation
from preftune.data.jsonl import read_jsonl
from preftune.data.records import RecordError, parse_comparison, parse_demonstration, parse_prompt, to_trl_json
from preftune.models.tiny import build_tiny_tokenizer

SKY = [{"role": "user", "content": "What color is the sky?"}]
BLUE, GREEN = [{"role": "assistant", "content": "It is blue."}], [{"role": "assistant", "content": "It is green."}]

PREFERENCE = {  # TRL name -> (record, prompt messages, chosen, rejected)
    "standard explicit": ({"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
                          [{"role": "user", "content": "The sky is"}], " blue.", " green."),
    "standard implicit": ({"chosen": "The sky is blue.", "rejected": "The sky is green."},
                          [{"role": "user", "content": "The sky is"}], " blue.", " green."),
    "conversational explicit": ({"prompt": SKY, "chosen": BLUE, "rejected": GREEN}, SKY, "It is blue.", "It is green."),
    "conversational implicit": ({"chosen": SKY + BLUE, "rejected": SKY + GREEN}, SKY, "It is blue.", "It is green."),
}


@pytest.mark.parametrize("name", PREFERENCE)
def test_every_trl_preference_format_is_read_with_trls_prompt(name):
    record, messages, chosen, rejected = PREFERENCE[name]
    rec = parse_comparison(record)
    assert (rec.messages, rec.chosen, rec.rejected) == (messages, chosen, rejected)


def test_implicit_text_pairs_split_where_trl_splits():
    # trl.data_utils.extract_prompt: the common start, less the space before the first difference.
    rec = parse_comparison({"chosen": "2 + 2 is 4", "rejected": "2 + 2 is 5"})
    assert (rec.messages[0]["content"], rec.chosen, rec.rejected) == ("2 + 2 is", " 4", " 5")
    rec = parse_comparison({"chosen": "Hello!", "rejected": "Help!"})  # no space to drop
    assert (rec.messages[0]["content"], rec.chosen, rec.rejected) == ("Hel", "lo!", "p!")
    with pytest.raises(RecordError, match="share no prompt"):
        parse_comparison({"chosen": "Yes.", "rejected": "No."})
    with pytest.raises(RecordError, match="the start of the other"):
        parse_comparison({"chosen": "The sky is blue", "rejected": "The sky is blue!"})
    # Anthropic HH transcripts keep their turns: the prompt ends at the last "\n\nAssistant:".
    rec = parse_comparison({"chosen": "\n\nHuman: Q\n\nAssistant: The answer is 4",
                            "rejected": "\n\nHuman: Q\n\nAssistant: The answer is 5"})
    assert (rec.messages, rec.chosen) == ([{"role": "user", "content": "Q"}], "The answer is 4")
    # Text before the first turn is the system's (it was dropped); "Human:" may open the text.
    rec = parse_comparison({"chosen": "You are kind.\n\nHuman: Q\n\nAssistant: yes",
                            "rejected": "You are kind.\n\nHuman: Q\n\nAssistant: no"})
    assert rec.messages == [{"role": "system", "content": "You are kind."}, {"role": "user", "content": "Q"}]
    rec = parse_comparison({"chosen": "Human: Q\n\nAssistant: yes", "rejected": "Human: Q\n\nAssistant: no"})
    assert (rec.messages, rec.chosen) == ([{"role": "user", "content": "Q"}], "yes")


def test_trl_unpaired_kto_records_are_not_taken_for_demonstrations():
    """Found by a reading of the code: {"prompt", "completion", "label": false} trained SFT on an
    answer marked undesirable."""
    from preftune.data.records import parse_demonstration

    with pytest.raises(RecordError, match=r"unpaired preference \(KTO\) format"):
        parse_demonstration({"prompt": "Q", "completion": "bad answer", "label": False})
    assert parse_demonstration({"prompt": "Q", "completion": "a", "label": "math"}).completion == "a"


def test_margin_is_strength():
    base = {"prompt": "Q", "chosen": "a", "rejected": "b"}
    assert parse_comparison({**base, "margin": 1.5}).strength == 1.5
    assert parse_comparison({**base, "margin": 1.5, "strength": 1.5}).strength == 1.5
    with pytest.raises(RecordError, match='"strength" and "margin" differ'):
        parse_comparison({**base, "margin": 1.0, "strength": 2.0})
    for bad in (-1, float("nan"), float("inf"), True, "2"):
        with pytest.raises(RecordError, match='"margin" must be a number >= 0'):
            parse_comparison({**base, "margin": bad})


def test_message_list_answers_are_one_reply_or_refused():
    assert parse_comparison({"prompt": SKY, "chosen": SKY + BLUE, "rejected": GREEN}).chosen == "It is blue."
    with pytest.raises(RecordError, match='"chosen" must be one assistant turn'):
        parse_comparison({"prompt": SKY, "chosen": BLUE + SKY + BLUE, "rejected": GREEN})


def test_trl_prompt_completion_and_prompt_only_formats():
    demo = parse_demonstration({"prompt": "The sky is", "completion": " blue."})
    assert (demo.messages, demo.completion) == ([{"role": "user", "content": "The sky is"}], " blue.")
    demo = parse_demonstration({"prompt": SKY, "completion": BLUE})
    assert (demo.messages, demo.completion) == (SKY, "It is blue.")
    assert parse_prompt({"prompt": "The sky is"}).messages == [{"role": "user", "content": "The sky is"}]
    assert parse_prompt({"prompt": SKY}).messages == SKY
    with pytest.raises(RecordError, match='"text" record has no prompt'):
        parse_demonstration({"text": "The sky is blue."})
    with pytest.raises(RecordError, match='"completion" must be one assistant turn'):
        parse_demonstration({"prompt": SKY, "completion": BLUE + SKY + BLUE})


def test_the_texts_trained_on_have_one_space_before_a_trl_completion():
    plain = build_tiny_tokenizer(chat_template=False)
    bos, eos = plain.bos_token, plain.eos_token
    rec = parse_comparison(PREFERENCE["standard explicit"][0])
    assert render_conversation(plain, rec.messages, rec.chosen) == f"{bos}User: The sky is\n\nAssistant: blue.{eos}"
    demo = parse_demonstration({"prompt": "The sky is", "completion": " blue."})
    pair = encode_pair(plain, demo.messages, demo.completion)  # SFT and DPO: the same text, split at the prompt
    assert plain.decode(pair.input_ids) == f"{bos}User: The sky is\n\nAssistant: blue.{eos}"
    chat = build_tiny_tokenizer()
    rec = parse_comparison(PREFERENCE["conversational implicit"][0])
    assert render_conversation(chat, rec.messages, rec.chosen) == chat.apply_chat_template(SKY + BLUE, tokenize=False)


def trl_reads(row: dict) -> tuple[list, list, list]:
    """What TRL's trainers do with a conversational explicit record: prompt + chosen and prompt +
    rejected are the two conversations, rendered by the chat template; the margin goes to the loss."""
    assert isinstance(row["prompt"], list) and isinstance(row["chosen"], list)
    return row["prompt"], row["prompt"] + row["chosen"], row["prompt"] + row["rejected"]


def test_convert_to_trl_and_back_keeps_every_pair(tmp_path):
    src = tmp_path / "mixed.jsonl"
    rows = [record for record, *_ in PREFERENCE.values()] + [
        {"prompt": "Q", "chosen": "a", "rejected": "b", "strength": 2, "annotator": "ann-1", "id": "x",
         "split": "eval"},
        {"chosen": "\n\nHuman: Q\n\nAssistant: yes", "rejected": "\n\nHuman: Q\n\nAssistant: no"}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "trl.jsonl"
    result = CliRunner().invoke(cli, ["convert", str(src), "--to", "trl", "--out", str(out)])
    assert result.exit_code == 0 and "converted 6 comparisons" in result.output
    before = read_jsonl(src, "comparisons").records
    written = [json.loads(line) for line in out.read_text().splitlines()]
    for rec, row in zip(before, written):
        prompt, chosen, rejected = trl_reads(row)
        assert prompt == rec.messages
        assert (chosen[-1]["content"], rejected[-1]["content"]) == (rec.chosen, rec.rejected)
        assert row["margin"] == (rec.strength or 0.0)
    assert written[4]["annotator"] == "ann-1" and written[4]["split"] == "eval" and written[4]["id"] == "x"
    after = read_jsonl(out, "comparisons").records
    assert [(r.messages, r.chosen, r.rejected, r.strength or 0.0, r.split) for r in after] == \
        [(r.messages, r.chosen, r.rejected, r.strength or 0.0, r.split) for r in before]


def test_convert_refuses_what_trl_cannot_hold(tmp_path):
    src = tmp_path / "rankings.jsonl"
    src.write_text(json.dumps({"prompt": "Q", "responses": ["a", "b"], "ranking": [0, 1]}) + "\n")
    result = CliRunner().invoke(cli, ["convert", str(src), "--to", "trl", "--out", str(tmp_path / "o.jsonl")])
    assert result.exit_code == 2 and "TRL has no format for rankings" in result.output
    result = CliRunner().invoke(cli, ["convert", str(src), "--to", "preftune", "--out", str(src)])
    assert result.exit_code == 2 and "overwrite the input" in result.output
    with pytest.raises(RecordError, match="TRL has no format for rankings"):
        to_trl_json(read_jsonl(src, "rankings").records[0])


def test_label_writes_trl_comparisons(tmp_path):
    candidates = tmp_path / "candidates.jsonl"
    candidates.write_text("".join(json.dumps({"prompt": f"Q{i}", "responses": ["short", "a much longer answer"]}) + "\n"
                                  for i in range(3)))
    out = tmp_path / "comparisons.jsonl"
    label = ["label", "--candidates", str(candidates), "--out", str(out), "--labeler", "length", "--format", "trl"]
    result = CliRunner().invoke(cli, label)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(trl_reads(r)[1][-1]["content"] == "a much longer answer" for r in rows)
    result = CliRunner().invoke(cli, label + ["--kind", "ratings"])
    assert result.exit_code == 2 and "TRL has no format for ratings" in result.output


def test_keys_preftune_does_not_read_are_written_back(tmp_path):
    """Found by a reading of the code: a round trip dropped every key it did not know (TRL's
    UltraFeedback ``score_chosen``, the ``chosen_model`` preftune label writes)."""
    from conftest import write_lines
    from preftune.data import read_jsonl, write_jsonl

    src = write_lines(tmp_path / "in.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b", "score_chosen": 8.5,
                                               "chosen_model": "sft", "source": {"dataset": "uf", "row": 3}}])
    records = read_jsonl(src, "comparisons").records
    for fmt in ("preftune", "trl"):
        write_jsonl(tmp_path / f"{fmt}.jsonl", records, format=fmt)
        row = json.loads((tmp_path / f"{fmt}.jsonl").read_text())
        assert (row["score_chosen"], row["chosen_model"], row["source"]) == (8.5, "sft", {"dataset": "uf", "row": 3})
    again = read_jsonl(tmp_path / "trl.jsonl", "comparisons").records[0]
    assert again.extra == {"score_chosen": 8.5, "chosen_model": "sft", "source": {"dataset": "uf", "row": 3}}
