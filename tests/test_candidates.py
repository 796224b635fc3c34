"""`preftune sample`: candidates from several models, recorded with their settings."""

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from conftest import ROOT, write_lines
from preftune.cli import cli
from preftune.data.jsonl import read_jsonl
from preftune.data.records import parse_prompt_source
from preftune.errors import DataError
from preftune.sampling.sample import model_labels


def read_candidates(path):
    return read_jsonl(path, "candidates")


def _sample(tmp_path, model_dir, *extra, out="cands.jsonl"):
    prompts = write_lines(tmp_path / "prompts.jsonl", [{"prompt": "Say hello."}, {"id": "p2", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 4?"}]},
        {"prompt": "Write a happy sentence about a city.", "split": "eval"}])
    args = ["sample", "--model", str(model_dir), "--model", str(model_dir), "--prompts", str(prompts), "--n", "2",
            "--max-new-tokens", "6", "--batch-size", "3", "--seed", "7", "--out", str(tmp_path / out), *extra]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return tmp_path / out, result.output


def test_sample_several_models_records_who_wrote_what(tmp_path, tiny_model_dir):
    out, output = _sample(tmp_path, tiny_model_dir)
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["prompt-0", "p2", "prompt-2"]
    assert rows[2]["split"] == "eval" and rows[1]["prompt"][0]["role"] == "system"
    for row in rows:
        assert row["models"] == ["model", "model", "model#2", "model#2"]
        assert len(row["responses"]) == len(row["ended"]) == len(row["num_tokens"]) == 4
        assert all(1 <= n <= 6 for n in row["num_tokens"])
        assert row["sampling"].pop("precision") in ("fp32", "bf16")  # --dtype auto: bf16 where the CPU has it
        assert row["sampling"] == {"engine": "hf", "temperature": 0.7, "top_p": 1.0, "top_k": 0, "max_new_tokens": 6,
                                   "stop": [], "seed": 7}  # --engine auto: hf on CPU
    assert "sampled 12 responses to 3 prompts" in output
    assert read_candidates(out).records[1].id == "p2"
    again, _ = _sample(tmp_path, tiny_model_dir, out="again.jsonl")
    assert again.read_text() == out.read_text()  # same seed, same samples


def test_sample_over_long_prompt_is_a_file_line_error(tmp_path, tiny_model_dir):
    prompts = write_lines(tmp_path / "prompts.jsonl", [{"prompt": "hi"}, {"prompt": "the cat " * 50}])
    result = CliRunner().invoke(cli, ["sample", "--model", str(tiny_model_dir), "--prompts", str(prompts),
                                      "--out", str(tmp_path / "c.jsonl"), "--max-prompt-length", "20"])
    assert result.exit_code == 2 and f"{prompts}:2: prompt is" in result.output


def test_model_labels_are_unique():
    assert model_labels(["runs/sft", "base", "other/sft", "runs/sft"]) == ["sft", "base", "sft#2", "sft#3"]


def test_bad_candidates_line_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [{"prompt": "q", "responses": ["a", "b"]},
                                              {"prompt": "q", "responses": ["a"], "models": ["m", "n"]}])
    with pytest.raises(DataError, match=r"c.jsonl:2: \"models\" must be a list of strings, one per response"):
        read_candidates(path)
    assert len(read_jsonl(path, "candidates", skip_invalid=True).records) == 1


def test_candidates_are_read_without_importing_the_sampling_stage(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [{"prompt": "q", "responses": ["a", "b"], "models": ["m", "n"]}])
    code = ("import sys; from preftune.data.jsonl import read_jsonl; "
            f"r = read_jsonl({str(path)!r}, 'candidates').records[0]; "
            "assert 'preftune.sampling' not in sys.modules; print(type(r).__name__, r.models)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["CandidateSet", "['m',", "'n']"]


def test_demonstrations_work_as_prompts(tmp_path):
    demo = parse_prompt_source({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    assert demo.messages == [{"role": "user", "content": "hi"}]
    assert parse_prompt_source({"prompt": "q", "completion": "a", "id": 3}).id == 3
