"""The app in a real browser (system Chromium driven by Playwright): an admin creates a project
and imports tasks; annotators label pairwise tasks with the mouse and with the keyboard and rate
a response, watching progress move; the admin sees agreement and downloads comparisons that the
foundation reader (and so `preftune reward`) accepts.

The tests of this module run in order against one live server. Screenshots go to
$PREFTUNE_SCREENSHOTS (docs/screenshots to refresh the README's) or a temporary directory."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip("browser tests need the system Chromium (apt-get install chromium; make test does it)",
                allow_module_level=True)
pytest.importorskip("playwright", reason="browser tests need playwright (the test extra)")

import uvicorn  # noqa: E402
from .conftest import fresh_database, known_users  # noqa: E402
from playwright.sync_api import Page, expect  # noqa: E402

from preftune.data.jsonl import read_jsonl  # noqa: E402
from preftune.feedback.app import create_app  # noqa: E402
from preftune.feedback.app.db import transaction  # noqa: E402
from preftune.feedback.app.models import User  # noqa: E402
from preftune.feedback.app.security import token_hash  # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
XSS_RESPONSE = "<script>alert('xss')</script> and <img src=x onerror=\"alert(1)\"> and <a href=\"javascript:alert(2)\">link</a>"


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    return {**browser_type_launch_args, "executable_path": CHROMIUM, "args": CHROMIUM_ARGS}


@pytest.fixture(scope="session")
def browser_context_args(browser_context_args):
    return {**browser_context_args, "viewport": {"width": 1280, "height": 860}, "accept_downloads": True}


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    target = Path(os.environ.get("PREFTUNE_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    target.mkdir(parents=True, exist_ok=True)
    return target


@contextlib.contextmanager
def serve(app):
    """``app`` served by uvicorn on a free port of 127.0.0.1 in a thread; yields its URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "server did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        app.state.engine.dispose()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """The app on a fresh SQLite database, with admin and ann1..ann3."""
    url = fresh_database("sqlite", tmp_path_factory.mktemp("browser"))
    app = create_app(url)
    with transaction(app.state.sessions) as s:
        for name, (role, _password, token, password_hash) in known_users().items():
            s.add(User(name=name, role=role, password_hash=password_hash, token_hash=token_hash(token)))
    with serve(app) as url:
        yield url


@pytest.fixture
def dialogs(page: Page) -> list[str]:
    """Any alert() would land here: model output must never run as script."""
    seen: list[str] = []
    page.on("dialog", lambda d: (seen.append(d.message), d.dismiss()))
    return seen


def login(page: Page, live: str, user: str, password: str | None = None) -> None:
    page.goto(f"{live}/login")
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", password or known_users()[user][1])
    page.click("button[type=submit]")
    page.wait_for_load_state()


def test_admin_creates_project_and_imports_tasks(live, page: Page, shots: Path, tmp_path):
    login(page, live, "admin")
    expect(page).to_have_url(f"{live}/admin")
    page.fill("input[name=name]", "greetings")
    page.select_option("select[name=kind]", "pairwise")
    page.fill("input[name=overlap]", "2")
    page.click("button:text-is('Create')")
    expect(page).to_have_url(f"{live}/admin/projects/greetings")
    tasks = tmp_path / "tasks.jsonl"
    records = [{"id": f"g{i}", "prompt": f"Greet a visitor from city {i} politely.",
                "responses": [f"Welcome to our town, friend from city {i}! How can I help?", f"What do you want? ({i})"]}
               for i in range(4)]
    records.append({"id": "xss", "prompt": "Show me some HTML.", "responses": [XSS_RESPONSE, "I would rather not."]})
    tasks.write_text("".join(json.dumps(r) + "\n" for r in records))
    page.set_input_files("input[type=file]", str(tasks))
    page.click("text=Import JSONL")
    expect(page.locator(".notice")).to_contain_text("Imported 5 tasks")
    page.click("text=Projects")
    page.fill("input[name=name]", "ratings")
    page.select_option("select[name=kind]", "rating")
    page.click("button:text-is('Create')")
    rating = tmp_path / "rating.jsonl"
    rating.write_text(json.dumps({"prompt": "What is the capital of Australia?",
                                  "responses": ["Sydney is the capital of Australia."]}) + "\n")
    page.set_input_files("input[type=file]", str(rating))
    page.click("text=Import JSONL")
    expect(page.locator(".notice")).to_contain_text("Imported 1 tasks")


def test_annotator_labels_pairwise_with_mouse_and_keyboard(live, page: Page, dialogs, shots: Path):
    login(page, live, "ann1")
    expect(page.locator("text=greetings")).to_be_visible()
    page.click("a.title:text('greetings')")
    expect(page.locator("#done")).to_have_text("0")
    expect(page.locator("#remaining")).to_have_text("5")
    for hint in ("A", "B", "T", "X", "Enter", "S"):
        expect(page.locator(f"kbd:text-is('{hint}')").first).to_be_visible()
    page.screenshot(path=str(shots / "annotator-pairwise.png"), full_page=True)
    page.evaluate("window.__same_page = true")  # survives only if the page is not reloaded

    def current():
        return [t.inner_text() for t in page.locator(".response .text.raw").all()]

    def label_current(by_keyboard: bool) -> None:
        texts = current()
        if any("<script>" in t for t in texts):  # shown as text, never run
            assert any(XSS_RESPONSE == t for t in texts)
            assert page.locator(".response .text img, .response .text script, .response .text a").count() == 0
        polite = next(i for i, t in enumerate(texts) if "Welcome" in t or "rather" in t)
        before = page.locator("#done").inner_text()
        if by_keyboard:
            page.keyboard.press("ab"[polite])
            page.keyboard.press("3")
            page.keyboard.press("Enter")
        else:
            page.click(f"label:has-text('{'AB'[polite]} is better')")
            page.click("label:has-text('clearly')")
            page.click("#submit")
        expect(page.locator("#done")).to_have_text(str(int(before) + 1))

    label_current(by_keyboard=False)
    label_current(by_keyboard=True)
    label_current(by_keyboard=True)
    assert page.evaluate("window.__same_page") is True  # next tasks came without a page load
    page.keyboard.press("s")  # skip one: 3 done, 1 skipped, 1 left
    expect(page.locator("#remaining")).to_have_text("1")
    label_current(by_keyboard=False)
    expect(page.locator("#all-done")).to_be_visible()
    expect(page.locator("#done")).to_have_text("4")
    assert dialogs == []


def test_annotator_rates_a_response(live, page: Page, shots: Path):
    login(page, live, "ann1")
    page.goto(f"{live}/annotate/ratings")
    expect(page.locator(".response .text.md")).to_have_text("Sydney is the capital of Australia.")
    page.keyboard.press("1")
    page.keyboard.press("h")
    expect(page.locator("input[name=flags][value=hallucination]")).to_be_checked()
    page.screenshot(path=str(shots / "annotator-rating.png"), full_page=True)
    page.keyboard.press("Enter")
    expect(page.locator("#all-done")).to_be_visible()
    expect(page.locator("#done")).to_have_text("1")


def test_annotator_ranks_with_the_keyboard(live, page: Page):
    import httpx

    admin = {"Authorization": f"Bearer {known_users()['admin'][2]}"}
    assert httpx.post(f"{live}/api/v1/projects", json={"name": "order", "kind": "ranking"}, headers=admin).status_code == 201
    r = httpx.post(f"{live}/api/v1/projects/order/tasks", headers=admin,
                   json=[{"id": "r", "prompt": "Rank", "responses": ["good", "also good", "bad"]}])
    assert r.status_code == 201
    login(page, live, "ann1")
    page.goto(f"{live}/annotate/order")
    texts = [t.inner_text() for t in page.locator(".response .text.raw").all()]
    pos = {t: str(i + 1) for i, t in enumerate(texts)}
    for key in (pos["good"], "=", pos["also good"], pos["bad"]):  # best first, "=" ties with the previous
        page.keyboard.press(key)
    expect(page.locator(f"select[name=rank_{int(pos['bad']) - 1}]")).to_have_value("2")
    page.keyboard.press("Enter")
    expect(page.locator("#all-done")).to_be_visible()
    raw = httpx.get(f"{live}/api/v1/projects/order/export", params={"format": "raw"}, headers=admin).text
    assert json.loads(raw)["ranking"] == [[0, 1], [2]]


def test_keyboard_ranks_all_twelve_and_enter_on_skip_skips(live, page: Page):
    """Found in a browser session: ranking by keyboard stopped at 9 ("1" then "0" ranked response 1
    and cleared everything), and Enter on a focused Skip button submitted the answer instead."""
    import httpx

    admin = {"Authorization": f"Bearer {known_users()['admin'][2]}"}
    assert httpx.post(f"{live}/api/v1/projects", json={"name": "twelve", "kind": "ranking"}, headers=admin).status_code == 201
    r = httpx.post(f"{live}/api/v1/projects/twelve/tasks", headers=admin,
                   json=[{"id": "t12", "prompt": "Rank", "responses": [f"answer {i}" for i in range(12)]}])
    assert r.status_code == 201
    login(page, live, "ann1")
    page.goto(f"{live}/annotate/twelve")
    expect(page.locator("kbd:text-is('12')").first).to_be_visible()
    shown = [t.inner_text() for t in page.locator(".response .text.raw").all()]
    order = ["10", "12", "1", "11"] + [str(k) for k in range(2, 10)]  # every position, best first
    for number in order:
        for digit in number:
            page.keyboard.press(digit)
        page.wait_for_timeout(900 if number == "1" else 0)  # "1" alone waits: 10-12 could follow
    for rank, number in enumerate(order, start=1):
        expect(page.locator(f"select[name=rank_{int(number) - 1}]")).to_have_value(str(rank))
    page.keyboard.press("Enter")
    expect(page.locator("#all-done")).to_be_visible()
    raw = json.loads(httpx.get(f"{live}/api/v1/projects/twelve/export", params={"format": "raw"}, headers=admin).text)
    best_first = [shown[int(n) - 1] for n in order]
    assert [raw["responses"][g[0]] for g in raw["ranking"]] == best_first

    assert httpx.post(f"{live}/api/v1/projects", json={"name": "skipper", "kind": "pairwise"}, headers=admin).status_code == 201
    httpx.post(f"{live}/api/v1/projects/skipper/tasks", headers=admin,
               json=[{"id": f"s{i}", "prompt": f"Q{i}", "responses": ["a", "b"]} for i in range(2)])
    page.goto(f"{live}/annotate/skipper")
    page.keyboard.press("a")  # an answer is chosen, but Enter lands on the focused Skip button
    page.focus("#skip")
    page.keyboard.press("Enter")
    expect(page.locator("#remaining")).to_have_text("1")
    expect(page.locator("#done")).to_have_text("0")
    assert httpx.get(f"{live}/api/v1/projects/skipper/export", params={"format": "raw"}, headers=admin).text == ""


def test_a_lost_lease_moves_on_to_the_next_task(live, page: Page):
    """Found in a browser session: after the lease ran out and the task went to someone else,
    Submit repeated the error until the annotator found S."""
    import httpx

    admin = {"Authorization": f"Bearer {known_users()['admin'][2]}"}
    assert httpx.post(f"{live}/api/v1/projects", json={"name": "lease", "kind": "pairwise", "lease_seconds": 10},
                      headers=admin).status_code == 201
    httpx.post(f"{live}/api/v1/projects/lease/tasks", headers=admin,
               json=[{"id": f"l{i}", "prompt": f"Lease question {i}", "responses": ["a", "b"]} for i in range(3)])
    login(page, live, "ann1")
    page.goto(f"{live}/annotate/lease")
    first = page.locator("#prompt").inner_text()
    time.sleep(10.5)  # the lease runs out ...
    ann2 = {"Authorization": f"Bearer {known_users()['ann2'][2]}"}
    while True:  # ... and ann2 skips the others (they stay open for ann1) until it gets ann1's task
        taken = httpx.get(f"{live}/api/v1/projects/lease/next", headers=ann2).json()
        if taken["prompt"] in first:
            break
        httpx.post(f"{live}/api/v1/assignments/{taken['assignment_id']}/skip", headers=ann2)
    page.keyboard.press("a")
    page.keyboard.press("Enter")
    expect(page.locator("#status")).to_contain_text("here is the next task")
    expect(page.locator("#prompt")).not_to_have_text(first)
    page.keyboard.press("b")
    page.keyboard.press("Enter")
    expect(page.locator("#done")).to_have_text("1")


def test_an_expired_session_keeps_the_answer_and_leads_back_to_log_in(live, page: Page):
    """Found in a browser session: with the session gone the annotator saw "authentication
    required: send Authorization: Bearer TOKEN", had no way back, and lost the chosen answer."""
    import httpx

    admin = {"Authorization": f"Bearer {known_users()['admin'][2]}"}
    assert httpx.post(f"{live}/api/v1/projects", json={"name": "session", "kind": "pairwise"},
                      headers=admin).status_code == 201
    httpx.post(f"{live}/api/v1/projects/session/tasks", headers=admin,
               json=[{"id": "q", "prompt": "Session question", "responses": ["a", "b"]}])
    login(page, live, "ann1")
    page.goto(f"{live}/annotate/session")
    page.keyboard.press("b")
    page.keyboard.press("4")
    page.context.clear_cookies()  # the session ends (expired, or logged out elsewhere)
    page.keyboard.press("Enter")
    expect(page.locator("#status")).to_contain_text("Your session has expired")
    page.click("#status a:text('Log in again')")
    page.fill("input[name=username]", "ann1")
    page.fill("input[name=password]", known_users()["ann1"][1])
    page.click("button[type=submit]")
    expect(page).to_have_url(f"{live}/annotate/session")
    expect(page.locator("input[name=choice][value=B]")).to_be_checked()  # the draft is back
    expect(page.locator("input[name=strength][value='4']")).to_be_checked()
    page.keyboard.press("Enter")
    expect(page.locator("#all-done")).to_be_visible()
    raw = json.loads(httpx.get(f"{live}/api/v1/projects/session/export", params={"format": "raw"}, headers=admin).text)
    assert (raw["choice"], raw["strength"]) == ("B", 4)


