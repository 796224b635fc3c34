"""End to end on tiny models: preftune eval, bon and the probes, plus the human judge over HTTP."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from preftune.cli import cli
from tests.conftest import corpus_texts, write_lines

JUDGES = '''
def words(prompts, responses):
    return [float(len(r.split())) for r in responses]

def constant(prompts, responses):
    return [1.0 for r in responses]

def letter_e(prompts, responses):
    return [float(r.count("e")) for r in responses]
'''


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory) -> Path:
    from preftune.models.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny-b") / "model", corpus_texts(), seed=1)


@pytest.fixture()
def files(tmp_path):
    judge = tmp_path / "judges.py"
    judge.write_text(JUDGES)
    prompts = write_lines(tmp_path / "prompts.jsonl",
                          [{"id": f"p{i}", "prompt": f"Tell me about <b>item</b> {i}."} for i in range(6)])
    return judge, prompts


def invoke(args):
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result


def test_eval_writes_judges_kl_and_an_escaped_report(tiny_model_dir, other_model_dir, files, tmp_path):
    judge, prompts = files
    out = tmp_path / "eval"
    r = invoke(["eval", "--model", tiny_model_dir, "--baseline", other_model_dir, "--prompts", prompts,
                "--judge", f"{judge}:words", "--judge", f"{judge}:constant", "--judge", "labeler:sentiment",
                "--out", out, "--max-new-tokens", 8, "--seed", 3])
    assert r.exit_code == 0, r.output
    result = json.loads((out / "eval.json").read_text())
    words, constant, labeler = result["judges"]
    assert labeler["judge"] == "labeler:sentiment" and -1 <= labeler["mean_a"] <= 1
    for key in ("judge", "mean_a", "ci_a", "mean_b", "ci_b", "winrate", "winrate_ci", "ties", "kl", "kl_se", "n"):
        assert key in words
    assert words["n"] == 6 and words["ci_a"][0] <= words["mean_a"] <= words["ci_a"][1]
    # A constant judge ties every pair: win rate exactly one half, all ties.
    assert (constant["winrate"], constant["ties"], constant["mean_a"]) == (0.5, 6, 1.0)
    rows = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    assert words["kl"] == pytest.approx(sum(row["kl"] for row in rows) / 6, abs=1e-6)
    assert words["kl_se"] > 0
    assert [row["scores"][f"{judge}:words"][0] for row in rows] == [len(row["response_a"].split()) for row in rows]
    html = (out / "report.html").read_text()
    assert "&lt;b&gt;item&lt;/b&gt;" in html and "<b>item" not in html
    assert "data:image/png;base64," in html


def test_kl_of_a_model_against_itself_is_zero(tiny_model_dir, files, tmp_path):
    judge, prompts = files
    r = invoke(["eval", "--model", tiny_model_dir, "--baseline", tiny_model_dir, "--prompts", prompts,
                "--judge", f"{judge}:words", "--out", tmp_path / "self", "--max-new-tokens", 8,
                "--temperature", 1.0])
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "self" / "eval.json").read_text())
    # Sampling-time log-probs (KV cache) against a full forward pass of the same weights.
    assert abs(result["kl"]) < 1e-3


def test_eval_errors_are_one_line(tiny_model_dir, files, tmp_path):
    judge, prompts = files
    r = CliRunner().invoke(cli, ["eval", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--judge",
                                 f"{judge}:nope", "--out", str(tmp_path / "x"), "--max-new-tokens", "4"])
    assert r.exit_code == 2 and "has no function nope" in r.output and "Traceback" not in r.output
    bad = write_lines(tmp_path / "bad.jsonl", ['{"prompt": "ok"}', '{"prompt": 3}'])
    r = CliRunner().invoke(cli, ["eval", "--model", str(tiny_model_dir), "--prompts", str(bad), "--judge",
                                 f"{judge}:words", "--out", str(tmp_path / "y")])
    assert r.exit_code == 2 and "bad.jsonl:2:" in r.output


def test_bon_reports_kl_and_monotone_proxy(tiny_model_dir, files, tmp_path):
    judge, prompts = files
    out = tmp_path / "bon"
    ppo = write_lines(tmp_path / "ppo_metrics.jsonl", [
        {"step": s, "eval/kl": kl, "eval/gold": g, "eval/proxy": p} for s, kl, g, p in
        [(5, 0.5, 1.0, 1.0), (10, 2.0, 2.0, 3.0), (15, 4.0, 2.5, 5.0), (20, 8.0, 1.0, 7.0)]])
    r = invoke(["bon", "--model", tiny_model_dir, "--reward", f"{judge}:letter_e", "--gold", f"{judge}:words",
                "--prompts", prompts, "--n", "1,2,4", "--out", out, "--max-new-tokens", 8, "--samples", 3,
                "--ppo-metrics", ppo])
    assert r.exit_code == 0, r.output
    result = json.loads((out / "bon.json").read_text())
    rows = result["results"]
    assert [row["n"] for row in rows] == [1, 2, 4]
    assert [round(row["kl"], 6) for row in rows] == [0.0, 0.193147, 0.636294]
    proxy = [row["proxy"] for row in rows]
    assert proxy == sorted(proxy)  # the expected best of n never falls as n grows
    samples = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 * 4
    # n = 1 is the plain mean of every sample.
    assert rows[0]["gold"] == pytest.approx(sum(s["gold"] for s in samples) / len(samples))
    html = (out / "report.html").read_text()
    # The PPO rows share the plot, and their fall in gold while proxy rises is flagged.
    assert "over-optimisation: gold reward 1 at step 20" in html and "<td>rl</td>" in html


def test_bon_with_too_few_n_to_fit_writes_the_rows_without_a_fit(tiny_model_dir, files, tmp_path):
    judge, prompts = files
    r = invoke(["bon", "--model", tiny_model_dir, "--reward", f"{judge}:letter_e", "--gold", f"{judge}:words",
                "--prompts", prompts, "--n", "1,2", "--out", tmp_path / "bon", "--max-new-tokens", 4, "--samples", 2])
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "bon" / "bon.json").read_text())
    assert [row["n"] for row in result["results"]] == [1, 2] and result["gold_fit"] is None  # one equation, two unknowns


def test_probes_on_a_tiny_model(tiny_model_dir, tmp_path):
    questions = write_lines(tmp_path / "q.jsonl", [
        {"id": "q1", "question": "What is the capital of France?", "answers": ["Paris"], "category": "capitals"},
        {"id": "q2", "question": "What is 2 plus 4?", "answers": ["6", "six"], "category": "maths"}])
    out = tmp_path / "hal"
    r = invoke(["probe", "hallucination", "--model", tiny_model_dir, "--baseline", tiny_model_dir,
                "--questions", questions, "--out", out, "--max-new-tokens", 6])
    assert r.exit_code == 0, r.output
    result = json.loads((out / "probe.json").read_text())
    assert result["n"] == 2 and set(result["rates"]) == {"correct", "wrong", "abstained"}
    assert sum(v["rate"] for v in result["rates"].values()) == pytest.approx(1.0)
    assert result["baseline"]["rates"] == result["rates"]  # greedy: same model, same answers
    answers = [json.loads(l) for l in (out / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 4 and {a["model"] for a in answers} == {"model", "baseline"}

    out = tmp_path / "adv"
    r = invoke(["probe", "adversarial", "--model", tiny_model_dir, "--out", out, "--samples", 12,
                "--max-new-tokens", 6, "--red-team", 3])
    assert r.exit_code == 0, r.output
    result = json.loads((out / "probe.json").read_text())
    assert set(result["rates"]) == {"unsafe", "refused", "over_refusal"}
    assert result["n"] == 12 and result["n_adversarial"] + result["n_benign"] == 12
    assert result["red_team"]["attempts"] <= 3
    assert "Adversarial-prompt probe" in (out / "report.html").read_text()


class FakeFeedbackApp(BaseHTTPRequestHandler):
    """The feedback app's contract: tasks in, raw judgements and stats out."""

    tasks: list = []
    auth: list = []

    def log_message(self, *args):
        pass

    def _send(self, body: bytes, ctype="application/json"):
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        assert self.path == "/api/v1/projects/demo/tasks"
        FakeFeedbackApp.auth.append(self.headers.get("Authorization"))
        FakeFeedbackApp.tasks = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self._send(b'{"created": %d}' % len(FakeFeedbackApp.tasks))

    def do_GET(self):
        if self.path.startswith("/api/v1/projects/demo/export"):
            # Two people prefer A on the first task, one calls the second a tie, the third is unjudged.
            lines = []
            t0, t1 = FakeFeedbackApp.tasks[0], FakeFeedbackApp.tasks[1]
            for annotator in ("ann1", "ann2"):
                lines.append({"task_id": t0["id"], "label": str(t0["meta"]["a_position"]), "choice": "B",
                              "annotator": annotator})
            lines.append({"task_id": t1["id"], "label": "tie", "choice": "tie", "annotator": "ann1"})
            lines.append({"task_id": "unrelated", "label": "0"})
            self._send("\n".join(json.dumps(l) for l in lines).encode(), "application/x-ndjson")
        elif self.path == "/api/v1/projects/demo/stats":
            self._send(b'{"agreement": {"percent": 0.75, "cohen_kappa": 0.5}}')
        else:
            self.send_error(404)


