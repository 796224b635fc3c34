"""What the app does, as functions on a database session: users, projects, task import,
assignment with leases and overlap, idempotent judgements. The web API, the pages and the CLI
are thin layers over these; each call runs inside the caller's transaction.

Concurrency: handing out a task, a late judgement (on an expired lease) and taking a skip back
first lock the project row (``SELECT ... FOR NO KEY UPDATE`` on PostgreSQL; SQLite transactions
already start with ``BEGIN IMMEDIATE``), so two annotators asking at once cannot both take the last
slot. A judgement on a live lease fills the slot its lease holds and locks only its assignment.
Each task counts the judgements it still needs (``Task.needed``) and each project its open tasks,
so finding the next task reads an index in order instead of counting over the project.
"""

from __future__ import annotations

import random
import unicodedata
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, bindparam, exists, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased
from sqlalchemy.orm.attributes import set_committed_value

from preftune.data.records import RATING_FLAGS
from preftune.errors import PreftuneError
from preftune.feedback.app.db import is_postgres
from preftune.feedback.app.markdown import render_markdown
from preftune.feedback.app.models import (
    Assignment,
    Judgement,
    JudgementRevision,
    Project,
    Task,
    User,
    WebSession,
    utcnow,
)
from preftune.feedback.app.security import hash_password, new_secret, token_hash, verify_password
from preftune.feedback.app.tasks import KINDS, Limits, TaskSpec, ranking_groups, unstorable

ROLES = ("admin", "annotator")
CHOICES = ("A", "B", "tie", "both_bad")
STRENGTHS = (1, 2, 3, 4)  # slightly, somewhat, clearly, much better
MAX_LEASE_SECONDS = 7 * 24 * 3600  # a week: longer leases only keep tasks from other annotators
MAX_ID = 2 ** 31 - 1  # ids are 32-bit integers in PostgreSQL; a larger one names nothing
CLOCK_SKEW = timedelta(seconds=60)  # how far the clocks of the app's hosts may disagree
MAX_GUIDELINES = 100_000  # characters of markdown


class FeedbackError(PreftuneError):
    """An error with the HTTP status the API answers it with."""

    status = 400


class NotFound(FeedbackError):
    status = 404


class Conflict(FeedbackError):
    status = 409


class Invalid(FeedbackError):
    status = 422


# ---------------------------------------------------------------- users and projects


@dataclass
class NewUser:
    user: User
    password: str
    token: str


CONFUSABLE_SCRIPTS = ("LATIN", "CYRILLIC", "GREEK")  # letters that look alike across these three


def normal_name(raw: str) -> str:
    """A name as stored and looked up: NFKC-normalised, stripped."""
    return unicodedata.normalize("NFKC", raw).strip()


def clean_name(raw: str, what: str) -> str:
    """A user or project name as stored and looked up: NFKC-normalised and stripped. Refused:
    empty or over 100 characters, control and invisible characters (NUL, newline, zero-width
    space, right-to-left override), a name of dots only (unreachable as a URL segment), '/', and
    letters of more than one of Latin, Cyrillic and Greek (a Cyrillic "о" in "bоss")."""
    name = normal_name(raw)
    if not name or len(name) > 100:
        raise Invalid(f"{what} must be 1 to 100 characters")
    hidden = next((c for c in name if unicodedata.category(c)[0] == "C" or unicodedata.category(c) in ("Zl", "Zp")),
                  None)
    if hidden is not None:
        raise Invalid(f"{what} must not contain control or invisible characters (U+{ord(hidden):04X})")
    if "/" in name or set(name) == {"."}:
        raise Invalid(f"{what} must not contain '/' or be made of dots only (it is part of URLs)")
    scripts = {unicodedata.name(c, "").split(" ")[0] for c in name if c.isalpha()} & set(CONFUSABLE_SCRIPTS)
    if len(scripts) > 1:
        raise Invalid(f"{what} mixes {' and '.join(sorted(s.title() for s in scripts))} letters, which look alike")
    return name


