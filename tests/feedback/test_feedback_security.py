"""Security of the feedback app: every route refuses the unauthenticated and the wrong role,
model output is shown as text, forms need CSRF tokens, log-ins are rate-limited, secrets are
stored hashed."""

from __future__ import annotations

import re

import pytest
from .conftest import page_csrf, pair_tasks
from sqlalchemy import select
from starlette.routing import Mount

from preftune.feedback.app.db import transaction
from preftune.feedback.app.models import Judgement, User

PUBLIC = {("GET", "/login"), ("POST", "/login"), ("GET", "/api/v1/openapi.json"), ("GET", "/api/v1/docs")}
ADMIN = {("POST", "/api/v1/projects"), ("POST", "/api/v1/users"), ("POST", "/api/v1/projects/{project}/tasks"),
         ("GET", "/api/v1/projects/{project}/export"), ("GET", "/api/v1/projects/{project}/stats"),
         ("GET", "/admin"), ("POST", "/admin/projects"), ("GET", "/admin/projects/{project}"),
         ("POST", "/admin/projects/{project}/import"), ("GET", "/admin/users"), ("POST", "/admin/users"),
         ("PUT", "/api/v1/projects/{project}/guidelines"), ("POST", "/admin/projects/{project}/guidelines"),
         ("POST", "/admin/users/{name}/password"), ("POST", "/admin/users/{name}/token"),
         ("POST", "/admin/users/{name}/role"), ("POST", "/admin/users/{name}/lock")}
ANY_USER = {("GET", "/api/v1/me"), ("GET", "/api/v1/projects"), ("GET", "/api/v1/projects/{project}/next"),
            ("POST", "/api/v1/assignments/{assignment_id}/judgement"), ("POST", "/api/v1/assignments/{assignment_id}/skip"),
            ("POST", "/api/v1/assignments/{assignment_id}/unskip"), ("GET", "/api/v1/projects/{project}/judgements"),
            ("PUT", "/api/v1/judgements/{judgement_id}"), ("GET", "/annotate/{project}/judgements"),
            ("GET", "/annotate/{project}/judgements/{judgement_id}"), ("POST", "/annotate/{project}/judgements/{judgement_id}"),
            ("GET", "/"), ("GET", "/annotate/{project}"), ("POST", "/annotate/{project}/submit"),
            ("POST", "/annotate/{project}/skip"), ("POST", "/annotate/{project}/unskip"), ("POST", "/logout"),
            ("GET", "/account"), ("POST", "/account/password"), ("POST", "/account/token")}


def all_routes(app, prefix: str = "") -> set[tuple[str, str]]:
    out = set()
    for route in app.routes:
        if hasattr(route, "original_router"):  # an included router (newer FastAPI)
            out |= all_routes(route.original_router, prefix + route.include_context.prefix)
        elif not isinstance(route, Mount):  # Mount: the static files
            out |= {(m, prefix + route.path) for m in route.methods - {"HEAD"}}
    return out


def url(path: str) -> str:
    return path.replace("{project}", "p").replace("{assignment_id}", "1").replace("{judgement_id}", "1").replace("{name}", "ann2")


def refused(response, page: bool) -> bool:
    if response.status_code in (401, 403):
        return True
    return page and response.status_code == 303 and response.headers["location"].startswith("/login")


@pytest.fixture
def ready(env):
    env.project("p")
    env.tasks("p", pair_tasks(2))
    return env


def test_every_route_is_classified(ready):
    # A new route must be added to one of the sets above (and so to the checks below).
    assert all_routes(ready.client.app) == PUBLIC | ADMIN | ANY_USER


def test_unauthenticated_requests_are_refused_everywhere(ready):
    c = ready.client
    for method, path in sorted(ADMIN | ANY_USER):
        for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": "Basic YWRtaW46YWRtaW4="}):
            r = c.request(method, url(path), headers=headers, follow_redirects=False)
            assert refused(r, not path.startswith("/api/")), (method, path, headers, r.status_code)