def test_admin_sees_agreement_and_exports_comparisons(live, page: Page, shots: Path, tmp_path):
    # A second annotator labels through the API, as a script would.
    import httpx

    headers = {"Authorization": f"Bearer {known_users()['ann2'][2]}"}
    with httpx.Client(base_url=live, headers=headers) as api:
        while (r := api.get("/api/v1/projects/greetings/next")).status_code == 200:
            a = r.json()
            polite = next(i for i, t in enumerate(a["responses"]) if "Welcome" in t or "rather" in t)
            assert api.post(f"/api/v1/assignments/{a['assignment_id']}/judgement",
                            json={"choice": "AB"[polite], "strength": 2}).status_code == 201
    login(page, live, "admin")
    page.goto(f"{live}/admin/projects/greetings")
    agreement = page.locator("#agreement")
    expect(agreement).to_contain_text("percent agreement")
    expect(agreement).to_contain_text("1.000")  # both preferred the polite reply on the 4 shared tasks
    expect(agreement).to_contain_text("ann1 / ann2")
    page.screenshot(path=str(shots / "admin-project.png"), full_page=True)
    with page.expect_download() as download:
        page.click("#export-comparisons")
    path = tmp_path / "comparisons.jsonl"
    download.value.save_as(path)
    records = read_jsonl(path, "comparisons").records
    assert len(records) == 9  # ann1: 4 (one skipped), ann2: 5
    assert all("Welcome" in rec.chosen or "rather" in rec.chosen for rec in records)
    assert {rec.annotator for rec in records} == {"ann1", "ann2"}
    page.goto(f"{live}/admin")
    page.screenshot(path=str(shots / "admin-projects.png"), full_page=True)
    shutil.copy(path, Path(os.environ.get("PREFTUNE_BROWSER_EXPORT", tmp_path / "export.jsonl")))


