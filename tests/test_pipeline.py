"""The main job's --quick variant: the whole loop on tiny models, end to end."""

from __future__ import annotations

import json

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