def test_annotators_are_refused_admin_routes(ready):
    c, annotator = ready.client, ready.login("ann1")
    for method, path in sorted(ADMIN):
        r = c.request(method, url(path), headers=ready.auth("ann1"), follow_redirects=False)
        assert refused(r, not path.startswith("/api/")) and r.status_code != 401, (method, path, r.status_code)
        csrf = page_csrf(annotator.get("/").text)
        r = annotator.request(method, url(path), headers={"X-CSRF-Token": csrf}, follow_redirects=False,
                              data={"csrf_token": csrf} if method == "POST" and not path.startswith("/api/") else None)
        assert r.status_code == 403, (method, path, r.status_code)


def test_annotators_cannot_touch_others_assignments(ready):
    a = ready.next("p", "ann1")
    r = ready.judge(a["assignment_id"], "ann2", choice="A")
    assert r.status_code == 404
    r = ready.client.post(f"/api/v1/assignments/{a['assignment_id']}/skip", headers=ready.auth("ann2"))
    assert r.status_code == 404
    assert ready.judge(a["assignment_id"], "ann1", choice="A").status_code == 201
    # ann2 gets its own assignment with no trace of ann1's label.
    b = ready.next("p", "ann2")
    assert set(b) == {"assignment_id", "task_id", "kind", "project", "prompt", "messages", "responses", "scale",
                      "expires_at", "seconds_left", "progress"}


XSS = ["<script>alert('x')</script>", '<img src=x onerror="alert(1)">', '<a href="javascript:alert(1)">click me</a>']


def test_model_output_is_rendered_as_text(ready):
    ready.project("x")
    ready.tasks("x", [{"prompt": XSS[2] + " prompt", "responses": [XSS[0], XSS[1] + " " + XSS[2]]}])
    browser = ready.login("ann1")
    page = browser.get("/annotate/x")
    assert page.status_code == 200
    for raw in XSS:
        assert raw not in page.text
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in page.text
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in page.text
    assert not re.search(r"<a[^>]+javascript:", page.text)
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    # The admin view shows imported text only through escaped templates as well.
    admin = ready.login("admin")
    assert all(raw not in admin.get("/admin/projects/x").text for raw in XSS)


def test_form_posts_without_a_valid_csrf_token_are_rejected(ready):
    browser = ready.login("ann1")
    page = browser.get("/annotate/p")
    assignment_id = re.search(r'name="assignment_id" id="assignment_id" value="(\d+)"', page.text).group(1)
    for token in (None, "", "forged"):
        data = {"assignment_id": assignment_id, "choice": "A", "client_key": "k"}
        if token is not None:
            data["csrf_token"] = token
        r = browser.post("/annotate/p/submit", data=data, follow_redirects=False)
        assert r.status_code == 400 and "CSRF" in r.text
    # API calls authenticated by the cookie need the header too.
    r = browser.post(f"/api/v1/assignments/{assignment_id}/judgement", json={"choice": "A"})
    assert r.status_code == 403
    with transaction(ready.client.app.state.sessions) as s:
        assert s.scalars(select(Judgement)).all() == []
    ok = browser.post("/annotate/p/submit", data={"assignment_id": assignment_id, "choice": "A", "client_key": "k",
                                                  "csrf_token": page_csrf(page.text)}, follow_redirects=False)
    assert ok.status_code == 303
    admin = ready.login("admin")
    r = admin.post("/admin/users", data={"name": "mallory", "role": "admin"}, follow_redirects=False)
    assert r.status_code == 400
    r = admin.post("/logout", data={}, follow_redirects=False)
    assert r.status_code == 400


def test_login_form_needs_its_csrf_cookie(ready):
    c = ready.client
    r = c.post("/login", data={"username": "ann1", "password": ready.passwords["ann1"], "csrf_token": "x"},
               follow_redirects=False)
    assert r.status_code == 401 and "CSRF" in r.text and "preftune_session" not in r.cookies


def test_session_cookie_flags(ready):
    c = ready.client
    page = c.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    r = c.post("/login", data={"username": "ann1", "password": ready.passwords["ann1"], "csrf_token": token},
               follow_redirects=False)
    cookie = [h for h in r.headers.get_list("set-cookie") if h.startswith("preftune_session=")][0]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie


def test_login_attempts_are_rate_limited(ready):
    c = ready.client
    token = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login").text).group(1)
    for _ in range(3):  # the fixture allows 3 failures a minute
        r = c.post("/login", data={"username": "ann1", "password": "guess", "csrf_token": token}, follow_redirects=False)
        assert r.status_code == 401
    r = c.post("/login", data={"username": "ann1", "password": ready.passwords["ann1"], "csrf_token": token},
               follow_redirects=False)
    assert r.status_code == 429 and "Too many" in r.text and int(r.headers["retry-after"]) > 0


def test_open_redirect_after_login_is_refused(ready):
    c = ready.client
    token = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login").text).group(1)
    for target in ("//evil.example/x", "/\\evil.example", "https://evil.example/"):
        token = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login").text).group(1)
        r = c.post("/login", data={"username": "ann1", "password": ready.passwords["ann1"], "csrf_token": token,
                                   "next": target}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/", target


def test_secrets_are_stored_hashed(ready):
    with transaction(ready.client.app.state.sessions) as s:
        users = {u.name: u for u in s.scalars(select(User))}
    for name, token in ready.tokens.items():
        u = users[name]
        assert token not in (u.token_hash, u.password_hash)
        assert ready.passwords[name] not in u.password_hash and u.password_hash.startswith("$argon2")


def test_logout_ends_the_session(ready):
    browser = ready.login("ann1")
    csrf = page_csrf(browser.get("/").text)
    assert browser.post("/logout", data={"csrf_token": csrf}, follow_redirects=False).status_code == 303
    assert browser.get("/", follow_redirects=False).status_code == 303


def test_login_timing_does_not_tell_which_names_exist(ready):
    """Found in a browser session: a wrong password for a real user took 0.23 s (argon2), an
    unknown name 0.005 s. Both now pay for one argon2 verification."""
    import time

    c = ready.client
    token = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login").text).group(1)

    def seconds(user: str) -> float:
        ready.client.app.state.limiter = type(ready.client.app.state.limiter)(100, 60)  # no lock-out here
        t = time.perf_counter()
        r = c.post("/login", data={"username": user, "password": "guess", "csrf_token": token}, follow_redirects=False)
        assert r.status_code == 401 and "Wrong user name or password" in r.text
        return time.perf_counter() - t

    seconds("nobody-at-all")  # the first call builds the stand-in hash
    known = sorted(seconds("ann1") for _ in range(3))[1]
    unknown = sorted(seconds(f"nobody-{k}") for k in range(3))[1]
    assert unknown > 0.5 * known, (unknown, known)


def test_forwarded_for_is_ignored_unless_a_proxy_is_trusted(tmp_path):
    from click.testing import CliRunner

    from preftune.cli import cli

    help_text = CliRunner().invoke(cli, ["annotate", "serve", "--help"]).output
    assert "--trusted-proxy IP" in help_text
    import uvicorn

    seen = {}
    original = uvicorn.run
    try:
        uvicorn.run = lambda app, **kw: seen.update(kw)
        db = str(tmp_path / "app.db")
        CliRunner().invoke(cli, ["annotate", "init", "--db", db])
        CliRunner().invoke(cli, ["annotate", "serve", "--db", db])
        assert seen["proxy_headers"] is False
        CliRunner().invoke(cli, ["annotate", "serve", "--db", db, "--trusted-proxy", "10.0.0.5"])
        assert seen["proxy_headers"] is True and seen["forwarded_allow_ips"] == "10.0.0.5"
    finally:
        uvicorn.run = original


def test_a_form_sent_with_an_expired_session_returns_to_its_page_after_log_in(ready):
    """Found in a browser session: without JavaScript, logging in again landed on a 405 page
    (the form's POST-only action)."""
    ready.project("late")
    ready.tasks("late", [{"id": "t", "prompt": "Late question?", "responses": ["a", "b"]}])
    anonymous = ready.client
    r = anonymous.post("/annotate/late/submit", data={"choice": "A"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login?next=/annotate/late"
    r = anonymous.post("/admin/projects/late/import", data={}, follow_redirects=False)
    assert r.headers["location"] == "/login?next=/admin/projects/late"
    assert anonymous.get("/annotate/late", follow_redirects=False).headers["location"] == "/login?next=/annotate/late"
    c = ready.login("ann1")
    page = c.get("/annotate/late")
    assert page.status_code == 200 and "Late question?" in page.text
