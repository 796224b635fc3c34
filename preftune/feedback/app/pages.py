"""Server-rendered pages (Jinja2, autoescaped: model output is shown as text, or as markdown rendered
to safe HTML by ``markdown.py``, never as the HTML it may contain).

Every form carries a CSRF token; the log-in form uses a double-submit cookie since there is no
session yet. The annotate page works as plain forms; ``static/annotate.js`` adds keyboard
shortcuts and loads the next task through the JSON API without reloading the page.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote, urlparse

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from preftune.data.records import RATING_FLAGS, RecordError
from preftune.errors import DataError
from preftune.feedback.app import service
from preftune.feedback.app.markdown import render_markdown
from preftune.feedback.app.models import Project, User, WebSession
from preftune.feedback.app.security import new_secret, same_secret, verify_no_user, verify_password
from preftune.feedback.app.stats import project_stats
from preftune.feedback.app.tasks import numbered_json_lines, parse_tasks, unstorable
from preftune.feedback.app.web import LOGIN_CSRF_COOKIE, SESSION_COOKIE, Caller, identify, start_session, tx

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
templates.env.filters["markdown"] = render_markdown

FLAG_KEYS = {"hallucination": "h", "harmful": "m", "ignores_instruction": "i", "unhelpful": "u", "other": "o"}
STRENGTH_NAMES = {1: "slightly", 2: "somewhat", 3: "clearly", 4: "much"}


class LoginRequired(Exception):
    def __init__(self, path: str) -> None:
        self.path = path


class PageForbidden(Exception):
    pass


def _caller(request: Request, s, *, admin: bool = False) -> Caller:
    caller = identify(request, s)
    if caller is None or caller.session is None:  # pages use the session cookie, not tokens
        raise LoginRequired(request.url.path)
    if admin and caller.user.role != "admin":
        raise PageForbidden()
    return caller


def _check_csrf(caller: Caller, token: str | None) -> None:
    if not same_secret(token, caller.session.csrf_token):
        raise service.FeedbackError("the form has expired or did not come from this site (CSRF check "
                                    "failed): reload the page and try again")


def render(request: Request, name: str, caller: Caller | None, status: int = 200, **context) -> HTMLResponse:
    return templates.TemplateResponse(request, name, {
        "user": caller.user if caller else None, "csrf": caller.session.csrf_token if caller else "", **context},
        status_code=status)


def _number(text: str, what: str, kind: type):
    try:
        return kind(text)
    except ValueError:
        raise service.Invalid(f"{what} must be a number") from None


def page_of(action: str) -> str:
    """The page whose form posts to ``action``: /annotate/P for /annotate/P/submit and /skip,
    /admin/projects/P for its forms, /admin for the rest of the admin's, else /."""
    parts = action.rstrip("/").split("/")
    if len(parts) >= 4 and parts[1] == "annotate":
        return "/".join(parts[:3])
    if len(parts) >= 4 and parts[1:3] == ["admin", "projects"]:
        return "/".join(parts[:4])
    if parts[1:3] == ["admin", "users"]:
        return "/admin/users"
    if parts[1:2] == ["account"]:
        return "/account"
    return "/admin" if parts[1:2] == ["admin"] else "/"


def _safe_next(target: str | None) -> str:
    """Only same-site paths after log-in (no open redirect)."""
    # Browsers read "/\\host" as "//host": refuse backslashes too.
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target or urlparse(target).netloc:
        return "/"
    return target


# ---------------------------------------------------------------- log-in


@router.get("/login")
def login_page(request: Request, next: str = "/", error: str | None = None):
    token = request.cookies.get(LOGIN_CSRF_COOKIE) or new_secret(24)
    response = render(request, "login.html", None, next=_safe_next(next), login_csrf=token, error=error,
                      status=401 if error else 200)
    response.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict",
                        secure=request.app.state.settings.secure_cookies)
    return response


@router.post("/login")
def login(request: Request, username: str = Form("", max_length=100), password: str = Form("", max_length=1000),
          csrf_token: str = Form(""), next: str = Form("/")):
    settings, limiter = request.app.state.settings, request.app.state.limiter
    if not same_secret(csrf_token, request.cookies.get(LOGIN_CSRF_COOKIE)):
        return login_page(request, next, "The log-in form expired (CSRF check failed). Please try again.")
    keys = (f"ip:{request.client.host if request.client else '?'}", f"user:{username}")
    wait = limiter.retry_after(*keys)
    if wait > 0:
        response = login_page(request, next, f"Too many failed log-ins. Try again in {int(wait) + 1} seconds.")
        response.status_code = 429
        response.headers["Retry-After"] = str(int(wait) + 1)
        return response
    with tx(request) as s:
        user = None if unstorable(username) else s.scalar(select(User).where(
            User.name == service.normal_name(username)))
        if not (verify_password(user.password_hash, password) if user is not None else verify_no_user(password)):
            limiter.failed(*keys)
            return login_page(request, next, "Wrong user name or password.")
        cookie, _ = start_session(s, user, settings.session_hours)
        target = _safe_next(next) if next != "/" else ("/admin" if user.role == "admin" else "/")
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(SESSION_COOKIE, cookie, httponly=True, samesite="strict", secure=settings.secure_cookies,
                        max_age=int(settings.session_hours * 3600))
    response.delete_cookie(LOGIN_CSRF_COOKIE)
    return response


