"""Markdown rendering (safe by construction), project guidelines, the lease's seconds left and
taking a skip back."""

from __future__ import annotations

import re
from html.parser import HTMLParser

from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine, inspect, text

from preftune.feedback.app.markdown import render_markdown

from .conftest import pair_tasks

# Everything the renderer may emit: markdown's own structure, nothing that loads or runs anything.
ALLOWED = {"p", "br", "em", "strong", "code", "pre", "a", "ul", "ol", "li", "blockquote", "h1", "h2", "h3", "h4",
           "h5", "h6", "hr", "table", "thead", "tbody", "tr", "th", "td", "s"}


class Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def tags_of(html: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = Tags()
    parser.feed(html)
    return parser.tags


def assert_safe(html: str) -> None:
    for tag, attrs in tags_of(html):
        assert tag in ALLOWED, (tag, html)
        assert not any(name.startswith("on") or name in ("style", "src") for name in attrs), (tag, attrs)
        href = (attrs.get("href") or "").strip().lower()
        assert not href or re.match(r"^(https?:|mailto:|#|/|[a-z0-9._~%-]+($|[/?#]))", href), href


def test_markdown_renders_as_hand_written():
    assert render_markdown("**bold** and *it*") == "<p><strong>bold</strong> and <em>it</em></p>\n"
    assert render_markdown("one\ntwo") == "<p>one<br />\ntwo</p>\n"  # a newline in model output is a line break
    assert render_markdown("```python\nx = 1 < 2\n```") == (
        '<pre><code class="language-python">x = 1 &lt; 2\n</code></pre>\n')
    assert render_markdown("- a\n- b") == "<ul>\n<li>a</li>\n<li>b</li>\n</ul>\n"
    assert render_markdown("[docs](https://example.org)") == (
        '<p><a href="https://example.org" rel="nofollow noopener noreferrer">docs</a></p>\n')
    assert render_markdown("") == ""


HOSTILE = ["<script>alert(1)</script>", '<img src=x onerror="alert(1)">', "[x](javascript:alert(1))",
           "[x](JaVaScRiPt:alert(1))", "[x](&#106;avascript:alert(1))", "[x](vbscript:msgbox(1))",
           "[x](data:text/html,<script>alert(1)</script>)", "![i](https://tracker.example/p.png)",
           '```js" onmouseover="alert(1)\nx\n```', "<iframe src=//evil></iframe>", "<a href=x onclick=alert(1)>a</a>",
           '[x](https://ok.example "t\\" onmouseover=\\"alert(1)")', "<style>body{display:none}</style>",
           "<svg onload=alert(1)>", "[a]: javascript:alert(1)\n\n[a]"]


def test_hostile_markdown_and_html_stay_text():
    for source in HOSTILE:
        html = render_markdown(source)
        assert_safe(html)
        assert "<script" not in html and "<img" not in html and "<iframe" not in html and "<svg" not in html
    assert render_markdown("<script>alert(1)</script>") == "<p>&lt;script&gt;alert(1)&lt;/script&gt;</p>\n"
    assert "href" not in render_markdown("[x](javascript:alert(1))")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["<", ">", '"', "'", "&", "[", "]", "(", ")", "!", "*", "`", "\n", " ", ":", "=",
                                 "/", "#", "script", "img", "a href", "javascript", "onerror", "x", "data", "|",
                                 "-", "```", "&#106;", "%3C"]), max_size=40).map("".join))
def test_any_text_renders_safely(source):
    assert_safe(render_markdown(source))


def test_the_annotate_page_renders_markdown_and_keeps_the_plain_text(env):
    env.project("md")
    env.tasks("md", [{"id": "m", "prompt": "Write **code**", "responses": ["```py\nprint(1)\n```", "<b>hi</b>"]}])
    page = env.login("ann1").get("/annotate/md").text
    assert "<p>Write <strong>code</strong></p>" in page and "Write **code**" in page  # rendered and plain views
    assert '<code class="language-py">print(1)' in page
    assert "&lt;b&gt;hi&lt;/b&gt;" in page and "<b>hi</b>" not in page
    body = env.client.get("/api/v1/projects/md/next?html=true", headers=env.auth("ann1")).json()
    shown = body["responses"]
    assert body["html"]["responses"] == [str(render_markdown(r)) for r in shown]
    assert body["html"]["messages"] == ["<p>Write <strong>code</strong></p>\n"]
    assert "html" not in env.next("md", "ann1")  # only when asked for


def test_guidelines_are_set_by_admins_and_shown_to_annotators(env):
    env.project("g", guidelines="Prefer **short** answers.")
    env.tasks("g", pair_tasks(1))
    assert "<strong>short</strong>" in env.login("ann1").get("/annotate/g").text
    r = env.client.put("/api/v1/projects/g/guidelines", json={"guidelines": "# Rules\nNo <script>"},
                       headers=env.auth("admin"))
    assert r.status_code == 200 and r.json()["guidelines"] == "# Rules\nNo <script>"
    page = env.login("ann2").get("/annotate/g").text
    assert "<h1>Rules</h1>" in page and "No &lt;script&gt;" in page
    r = env.client.put("/api/v1/projects/g/guidelines", json={"guidelines": "x" * 100_001}, headers=env.auth("admin"))
    assert r.status_code == 422
    r = env.client.put("/api/v1/projects/g/guidelines", json={"guidelines": "a"}, headers=env.auth("ann1"))
    assert r.status_code == 403
    # the admin page's form (CSRF-checked like every form)
    admin = env.login("admin")
    page = admin.get("/admin/projects/g").text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    r = admin.post("/admin/projects/g/guidelines", data={"guidelines": "Be kind.", "csrf_token": csrf},
                   follow_redirects=False)
    assert r.status_code == 303
    assert env.client.get("/api/v1/projects", headers=env.auth("admin")).json()[0]["guidelines"] == "Be kind."
    r = admin.post("/admin/projects/g/guidelines", data={"guidelines": "x", "csrf_token": "wrong"})
    assert r.status_code == 400


