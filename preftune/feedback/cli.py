"""``preftune annotate ...``: set up the feedback database, users and projects, import tasks,
serve the app, export labels and print agreement statistics.

Every command takes ``--db URL`` (default: ``$PREFTUNE_DB``, else the SQLite file
``preftune-feedback.db`` in the working directory; a plain path means a SQLite file).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import click

DB_HELP = ("Database URL (sqlite:///FILE or postgresql://USER@HOST/DB) or a SQLite file path. "
           "[default: $PREFTUNE_DB, else preftune-feedback.db]")


def db_option(func):
    return click.option("--db", "db", envvar="PREFTUNE_DB", default=None, metavar="URL", help=DB_HELP)(func)


def _open(db: str | None):
    from preftune.feedback.app.db import open_database

    return open_database(db)


# What `pip install 'preftune[feedback]'` adds (import names).
FEEDBACK_EXTRA = {"fastapi", "uvicorn", "sqlalchemy", "alembic", "jinja2", "multipart", "python_multipart", "argon2",
                  "psycopg", "markdown_it", "fastapi_offline", "starlette"}


class AnnotateGroup(click.Group):
    """The app's modules load on first use: one missing from the feedback extra ends any command
    with one line saying how to install it."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] not in FEEDBACK_EXTRA:
                raise
            from preftune.errors import PreftuneError

            raise PreftuneError(f"the feedback app needs its extra: pip install 'preftune[feedback]' ({e.name} "
                                "is missing)") from None


@click.group("annotate", cls=AnnotateGroup)
def annotate() -> None:
    """Human feedback: people rate, compare and rank responses in the browser.

    \b
    preftune annotate init                       create or migrate the database
    preftune annotate add-user alice --role annotator
    preftune annotate set-password alice         (also rotate-token, set-role, lock-user)
    preftune annotate project create demo --kind pairwise --overlap 3
    preftune annotate import demo tasks.jsonl
    preftune annotate serve                      http://127.0.0.1:8000
    preftune annotate stats demo
    preftune annotate export demo --format comparisons --out comparisons.jsonl"""


@annotate.command("init")
@db_option
def init(db: str | None) -> None:
    """Create the database schema, or migrate it to the newest version."""
    from preftune.feedback.app.db import make_engine, migrate

    engine = make_engine(db)
    before, after = migrate(engine)
    where = engine.url.render_as_string()
    if before == after:
        click.echo(f"{where}: schema is current ({after})")
    else:
        click.echo(f"{where}: schema {'created' if before is None else 'migrated from ' + before} -> {after}")


@annotate.command("add-user")
@click.argument("name")
@click.option("--role", type=click.Choice(["admin", "annotator"]), default="annotator", show_default=True,
              help="admins import, export, manage users and see statistics; annotators label.")
@click.option("--password", default=None, help="Set this password (10+ characters) instead of a generated one.")
@db_option
def add_user(name: str, role: str, password: str | None, db: str | None) -> None:
    """Create a user; prints {"user", "role", "password", "token"} as JSON (shown only once:
    the database keeps hashes)."""
    from preftune.feedback.app.db import transaction
    from preftune.feedback.app.service import create_user

    _, sessions = _open(db)
    with transaction(sessions) as s:
        new = create_user(s, name, role, password)
        out = {"user": new.user.name, "role": new.user.role, "password": new.password, "token": new.token}
    click.echo(json.dumps(out))


@annotate.command("set-password")
@click.argument("name")
@click.option("--password", default=None, help="This password (10+ characters) instead of a generated one.")
@db_option
def set_password_cmd(name: str, password: str | None, db: str | None) -> None:
    """Give a user a new password (printed once); their browser sessions end."""
    from preftune.feedback.app.db import transaction
    from preftune.feedback.app.service import set_password

    _, sessions = _open(db)
    with transaction(sessions) as s:
        new = set_password(s, name, password)
    click.echo(json.dumps({"user": name, "password": new}))


@annotate.command("rotate-token")
@click.argument("name")
@db_option
def rotate_token_cmd(name: str, db: str | None) -> None:
    """Give a user a new API token (printed once); the old one stops working."""
    from preftune.feedback.app.db import transaction
    from preftune.feedback.app.service import rotate_token

    _, sessions = _open(db)
    with transaction(sessions) as s:
        token = rotate_token(s, name)
    click.echo(json.dumps({"user": name, "token": token}))


@annotate.command("set-role")
@click.argument("name")
@click.argument("role", type=click.Choice(["admin", "annotator"]))
@db_option
def set_role_cmd(name: str, role: str, db: str | None) -> None:
    """Make a user an admin or an annotator (the last admin stays one)."""
    from preftune.feedback.app.db import transaction
    from preftune.feedback.app.service import set_role

    _, sessions = _open(db)
    with transaction(sessions) as s:
        set_role(s, name, role)
    click.echo(f"{name} is now {'an admin' if role == 'admin' else 'an annotator'}")


