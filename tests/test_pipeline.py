"""The main job's --quick variant: the whole loop on tiny models, end to end."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import ROOT
from preftune.cli import cli


def test_quick_run_writes_report_and_metrics_and_ppo_reward_rises(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "quick"
    result = CliRunner().invoke(cli, ["run", "--quick", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("rm_eval_accuracy", "annotator_agreement", "kl_ppo_sft", "winrate_ppo_vs_sft_gold",
                "seconds_total"):
        assert isinstance(metrics[key], float), key
    assert 0.0 <= metrics["rm_eval_gold_accuracy"] <= 1.0 and 0.0 <= metrics["rm_gold_agreement"] <= 1.0
    for key in ("gold_reward", "proxy_reward"):
        for model in ("base", "sft", "ppo"):
            entry = metrics[key][model]
            assert entry["ci"][0] <= entry["mean"] <= entry["ci"][1]
    assert set(metrics["seconds_per_stage"]) == {"sft", "sample", "label", "reward", "ppo", "eval", "probes"}
    html = (out / "report.html").read_text()
    for heading in ("Supervised fine-tuning", "Reward model", "PPO", "Evaluation on held-out prompts",
                    "Over-optimisation", "Sample replies", "hallucination"):
        assert heading in html
    assert "<script" not in html.lower()  # self-contained and inert
    # PPO's reward (the reward model's score of its rollouts) went up over training.
    rows = [json.loads(l) for l in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    scores = [r["objective/scores"] for r in rows]
    k = max(2, len(scores) // 3)
    assert sum(scores[-k:]) / k > sum(scores[:k]) / k
    # A second invocation reuses every finished stage.
    again = CliRunner().invoke(cli, ["run", "--quick", "--out", str(out)], catch_exceptions=False)
    assert again.exit_code == 0 and "reusing the finished stage" in again.output
    assert "stage 6/7: eval" not in again.output


@pytest.fixture(scope="module")
def quick_run_without_probes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quick") / "run"
    first = CliRunner().invoke(cli, ["run", "--quick", "--out", str(out), "--no-probes"], catch_exceptions=False)
    assert first.exit_code == 0, first.output
    return out


@pytest.mark.parametrize("method, title", [("grpo", "GRPO"), ("dpo", "DPO")])
def test_quick_run_with_another_method_reuses_the_data_and_judges_the_new_model(method, title, tmp_path,
                                                                               quick_run_without_probes):
    out = tmp_path / "quick"
    shutil.copytree(quick_run_without_probes, out)
    result = CliRunner().invoke(cli, ["run", "--quick", "--out", str(out), "--no-probes", "--algorithm", method],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.count("reusing the finished stage") == 4  # sft, sample, label, reward
    assert f"stage 5/6: {method}" in result.output and "stage 6/6: eval" in result.output  # no probes
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["algorithm"] == method and isinstance(metrics[f"winrate_{method}_vs_sft_gold"], float)
    assert set(metrics["gold_reward"]) == {"base", "sft", method}
    assert (out / method / "config.json").exists() and (out / "ppo" / "config.json").exists()
    assert f"4. {title}" in (out / "report.html").read_text()


def test_gold_accuracy_on_held_out_counts_the_gold_agreeing_with_the_labels(tmp_path):
    from preftune.pipeline.run import gold_on_held_out
    from preftune.reward.config import RewardConfig

    rows = [{"prompt": "How was the day?", "chosen": good, "rejected": bad, "split": split}
            for good, bad, split in [("A wonderful, happy day.", "A terrible, awful day.", "eval"),
                                     ("I love it, great fun.", "I hate it, sad and bad.", "eval"),
                                     ("Horrible and ugly.", "Lovely and nice.", "eval"),  # against the gold
                                     ("Great!", "Awful!", "train")]]
    path = tmp_path / "comparisons.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = RewardConfig(model="unused", data=str(path), out=str(tmp_path / "rm"))
    result = gold_on_held_out(cfg, "sentiment")
    assert result == {"gold_eval_accuracy": pytest.approx(2 / 3)}  # no trained model in out: no RM agreement


def test_reward_data_holds_out_whole_prompts_and_only_their_comparisons(tmp_path):
    from preftune.pipeline.config import RunConfig
    from preftune.pipeline.run import Run, reward_data

    run = Run(RunConfig(out=str(tmp_path)), None)
    prompts = [f"Prompt {i}?" for i in range(10)]
    comparisons = [{"prompt": p, "chosen": f"good {k}", "rejected": f"bad {k}", "annotator": a}
                   for p in prompts for k in range(2) for a in ("sim-1", "sim-2")]
    ratings = [{"prompt": p, "response": f"good {k}", "rating": 1 + k, "scale": 3, "annotator": "sim-1"}
               for p in prompts for k in range(2)]
    for name, rows in (("comparisons", comparisons), ("ratings", ratings)):
        (tmp_path / "data").mkdir(exist_ok=True)
        (tmp_path / "data" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    train_path, eval_path = reward_data(run, 0.2, seed=3)
    train = [json.loads(l) for l in train_path.read_text().splitlines()]
    held = [json.loads(l) for l in eval_path.read_text().splitlines()]
    held_prompts = {r["prompt"] for r in held}
    assert len(held_prompts) == 2 and not held_prompts & {r["prompt"] for r in train}
    assert all("chosen" in r for r in held) and len(held) == 2 * 4  # comparisons only, all of them
    assert len(train) == 8 * 4 + 8 * 2  # the other prompts' comparisons and ratings
    assert reward_data(run, 0.2, seed=3)[1].read_text() == eval_path.read_text()  # deterministic

    run.cfg.reward_ratings = False
    train_path, _ = reward_data(run, 0.2, seed=3)
    assert all("chosen" in json.loads(l) for l in train_path.read_text().splitlines())


def test_eval_and_probe_tables_take_effect(tmp_path):
    from preftune.config import build_config
    from preftune.errors import ConfigError
    from preftune.pipeline.config import RunConfig
    from preftune.pipeline.run import Run, eval_config, probe_configs

    toml = tmp_path / "run.toml"
    toml.write_text('[run]\nmax_new_tokens = 20\nprobe_questions = 7\n'
                    '[eval]\ntemperature = 0.3\nbootstrap = 500\n'
                    '[probes]\nmax_new_tokens = 5\n'
                    '[probes.adversarial]\nred_team = 2\nsamples = 3\n')
    run = Run(build_config(RunConfig, file=toml, section="run", overrides={"out": str(tmp_path)}), str(toml))
    ev = eval_config(run, tmp_path / "prompts.jsonl")
    assert (ev.temperature, ev.bootstrap, ev.max_new_tokens, ev.batch_size) == (0.3, 500, 20, 32)
    assert ev.model == str(tmp_path / "ppo") and ev.baseline == str(tmp_path / "sft")  # the default method
    hallucination, adversarial = probe_configs(run, "base-model")
    assert (hallucination.max_new_tokens, hallucination.samples) == (5, 7)  # [probes], then [run]
    assert (adversarial.max_new_tokens, adversarial.red_team, adversarial.samples) == (5, 2, 3)
    assert adversarial.baseline == "base-model" and hallucination.model == str(tmp_path / "ppo")
    toml.write_text('[probes.hallucination]\nred_team = 2\n')  # an adversarial option
    with pytest.raises(ConfigError, match=r"run\.toml: unknown option 'red_team'"):
        probe_configs(Run(RunConfig(out=str(tmp_path)), str(toml)), "base-model")


def test_quick_run_from_a_wheel_in_a_fresh_venv(tmp_path):
    """--quick needs nothing outside the installed package: build the wheel, install it alone in a
    new virtual environment (the dependencies seen through a .pth file), run it from elsewhere."""
    source, wheels = tmp_path / "source", tmp_path / "wheels"  # built from a copy: the checkout stays clean
    shutil.copytree(ROOT / "preftune", source / "preftune", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(wheels), str(source)], check=True, capture_output=True)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # Paths named in a .pth file are added as they are: the editable install of this checkout, which
    # lives there as a .pth of its own, is not.
    (Path(site) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-index", *map(str, wheels.glob("*.whl"))], check=True, capture_output=True)
    where = subprocess.run([str(python), "-c", "import preftune; print(preftune.__file__)"], cwd=tmp_path,
                           check=True, capture_output=True, text=True).stdout.strip()
    assert where.startswith(site), where
    proc = subprocess.run([str(venv / "bin" / "preftune"), "run", "--quick", "--out", "q"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "report: q/report.html" in proc.stdout
    metrics = json.loads((tmp_path / "q" / "metrics.json").read_text())
    assert metrics["quick"] and set(metrics["seconds_per_stage"]) >= {"sft", "ppo", "eval", "probes"}


def test_compare_trains_each_method_once_and_judges_all_the_same_way(tmp_path, quick_run_without_probes):
    from preftune.pipeline.compare import best_within, gold_peak

    out = tmp_path / "quick"
    shutil.copytree(quick_run_without_probes, out)
    args = ["compare", "--run", str(out), "--methods", "rloo,dpo,bon", "--bon-n", "1,2,4"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    compare = json.loads((out / "compare" / "compare.json").read_text())
    rows = {r["method"]: r for r in compare["methods"]}
    assert set(rows) == {"rloo", "dpo", "bon"}
    assert rows["rloo"]["episodes"] == 12 * 16 and rows["dpo"]["episodes"] == 0 and rows["bon"]["episodes"] == 24 * 4
    for row in rows.values():
        assert row["gold"]["ci"][0] <= row["gold"]["mean"] <= row["gold"]["ci"][1]
        assert row["seconds"] > 0 and row["peak_rss_mb"] > 100  # measured in the method's own process
    assert rows["bon"]["kl"]["mean"] == pytest.approx(math.log(4) - 3 / 4)  # best-of-4's analytic KL
    assert rows["rloo"]["kl"]["mean"] > 0 and rows["rloo"]["winrate_vs_sft_gold"] is not None
    assert (out / "rloo" / "config.json").exists() and (out / "dpo" / "config.json").exists()
    assert (out / "compare" / "compare.png").stat().st_size > 0
    assert "Methods side by side" in (out / "compare" / "report.html").read_text()
    again = CliRunner().invoke(cli, args, catch_exceptions=False)  # trained methods are reused
    assert again.output.count("reusing the earlier comparison's run") == 3
    # the helpers: best gold within the KL budget (points are (sqrt KL, gold)), a peak followed by a fall
    assert best_within([(1.0, 0.2), (2.0, 0.5), (3.0, 0.9)], 6.0) == 0.5  # 3^2 = 9 > 6
    assert gold_peak([(1.0, 0.2), (2.0, 0.5), (3.0, 0.4)]) == (2.0, 0.5)
    assert gold_peak([(1.0, 0.2), (2.0, 0.5)]) is None


def test_compare_refuses_an_unfinished_run_in_one_line(tmp_path):
    (tmp_path / "run_config.json").write_text(json.dumps({"config_file": None, "out": str(tmp_path)}))
    result = CliRunner().invoke(cli, ["compare", "--run", str(tmp_path)])
    assert result.exit_code != 0 and "has not finished its first stages" in result.output
    assert "Traceback" not in result.output


def test_quick_run_with_a_reward_ensemble(tmp_path, quick_run_without_probes):
    """[reward] ensemble = 2: the main job trains two members, PPO optimises their mean and logs
    their disagreement, and the report shows it next to proxy and gold."""
    from preftune.pipeline.cli import quick_files

    out = tmp_path / "quick"
    shutil.copytree(quick_run_without_probes, out)
    for stage in ("rm", "ppo"):  # the stages to run again; the rest is reused
        shutil.rmtree(out / stage)
    config = tmp_path / "ensemble.toml"
    config.write_text(Path(quick_files()["config"]).read_text().replace("[reward]\n", "[reward]\nensemble = 2\n"))
    result = CliRunner().invoke(cli, ["run", "--quick", "--config", str(config), "--out", str(out), "--no-probes"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "rm" / "ensemble.json").read_text())["members"] == ["member-0", "member-1"]
    reward = json.loads((out / "stages.json").read_text())["reward"]["summary"]
    assert reward["members"] == 2 and reward["eval_disagreement"] > 0 and "rm_gold_agreement" in reward
    rows = [json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["objective/reward_uncertainty"] > 0 for r in rows)
    assert any("eval/proxy_uncertainty" in r for r in rows)
    assert "The proxy is an ensemble of reward models" in (out / "report.html").read_text()


def test_compare_passes_the_options_it_is_given_to_every_method(tmp_path):
    """Found by a reading of --help: compare accepted --seed, --device, --dtype, --threads and
    --skip-invalid (and the docs --engine) and then used the run's recorded values."""
    from preftune.pipeline.compare import open_run
    from preftune.pipeline.config import CompareConfig, RunConfig

    recorded = RunConfig(out=str(tmp_path), seed=3, device="cpu", threads=2).model_dump()
    (tmp_path / "run_config.json").write_text(json.dumps({**recorded, "config_file": None}))
    run = open_run(CompareConfig(run=str(tmp_path), seed=11, engine="hf", skip_invalid=True), None, "rloo")
    assert (run.cfg.seed, run.cfg.engine, run.cfg.skip_invalid, run.cfg.algorithm) == (11, "hf", True, "rloo")
    assert (run.cfg.device, run.cfg.threads) == ("cpu", 2)  # not given: the run's own