@router.post("/logout")
def logout(request: Request, csrf_token: str = Form("")):
    with tx(request) as s:
        caller = _caller(request, s)
        _check_csrf(caller, csrf_token)
        s.delete(s.get(WebSession, caller.session.id))
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE)
    return response


# ---------------------------------------------------------------- annotators


@router.get("/")
def home(request: Request):
    with tx(request) as s:
        caller = _caller(request, s)
        projects = [(p, service.progress(s, p, caller.user)) for p in s.scalars(select(Project).order_by(Project.name))]
        return render(request, "home.html", caller, projects=projects)


@router.get("/annotate/{project}")
def annotate(request: Request, project: str, message: str | None = None, skipped: str | None = None):
    with tx(request) as s:
        caller = _caller(request, s)
        p, assignment, task = service.next_assignment(s, project, caller.user)
        view = service.assignment_json(assignment, task, p) if assignment else None
        return render(request, "annotate.html", caller, project=p, task=view,
                      progress=service.progress(s, p, caller.user), client_key=new_secret(12),
                      flags=[(f, FLAG_KEYS[f]) for f in RATING_FLAGS],
                      strengths=STRENGTH_NAMES, message=message,
                      skipped=skipped if skipped and skipped.isdigit() else None)


@router.post("/annotate/{project}/submit")
async def annotate_submit(request: Request, project: str):
    form = await request.form()  # multi-valued fields (flags) and per-response ranks
    return await run_in_threadpool(_submit_form, request, project, form)  # keep the event loop free


def _submit_form(request: Request, project: str, form):
    with tx(request) as s:
        caller = _caller(request, s)
        _check_csrf(caller, form.get("csrf_token"))
        p = service.get_project(s, project)
        try:
            assignment_id = int(form.get("assignment_id", ""))
        except ValueError:
            raise service.Invalid("the form has no assignment") from None
        body = {"client_key": form.get("client_key") or None, **_answer_from_form(p, form)}
        service.submit_judgement(s, assignment_id, caller.user, body, request.app.state.settings.limits)
    return RedirectResponse(f"/annotate/{quote(project)}", status_code=303)


def _form_int(value: str | None, field: str) -> int | None:
    """A form's number: None when left empty, else a small non-negative integer in ASCII digits
    (str.isdigit() also accepts "²", which int() does not)."""
    if not value:
        return None
    if len(value) > 6 or not (value.isascii() and value.isdigit()):
        raise service.Invalid(f"{field} must be a number")
    return int(value)


def _answer_from_form(p: Project, form) -> dict:
    """The answer fields of an annotate form, as the API takes them (positions as shown)."""
    body: dict = {"rationale": form.get("rationale") or None}
    if p.kind == "pairwise":
        body.update(choice=form.get("choice"), strength=_form_int(form.get("strength"), "strength"))
    elif p.kind == "rating":
        body.update(rating=_form_int(form.get("rating"), "rating"), flags=form.getlist("flags"))
    else:
        ranks: dict[int, list[int]] = {}
        for key, value in form.multi_items():
            if key.startswith("rank_") and (rank := _form_int(value, "a rank")) is not None:
                ranks.setdefault(rank, []).append(_form_int(key[5:], "a response's position"))
        body["ranking"] = [sorted(ranks[r]) for r in sorted(ranks)]
    return body


@router.get("/annotate/{project}/judgements")
def annotate_history(request: Request, project: str, message: str | None = None):
    with tx(request, readonly=True) as s:
        caller = _caller(request, s)
        p = service.get_project(s, project)
        rows = [(service.judgement_json(j, a), t, service.revision_count(s, j))
                for j, a, t in service.recent_judgements(s, p, caller.user, limit=50)]
        return render(request, "history.html", caller, project=p, rows=rows, message=message,
                      strengths=STRENGTH_NAMES)