@annotate.command("lock-user")
@click.argument("name")
@db_option
def lock_user_cmd(name: str, db: str | None) -> None:
    """Disable a user: their sessions end and their password and token stop working (their
    judgements stay). set-password and rotate-token open the account again."""
    from preftune.feedback.app.db import transaction
    from preftune.feedback.app.service import lock_user

    _, sessions = _open(db)
    with transaction(sessions) as s:
        ended = lock_user(s, name)
    click.echo(f"{name} is locked ({ended} browser session(s) ended)")


@annotate.group("project")
def project() -> None:
    """Create and list projects."""


@project.command("create")
@click.argument("name")
@click.option("--kind", type=click.Choice(["pairwise", "ranking", "rating"]), required=True,
              help="pairwise: A/B/tie/both bad with strength; ranking: order K responses (ties allowed); "
                   "rating: one response on the scale, with flags.")
@click.option("--overlap", type=int, default=1, show_default=True, help="Distinct annotators per task.")
@click.option("--scale", type=int, default=3, show_default=True, help="Rating scale 1..S (rating projects).")
@click.option("--gold-rate", type=float, default=0.0, show_default=True,
              help="Share of assignments drawn from gold (known-answer) tasks, for quality control.")
@click.option("--lease", "lease_seconds", type=int, default=600, show_default=True,
              help="Seconds an assignment stays reserved for its annotator before it may go to someone else.")
@click.option("--guidelines", type=click.Path(exists=True, dir_okay=False),
              help="A markdown file of guidelines shown to annotators above every task.")
@db_option
def project_create(name: str, kind: str, overlap: int, scale: int, gold_rate: float, lease_seconds: int,
                   guidelines: str | None, db: str | None) -> None:
    """Create a project holding tasks of one kind."""
    from preftune.feedback.app.db import transaction
    from preftune.feedback.app.service import create_project

    _, sessions = _open(db)
    with transaction(sessions) as s:
        p = create_project(s, name, kind, overlap=overlap, scale=scale, gold_rate=gold_rate,
                           lease_seconds=lease_seconds, guidelines=_read_text(guidelines) if guidelines else "")
    click.echo(f"project {p.name}: {p.kind}, overlap {p.overlap}" + (f", scale 1-{p.scale}" if kind == "rating" else ""))


@project.command("guidelines")
@click.argument("name")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@db_option
def project_guidelines(name: str, file: str, db: str | None) -> None:
    """Replace a project's guidelines with a markdown FILE (an empty file removes them)."""
    from preftune.feedback.app.db import transaction
    from preftune.feedback.app.service import set_guidelines

    _, sessions = _open(db)
    with transaction(sessions) as s:
        p = set_guidelines(s, name, _read_text(file))
    click.echo(f"project {p.name}: guidelines of {len(p.guidelines)} characters")


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise click.ClickException(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


@project.command("list")
@db_option
def project_list(db: str | None) -> None:
    """List projects with their progress."""
    from sqlalchemy import select

    from preftune.feedback.app.db import transaction
    from preftune.feedback.app.models import Project
    from preftune.feedback.app.stats import project_stats

    _, sessions = _open(db)
    with transaction(sessions) as s:
        for p in s.scalars(select(Project).order_by(Project.name)):
            prog = project_stats(s, p)["progress"]
            click.echo(f"{p.name}\t{p.kind}\toverlap {p.overlap}\ttasks {prog['tasks']}\t"
                       f"done {prog['done']}/{prog['judgements_needed']}")


@annotate.command("import")
@click.argument("project_name", metavar="PROJECT")
@click.argument("file", type=click.Path(dir_okay=False))
@db_option
def import_(project_name: str, file: str, db: str | None) -> None:
    """Import tasks from JSONL: {"prompt", "responses": [...], "id"?, "gold"?, "meta"?} per line,
    or samples {"prompt", "response"} (grouped by prompt), or comparison records.
    All or nothing: a bad record stops the import with its file and line."""
    from pathlib import Path

    from preftune.data.records import RecordError
    from preftune.errors import DataError
    from preftune.feedback.app.db import transaction
    from preftune.feedback.app.service import Conflict, add_tasks, get_project
    from preftune.feedback.app.tasks import numbered_json_lines, parse_tasks

    _, sessions = _open(db)
    if not Path(file).is_file():
        raise DataError(file, None, "no such file")
    with open(file, "rb") as f:
        numbered = numbered_json_lines(f, file)
    with transaction(sessions) as s:
        p = get_project(s, project_name)
        try:
            parsed = parse_tasks(numbered, p.kind, p.scale)
            result = add_tasks(s, p, parsed.specs)
        except RecordError as e:
            raise DataError(file, e.line, str(e)) from None
        except Conflict as e:
            raise DataError(file, None, str(e)) from None
    extra = f" ({result.unchanged} already present)" if result.unchanged else ""
    click.echo(f"imported {result.added} tasks into {p.name}{extra}{parsed.note()}")


@annotate.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=int, default=8000, show_default=True, help="Port to listen on.")
@click.option("--secure-cookies/--no-secure-cookies", default=False, show_default=True,
              help="Mark cookies Secure (when served behind HTTPS).")
