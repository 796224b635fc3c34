"""Account management in the browser: admins reset passwords, issue new tokens, change roles and
lock users; everyone changes their own password and token. Secrets are shown once, old ones stop
working at once."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from preftune.feedback.app.db import transaction
from preftune.feedback.app.models import User, WebSession


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def shown(html: str, what: str) -> str:
    return re.search(rf'<code id="new-{what}">([^<]+)</code>', html).group(1)


def log_in(env, user: str, password: str) -> int:
    c = TestClient(env.client.app)
    token = csrf_of(c.get("/login").text)
    return c.post("/login", data={"username": user, "password": password, "csrf_token": token},
                  follow_redirects=False).status_code


def test_admin_resets_a_password_and_the_old_one_and_its_sessions_end(env):
    annotator = env.login("ann1")
    admin = env.login("admin")
    csrf = csrf_of(admin.get("/admin/users").text)
    r = admin.post("/admin/users/ann1/password", data={"csrf_token": csrf})
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    new = shown(r.text, "password")
    assert "new-token" not in r.text
    assert log_in(env, "ann1", env.passwords["ann1"]) == 401
    assert log_in(env, "ann1", new) == 303
    assert annotator.get("/", follow_redirects=False).status_code == 303  # logged out
    assert admin.get("/admin/users").status_code == 200  # the admin's own session goes on


def test_admin_issues_a_new_token_sets_roles_and_locks(env):
    admin = env.login("admin")
    csrf = csrf_of(admin.get("/admin/users").text)
    old = env.auth("ann1")
    token = shown(admin.post("/admin/users/ann1/token", data={"csrf_token": csrf}).text, "token")
    assert env.client.get("/api/v1/me", headers=old).status_code == 401
    assert env.client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"}).json()["user"] == "ann1"

    r = admin.post("/admin/users/ann2/role", data={"role": "admin", "csrf_token": csrf})
    assert r.status_code == 200 and "ann2 is now admin" in r.text
    assert env.client.get("/api/v1/me", headers=env.auth("ann2")).json()["role"] == "admin"
    assert admin.post("/admin/users/ann2/role", data={"role": "boss", "csrf_token": csrf}).status_code == 422

    r = admin.post("/admin/users/ann3/lock", data={"csrf_token": csrf})
    assert r.status_code == 200 and "ann3 is locked" in r.text
    assert env.client.get("/api/v1/me", headers=env.auth("ann3")).status_code == 401
    assert log_in(env, "ann3", env.passwords["ann3"]) == 401
    assert admin.post("/admin/users/admin/lock", data={"csrf_token": csrf}).status_code == 409  # not oneself
    assert admin.post("/admin/users/nobody/lock", data={"csrf_token": csrf}).status_code == 404
    assert admin.post("/admin/users/ann1/lock", data={"csrf_token": "wrong"}).status_code == 400


def test_the_last_admin_keeps_the_role(env):
    admin = env.login("admin")
    csrf = csrf_of(admin.get("/admin/users").text)
    r = admin.post("/admin/users/admin/role", data={"role": "annotator", "csrf_token": csrf})
    assert r.status_code == 409 and "only admin" in r.text


def test_everyone_changes_their_own_password_and_token(env):
    me = env.login("ann1")
    elsewhere = env.login("ann1")
    page = me.get("/account")
    assert page.status_code == 200 and "Change your password" in page.text
    csrf = csrf_of(page.text)
    new = "a much better passphrase"
    bad = [({"current": "wrong", "new": new, "again": new}, "current password is wrong"),
           ({"current": env.passwords["ann1"], "new": new, "again": new + "!"}, "differ"),
           ({"current": env.passwords["ann1"], "new": "short", "again": "short"}, "at least 10 characters"),
           ({"current": env.passwords["ann1"], "new": "ann1", "again": "ann1"}, "at least 10")]
    for form, reason in bad:
        r = me.post("/account/password", data={**form, "csrf_token": csrf})
        assert r.status_code == 422 and reason in r.text, (form, r.text[:300])
    r = me.post("/account/password", data={"current": env.passwords["ann1"], "new": new, "again": new,
                                           "csrf_token": csrf})
    assert r.status_code == 200 and "Password changed" in r.text
    assert log_in(env, "ann1", new) == 303 and log_in(env, "ann1", env.passwords["ann1"]) == 401
    assert me.get("/account").status_code == 200  # this session goes on
    assert elsewhere.get("/account", follow_redirects=False).status_code == 303  # the other one ended
    with transaction(env.client.app.state.sessions) as s:
        uid = s.query(User).filter_by(name="ann1").one().id
        assert s.query(WebSession).filter_by(user_id=uid).count() == 2  # this one and the log_in above

    old = env.auth("ann1")
    r = me.post("/account/token", data={"csrf_token": csrf})
    token = shown(r.text, "token")
    assert r.headers["cache-control"] == "no-store"
    assert env.client.get("/api/v1/me", headers=old).status_code == 401
    assert env.client.get("/api/v1/me", headers={"Authorization": f"Bearer {token}"}).json()["user"] == "ann1"