def test_phone_width_dark_mode_and_accessible_names(live, browser, shots: Path):
    """At 390 px no page scrolls sideways; dark mode follows the system; every rank selector and
    response card has a name a screen reader can say; text direction follows the text."""
    import httpx

    admin = {"Authorization": f"Bearer {known_users()['admin'][2]}"}
    assert httpx.post(f"{live}/api/v1/projects", json={"name": "phone", "kind": "ranking"}, headers=admin).status_code == 201
    httpx.post(f"{live}/api/v1/projects/phone/tasks", headers=admin,
               json=[{"id": "p", "prompt": "مرحبا، كيف حالك؟ " * 5, "responses": ["word " * 400, "short", "x" * 300]}])
    for scheme in ("light", "dark"):
        context = browser.new_context(viewport={"width": 390, "height": 844}, color_scheme=scheme)
        page = context.new_page()
        for user, paths in (("ann1", ["/", "/annotate/phone"]),
                            ("admin", ["/admin", "/admin/projects/greetings", "/admin/projects/twelve", "/admin/users"])):
            login(page, live, user)
            for path in paths:
                page.goto(f"{live}{path}")
                overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
                wide = page.evaluate("""Array.from(document.querySelectorAll('body *')).filter(
                    e => e.getBoundingClientRect().right > document.documentElement.clientWidth + 0.5
                         && !e.closest('table'))
                    .slice(0, 5).map(e => e.tagName + '.' + e.className + ' ' + e.getBoundingClientRect().right)""")
                assert overflow <= 0, (scheme, path, overflow, wide)
            page.context.clear_cookies()
        login(page, live, "ann1")
        page.goto(f"{live}/annotate/phone")
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert (background == "rgb(13, 17, 23)") == (scheme == "dark"), background
        for letter in "ABC":
            expect(page.get_by_role("combobox", name=f"Rank of response {letter.lower()}")).to_be_visible()
            expect(page.get_by_role("article", name=f"Response {letter}")).to_be_visible()
        assert page.locator("#prompt .text").first.get_attribute("dir") == "auto"
        page.screenshot(path=str(shots / f"annotator-phone-{scheme}.png"), full_page=True)
        context.close()