@click.option("--trusted-proxy", "trusted_proxies", multiple=True, metavar="IP",
              help="A reverse proxy whose X-Forwarded-For / X-Forwarded-Proto headers are believed (repeatable). "
                   "Without one these headers are ignored, so no client can pick the address the log-in limit "
                   "counts against.")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Server processes, to use several cores. On SQLite the writers of every process still "
                   "take turns (one lock beside the database file), so a second worker gains less there. The "
                   "log-in rate limit counts per process.")
@db_option
def serve(host: str, port: int, secure_cookies: bool, trusted_proxies: tuple[str, ...], workers: int,
          db: str | None) -> None:
    """Serve the annotation app and the JSON API (docs at /api/v1/docs)."""
    import os

    import uvicorn

    from preftune.feedback.app import Settings, create_app
    from preftune.feedback.app.db import resolve_db_url

    options = dict(host=host, port=port, log_level="warning", proxy_headers=bool(trusted_proxies),
                   forwarded_allow_ips=",".join(trusted_proxies) or None)
    app = create_app(db, Settings(secure_cookies=secure_cookies))  # checks the database before serving
    click.echo(f"preftune feedback on http://{host}:{port} with {workers} worker(s)  (API docs: /api/v1/docs; "
               "Ctrl+C stops)", err=True)
    if workers == 1:
        uvicorn.run(app, **options)
        return
    app.state.engine.dispose()  # each worker process opens its own
    os.environ.update(PREFTUNE_DB=resolve_db_url(db), PREFTUNE_SECURE_COOKIES="1" if secure_cookies else "")
    uvicorn.run("preftune.feedback.app:app_from_env", factory=True, workers=workers, **options)


@annotate.command("export")
@click.argument("project_name", metavar="PROJECT")
@click.option("--format", "fmt", type=click.Choice(["comparisons", "trl", "raw", "ratings"]),
              default="comparisons", show_default=True,
              help="comparisons: chosen/rejected JSONL for `preftune reward`; trl: the same comparisons in TRL's "
                   "conversational format (prompt/chosen/rejected message lists, margin), which TRL's trainers "
                   "read with our meaning; raw: every judgement; ratings: rating records.")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Output JSONL file ('-' for stdout).")
@click.option("--include-ties", is_flag=True, help="comparisons: also write ties (strength 0, \"tie\": true).")
@db_option
def export(project_name: str, fmt: str, out: str, include_ties: bool, db: str | None) -> None:
    """Export labels in the JSONL formats every preftune stage reads."""
    from preftune.data.jsonl import write_jsonl
    from preftune.feedback.app.db import transaction
    from preftune.feedback.app.export import export_rows
    from preftune.feedback.app.service import get_project

    _, sessions = _open(db)
    counts: Counter = Counter()
    with transaction(sessions) as s:
        p = get_project(s, project_name)
        rows = export_rows(s, p, fmt, counts, include_ties)
        if out == "-":
            n = 0
            for row in rows:
                sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
        else:
            n = write_jsonl(out, rows)
    left_out = {k: v for k, v in counts.items() if k.endswith("excluded")}
    note = ("; left out: " + ", ".join(f"{v} {k.removesuffix('_excluded').replace('_', ' ')}"
                                        for k, v in sorted(left_out.items()))) if left_out else ""
    click.echo(f"wrote {n} {fmt} records to {out}{note}", err=True)


@annotate.command("stats")
@click.argument("project_name", metavar="PROJECT")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as JSON.")
@db_option
def stats(project_name: str, as_json: bool, db: str | None) -> None:
    """Progress, per-annotator gold accuracy, agreement (percent, Cohen's and Fleiss' kappa,
    Krippendorff's alpha) and position bias."""
    from preftune.feedback.app.db import transaction
    from preftune.feedback.app.service import get_project
    from preftune.feedback.app.stats import format_stats, project_stats

    _, sessions = _open(db)
    with transaction(sessions) as s:
        result = project_stats(s, get_project(s, project_name))
    click.echo(json.dumps(result, indent=2) if as_json else format_stats(result))