def test_human_judge_push_and_collect(tiny_model_dir, files, tmp_path, monkeypatch):
    judge, prompts = files
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeFeedbackApp)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("PREFTUNE_FEEDBACK_TOKEN", "secret")
    out = tmp_path / "human"
    try:
        r = invoke(["eval", "--model", tiny_model_dir, "--baseline", tiny_model_dir, "--prompts", prompts,
                    "--judge", "human:demo", "--judge", f"{judge}:words", "--feedback-url", url, "--out", out,
                    "--max-new-tokens", 4, "--samples", 3])
        assert r.exit_code == 0, r.output
        assert len(FakeFeedbackApp.tasks) == 3 and FakeFeedbackApp.auth == ["Bearer secret"]
        assert all(len(t["responses"]) == 2 for t in FakeFeedbackApp.tasks)
        r = invoke(["eval", "--collect", "--feedback-url", url, "--out", out])
        assert r.exit_code == 0, r.output
    finally:
        server.shutdown()
    human = json.loads((out / "eval.json").read_text())["judges"][0]
    # Judgements: A, A, tie -> (2 + 0.5) / 3.
    assert (human["wins"], human["ties"], human["losses"]) == (2, 1, 0)
    assert human["winrate"] == pytest.approx(2.5 / 3)
    assert human["pending"] == 1
    assert human["agreement"] == {"agreement": {"percent": 0.75, "cohen_kappa": 0.5}}