def create_user(session: Session, name: str, role: str, password: str | None = None) -> NewUser:
    if role not in ROLES:
        raise Invalid(f"role must be one of {', '.join(ROLES)}")
    name = clean_name(name, "user name")
    if session.scalar(select(User.id).where(User.name == name)) is not None:
        raise Conflict(f"user {name!r} already exists")
    password = checked_password(password, name) if password is not None else new_secret(12)
    token = new_secret(32)
    user = User(name=name, role=role, password_hash=hash_password(password), token_hash=token_hash(token))
    session.add(user)
    session.flush()
    return NewUser(user, password, token)


MIN_PASSWORD_CHARS = 10


def checked_password(password: str, name: str) -> str:
    """A password people choose: at least 10 characters, not the user name, not one character repeated."""
    if len(password) < MIN_PASSWORD_CHARS:
        raise Invalid(f"a password needs at least {MIN_PASSWORD_CHARS} characters (leave it out to get a "
                      f"generated one)")
    if password.strip().lower() == name.lower() or len(set(password)) < 3:
        raise Invalid("that password is too easy to guess (the user name, or one or two characters repeated)")
    return password


def get_user(session: Session, name: str) -> User:
    user = None if unstorable(name) else session.scalar(select(User).where(User.name == normal_name(name)))
    if user is None:
        raise NotFound(f"no user named {name!r}")
    return user


def end_sessions(session: Session, user: User) -> int:
    """Log the user out everywhere; returns how many browser sessions ended."""
    rows = session.scalars(select(WebSession).where(WebSession.user_id == user.id)).all()
    for row in rows:
        session.delete(row)
    return len(rows)


def set_password(session: Session, name: str, password: str | None = None) -> str:
    """A new password (``password``, or a generated one, returned); the user's browser sessions end."""
    user = get_user(session, name)
    password = checked_password(password, user.name) if password is not None else new_secret(12)
    user.password_hash = hash_password(password)
    end_sessions(session, user)
    return password


def change_own_password(session: Session, user: User, current: str, new: str, keep: WebSession | None) -> None:
    """A user's own change: the current password is needed; their other browser sessions end."""
    if not verify_password(user.password_hash, current):
        raise Invalid("the current password is wrong")
    user.password_hash = hash_password(checked_password(new, user.name))
    for row in session.scalars(select(WebSession).where(WebSession.user_id == user.id)).all():
        if keep is None or row.id != keep.id:
            session.delete(row)


def rotate_token(session: Session, name: str) -> str:
    """A new API token (returned); the old one stops working at once."""
    user = get_user(session, name)
    token = new_secret(32)
    user.token_hash = token_hash(token)
    return token


def set_role(session: Session, name: str, role: str) -> User:
    if role not in ROLES:
        raise Invalid(f"role must be one of {', '.join(ROLES)}")
    user = get_user(session, name)
    if user.role == "admin" and role != "admin" and session.scalar(
            select(func.count(User.id)).where(User.role == "admin")) == 1:
        raise Conflict(f"{user.name} is the only admin: make another admin first")
    user.role = role
    return user


def lock_user(session: Session, name: str) -> int:
    """Disable an account: its sessions end and its password and token are replaced by secrets
    nobody knows (its judgements stay). ``set-password`` and ``rotate-token`` open it again."""
    user = get_user(session, name)
    user.password_hash = hash_password(new_secret(24))
    user.token_hash = token_hash(new_secret(32))
    return end_sessions(session, user)


def create_project(session: Session, name: str, kind: str, *, overlap: int = 1, scale: int = 3,
                   gold_rate: float = 0.0, lease_seconds: int = 600, guidelines: str = "") -> Project:
    name = clean_name(name, "project name")
    if kind not in KINDS:
        raise Invalid(f"kind must be one of {', '.join(KINDS)}")
    if not 1 <= overlap <= 100:
        raise Invalid("overlap must be between 1 and 100")
    if not 2 <= scale <= 10:
        raise Invalid("scale must be between 2 and 10")
    if not 0.0 <= gold_rate < 1.0:
        raise Invalid("gold rate must be at least 0 and below 1")
    if not 10 <= lease_seconds <= MAX_LEASE_SECONDS:
        raise Invalid(f"lease must be between 10 and {MAX_LEASE_SECONDS} seconds (a week)")
    if session.scalar(select(Project.id).where(Project.name == name)) is not None:
        raise Conflict(f"project {name!r} already exists")
    project = Project(name=name, kind=kind, overlap=overlap, scale=scale, gold_rate=gold_rate,
                      lease_seconds=lease_seconds, guidelines=checked_guidelines(guidelines))
    session.add(project)
    session.flush()
    return project