HOSTILE_MARKDOWN = ("**Bold** claim with `code` and\n```python\nprint('hi')\n```\n"
                    "<script>window.__ran = 1; alert('md')</script> <img src=x onerror=\"window.__ran = 2\">\n"
                    "[click](javascript:window.__ran=3) ![pixel](http://127.0.0.1:9/p.png) <svg onload=alert(4)>")


def test_markdown_is_rendered_and_hostile_content_never_runs(live, page: Page, dialogs, shots: Path):
    import httpx

    admin = {"Authorization": f"Bearer {known_users()['admin'][2]}"}
    assert httpx.post(f"{live}/api/v1/projects", headers=admin,
                      json={"name": "md", "kind": "pairwise", "guidelines": "Prefer **correct** code."}).status_code == 201
    httpx.post(f"{live}/api/v1/projects/md/tasks", headers=admin,
               json=[{"id": f"m{i}", "prompt": f"Write *code* {i}", "responses": [HOSTILE_MARKDOWN, "plain answer"]}
                     for i in range(2)])
    login(page, live, "ann1")
    page.goto(f"{live}/annotate/md")
    expect(page.locator("#guidelines strong")).to_have_text("correct")

    def check_rendering():
        card = page.locator(".response", has_text="Bold claim")
        expect(card.locator(".text.md strong")).to_have_text("Bold")
        expect(card.locator(".text.md pre code")).to_have_text("print('hi')\n")
        assert "monospace" in page.evaluate("getComputedStyle(document.querySelector('.text.md pre code')).fontFamily")
        assert card.locator(".text.md script, .text.md img, .text.md svg, .text.md a[href^='javascript']").count() == 0
        expect(card.locator(".text.md")).to_contain_text("<script>window.__ran = 1")  # shown, as text
        expect(page.locator("#prompt .text.md em")).to_have_text("code")

    check_rendering()
    page.screenshot(path=str(shots / "annotator-markdown.png"), full_page=True)
    page.click("label:has-text('A is better')")
    page.click("#submit")  # the next task arrives through the API (?html=true) and is rendered by the script
    expect(page.locator("#done")).to_have_text("1")
    check_rendering()
    page.click("text=click")  # a refused link is plain text: clicking does nothing
    # "Plain text" shows exactly what the model wrote, and is remembered
    page.check("#plain")
    card = page.locator(".response", has_text="Bold claim")
    expect(card.locator(".text.raw")).to_be_visible()
    expect(card.locator(".text.md")).to_be_hidden()
    assert card.locator(".text.raw").inner_text() == HOSTILE_MARKDOWN
    page.reload()
    expect(page.locator("#plain")).to_be_checked()
    page.uncheck("#plain")
    assert page.evaluate("window.__ran") is None and dialogs == []