@router.get("/annotate/{project}/judgements/{judgement_id}")
def annotate_revise_page(request: Request, project: str, judgement_id: int):
    with tx(request, readonly=True) as s:
        caller = _caller(request, s)
        j, a, t, p = service.own_judgement(s, judgement_id, caller.user)
        if p.name != service.normal_name(project):
            raise service.NotFound(f"no judgement {judgement_id} of yours in project {project!r}")
        answer = service.judgement_json(j, a)
        answer["ranks"] = {pos: rank for rank, group in enumerate(answer["ranking"] or [], start=1) for pos in group}
        view = service.assignment_json(a, t, p)
        return render(request, "annotate.html", caller, project=p, task=view,
                      progress=service.progress(s, p, caller.user), client_key="",
                      flags=[(f, FLAG_KEYS[f]) for f in RATING_FLAGS], strengths=STRENGTH_NAMES,
                      message=None, skipped=None, answer=answer)


@router.post("/annotate/{project}/judgements/{judgement_id}")
async def annotate_revise(request: Request, project: str, judgement_id: int):
    form = await request.form()
    return await run_in_threadpool(_revise_form, request, project, judgement_id, form)


def _revise_form(request: Request, project: str, judgement_id: int, form):
    with tx(request) as s:
        caller = _caller(request, s)
        _check_csrf(caller, form.get("csrf_token"))
        p = service.get_project(s, project)
        if service.own_judgement(s, judgement_id, caller.user)[3].id != p.id:
            raise service.NotFound(f"no judgement {judgement_id} of yours in project {project!r}")
        service.revise_judgement(s, judgement_id, caller.user, _answer_from_form(p, form),
                                 request.app.state.settings.limits)
    return RedirectResponse(f"/annotate/{quote(project)}/judgements?message={quote('Judgement changed')}",
                            status_code=303)


@router.post("/annotate/{project}/skip")
def annotate_skip(request: Request, project: str, assignment_id: str = Form(""), csrf_token: str = Form("")):
    with tx(request) as s:
        caller = _caller(request, s)
        _check_csrf(caller, csrf_token)
        service.skip_assignment(s, _number(assignment_id, "assignment", int), caller.user)
    return RedirectResponse(f"/annotate/{quote(project)}?skipped={quote(assignment_id)}", status_code=303)


@router.post("/annotate/{project}/unskip")
def annotate_unskip(request: Request, project: str, assignment_id: str = Form(""), csrf_token: str = Form("")):
    with tx(request) as s:
        caller = _caller(request, s)
        _check_csrf(caller, csrf_token)
        service.unskip_assignment(s, _number(assignment_id, "assignment", int), caller.user)
    return RedirectResponse(f"/annotate/{quote(project)}", status_code=303)


# ---------------------------------------------------------------- admins


@router.get("/admin")
def admin_projects(request: Request):
    with tx(request) as s:
        caller = _caller(request, s, admin=True)
        rows = [(p, project_stats(s, p)["progress"]) for p in s.scalars(select(Project).order_by(Project.name))]
        return render(request, "admin_projects.html", caller, rows=rows)


@router.post("/admin/projects")
def admin_create_project(request: Request, name: str = Form(""), kind: str = Form(""), overlap: str = Form("1"),
                         scale: str = Form("3"), gold_rate: str = Form("0"), lease_seconds: str = Form("600"),
                         csrf_token: str = Form("")):
    # Form fields arrive as text and are checked after the caller is: no hints to strangers.
    with tx(request) as s:
        caller = _caller(request, s, admin=True)
        _check_csrf(caller, csrf_token)
        p = service.create_project(s, name, kind, overlap=_number(overlap, "overlap", int),
                                   scale=_number(scale, "scale", int), gold_rate=_number(gold_rate, "gold rate", float),
                                   lease_seconds=_number(lease_seconds, "lease", int))
    return RedirectResponse(f"/admin/projects/{quote(p.name)}", status_code=303)


@router.get("/admin/projects/{project}")
def admin_project(request: Request, project: str, message: str | None = None):
    with tx(request) as s:
        caller = _caller(request, s, admin=True)
        p = service.get_project(s, project)
        return render(request, "admin_project.html", caller, project=p, stats=project_stats(s, p), message=message)


@router.post("/admin/projects/{project}/guidelines")
def admin_guidelines(request: Request, project: str, guidelines: str = Form("", max_length=service.MAX_GUIDELINES),
                     csrf_token: str = Form("")):
    with tx(request) as s:
        caller = _caller(request, s, admin=True)
        _check_csrf(caller, csrf_token)
        service.set_guidelines(s, project, guidelines)
    return RedirectResponse(f"/admin/projects/{quote(project)}?message={quote('Guidelines saved')}", status_code=303)