def checked_guidelines(text: str) -> str:
    if len(text) > MAX_GUIDELINES:
        raise Invalid(f"guidelines are {len(text)} characters; at most {MAX_GUIDELINES} are kept")
    if problem := unstorable(text):
        raise Invalid(f"guidelines contain {problem}")
    return text.replace("\r\n", "\n")


def set_guidelines(session: Session, name: str, text: str) -> Project:
    """Replace a project's guidelines (markdown; annotators see them from their next page)."""
    project = get_project(session, name)
    project.guidelines = checked_guidelines(text)
    session.flush()
    return project


def get_project(session: Session, name: str) -> Project:
    name = normal_name(name)
    project = None if unstorable(name) else session.scalar(PROJECT_BY_NAME, {"name": name})
    if project is None:
        raise NotFound(f"no project named {name!r}")
    return project


@dataclass
class ImportResult:
    added: int
    unchanged: int  # already present with the same content (re-imports are harmless)


def add_tasks(session: Session, project: Project, specs: list[TaskSpec]) -> ImportResult:
    """Add tasks; an id already in the project is skipped when its content is the same and an
    error (naming the line) when it differs. Nothing is written if any record is rejected."""
    existing = {t.ext_id: t for t in session.scalars(
        select(Task).where(Task.project_id == project.id, Task.ext_id.in_([s.ext_id for s in specs])))}
    added = unchanged = regular = 0
    for spec in specs:
        old = existing.get(spec.ext_id)
        if old is not None:
            if (old.prompt, old.responses, old.gold) != (spec.prompt, spec.responses, spec.gold):
                raise Conflict(f"line {spec.line}: task id {spec.ext_id!r} already exists in project "
                               f"{project.name!r} with different content")
            unchanged += 1
            continue
        session.add(Task(project_id=project.id, ext_id=spec.ext_id, prompt=spec.prompt, responses=spec.responses,
                         is_gold=spec.is_gold, gold=spec.gold, meta=spec.meta,
                         needed=0 if spec.is_gold else project.overlap))
        added += 1
        regular += not spec.is_gold
    session.flush()
    _count_open(session, project, regular)
    return ImportResult(added, unchanged)


def _count_open(session: Session, project: Project, change: int) -> None:
    """``project.open_tasks += change``, in SQL so that concurrent writers never lose an update."""
    if change:
        session.execute(OPEN_TASKS_CHANGE, {"project_id": project.id, "change": change},
                        execution_options={"synchronize_session": False})
        session.expire(project, ["open_tasks"])


# ---------------------------------------------------------------- assignment


def _live(now):
    """Leases not yet expired."""
    return and_(Assignment.status == "leased", Assignment.expires_at > now)


def _active(now):
    """Assignments that hold a slot of their task: done, or a live lease."""
    return or_(Assignment.status == "done", _live(now))


def _unseen(user_id, now):
    """Tasks this user has never been given (an expired lease of theirs may be renewed)."""
    return ~exists().where(Assignment.task_id == Task.id, Assignment.user_id == user_id,
                           ~and_(Assignment.status == "leased", Assignment.expires_at <= now))


def _queue(project_id, user_id, now):
    """Regular tasks this user may take, closest to complete first: read along the queue index
    (project, regular, needed, id), so the cost does not grow with the project. A task has room
    while its live leases are fewer than the judgements it still needs."""
    leased = (select(func.count(Assignment.id)).where(Assignment.task_id == Task.id, _live(now))
              .correlate(Task).scalar_subquery())
    return (select(Task).where(Task.project_id == project_id, Task.is_gold.is_(False), Task.needed > 0,
                               _unseen(user_id, now), leased < Task.needed)
            .order_by(Task.needed, Task.id))


_OWN = aliased(Assignment)


def _with_own_lease(query, user_id):
    """The query's tasks, each with the user's own expired lease on it if they had one (renewed
    rather than duplicated), in the same read."""
    return query.add_columns(_OWN).outerjoin(_OWN, and_(_OWN.task_id == Task.id, _OWN.user_id == user_id))


