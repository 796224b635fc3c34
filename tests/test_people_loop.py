"""People in the loop: active selection by hand, iterated rounds, and the main job with the
feedback app (a scripted annotator answering through the HTTP API with real tokens)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import ROOT
from preftune.annotators.selection import (
    Pair,
    candidate_pairs,
    mutual_information,
    order_pairs,
    pair_disagreement,
    pair_entropy,
    preference_entropy,
    spread_over_items,
)
from preftune.cli import cli
from preftune.data.records import CandidateSet


def test_preference_entropy_by_hand():
    # P = 1/2: ln 2; margin ln 3: P = 3/4, H = -(3/4 ln 3/4 + 1/4 ln 1/4) = 0.5623351446
    h = preference_entropy(torch.tensor([0.0, math.log(3), -math.log(3)], dtype=torch.float64))
    assert h.tolist() == pytest.approx([math.log(2), 0.5623351446, 0.5623351446], abs=1e-9)
    # A spread s with 1 + pi s^2 / 8 = 4 halves the margin: 2 ln 3 is then as uncertain as ln 3.
    s = math.sqrt(24 / math.pi)
    assert preference_entropy(torch.tensor([2 * math.log(3)], dtype=torch.float64),
                              torch.tensor([s], dtype=torch.float64)).item() == pytest.approx(0.5623351446)
    assert preference_entropy(torch.tensor([200.0])).item() == pytest.approx(0.0, abs=1e-12)  # finite, no NaN


def test_spread_over_items_takes_every_items_best_pair_before_any_second_by_hand():
    pairs = [Pair(0, 0, 1), Pair(0, 0, 2), Pair(1, 0, 1), Pair(1, 1, 2), Pair(2, 0, 1)]
    score = torch.tensor([0.9, 0.8, 0.5, 0.4, 0.1])
    # Round 0: each item's best pair by score (0.9, 0.5, 0.1); round 1: the seconds (0.8, 0.4).
    assert spread_over_items(pairs, score) == [0, 2, 4, 1, 3]
    # Item 0 holds a label already, so its best pair belongs to round 1, its second to round 2.
    assert spread_over_items(pairs, score, labelled={0: 1}) == [2, 4, 0, 3, 1]
    # Ties in score keep the pairs' order.
    assert spread_over_items(pairs, torch.zeros(5)) == [0, 2, 4, 1, 3]


def test_active_labels_benchmark_refuses_reusing_points_made_from_other_candidates(tmp_path):
    import argparse

    from benchmarks.active_labels import check_same_setup

    candidates = tmp_path / "candidates.jsonl"
    candidates.write_text('{"id": "a"}\n')
    args = argparse.Namespace(candidates=str(candidates), model="minilm", labeler="helpful",
                              target_agreement=0.73, eval_share=0.2)
    out = tmp_path / "out"
    out.mkdir()
    parser = argparse.ArgumentParser()
    check_same_setup(parser, out, args)  # first run: records the set-up
    check_same_setup(parser, out, args)  # the same again: continues
    candidates.write_text('{"id": "b"}\n')
    with pytest.raises(SystemExit):
        check_same_setup(parser, out, args)
    candidates.write_text('{"id": "a"}\n')
    args.labeler = "concise"
    with pytest.raises(SystemExit):
        check_same_setup(parser, out, args)


def test_mutual_information_by_hand():
    l3 = math.log(3)
    # Members at P = 3/4 and 1/4: their mean is 1/2, so ln 2 - H(3/4) = 0.6931471806 - 0.5623351446.
    # Members at 3/4 and 1/2: H(5/8) - (H(3/4) + ln 2) / 2 = 0.6615632381 - 0.6277411626.
    # Members that agree carry no information, even on a coin flip (margin 0) or a sure pair (200).
    margins = torch.tensor([[l3, l3, 0.0, l3, 200.0], [-l3, 0.0, 0.0, l3, 200.0]], dtype=torch.float64)
    assert mutual_information(margins).tolist() == pytest.approx([0.1308120360, 0.0338220755, 0, 0, 0], abs=1e-9)
    # One member alone cannot disagree; the score never exceeds ln 2 (members at P = 0 and 1).
    assert mutual_information(margins[:1]).tolist() == pytest.approx([0.0] * 5, abs=1e-12)
    assert mutual_information(torch.tensor([[300.0], [-300.0]])).item() == pytest.approx(math.log(2))


def test_pair_disagreement_ranks_the_pairs_members_disagree_on_first():
    item = CandidateSet(messages=[{"role": "user", "content": "q"}], responses=["a", "b", "c"],
                        models=["m", "m", "m"], id="q")
    pairs = candidate_pairs([item])  # (0, 1), (0, 2), (1, 2)
    # Both members call 0-1 a tie (the mean's highest entropy, no disagreement); they disagree on c.
    members = [torch.tensor([[0.0, 0.0, 3.0], [0.0, 0.0, -1.0]])]
    mi = pair_disagreement(pairs, members)
    assert mi[0].item() == pytest.approx(0.0, abs=1e-12)
    assert order_pairs(pairs, "uncertainty", 0, mi) == [Pair(0, 0, 2), Pair(0, 1, 2), Pair(0, 0, 1)]
    assert order_pairs(pairs, "uncertainty", 0, pair_entropy(pairs, [members[0].mean(0)], None))[0] == Pair(0, 0, 1)


def test_pairs_across_models_and_most_uncertain_first():
    item = CandidateSet(messages=[{"role": "user", "content": "q"}], responses=["a", "b", "c", "", "c"],
                        models=["base", "base", "sft", "sft", "sft"], id="q")
    # Across models, one pair per index of each model's non-empty responses: base's k-th against sft's k-th.
    assert candidate_pairs([item], across_models=True) == [Pair(0, 0, 2), Pair(0, 1, 4)]
    assert candidate_pairs([item]) == [Pair(0, 0, 1), Pair(0, 0, 2), Pair(0, 0, 4), Pair(0, 1, 2), Pair(0, 1, 4)]
    pairs = candidate_pairs([item])
    scores = [torch.tensor([0.0, 3.0, 0.5, 0.0, 9.0])]  # margins -3, -0.5, -9, 2.5, -6
    entropy = pair_entropy(pairs, scores, None)
    assert order_pairs(pairs, "uncertainty", seed=0, entropy=entropy) == [
        Pair(0, 0, 2), Pair(0, 1, 2), Pair(0, 0, 1), Pair(0, 1, 4), Pair(0, 0, 4)]
    # An ensemble's spread makes a pair less certain: the same margins, one pair's members disagree.
    spreads = [torch.tensor([0.0, 0.0, 0.0, 0.0, 20.0])]
    first = order_pairs(pairs, "uncertainty", 0, pair_entropy(pairs, scores, spreads))[0]
    assert first in (Pair(0, 0, 4), Pair(0, 1, 4))
    assert sorted(order_pairs(pairs, "random", seed=1), key=lambda p: (p.i, p.j)) == pairs


def quick(out: Path, *extra: str):
    return CliRunner().invoke(cli, ["run", "--quick", "--out", str(out), "--no-probes", *extra],
                              catch_exceptions=False)


def test_two_rounds_continue_from_the_first_rounds_policy(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "r2"
    result = quick(out, "--rounds", "2", "--select", "uncertainty", "--labels-per-round", "30")
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert [r["labels"] for r in metrics["rounds"]] == [60, 60]  # 30 pairs x 2 annotators
    assert metrics["rounds"][0]["selection"].startswith("random") and metrics["rounds"][1]["selection"].startswith(
        "uncertainty")
    assert isinstance(metrics["rounds"][1]["previous_rm_newest_round_accuracy"], float)
    assert {"sample.r2", "label.r2", "reward.r2", "ppo.r2"} <= set(metrics["seconds_per_stage"])
    # Round 2's candidates come from the SFT model and round 1's policy.
    candidates = [json.loads(line) for line in (out / "round2" / "data" / "candidates.jsonl").read_text().splitlines()]
    assert {m for c in candidates for m in c["models"]} == {"sft", "ppo"}
    # Round 2 tuned from round 1's policy, leashed to SFT; its reward model saw both rounds' labels.
    cfg = json.loads((out / "round2" / "ppo" / "run_config.json").read_text())
    assert cfg["policy"] == str(out / "ppo") and cfg["reference"] == str(out / "sft")
    train = (out / "round2" / "data" / "rm_train.jsonl").read_text()
    round1 = [json.loads(line)["chosen"] for line in (out / "data" / "comparisons.jsonl").read_text().splitlines()]
    assert sum(c in train for c in round1) > 0
    assert "Rounds of iterated RLHF" in (out / "report.html").read_text()
    # Found by a reading of the code: with fewer rounds the evaluation judged round 2's policy still.
    again = quick(out, "--rounds", "1", "--select", "uncertainty", "--labels-per-round", "30")
    assert again.exit_code == 0, again.output
    assert "stage eval finished" in again.output and "stage ppo finished" not in again.output
    assert len(json.loads((out / "metrics.json").read_text())["rounds"]) == 1


# ---------------------------------------------------------------- people in the feedback app


def scripted_annotators(url: str, names: list[str]):
    """Annotator accounts with API tokens, and an HTTP client of the app on ``url``."""
    from fastapi.testclient import TestClient

    from preftune.feedback.app import create_app
    from preftune.feedback.app.db import transaction
    from preftune.feedback.app.service import create_user

    app = create_app(url)
    with transaction(app.state.sessions) as s:
        tokens = {n: create_user(s, n, "annotator").token for n in names}
    return TestClient(app), tokens


def judge_everything(client, tokens: dict[str, str], project: str, gold, seed: int) -> int:
    """Each annotator takes tasks until none are left and answers as a simulated person: the gold's
    preference with Bradley-Terry noise (ratings: gold score thresholds). Returns judgements made."""
    rng = np.random.default_rng(seed)
    made = 0
    for name, token in tokens.items():
        auth = {"Authorization": f"Bearer {token}"}
        while True:
            r = client.get(f"/api/v1/projects/{project}/next", headers=auth)
            if r.status_code == 204:
                break
            assert r.status_code == 200, r.text
            task = r.json()
            prompts = [task["messages"][-1]["content"]] * len(task["responses"])
            scores = gold(prompts, task["responses"]).double().numpy()
            if task["kind"] == "rating":
                body = {"rating": int(1 + (scores[0] > 0.05) + (scores[0] > 0.2)), "flags": []}
            else:
                p_first = 1 / (1 + math.exp(-(scores[0] - scores[1]) / 0.1))
                body = {"choice": "A" if rng.random() < p_first else "B"}
            done = client.post(f"/api/v1/assignments/{task['assignment_id']}/judgement", headers=auth,
                               json={**body, "client_key": f"{name}-{task['assignment_id']}"})
            assert done.status_code == 201, done.text
            made += 1
    return made


def test_the_main_job_with_people_stops_for_labels_and_continues(tmp_path, monkeypatch):
    pytest.importorskip("fastapi")
    from preftune.scoring import load_scorer

    monkeypatch.chdir(ROOT)
    out, db = tmp_path / "people", tmp_path / "feedback.db"
    options = ["--feedback", "app", "--db", str(db), "--project", "t", "--eval-judge", "human",
               "--comparison-prompts", "8"]
    first = quick(out, *options)
    assert first.exit_code == 3, first.output
    assert "judgements are still missing (projects t-ratings, t-pairs)" in first.output
    assert "preftune annotate serve --db" in first.output and "Traceback" not in first.output
    assert not (out / "rm").exists()

    gold = load_scorer("0.5*sentiment + 0.5*keyword(lovely|wonderful|great|love|happy|fun)")
    client, tokens = scripted_annotators(f"sqlite:///{db}", ["ann1", "ann2"])
    made = sum(judge_everything(client, tokens, p, gold, seed=k) for k, p in enumerate(["t-ratings", "t-pairs"]))
    assert made > 0

    second = quick(out, *options)  # continues: labels in, reward, PPO, eval; then people evaluate
    assert second.exit_code == 3, second.output
    assert "reusing the finished stage" in second.output and "human evaluation:" in second.output
    # The reward model trained on exactly what people judged (the held-out prompts' comparisons aside).
    admin_rows = lambda path: [json.loads(x) for x in path.read_text().splitlines() if x.strip()]  # noqa: E731
    exported = admin_rows(out / "data" / "comparisons.jsonl") + admin_rows(out / "data" / "ratings.jsonl")
    used = admin_rows(out / "data" / "rm_train.jsonl") + admin_rows(out / "data" / "rm_eval.jsonl")
    assert {r["id"] for r in used} <= {r["id"] for r in exported}
    assert {r["id"] for r in admin_rows(out / "data" / "comparisons.jsonl")} <= {r["id"] for r in used}
    assert all(r["annotator"] in tokens for r in exported)

    from preftune.feedback.app.models import Project
    from preftune.pipeline.people import FeedbackDB

    with FeedbackDB.open(f"sqlite:///{db}").transaction(readonly=True) as s:
        (eval_project,) = [p.name for p in s.query(Project) if p.name.startswith("t-eval")]
    assert re.fullmatch(r"t-eval-ppo-[0-9a-f]{6}", eval_project)  # named by the method and the compared answers
    assert eval_project in second.output
    judged_eval = judge_everything(client, tokens, eval_project, gold, seed=3)
    third = quick(out, *options)
    assert third.exit_code == 0, third.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["feedback"] == "app" and metrics["annotators"] == 2
    assert metrics["human_judgements"] == made
    human = metrics["human_eval"]
    rate = human["winrate_ppo_vs_sft"]
    assert rate["wins"] + rate["ties"] + rate["losses"] == judged_eval
    assert rate["ci"][0] <= metrics["winrate_ppo_vs_sft_human"] <= rate["ci"][1]
    html = (out / "report.html").read_text()
    assert "People&#x27;s judgements" in html or "People's judgements" in html


def test_a_sample_the_database_cannot_hold_is_imported_as_shown(tmp_path):
    """Found by CI: a tiny model's sample held a NUL (a byte-level token), and the main job's import
    of its own samples stopped at the check a person's import gets. The run's samples are stored
    with U+FFFD there, as a browser shows them; a person's file is still refused."""
    from preftune.feedback.app.models import Task
    from preftune.feedback.app.tasks import storable
    from preftune.pipeline.people import FeedbackDB

    assert storable({"responses": ["a\x00b", "ok"], "meta": {"n": 1, "x\ud800": [None, "\ud800"]}}) == \
        {"responses": ["a\ufffdb", "ok"], "meta": {"n": 1, "x\ufffd": [None, "\ufffd"]}}
    db = FeedbackDB.open(f"sqlite:///{tmp_path / 'f.db'}")
    db.ensure_project("p", "pairwise", overlap=1)
    assert db.import_records("p", [{"prompt": "q", "responses": ["caan\x00 the", "fine"]}]) == (1, 0)
    with db.transaction(readonly=True) as s:
        assert s.query(Task).one().responses == ["caan\ufffd the", "fine"]