def test_skip_can_be_undone_and_the_lease_counts_down(live, page: Page):
    import httpx

    admin = {"Authorization": f"Bearer {known_users()['admin'][2]}"}
    assert httpx.post(f"{live}/api/v1/projects", headers=admin,
                      json={"name": "undo", "kind": "pairwise", "lease_seconds": 90}).status_code == 201
    httpx.post(f"{live}/api/v1/projects/undo/tasks", headers=admin,
               json=[{"id": f"u{i}", "prompt": f"Question {i}", "responses": [f"a{i}", f"b{i}"]} for i in range(3)])
    login(page, live, "ann2")
    page.goto(f"{live}/annotate/undo")
    lease = page.locator("#lease-left")
    expect(lease).to_have_text(re.compile(r"^1:[23]\d$"))  # 90 s: 1:30 down
    first = page.locator("#prompt .text.raw").inner_text()
    page.wait_for_timeout(2100)
    assert lease.inner_text() < "1:29"
    expect(page.locator("#undo")).to_be_hidden()
    page.keyboard.press("s")
    expect(page.locator("#undo")).to_be_visible()
    expect(page.locator("#prompt .text.raw")).not_to_have_text(first)
    page.keyboard.press("z")  # the skipped task comes back
    expect(page.locator("#prompt .text.raw")).to_have_text(first)
    expect(page.locator("#undo")).to_be_hidden()
    expect(page.locator("#remaining")).to_have_text("3")
    page.keyboard.press("s")  # and by the button
    page.click("#undo-skip")
    expect(page.locator("#prompt .text.raw")).to_have_text(first)
    page.keyboard.press("a")
    page.keyboard.press("Enter")
    expect(page.locator("#done")).to_have_text("1")
    expect(page.locator("#undo")).to_be_hidden()  # nothing to undo after a judgement
    raw = httpx.get(f"{live}/api/v1/projects/undo/export", params={"format": "raw"}, headers=admin).text
    assert json.loads(raw)["prompt"][-1]["content"] == first