# The statements every judgement runs, built once with bound parameters: on SQLite, building a
# statement costs more than running it.
_PROJECT, _USER, _NOW = bindparam("project_id"), bindparam("user_id"), bindparam("now")
NEXT_TASK = _with_own_lease(_queue(_PROJECT, _USER, _NOW), _USER).limit(1)
CURRENT_LEASE = (select(Assignment, Task).join(Task, Assignment.task_id == Task.id)
                 .where(Assignment.project_id == _PROJECT, Assignment.user_id == _USER, _live(_NOW))
                 .order_by(Assignment.id).limit(1))
PROGRESS = (select(func.count(Assignment.id).filter(Assignment.status == "done"),
                   func.count(Assignment.id).filter(Assignment.status.in_(("done", "skipped")),
                                                    Task.is_gold.is_(False), Task.needed > 0))
            .join(Task, Assignment.task_id == Task.id)
            .where(Assignment.project_id == _PROJECT, Assignment.user_id == _USER))
PROJECT_BY_NAME = select(Project).where(Project.name == bindparam("name"))
# Row locks are FOR NO KEY UPDATE: the foreign-key checks of inserts that merely reference the row
# (assignments, judgements) take KEY SHARE, which does not wait for it. All of them are no-ops on
# SQLite, whose writers hold the database's write lock already.
#
# A lease claims its task row, skipping rows other leases hold, so annotators asking at once take
# different tasks instead of queueing on one lock. Every change to a task's slots (lease, unskip,
# late submit) holds the task's row, and each one's caller's user row first: one request at a time
# per annotator (one live lease each, however many tabs), and one lock order: user, then a single
# task (a lease's pass that finds its task full lets go of it before the next), so they cannot deadlock.
NEXT_TASK_CLAIMED = NEXT_TASK.with_for_update(of=Task, key_share=True, skip_locked=True)
NEXT_TASK_WAITING = NEXT_TASK.with_for_update(of=Task, key_share=True)
TASK_LOCKED = select(Task.id).where(Task.id == bindparam("task_id")).with_for_update(key_share=True)
USER_LOCKED = select(User.id).where(User.id == _USER).with_for_update(key_share=True)
OTHERS_LIVE_LEASES = select(func.count(Assignment.id)).where(
    Assignment.task_id == bindparam("task_id"), Assignment.user_id != _USER, _live(_NOW))
OTHERS_ACTIVE = select(func.count(Assignment.id)).where(
    Assignment.task_id == bindparam("task_id"), Assignment.id != bindparam("assignment_id"), _active(_NOW))
ASSIGNMENT_WITH_TASK = (select(Assignment, Task, Project).join(Task, Assignment.task_id == Task.id)
                        .join(Project, Assignment.project_id == Project.id)
                        .where(Assignment.id == bindparam("assignment_id")))
ASSIGNMENT_WITH_TASK_LOCKED = ASSIGNMENT_WITH_TASK.with_for_update(of=Assignment, key_share=True)
JUDGEMENT_BY_KEY = select(Judgement).where(Judgement.user_id == _USER, Judgement.client_key == bindparam("key"))
OPEN_TASKS_CHANGE = (update(Project).where(Project.id == _PROJECT)
                     .values(open_tasks=Project.open_tasks + bindparam("change")))
ONE_FEWER_NEEDED = (update(Task).where(Task.id == bindparam("task_id")).values(needed=Task.needed - 1)
                    .returning(Task.needed))


def progress(session: Session, project: Project, user: User) -> dict[str, int]:
    """What the annotator's progress line shows, in one indexed read: judged so far, and the regular
    tasks still open that they have not judged or skipped (the one they hold and those they may be
    given; some of these may be leased to others right now)."""
    done, closed = session.execute(PROGRESS, {"project_id": project.id, "user_id": user.id}).one()
    return {"done": done, "remaining": max(0, project.open_tasks - closed)}


def remaining_for(session: Session, project: Project, user: User) -> int:
    return progress(session, project, user)["remaining"]


