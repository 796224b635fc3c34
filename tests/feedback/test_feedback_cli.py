"""`preftune annotate ...` end to end on a SQLite file: init, users, projects, import (with
one-line errors), labelling through the service layer, stats with hand-computed agreement, export."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from preftune.cli import cli
from preftune.data.jsonl import read_jsonl
from preftune.feedback.app.db import make_engine, open_database, transaction
from preftune.feedback.app.models import Base, User
from preftune.feedback.app.service import get_project, next_assignment, submit_judgement


def run(*args, ok=True):
    result = CliRunner().invoke(cli, list(args))
    if ok:
        assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def db(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'fb.db'}"
    run("annotate", "init", "--db", url)
    return url


@pytest.mark.parametrize("args", [["init"], ["serve", "--port", "1"], ["project", "list"]])
def test_without_the_feedback_extra_every_command_says_how_to_install_it(tmp_path, args):
    """Found by a reading of the code: annotate init and serve imported the app before the check
    (a traceback), and every other command too, through its own imports."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['sqlalchemy'] = None  # as if the extra were not installed\n"
            "from preftune.cli import main; sys.argv = ['preftune', 'annotate', *sys.argv[1:]]; main()")
    done = subprocess.run([sys.executable, "-c", code, *args, "--db", str(tmp_path / "x.db")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == ("error: the feedback app needs its extra: pip install 'preftune[feedback]' "
                                   "(sqlalchemy is missing)"), done.stderr


def test_commands_need_an_initialised_database(tmp_path):
    r = run("annotate", "stats", "demo", "--db", str(tmp_path / "new.db"), ok=False)
    assert r.exit_code == 2 and "annotate init" in r.output and "Traceback" not in r.output


def test_db_defaults_to_env_then_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PREFTUNE_DB", raising=False)
    run("annotate", "init")
    assert (tmp_path / "preftune-feedback.db").exists()
    monkeypatch.setenv("PREFTUNE_DB", str(tmp_path / "other.db"))
    run("annotate", "init")
    assert (tmp_path / "other.db").exists()


def test_init_is_repeatable_and_schema_matches_models(db):
    assert "schema is current" in run("annotate", "init", "--db", db).output
    # The migration creates exactly what the models declare (no drift).
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with make_engine(db).connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []


def test_add_user_prints_credentials_json(db):
    out = json.loads(run("annotate", "add-user", "alice", "--role", "admin", "--db", db).output)
    assert set(out) == {"user", "role", "password", "token"} and out["role"] == "admin"
    r = run("annotate", "add-user", "alice", "--db", db, ok=False)
    assert r.exit_code == 2 and "already exists" in r.output


def test_import_errors_name_file_and_line(db, tmp_path):
    run("annotate", "project", "create", "demo", "--kind", "pairwise", "--db", db)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "responses": ["x", "y"]}\n\n{"prompt": "b", "responses": ["only one"]}\n')
    r = run("annotate", "import", "demo", str(bad), "--db", db, ok=False)
    assert r.exit_code == 2 and r.output.strip() == f"error: {bad}:3: a pairwise task needs at least 2 responses, got 1"
    bad.write_text('{"prompt": "a", "responses": ["x", "y"]}\n{"prompt": \n')
    r = run("annotate", "import", "demo", str(bad), "--db", db, ok=False)
    assert f"{bad}:2: invalid JSON" in r.output
    r = run("annotate", "import", "nope", str(bad), "--db", db, ok=False)
    assert r.exit_code == 2
    stats = json.loads(run("annotate", "stats", "demo", "--json", "--db", db).output)
    assert stats["progress"]["tasks"] == 0  # nothing half-imported


def _label(db: str, project: str, answers: dict[str, list[str]]) -> None:
    """answers[annotator][i] is the label of the task whose prompt holds the number i: the index
    of the better response, "tie" or "both_bad"."""
    _, sessions = open_database(db)
    for name, labels in answers.items():
        for _ in labels:
            with transaction(sessions) as s:
                user = s.query(User).filter_by(name=name).one()
                _, a, task = next_assignment(s, project, user)
                label = labels[int(re.search(r"\d+", task.prompt[0]["content"]).group())]
                choice = label if label in ("tie", "both_bad") else "AB"[a.shown_order.index(int(label))]
                submit_judgement(s, a.id, user, {"choice": choice, "strength": None if label in ("tie", "both_bad") else 2})


def test_label_stats_and_export_round_trip(db, tmp_path):
    for name in ("ann1", "ann2"):
        run("annotate", "add-user", name, "--db", db)
    run("annotate", "project", "create", "demo", "--kind", "pairwise", "--overlap", "2", "--db", db)
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"id": f"t{i}", "prompt": f"q{i}", "responses": [f"a{i}", f"b{i}"]}) + "\n"
                             for i in range(4)))
    assert "imported 4 tasks" in run("annotate", "import", "demo", str(tasks), "--db", db).output
    assert "4 already present" in run("annotate", "import", "demo", str(tasks), "--db", db).output
    _label(db, "demo", {"ann1": ["0", "0", "1", "1"], "ann2": ["0", "1", "1", "1"]})
    stats = json.loads(run("annotate", "stats", "demo", "--json", "--db", db).output)
    # Hand-computed: 3 of 4 items agree; p_e = (2*1 + 2*3) / 16 = 0.5 -> kappa = (0.75-0.5)/0.5 = 0.5.
    agreement = stats["agreement"]
    assert agreement["percent_agreement"] == 0.75
    assert agreement["cohen_kappa"] == [{"annotators": ["ann1", "ann2"], "kappa": 0.5, "items": 4}]
    # Fleiss with pooled p: p_0 = 3/8, p_1 = 5/8 -> P_e = 34/64; P-bar = 0.75 -> (0.75 - 0.53125)/0.46875
    assert agreement["fleiss_kappa"] == pytest.approx((0.75 - 34 / 64) / (1 - 34 / 64), abs=1e-4)
    assert stats["progress"] == {"tasks": 4, "gold_tasks": 0, "judgements_needed": 8, "done": 8, "in_progress": 0,
                                 "remaining": 0, "tasks_complete": 4}
    text = run("annotate", "stats", "demo", "--db", db).output
    assert "percent agreement 0.750" in text and "Cohen's kappa ann1 / ann2: 0.500 on 4 tasks" in text
    out = tmp_path / "comparisons.jsonl"
    r = run("annotate", "export", "demo", "--format", "comparisons", "--out", str(out), "--db", db)
    assert "wrote 8 comparisons records" in r.output
    records = read_jsonl(out, "comparisons").records
    chosen = sorted((rec.annotator, rec.messages[0]["content"], rec.chosen) for rec in records)
    assert chosen[:4] == [("ann1", "q0", "a0"), ("ann1", "q1", "a1"), ("ann1", "q2", "b2"), ("ann1", "q3", "b3")]
    trl = tmp_path / "trl.jsonl"
    assert "wrote 8 trl records" in run("annotate", "export", "demo", "--format", "trl", "--out", str(trl),
                                        "--db", db).output
    first = json.loads(trl.read_text().splitlines()[0])
    assert first["prompt"] == records[0].messages and first["margin"] == records[0].strength
    assert first["chosen"] == [{"role": "assistant", "content": records[0].chosen}]
    again = read_jsonl(trl, "comparisons").records
    assert [(r.annotator, r.messages, r.chosen, r.rejected, r.strength) for r in again] == \
        [(r.annotator, r.messages, r.chosen, r.rejected, r.strength) for r in records]
    raw = tmp_path / "raw.jsonl"
    run("annotate", "export", "demo", "--format", "raw", "--out", str(raw), "--db", db)
    assert len(raw.read_text().splitlines()) == 8
    r = run("annotate", "export", "demo", "--format", "ratings", "--out", str(raw), "--db", db, ok=False)
    assert r.exit_code == 2 and "no ratings" in r.output