def test_seconds_left_counts_the_lease(env):
    env.project("l", lease_seconds=120)
    env.tasks("l", pair_tasks(1))
    a = env.next("l", "ann1")
    assert 118 <= a["seconds_left"] <= 120
    assert 'data-seconds-left="1' in env.login("ann1").get("/annotate/l").text


def unskip(env, assignment_id: int, user: str):
    return env.client.post(f"/api/v1/assignments/{assignment_id}/unskip", headers=env.auth(user))


def test_a_skip_can_be_taken_back(env):
    env.project("u", overlap=1)
    env.tasks("u", pair_tasks(2))
    first = env.next("u", "ann1")
    r = env.client.post(f"/api/v1/assignments/{first['assignment_id']}/skip", headers=env.auth("ann1"))
    assert r.status_code == 200
    second = env.next("u", "ann1")
    assert second["task_id"] != first["task_id"]
    r = unskip(env, first["assignment_id"], "ann1")
    assert r.status_code == 200
    back = r.json()
    assert (back["assignment_id"], back["task_id"]) == (first["assignment_id"], first["task_id"])
    assert back["progress"] == {"done": 0, "remaining": 2}
    assert env.next("u", "ann1")["assignment_id"] == first["assignment_id"]  # the current lease again
    # the task shown after the skip went back to the pool: another annotator gets it
    assert env.next("u", "ann2")["task_id"] == second["task_id"]
    assert env.judge(first["assignment_id"], "ann1", choice="A").status_code == 201
    assert unskip(env, first["assignment_id"], "ann1").status_code == 409  # judged, not skipped
    assert unskip(env, first["assignment_id"], "ann2").status_code == 404  # not theirs


def test_a_skip_cannot_be_taken_back_once_others_filled_the_task(env):
    env.project("v", overlap=1)
    env.tasks("v", pair_tasks(1))
    a = env.next("v", "ann1")
    env.client.post(f"/api/v1/assignments/{a['assignment_id']}/skip", headers=env.auth("ann1"))
    b = env.next("v", "ann2")
    assert b["task_id"] == a["task_id"]
    r = unskip(env, a["assignment_id"], "ann1")
    assert r.status_code == 409 and "other annotators" in r.json()["detail"]


def test_the_no_script_skip_page_offers_undo(env):
    env.project("w")
    env.tasks("w", pair_tasks(2))
    browser = env.login("ann1")
    page = browser.get("/annotate/w").text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    assignment = re.search(r'name="assignment_id" id="assignment_id" value="(\d+)"', page).group(1)
    r = browser.post("/annotate/w/skip", data={"assignment_id": assignment, "csrf_token": csrf})
    assert r.status_code == 200 and f'id="undo-id" value="{assignment}"' in r.text
    assert re.search(r'<form class="notice undo" id="undo"[^>]*>', r.text).group(0).count("hidden") == 0
    r = browser.post("/annotate/w/unskip", data={"assignment_id": assignment, "csrf_token": csrf})
    assert r.status_code == 200 and f'id="assignment_id" value="{assignment}"' in r.text


def test_an_existing_database_upgrades_with_its_data(tmp_path):
    """A database of the first schema, with a judged task, migrated to the newest: guidelines
    empty, each task's remaining judgements and the project's open tasks counted from what it holds."""
    from alembic import command

    from preftune.feedback.app.db import _alembic_config, head_revision, migrate

    engine = create_engine(f"sqlite:///{tmp_path / 'old.db'}")
    command.upgrade(_alembic_config(engine), "0001")
    with engine.begin() as conn:
        for sql in ("INSERT INTO projects VALUES (1, 'old', 'pairwise', 2, 3, 0, 600, '2026-01-01')",
                    "INSERT INTO users VALUES (1, 'ann', 'annotator', 'x', 'y', '2026-01-01')",
                    "INSERT INTO tasks VALUES (1, 1, 't1', '[]', '[\"a\", \"b\"]', 0, NULL, NULL, '2026-01-01')",
                    "INSERT INTO tasks VALUES (2, 1, 't2', '[]', '[\"a\", \"b\"]', 0, NULL, NULL, '2026-01-01')",
                    "INSERT INTO tasks VALUES (3, 1, 'g', '[]', '[\"a\", \"b\"]', 1, '\"0\"', NULL, '2026-01-01')",
                    "INSERT INTO assignments VALUES (1, 1, 1, 1, '[0, 1]', 'done', '2026-01-01', '2026-01-02', NULL)",
                    "INSERT INTO judgements (id, assignment_id, task_id, user_id, project_id, client_key, choice, label,"
                    " created_at) VALUES (1, 1, 1, 1, 1, 'k', 'A', '0', '2026-01-01')"):
            conn.execute(text(sql))
    assert "guidelines" not in {c["name"] for c in inspect(engine).get_columns("projects")}
    assert migrate(engine) == ("0001", head_revision(engine))
    with engine.begin() as conn:
        projects = conn.execute(text("SELECT name, guidelines, open_tasks FROM projects")).all()
        assert projects == [("old", "", 2)]
        assert conn.execute(text("SELECT ext_id, needed FROM tasks ORDER BY id")).all() == [
            ("t1", 1), ("t2", 2), ("g", 0)]