def next_assignment(session: Session, name: str, user: User,
                    rng: random.Random | None = None) -> tuple[Project, Assignment | None, Task | None]:
    """Project ``name``, the user's current lease in it (else a new one on the queue's first task
    with room for them) and its task; (project, None, None) when nothing is left. Gold tasks are
    mixed in at ``project.gold_rate`` while regular work remains. The task is claimed under its row
    lock, so two annotators asking at once never both take its last slot."""
    rng = rng or random.Random()
    project = get_project(session, name)
    _hold_user(session, user)
    return project, *_lease(session, project, user, rng)


def _hold_user(session: Session, user: User) -> None:
    """This user's requests that change slots, one at a time (SQLite's writers are already)."""
    if is_postgres(session):
        session.execute(USER_LOCKED, {"user_id": user.id})


def _claim(session: Session, project: Project, user: User, now) -> tuple[Task, Assignment | None] | None:
    """The queue's first task with room for the user, its row locked, with their own expired lease on
    it if any. On PostgreSQL rows held by other leases are skipped, and waited for only when every
    task with room is held (the end of a project: their other slots are still free). The room is
    counted again once the lock is held: the claim read the slots as they were when it started,
    and a lease that committed meanwhile (and released the row) is seen only by a later statement."""
    params = {"project_id": project.id, "user_id": user.id, "now": now}
    if not is_postgres(session):  # one writer at a time: what the read sees stays true
        return session.execute(NEXT_TASK, params).first()
    for _ in range(100):  # each pass reads newer state, and a miss means another lease committed
        # Each pass in a savepoint, so that a task found full is let go of at once: a lease that kept
        # it locked while waiting for the next task deadlocked with a lease doing the same the other way.
        attempt = session.begin_nested()
        row = (session.execute(NEXT_TASK_CLAIMED, params).first()
               or session.execute(NEXT_TASK_WAITING, params).first())
        if row is None or session.scalar(OTHERS_LIVE_LEASES, {**params, "task_id": row[0].id}) < row[0].needed:
            attempt.commit()
            return row
        attempt.rollback()  # (releases the row lock taken in this pass)
    raise Conflict("the queue is too busy right now: ask again")


def _lease(session: Session, project: Project, user: User,
           rng: random.Random) -> tuple[Assignment, Task] | tuple[None, None]:
    # (The task goes back with its assignment: the session holds loaded objects weakly, so reading
    # it again later in the request would be another query.)
    now = utcnow()
    current = session.execute(CURRENT_LEASE, {"project_id": project.id, "user_id": user.id, "now": now}).first()
    if current is not None:  # e.g. a reload, or two tabs asking at once
        return current[0], current[1]
    row = _claim(session, project, user, now)
    if row is None:
        return None, None
    task, stale = row
    if project.gold_rate > 0 and rng.random() < project.gold_rate:
        golds = select(Task).where(Task.project_id == project.id, Task.is_gold.is_(True), _unseen(user.id, now))
        gold = session.execute(_with_own_lease(golds, user.id).order_by(func.random()).limit(1)).first()
        task, stale = gold or (task, stale)
    order = list(range(len(task.responses)))
    rng.shuffle(order)  # recorded, so position bias can be measured
    expires = now + timedelta(seconds=project.lease_seconds)
    if stale is not None:  # this user's own expired lease: renew it
        stale.shown_order, stale.leased_at, stale.expires_at = order, now, expires
        session.flush()
        return stale, task
    assignment = Assignment(task_id=task.id, user_id=user.id, project_id=project.id, shown_order=order,
                            status="leased", leased_at=now, expires_at=expires)
    session.add(assignment)
    session.flush()
    return assignment, task


def own_assignment(session: Session, assignment_id: int, user: User, *,
                   lock: bool = False) -> tuple[Assignment, Task, Project]:
    """The user's assignment with its task and project; ``lock``: hold the assignment's row for this
    transaction (read in the same statement, so its state is the one the lock protects)."""
    if not 1 <= assignment_id <= MAX_ID:
        raise NotFound(f"no assignment {assignment_id} for you")
    row = session.execute(ASSIGNMENT_WITH_TASK_LOCKED if lock else ASSIGNMENT_WITH_TASK,
                          {"assignment_id": assignment_id}).first()
    # Someone else's assignment looks exactly like a missing one.
    if row is None or row[0].user_id != user.id:
        raise NotFound(f"no assignment {assignment_id} for you")
    return row[0], row[1], row[2]