def test_api_docs_render_offline_under_the_strict_csp(live, page: Page):
    """Swagger UI comes from the app itself (no CDN) and runs under the pages' Content-Security-Policy."""
    requests, violations = [], []
    page.on("request", lambda r: requests.append(r.url))
    page.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None)
    response = page.goto(f"{live}/api/v1/docs")
    assert "script-src 'self'" in response.headers["content-security-policy"]
    expect(page.locator(".opblock-summary-path", has_text="/api/v1/projects/{project}/next").first).to_be_visible()
    assert all(url.startswith(live) for url in requests), [u for u in requests if not u.startswith(live)]
    assert violations == []


def test_an_annotator_changes_a_recent_judgement(live, page: Page):
    import httpx

    admin = {"Authorization": f"Bearer {known_users()['admin'][2]}"}
    assert httpx.post(f"{live}/api/v1/projects", headers=admin, json={"name": "revisit", "kind": "pairwise"}).status_code == 201
    httpx.post(f"{live}/api/v1/projects/revisit/tasks", headers=admin,
               json=[{"id": f"v{i}", "prompt": f"Question {i}", "responses": [f"a{i}", f"b{i}"]} for i in range(2)])
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    login(page, live, "ann3")
    page.goto(f"{live}/annotate/revisit")
    page.keyboard.press("a")
    page.keyboard.press("2")
    page.keyboard.press("Enter")
    expect(page.locator("#done")).to_have_text("1")
    page.click("text=Your judgements")
    expect(page.locator("#judgements tbody tr")).to_have_count(1)
    expect(page.locator("#judgements")).to_contain_text("A is better (somewhat)")
    page.click("#judgements >> text=Change")
    expect(page.locator("#revising")).to_be_visible()
    expect(page.locator('input[name=choice][value="A"]')).to_be_checked()
    expect(page.locator('input[name=strength][value="2"]')).to_be_checked()
    page.keyboard.press("b")  # the same keys as when annotating
    page.keyboard.press("4")
    page.keyboard.press("Enter")
    expect(page.locator("p.notice", has_text="Judgement changed")).to_be_visible()
    expect(page.locator("#judgements")).to_contain_text("B is better (much)")
    expect(page.locator("#judgements")).to_contain_text("changed 1x")
    raw = json.loads(httpx.get(f"{live}/api/v1/projects/revisit/export", params={"format": "raw"}, headers=admin).text)
    assert (raw["choice"], raw["strength"], raw["revisions"][0]["choice"]) == ("B", 4, "A")
    assert [e for e in errors if "Failed to load resource" not in e] == []  # (no favicon)