def test_a_stage_table_setting_what_the_run_sets_for_every_stage_is_refused(tmp_path):
    """Found by a reading of --help: [ppo] engine = "hf" (or seed, device, dtype, threads) was
    silently overridden by the run's value."""
    from preftune.errors import ConfigError
    from preftune.pipeline.config import RunConfig
    from preftune.pipeline.run import Run
    from preftune.rl.config import PPOConfig

    config = tmp_path / "run.toml"
    config.write_text('[run]\nseed = 1\n\n[ppo]\nlr = 1e-5\nengine = "hf"\n')
    run = Run(RunConfig(out=str(tmp_path / "out")), str(config), quiet=True)
    with pytest.raises(ConfigError, match=r"\[ppo\] engine: set it in \[run\]"):
        run.stage_config(PPOConfig, "ppo", policy="x", reward="y", prompts="z", out="w")
    config.write_text('[run]\nseed = 1\n\n[ppo]\nlr = 1e-5\n')
    assert run.stage_config(PPOConfig, "ppo", policy="x", reward="y", prompts="z", out="w").lr == 1e-5


def test_run_prompt_split_knows_every_split_tag(tmp_path):
    """Found by a reading of the code: the run's own prompt split knew only "train", "eval", "test"
    and "validation" in lower case, so prompts tagged "dev", "val" or "Train" (which the readers
    accept) were silently dropped, and a file held out only by "dev" had "no held-out prompts"."""
    from conftest import write_lines

    from preftune.pipeline.config import RunConfig
    from preftune.pipeline.run import Run, split_prompts

    tags = ["train", "Train", None, "dev", "VAL", "Eval", "held_out"]
    prompts = write_lines(tmp_path / "p.jsonl", [{"prompt": f"p{i}", **({"split": t} if t else {})}
                                                 for i, t in enumerate(tags)])
    demos = write_lines(tmp_path / "d.jsonl", [{"prompt": "c", "completion": "d"}])
    cfg = RunConfig(prompts=str(prompts), demos=str(demos), out=str(tmp_path / "out"), eval_prompts=10)
    paths = split_prompts(Run(cfg, None, quiet=True))
    read = lambda key: sorted(json.loads(line)["prompt"] for line in paths[key].read_text().splitlines())  # noqa: E731
    assert read("rl") == ["p0", "p1", "p2"]
    assert read("eval") == ["p3", "p4", "p5", "p6"]


def test_run_skip_invalid_reaches_the_prompt_split(tmp_path):
    """Found by a reading of the code: --skip-invalid was listed by `preftune run --help` and reached
    no stage; the run's own prompt split stopped at the first bad line."""
    from conftest import write_lines

    from preftune.errors import DataError
    from preftune.pipeline.config import RunConfig
    from preftune.pipeline.run import Run, split_prompts
    from preftune.sft.config import SFTConfig

    prompts = write_lines(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b", "split": "eval"}, {"text": "x"}])
    demos = write_lines(tmp_path / "d.jsonl", [{"prompt": "c", "completion": "d"}])

    def run(**kw):
        return Run(RunConfig(prompts=str(prompts), demos=str(demos), out=str(tmp_path / "out"), **kw), None, quiet=True)

    with pytest.raises(DataError, match=r"p\.jsonl:3"):
        split_prompts(run())
    paths = split_prompts(run(skip_invalid=True))
    assert paths["rl"].read_text().count("\n") == 1 and paths["eval"].read_text().count("\n") == 1
    assert run(skip_invalid=True).stage_config(SFTConfig, "sft", model="m", data="d", out="o").skip_invalid