def skip_assignment(session: Session, assignment_id: int, user: User) -> None:
    # Under the user's and the assignment's locks, as a submit: a skip racing a submit of the same
    # assignment sees it judged instead of marking a judged assignment skipped.
    _hold_user(session, user)
    assignment, _, _ = own_assignment(session, assignment_id, user, lock=True)
    if assignment.status == "done":
        raise Conflict("this assignment is already judged")
    assignment.status = "skipped"
    session.flush()


def unskip_assignment(session: Session, assignment_id: int, user: User) -> tuple[Assignment, Task, Project]:
    """Take a skip back: the task is leased to the user again, unless other annotators have filled
    its slots meanwhile (409). The task handed out after the skip goes back to the pool."""
    _hold_user(session, user)
    assignment, task, project = own_assignment(session, assignment_id, user)
    session.execute(TASK_LOCKED, {"task_id": task.id})
    session.refresh(assignment)
    if assignment.status != "skipped":
        raise Conflict("this assignment was not skipped")
    now = utcnow()
    if not task.is_gold:
        taken = session.scalar(select(func.count(Assignment.id)).where(
            Assignment.task_id == task.id, Assignment.id != assignment.id, _active(now)))
        if taken >= project.overlap:
            raise Conflict("this task has gone to other annotators since it was skipped")
    for other in session.scalars(select(Assignment).where(  # unjudged, so nothing is lost
            Assignment.project_id == project.id, Assignment.user_id == user.id, Assignment.status == "leased",
            Assignment.id != assignment.id)):
        session.delete(other)
    assignment.status, assignment.leased_at = "leased", now
    assignment.expires_at = now + timedelta(seconds=project.lease_seconds)
    session.flush()
    return assignment, task, project


# ---------------------------------------------------------------- judgements