def test_people_make_some_of_a_runs_judgements_in_the_browser(page: Page, tmp_path, monkeypatch):
    """The main job with ``--feedback app`` stops for labels; an annotator judges a few of its pairs and
    rates a response in the browser, a scripted annotator the rest through the API; the re-run
    finishes, and the reward model trained on the browser's judgements."""
    from test_people_loop import ROOT, judge_everything, quick, scripted_annotators

    from preftune.feedback.app.service import create_user
    from preftune.pipeline.people import FeedbackDB
    from preftune.scoring import load_scorer

    monkeypatch.chdir(ROOT)
    out, db = tmp_path / "run", tmp_path / "feedback.db"
    options = ["--feedback", "app", "--db", str(db), "--project", "b", "--comparison-prompts", "4"]
    first = quick(out, *options)
    assert first.exit_code == 3, first.output

    app = create_app(f"sqlite:///{db}")
    password = "browser-pass-1234"
    with transaction(app.state.sessions) as s:
        ann1_token = create_user(s, "ann1", "annotator", password=password).token
    with serve(app) as url:
        login(page, url, "ann1", password)
        page.goto(f"{url}/annotate/b-pairs")
        for n in range(3):
            expect(page.locator("#done")).to_have_text(str(n))
            page.keyboard.press("a")
            page.keyboard.press("Enter")
        expect(page.locator("#done")).to_have_text("3")
        page.goto(f"{url}/annotate/b-ratings")
        page.keyboard.press("3")
        page.keyboard.press("Enter")
        expect(page.locator("#done")).to_have_text("1")
    in_browser = FeedbackDB.open(f"sqlite:///{db}").export("b-pairs", "comparisons")
    assert len(in_browser) == 3 and {r["annotator"] for r in in_browser} == {"ann1"}

    gold = load_scorer("0.5*sentiment + 0.5*keyword(lovely|wonderful|great|love|happy|fun)")
    client, tokens = scripted_annotators(f"sqlite:///{db}", ["ann2"])
    tokens["ann1"] = ann1_token  # ann1 goes on through the API
    for k, project in enumerate(["b-ratings", "b-pairs"]):
        judge_everything(client, tokens, project, gold, seed=k)
    second = quick(out, *options)
    assert second.exit_code == 0, second.output
    rows = lambda path: [json.loads(x) for x in path.read_text().splitlines() if x.strip()]  # noqa: E731
    used = {r["id"] for r in rows(out / "data" / "rm_train.jsonl") + rows(out / "data" / "rm_eval.jsonl")}
    assert {r["id"] for r in in_browser} <= used