def test_ties_and_both_bad_are_counted_when_left_out(db, tmp_path):
    run("annotate", "add-user", "ann1", "--db", db)
    run("annotate", "project", "create", "demo", "--kind", "pairwise", "--db", db)
    tasks = tmp_path / "t.jsonl"
    tasks.write_text("".join(json.dumps({"prompt": f"q{i}", "responses": [f"a{i}", f"b{i}"]}) + "\n" for i in range(3)))
    run("annotate", "import", "demo", str(tasks), "--db", db)
    _label(db, "demo", {"ann1": ["0", "tie", "both_bad"]})
    r = run("annotate", "export", "demo", "--out", str(tmp_path / "c.jsonl"), "--db", db)
    assert "wrote 1 comparisons records" in r.output and "left out: 1 both bad, 1 tie" in r.output


def test_rating_project_scale_and_help():
    r = run("annotate", "project", "create", "--help")
    assert "--overlap" in r.output and "--scale" in r.output and "--gold-rate" in r.output
    r = run("annotate", "--help")
    for command in ("init", "add-user", "project", "import", "serve", "export", "stats"):
        assert command in r.output


@pytest.mark.skipif("reward" not in cli.commands, reason="`preftune reward` is not on this branch yet")
def test_exported_comparisons_train_a_reward_model(db, tmp_path, tiny_model_dir):
    """The closed loop: labels exported by the app feed `preftune reward` unchanged."""
    for name in ("ann1", "ann2"):
        run("annotate", "add-user", name, "--db", db)
    run("annotate", "project", "create", "demo", "--kind", "pairwise", "--overlap", "2", "--db", db)
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"prompt": f"Say something kind {i}.",
                                         "responses": [f"You are doing great {i}.", f"Go away {i}."]}) + "\n"
                             for i in range(8)))
    run("annotate", "import", "demo", str(tasks), "--db", db)
    _label(db, "demo", {"ann1": ["0"] * 8, "ann2": ["0"] * 7 + ["1"]})
    out = tmp_path / "comparisons.jsonl"
    run("annotate", "export", "demo", "--out", str(out), "--db", db)
    run("reward", "--model", str(tiny_model_dir), "--data", str(out), "--out", str(tmp_path / "rm"), "--max-steps", "2",
        "--batch-size", "4")
    assert (tmp_path / "rm" / "metrics.json").exists()