def _validate(kind: str, scale: int, order: list[int], body: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """The judgement fields in canonical form (indices of ``task.responses``), or ``Invalid``."""
    out: dict[str, Any] = {}
    allowed = {"pairwise": {"choice", "strength", "rationale"}, "ranking": {"ranking", "rationale"},
               "rating": {"rating", "flags", "rationale"}}[kind]
    given = {k for k, v in body.items() if v is not None and k != "client_key"}
    if given - allowed:
        raise Invalid(f"{', '.join(sorted(given - allowed))} not allowed for a {kind} task "
                      f"(expected {', '.join(sorted(allowed))})")
    rationale = body.get("rationale")
    if rationale is not None:
        if not isinstance(rationale, str):
            raise Invalid("rationale must be a string")
        if len(rationale) > limits.max_text_chars:
            raise Invalid(f"rationale is longer than {limits.max_text_chars} characters")
        if problem := unstorable(rationale):
            raise Invalid(f"rationale contains {problem}")
        out["rationale"] = rationale or None
    if kind == "pairwise":
        choice = body.get("choice")
        if choice not in CHOICES:
            raise Invalid(f"choice must be one of {', '.join(CHOICES)}")
        strength = body.get("strength")
        if strength is not None and (isinstance(strength, bool) or strength not in STRENGTHS):
            raise Invalid("strength must be 1, 2, 3 or 4")
        if choice in ("tie", "both_bad") and strength is not None:  # refused, never silently dropped
            raise Invalid(f"strength says how much better A or B is; a {choice.replace('_', ' ')} has none")
        label = str(order[0 if choice == "A" else 1]) if choice in ("A", "B") else choice
        out.update(choice=choice, label=label, strength=strength)
    elif kind == "ranking":
        try:
            shown = ranking_groups(body.get("ranking"), len(order))
        except Exception as e:
            raise Invalid(str(e).replace('"', "")) from None
        out["ranking"] = [sorted(order[i] for i in g) for g in shown]
    else:
        rating = body.get("rating")
        if isinstance(rating, bool) or not isinstance(rating, int) or not 1 <= rating <= scale:
            raise Invalid(f"rating must be an integer from 1 to {scale}")
        flags = body.get("flags") or []
        if not isinstance(flags, list) or any(f not in RATING_FLAGS for f in flags):
            raise Invalid(f"flags must be a list of: {', '.join(RATING_FLAGS)}")
        out.update(rating=rating, flags=sorted(set(flags)))
    return out


def grade(kind: str, gold: Any, fields: dict[str, Any]) -> bool:
    """Does a judgement match the known answer? Rankings: the same best group."""
    if kind == "pairwise":
        return fields["label"] == gold
    if kind == "ranking":
        return sorted(fields["ranking"][0]) == sorted(gold[0])
    return fields["rating"] == gold


def _by_client_key(session: Session, user: User, client_key: str, assignment: Assignment) -> Judgement | None:
    previous = session.scalar(JUDGEMENT_BY_KEY, {"user_id": user.id, "key": client_key})
    if previous is not None and previous.assignment_id != assignment.id:
        raise Conflict("client_key was already used for another assignment")
    return previous


def submit_judgement(session: Session, assignment_id: int, user: User, body: dict[str, Any],
                     limits: Limits = Limits()) -> tuple[Judgement, Assignment, Project, bool]:
    """Store a judgement; returns (judgement, its assignment, their project, created). The same ``client_key``
    again returns the stored judgement unchanged, so a retried submit never creates a duplicate.

    Locks the user's and the assignment's rows, not the project's. A judgement on a lease with more
    than ``CLOCK_SKEW`` left fills the slot its lease holds; a later one (its lease expired, or
    about to, by some host's clock) also holds the task's row and counts the other slots, so a task
    never goes over its overlap when the slot went to someone else meanwhile."""
    client_key = body.get("client_key")
    if client_key is not None and (not isinstance(client_key, str) or not 1 <= len(client_key) <= 100
                                   or unstorable(client_key)):
        raise Invalid("client_key must be a string of 1 to 100 characters (no NUL, no lone surrogate)")
    _hold_user(session, user)
    assignment, task, project = own_assignment(session, assignment_id, user, lock=True)
    if client_key is not None:  # (after the lock: a retry racing its first attempt finds its judgement)
        previous = _by_client_key(session, user, client_key, assignment)
        if previous is not None:
            return previous, assignment, project, False
    if assignment.status == "done":
        raise Conflict("this assignment is already judged")
    if assignment.status == "skipped":
        raise Conflict("this assignment was skipped")
    now = utcnow()
    if not task.is_gold and assignment.expires_at - now <= CLOCK_SKEW:
        # The slot this judgement fills must still be free. A live lease holds one, but near its
        # end a lease claimed meanwhile may have read it as expired by a clock a little ahead
        # (another request, another app host), so such a submit holds the task's row and counts.
        session.execute(TASK_LOCKED, {"task_id": task.id})
        others = session.scalar(OTHERS_ACTIVE, {"task_id": task.id, "assignment_id": assignment.id, "now": now})
        if others >= project.overlap:
            raise Conflict("this assignment expired and the task was given to someone else")
    fields = _validate(project.kind, project.scale, assignment.shown_order, body, limits)
    judgement = Judgement(assignment_id=assignment.id, task_id=task.id, user_id=user.id, project_id=project.id,
                          client_key=client_key or new_secret(12), created_at=now,
                          seconds=(now - assignment.leased_at).total_seconds(),
                          gold_correct=grade(project.kind, task.gold, fields) if task.is_gold else None, **fields)
    assignment.status, assignment.done_at = "done", now
    session.add(judgement)
    try:
        session.flush()  # (no savepoint: the Conflict rolls the whole transaction back)
    except IntegrityError:
        raise Conflict("this assignment is already judged") from None
    if not task.is_gold:  # one judgement fewer needed; the task leaves the queue at zero
        needed = session.scalar(ONE_FEWER_NEEDED, {"task_id": task.id},
                                execution_options={"synchronize_session": False})
        set_committed_value(task, "needed", needed)
        if needed == 0:
            _count_open(session, project, -1)
    return judgement, assignment, project, True


ANSWER_FIELDS = ("choice", "label", "strength", "ranking", "rating", "flags", "rationale")


def own_judgement(session: Session, judgement_id: int, user: User) -> tuple[Judgement, Assignment, Task, Project]:
    if not 1 <= judgement_id <= MAX_ID:
        raise NotFound(f"no judgement {judgement_id} of yours")
    row = session.execute(select(Judgement, Assignment, Task, Project)
                          .join(Assignment, Judgement.assignment_id == Assignment.id)
                          .join(Task, Judgement.task_id == Task.id).join(Project, Judgement.project_id == Project.id)
                          .where(Judgement.id == judgement_id)).first()
    if row is None or row[0].user_id != user.id:  # someone else's looks exactly like a missing one
        raise NotFound(f"no judgement {judgement_id} of yours")
    return row[0], row[1], row[2], row[3]


def revise_judgement(session: Session, judgement_id: int, user: User, body: dict[str, Any],
                     limits: Limits = Limits()) -> tuple[Judgement, Assignment]:
    """Change one's own judgement. Exports use the latest answer; each earlier one is kept as a
    revision (an unchanged answer adds none)."""
    _hold_user(session, user)  # two revisions at once: the second records the first's answer as previous
    judgement, assignment, task, project = own_judgement(session, judgement_id, user)
    validated = _validate(project.kind, project.scale, assignment.shown_order, body, limits)
    answer = {k: validated.get(k) for k in ANSWER_FIELDS}
    previous = {k: getattr(judgement, k) for k in ANSWER_FIELDS}
    if answer != previous:
        now = utcnow()
        session.add(JudgementRevision(judgement_id=judgement.id, previous=previous, revised_at=now))
        for k, v in answer.items():
            setattr(judgement, k, v)
        judgement.gold_correct = grade(project.kind, task.gold, answer) if task.is_gold else None
        judgement.revised_at = now
        session.flush()
    return judgement, assignment


def recent_judgements(session: Session, project: Project, user: User,
                      limit: int = 20) -> list[tuple[Judgement, Assignment, Task]]:
    """The user's latest judgements in the project, newest first."""
    return [tuple(row) for row in session.execute(
        select(Judgement, Assignment, Task).join(Assignment, Judgement.assignment_id == Assignment.id)
        .join(Task, Judgement.task_id == Task.id)
        .where(Judgement.project_id == project.id, Judgement.user_id == user.id)
        .order_by(Judgement.id.desc()).limit(limit))]


def revision_count(session: Session, judgement: Judgement) -> int:
    return session.scalar(select(func.count(JudgementRevision.id))
                          .where(JudgementRevision.judgement_id == judgement.id)) or 0


# ---------------------------------------------------------------- JSON views


def assignment_json(assignment: Assignment, task: Task, project: Project, html: bool = False) -> dict[str, Any]:
    """What the annotator sees: responses in the order shown to them ("A" is the first); with
    ``html``, also the messages and responses rendered from markdown (safe HTML)."""
    responses = [task.responses[i] for i in assignment.shown_order]
    body = {"assignment_id": assignment.id, "task_id": task.ext_id, "kind": project.kind,
            "project": project.name, "prompt": task.prompt[-1]["content"] if len(task.prompt) == 1 else task.prompt,
            "messages": task.prompt, "responses": responses,
            "scale": project.scale if project.kind == "rating" else None,
            "expires_at": assignment.expires_at.isoformat() + "Z",
            "seconds_left": max(0, int((assignment.expires_at - utcnow()).total_seconds()))}
    if html:
        body["html"] = {"messages": [str(render_markdown(m["content"])) for m in task.prompt],
                        "responses": [str(render_markdown(r)) for r in responses]}
    return body


def judgement_json(j: Judgement, assignment: Assignment) -> dict[str, Any]:
    """The annotator's own judgement, in the terms they submitted it (shown positions)."""
    where = {idx: pos for pos, idx in enumerate(assignment.shown_order)}
    ranking = None if j.ranking is None else [sorted(where[i] for i in g) for g in j.ranking]
    return {"judgement_id": j.id, "assignment_id": j.assignment_id, "client_key": j.client_key,
            "choice": j.choice, "strength": j.strength, "ranking": ranking, "rating": j.rating,
            "flags": j.flags, "rationale": j.rationale, "created_at": j.created_at.isoformat() + "Z",
            "revised_at": None if j.revised_at is None else j.revised_at.isoformat() + "Z"}
