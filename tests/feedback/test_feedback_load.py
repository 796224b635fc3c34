"""Reliability against a real server process on loopback: 50 concurrent annotators submit
while the server is killed with SIGKILL and restarted (SQLite and PostgreSQL). The full
5,000-judgement runs are ``benchmarks/feedback_load.py`` (figures in docs/benchmarks.md)."""

from __future__ import annotations

import sys

import pytest

from benchmarks.feedback_load import run

from .conftest import PG_SKIP, PG_URL


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
@pytest.mark.parametrize("submit_next", [False, True], ids=["next-then-submit", "submit-answers-next"])
def test_fifty_annotators_and_a_sigkill_lose_no_acknowledged_judgement(kind, submit_next, tmp_path):
    if kind == "postgres" and not PG_URL:
        pytest.skip(PG_SKIP)
    url = PG_URL if kind == "postgres" else f"sqlite:///{tmp_path / 'load.db'}"
    result = run(url, annotators=50, tasks=100, overlap=2, crash_after=70, time_limit=150, workdir=tmp_path,
                 submit_next=submit_next)
    assert result["killed_after_acks"] is not None and result["killed_after_acks"] < 200  # killed mid-load
    assert result["errors"] == 0, result["first_errors"]
    assert result["acknowledged"] == 200
    assert result["acknowledged_missing_or_duplicated"] == 0  # every ack in the export exactly once
    assert result["duplicates_in_export"] == 0
    assert result["tasks_over_overlap"] == 0
    assert result["exported"] == 200 and result["all_done"]
    assert 0 < result["submit_p95_ms"] < 60_000


def test_two_sqlite_workers_share_one_queue_of_writers(tmp_path):
    result = run(f"sqlite:///{tmp_path / 'load.db'}", annotators=20, tasks=50, overlap=2, time_limit=150,
                 workdir=tmp_path, workers=2)
    assert result["errors"] == 0, result["first_errors"]
    assert result["acknowledged"] == result["exported"] == 100 and result["all_done"]
    assert result["acknowledged_missing_or_duplicated"] == result["tasks_over_overlap"] == 0


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
def test_the_sqlite_write_lock_excludes_other_openers_of_the_file(tmp_path):
    """Two engines on one file stand for two worker processes (flock locks belong to the open
    file, so the second opener waits even in this process)."""
    import threading
    import time

    from preftune.feedback.app.db import WriteLock

    first, second = WriteLock(str(tmp_path / "x.db")), WriteLock(str(tmp_path / "x.db"))
    order = []

    def take_second():
        with second:
            order.append("second")

    with first:
        t = threading.Thread(target=take_second)
        t.start()
        time.sleep(0.3)
        order.append("first done")
    t.join(5)
    assert order == ["first done", "second"]
