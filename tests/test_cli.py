"""The command line: help, config files, one-line errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from conftest import ROOT, write_lines
from preftune.cli import cli
from preftune.config import build_config
from preftune.errors import ConfigError
from preftune.sft.config import SFTConfig


def run(args):
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def test_help_explains_every_option():
    result = run(["sft", "--help"])
    assert result.exit_code == 0
    for flag in ("--epochs", "--max-steps", "--lr", "--batch-size", "--seed", "--max-length", "--lora",
                 "--eval-split", "--resume", "--config", "--packing", "--skip-invalid"):
        assert flag in result.output
    assert "Peak learning rate" in result.output



def test_an_option_states_its_default_once():
    """A None default that the help text explains in words (--project: "default: the name of
    --out") is not also shown as "[default: None]"; a plain default still is."""
    import click

    from preftune.config import config_options
    from preftune.pipeline.config import RunConfig

    command = config_options(RunConfig)(click.command()(lambda **_: None))
    helps = {p.name: p.help for p in command.params}
    assert "default: the name of --out" in helps["project"] and "[default: None]" not in helps["project"]
    assert helps["select"].endswith("[default: random]")

def test_config_precedence_file_then_flags(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[sft]\nmodel = "m"\ndata = "d.jsonl"\nout = "o"\nlr = 0.5\nbatch_size = 3\n'
                    '[reward]\nlr = 9.0\n')
    cfg = build_config(SFTConfig, file=toml, section="sft", overrides={"lr": 0.25, "epochs": None})
    assert (cfg.lr, cfg.batch_size, cfg.epochs) == (0.25, 3, 1.0)
    yaml = tmp_path / "c.yaml"
    yaml.write_text("model: m\ndata: d.jsonl\nout: o\nlora: true\nlora_targets: [q_proj, v_proj]\n")
    cfg = build_config(SFTConfig, file=yaml, section="sft")
    assert cfg.lora and cfg.lora_targets == ["q_proj", "v_proj"]


def test_config_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "m"\ndata = "d"\nout = "o"\nlearning_rate = 1\n')
    with pytest.raises(ConfigError, match=r"bad\.toml: unknown option 'learning_rate'"):
        build_config(SFTConfig, file=bad, section="sft")
    with pytest.raises(ConfigError, match=r"--lr: Input should be greater than 0"):
        build_config(SFTConfig, overrides={"model": "m", "data": "d", "out": "o", "lr": -1})


@pytest.mark.parametrize("content,expected", [
    ([{"prompt": "ok", "completion": "fine"}, {"prompt": "Q", "completion": 5}],
     'demos.jsonl:2: "completion" must be a string'),
    ([], "demos.jsonl: file is empty"),
    (['[{"prompt": "a", "completion": "b"}]'], "demos.jsonl:1: this is a JSON array"),
    ([{"id": 1, "prompt": "a", "completion": "b"}, {"id": 1, "prompt": "c", "completion": "d"}],
     'demos.jsonl:2: duplicate id "1"'),
])
def test_bad_input_gives_one_line_and_exit_2(tmp_path, tiny_model_dir, content, expected):
    data = write_lines(tmp_path / "demos.jsonl", content)
    result = CliRunner().invoke(cli, ["sft", "--model", str(tiny_model_dir), "--data", str(data),
                                      "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and lines[0].startswith("error: ")


def test_non_utf8_and_over_long_records_in_a_real_process(tmp_path, tiny_model_dir):
    data = tmp_path / "demos.jsonl"
    data.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff", "completion": "b"}\n')
    proc = subprocess.run([sys.executable, "-m", "preftune", "sft", "--model", str(tiny_model_dir),
                           "--data", str(data), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: {data}:2: not valid UTF-8 (byte 0xff at column 13)"
    long = write_lines(tmp_path / "long.jsonl", [{"prompt": "a", "completion": "b"},
                                                 {"prompt": "word " * 400, "completion": "b"}])
    result = CliRunner().invoke(cli, ["sft", "--model", str(tiny_model_dir), "--data", str(long),
                                      "--out", str(tmp_path / "o"), "--max-length", "64"])
    assert result.exit_code == 2 and "long.jsonl:2: record is" in result.output


def test_skip_invalid_trains_on_the_rest_and_reports(tmp_path, tiny_model_dir):
    rows = [{"prompt": f"q{i}", "completion": f"answer {i}"} for i in range(12)] + [{"prompt": "x"}]
    data = write_lines(tmp_path / "demos.jsonl", rows)
    result = CliRunner().invoke(cli, ["sft", "--model", str(tiny_model_dir), "--data", str(data), "--out",
                                      str(tmp_path / "o"), "--skip-invalid", "--max-steps", "2", "--eval-split", "0"])
    assert result.exit_code == 0, result.output
    assert "skipped 1 invalid" in result.output
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["train_examples"] == 12


def test_dotted_sections_merge_their_levels_and_defaults_rank_below_the_file(tmp_path):
    from preftune.evaluation.config import AdversarialConfig

    toml = tmp_path / "c.toml"
    toml.write_text('[probes]\nmax_new_tokens = 5\nsamples = 9\n[probes.adversarial]\nsamples = 3\n'
                    '[probes.hallucination]\nquestions = "q.jsonl"\n')
    cfg = build_config(AdversarialConfig, file=toml, section="probes.adversarial",
                       defaults={"samples": 100, "batch_size": 4}, overrides={"model": "m", "out": "o"})
    # max_new_tokens from [probes], samples from [probes.adversarial] over [probes] over the default,
    # batch_size from the defaults; [probes.hallucination] belongs to the other probe.
    assert (cfg.max_new_tokens, cfg.samples, cfg.batch_size) == (5, 3, 4)
