"""Fixtures of the feedback app tests: a fresh database per test (SQLite always; PostgreSQL when
``PREFTUNE_TEST_PG_URL`` is set, as ``scripts/test-services.sh`` does), an app with an admin and
two annotators, and helpers to label through the API."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from urllib.parse import quote

import pytest

pytest.importorskip("fastapi", reason="the feedback extra is not installed")

from fastapi.testclient import TestClient  # noqa: E402
from sqlalchemy import text  # noqa: E402

from preftune.feedback.app import Settings, create_app  # noqa: E402
from preftune.feedback.app.db import make_engine, migrate, transaction  # noqa: E402
from preftune.feedback.app.models import Base, User  # noqa: E402
from preftune.feedback.app.security import hash_password, new_secret, token_hash  # noqa: E402
from preftune.feedback.app.service import create_user  # noqa: E402

PG_URL = os.environ.get("PREFTUNE_TEST_PG_URL")
PG_SKIP = "PostgreSQL tests need PREFTUNE_TEST_PG_URL (make test starts a throwaway server)"


_MIGRATED: dict[str, str] = {}


def _migrated_template(tmp_root) -> str:
    """Migrate once per session; tests copy (SQLite) or truncate (PostgreSQL) from there."""
    if "sqlite" not in _MIGRATED:
        path = tmp_root / "template.db"
        engine = make_engine(f"sqlite:///{path}")
        migrate(engine)
        engine.dispose()
        _MIGRATED["sqlite"] = str(path)
    return _MIGRATED["sqlite"]


def fresh_database(kind: str, tmp_path) -> str:
    """A migrated, empty database of ``kind`` ("sqlite" or "postgres"); returns its URL."""
    if kind == "sqlite":
        path = tmp_path / "feedback.db"
        shutil.copy(_migrated_template(tmp_path.parent), path)
        return f"sqlite:///{path}"
    if not PG_URL:
        pytest.skip(PG_SKIP)
    engine = make_engine(PG_URL)
    if "postgres" not in _MIGRATED:
        with engine.begin() as conn:
            conn.execute(text("DROP SCHEMA public CASCADE"))
            conn.execute(text("CREATE SCHEMA public"))
        migrate(engine)
        _MIGRATED["postgres"] = PG_URL
    with engine.begin() as conn:
        tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
        conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    engine.dispose()
    return PG_URL


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path) -> str:
    return fresh_database(request.param, tmp_path)


@dataclass
class Env:
    url: str
    client: TestClient
    tokens: dict[str, str] = field(default_factory=dict)
    passwords: dict[str, str] = field(default_factory=dict)

    def auth(self, user: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[user]}"}

    def add_user(self, name: str, role: str = "annotator") -> None:
        with transaction(self.client.app.state.sessions) as s:
            new = create_user(s, name, role)
            self.tokens[name], self.passwords[name] = new.token, new.password

    def add_known_users(self) -> None:
        """admin, ann1..ann3 from hashes computed once per session (argon2 is slow on purpose)."""
        with transaction(self.client.app.state.sessions) as s:
            for name, (role, password, token, password_hash) in known_users().items():
                s.add(User(name=name, role=role, password_hash=password_hash, token_hash=token_hash(token)))
                self.tokens[name], self.passwords[name] = token, password

    def project(self, name: str = "demo", kind: str = "pairwise", **options) -> None:
        r = self.client.post("/api/v1/projects", json={"name": name, "kind": kind, **options}, headers=self.auth("admin"))
        assert r.status_code == 201, r.text

    def tasks(self, project: str, records: list[dict]) -> dict:
        r = self.client.post(f"/api/v1/projects/{quote(project, safe='')}/tasks", json=records, headers=self.auth("admin"))
        assert r.status_code == 201, r.text
        return r.json()

    def next(self, project: str, user: str):
        r = self.client.get(f"/api/v1/projects/{quote(project, safe='')}/next", headers=self.auth(user))
        assert r.status_code in (200, 204), r.text
        return None if r.status_code == 204 else r.json()

    def judge(self, assignment_id: int, user: str, **body):
        return self.client.post(f"/api/v1/assignments/{assignment_id}/judgement", json=body, headers=self.auth(user))

    def export(self, project: str, fmt: str = "comparisons", **params) -> list[dict]:
        import json

        r = self.client.get(f"/api/v1/projects/{quote(project, safe='')}/export", params={"format": fmt, **params},
                            headers=self.auth("admin"))
        assert r.status_code == 200, r.text
        return [json.loads(line) for line in r.text.splitlines()]

    def login(self, user: str, client: TestClient | None = None) -> TestClient:
        """A browser-like client logged in through the form (cookies, CSRF)."""
        import re

        c = client or TestClient(self.client.app)
        page = c.get("/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
        r = c.post("/login", data={"username": user, "password": self.passwords[user], "csrf_token": token},
                   follow_redirects=False)
        assert r.status_code == 303, r.text
        return c


def page_csrf(html: str) -> str:
    import re

    return re.search(r'<meta name="csrf-token" content="([^"]*)">', html).group(1)


_KNOWN: dict[str, tuple[str, str, str, str]] = {}


def known_users() -> dict[str, tuple[str, str, str, str]]:
    if not _KNOWN:
        for name in ("admin", "ann1", "ann2", "ann3"):
            password, token = new_secret(12), new_secret(32)
            _KNOWN[name] = ("admin" if name == "admin" else "annotator", password, token, hash_password(password))
    return _KNOWN


@pytest.fixture
def env(db_url) -> Env:
    app = create_app(db_url, Settings(login_max_failures=3, login_window_seconds=60))
    with TestClient(app) as client:
        e = Env(db_url, client)
        e.add_known_users()
        yield e
    app.state.engine.dispose()


def pair_tasks(n: int, start: int = 0) -> list[dict]:
    return [{"id": f"t{i}", "prompt": f"Question {i}?", "responses": [f"good answer {i}", f"bad answer {i}"]}
            for i in range(start, start + n)]