def test_account_management(db):
    """Passwords (with a minimum policy), token rotation, roles (never the last admin) and locking."""
    from preftune.feedback.app.security import token_hash, verify_password

    assert "at least 10 characters" in run("annotate", "add-user", "bob", "--password", "short", "--db", db,
                                           ok=False).output
    assert "too easy" in run("annotate", "add-user", "bob", "--password", "aaaaaaaaaaaa", "--db", db, ok=False).output
    boss = json.loads(run("annotate", "add-user", "boss", "--role", "admin", "--db", db).output)
    bob = json.loads(run("annotate", "add-user", "bob", "--password", "correct horse", "--db", db).output)
    _, sessions = open_database(db)

    def user(name):
        with transaction(sessions) as s:
            u = s.query(User).filter_by(name=name).one()
            return u.role, u.password_hash, u.token_hash

    new = json.loads(run("annotate", "set-password", "bob", "--db", db).output)["password"]
    assert verify_password(user("bob")[1], new) and not verify_password(user("bob")[1], "correct horse")
    token = json.loads(run("annotate", "rotate-token", "bob", "--db", db).output)["token"]
    assert user("bob")[2] == token_hash(token) != token_hash(bob["token"])
    assert "is the only admin" in run("annotate", "set-role", "boss", "annotator", "--db", db, ok=False).output
    run("annotate", "set-role", "bob", "admin", "--db", db)
    run("annotate", "set-role", "boss", "annotator", "--db", db)
    assert user("boss")[0] == "annotator" and user("bob")[0] == "admin"
    assert "locked" in run("annotate", "lock-user", "boss", "--db", db).output
    assert not verify_password(user("boss")[1], boss["password"]) and user("boss")[2] != token_hash(boss["token"])
    assert "no user named 'nobody'" in run("annotate", "rotate-token", "nobody", "--db", db, ok=False).output


def test_project_guidelines_from_a_file(db, tmp_path):
    first = tmp_path / "first.md"
    first.write_text("# Guidelines\r\nPrefer *short* answers.\r\n")
    run("annotate", "project", "create", "g", "--kind", "pairwise", "--guidelines", str(first), "--db", db)
    _, sessions = open_database(db)
    with transaction(sessions) as s:
        assert get_project(s, "g").guidelines == "# Guidelines\nPrefer *short* answers.\n"
    second = tmp_path / "second.md"
    second.write_text("Be kind.")
    assert "guidelines of 8 characters" in run("annotate", "project", "guidelines", "g", str(second), "--db", db).output
    with transaction(sessions) as s:
        assert get_project(s, "g").guidelines == "Be kind."
    latin1 = tmp_path / "latin1.md"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    out = run("annotate", "project", "guidelines", "g", str(latin1), "--db", db, ok=False).output
    assert "latin1.md: not UTF-8 text" in out and "Traceback" not in out
    assert "no project named 'h'" in run("annotate", "project", "guidelines", "h", str(second), "--db", db,
                                         ok=False).output
