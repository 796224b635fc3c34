"""Reliability against a real server process on loopback: 50 concurrent annotators, and a
SIGKILL in the middle of the load (SQLite and PostgreSQL). The full 5,000-judgement run is
``benchmarks/feedback_load.py`` (figures in docs/benchmarks.md)."""

from __future__ import annotations

import pytest
from .conftest import PG_SKIP, PG_URL

from benchmarks.feedback_load import run


def _url(kind: str, tmp_path) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'load.db'}"
    if not PG_URL:
        pytest.skip(PG_SKIP)
    return PG_URL


def _check(result: dict, judgements: int) -> None:
    assert result["errors"] == 0, result["first_errors"]
    assert result["acknowledged"] == judgements
    assert result["acknowledged_missing_or_duplicated"] == 0  # every ack in the export exactly once
    assert result["duplicates_in_export"] == 0
    assert result["tasks_over_overlap"] == 0
    assert result["exported"] == judgements and result["all_done"]


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_fifty_concurrent_annotators(kind, tmp_path):
    result = run(_url(kind, tmp_path), annotators=50, tasks=125, overlap=2, time_limit=120, workdir=tmp_path)
    _check(result, 250)
    assert result["submit_p95_ms"] > 0


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_sigkill_mid_load_loses_no_acknowledged_judgement(kind, tmp_path):
    result = run(_url(kind, tmp_path), annotators=50, tasks=75, overlap=2, crash_after=50, time_limit=120,
                 workdir=tmp_path)
    assert result["killed_after_acks"] is not None and result["killed_after_acks"] < 150  # killed mid-load
    _check(result, 150)