@router.post("/admin/projects/{project}/import")
def admin_import(request: Request, project: str, file: UploadFile | None = File(None), csrf_token: str = Form("")):
    limits = request.app.state.settings.limits
    with tx(request) as s:
        caller = _caller(request, s, admin=True)
        _check_csrf(caller, csrf_token)
        p = service.get_project(s, project)
        if file is None:
            raise service.Invalid("choose a JSONL file to import")
        name = file.filename or "upload"
        try:
            numbered = numbered_json_lines(file.file, name)
        except DataError as e:
            raise service.Invalid(str(e)) from None
        try:
            parsed = parse_tasks(numbered, p.kind, p.scale, limits)
        except RecordError as e:
            raise service.Invalid(f"{name}:{e.line}: {e}") from None
        result = service.add_tasks(s, p, parsed.specs)
    message = (f"Imported {result.added} tasks" + (f" ({result.unchanged} already present)" if result.unchanged else "")
               + parsed.note())
    return RedirectResponse(f"/admin/projects/{quote(project)}?message={quote(message)}", status_code=303)


@router.get("/admin/users")
def admin_users(request: Request, message: str | None = None):
    with tx(request) as s:
        caller = _caller(request, s, admin=True)
        users = list(s.scalars(select(User).order_by(User.name)))
        return render(request, "admin_users.html", caller, users=users, created=None, message=message)


def _secret_page(request: Request, caller: Caller, s, **shown) -> HTMLResponse:
    """The users page showing new credentials once (only their hashes are stored)."""
    users = list(s.scalars(select(User).order_by(User.name)))
    response = render(request, "admin_users.html", caller, users=users, created=shown)
    response.headers["Cache-Control"] = "no-store"
    return response


@router.post("/admin/users/{name}/password")
def admin_reset_password(request: Request, name: str, csrf_token: str = Form("")):
    with tx(request) as s:
        caller = _caller(request, s, admin=True)
        _check_csrf(caller, csrf_token)
        password = service.set_password(s, name)
        user = service.get_user(s, name)
        return _secret_page(request, caller, s, user=user.name, role=user.role, password=password,
                            what="New password for")


@router.post("/admin/users/{name}/token")
def admin_rotate_token(request: Request, name: str, csrf_token: str = Form("")):
    with tx(request) as s:
        caller = _caller(request, s, admin=True)
        _check_csrf(caller, csrf_token)
        token = service.rotate_token(s, name)
        user = service.get_user(s, name)
        return _secret_page(request, caller, s, user=user.name, role=user.role, token=token,
                            what="New API token for")


@router.post("/admin/users/{name}/role")
def admin_set_role(request: Request, name: str, role: str = Form(""), csrf_token: str = Form("")):
    with tx(request) as s:
        caller = _caller(request, s, admin=True)
        _check_csrf(caller, csrf_token)
        user = service.set_role(s, name, role)
        message = f"{user.name} is now {user.role}"
    return RedirectResponse(f"/admin/users?message={quote(message)}", status_code=303)


@router.post("/admin/users/{name}/lock")
def admin_lock_user(request: Request, name: str, csrf_token: str = Form("")):
    with tx(request) as s:
        caller = _caller(request, s, admin=True)
        _check_csrf(caller, csrf_token)
        if service.get_user(s, name).id == caller.user.id:
            raise service.Conflict("you cannot lock yourself out")
        ended = service.lock_user(s, name)
        message = f"{service.normal_name(name)} is locked ({ended} browser session(s) ended); a new password opens it"
    return RedirectResponse(f"/admin/users?message={quote(message)}", status_code=303)


# ---------------------------------------------------------------- everyone's own account


@router.get("/account")
def account(request: Request, message: str | None = None):
    with tx(request) as s:
        caller = _caller(request, s)
        return render(request, "account.html", caller, message=message, token=None)


@router.post("/account/password")
def account_password(request: Request, current: str = Form("", max_length=1000), new: str = Form("", max_length=1000),
                     again: str = Form("", max_length=1000), csrf_token: str = Form("")):
    with tx(request) as s:
        caller = _caller(request, s)
        _check_csrf(caller, csrf_token)
        if new != again:
            raise service.Invalid("the two new passwords differ")
        service.change_own_password(s, caller.user, current, new, keep=caller.session)
    message = "Password changed; your other browser sessions were logged out"
    return RedirectResponse(f"/account?message={quote(message)}", status_code=303)


@router.post("/account/token")
def account_token(request: Request, csrf_token: str = Form("")):
    with tx(request) as s:
        caller = _caller(request, s)
        _check_csrf(caller, csrf_token)
        token = service.rotate_token(s, caller.user.name)
        response = render(request, "account.html", caller, message=None, token=token)
    response.headers["Cache-Control"] = "no-store"
    return response


@router.post("/admin/users")
def admin_create_user(request: Request, name: str = Form(""), role: str = Form("annotator"),
                      csrf_token: str = Form("")):
    with tx(request) as s:
        caller = _caller(request, s, admin=True)
        _check_csrf(caller, csrf_token)
        new = service.create_user(s, name, role)
        return _secret_page(request, caller, s, user=new.user.name, role=new.user.role, password=new.password,
                            token=new.token, what="Created")
