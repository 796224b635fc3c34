"""`preftune eval --judge human:PROJECT` against the real feedback app, served on loopback."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from click.testing import CliRunner

from preftune.cli import cli
from tests.conftest import corpus_texts, write_lines

uvicorn = pytest.importorskip("uvicorn")


@pytest.fixture()
def served(env):
    """The env's app on a free loopback port (urllib in the judge needs a real socket)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(env.client.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def model_b(tmp_path_factory):
    from preftune.models.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny-b") / "model", corpus_texts(), seed=1)


def test_push_judge_collect_round_trip(env, served, tiny_model_dir, model_b, tmp_path, monkeypatch):
    env.project("evalproj", kind="pairwise", overlap=2)
    monkeypatch.setenv("PREFTUNE_FEEDBACK_TOKEN", env.tokens["admin"])
    prompts = write_lines(tmp_path / "prompts.jsonl", [{"prompt": f"Tell me about the {t}."}
                                                      for t in ("sea", "sky", "dog")])
    out = tmp_path / "eval"
    args = ["eval", "--model", str(tiny_model_dir), "--baseline", str(model_b), "--prompts", str(prompts),
            "--judge", "human:evalproj", "--feedback-url", served, "--out", str(out), "--max-new-tokens", "8",
            "--temperature", "1.0"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    samples = {row["prompt"]: row for row in map(json.loads, (out / "samples.jsonl").read_text().splitlines())}

    # ann1 prefers A's response on every task (whatever order the app shows it in); ann2 judges the
    # first task a tie and leaves the rest.
    for user, limit in (("ann1", 3), ("ann2", 1)):
        for _ in range(limit):
            task = env.next("evalproj", user)
            row = samples[task["prompt"]]
            if user == "ann2":
                choice = "tie"
            else:
                assert row["response_a"] != row["response_b"]
                choice = "A" if task["responses"][0] == row["response_a"] else "B"
            assert env.judge(task["assignment_id"], user, choice=choice).status_code == 201

    r = CliRunner().invoke(cli, ["eval", "--collect", "--feedback-url", served, "--out", str(out)])
    assert r.exit_code == 0, r.output
    human = json.loads((out / "eval.json").read_text())["judges"][0]
    assert (human["wins"], human["ties"], human["losses"], human["n"]) == (3, 1, 0, 4)
    assert human["winrate"] == pytest.approx(3.5 / 4)
    assert human["pending"] == 0
    assert human["agreement"]["agreement"]["items"] == 1  # one task judged by both annotators
    assert "evalproj" in (out / "report.html").read_text()


def test_unknown_project_is_a_one_line_error(env, served, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFTUNE_FEEDBACK_TOKEN", env.tokens["admin"])
    prompts = write_lines(tmp_path / "prompts.jsonl", [{"prompt": "Hello?"}])
    r = CliRunner().invoke(cli, ["eval", "--model", str(tiny_model_dir), "--baseline", str(tiny_model_dir),
                                 "--prompts", str(prompts), "--judge", "human:nope", "--feedback-url", served,
                                 "--out", str(tmp_path / "x"), "--max-new-tokens", "4", "--temperature", "1.0"])
    assert r.exit_code == 2 and "HTTP 404" in r.output and "Traceback" not in r.output
