"""Database engines and the schema version: SQLite by default (WAL, foreign keys on, every
transaction ``BEGIN IMMEDIATE`` so concurrent writers queue instead of failing), PostgreSQL by URL.

``migrate`` brings a database to the newest schema with the Alembic migrations shipped in this
package; every other command checks that the schema is current and says how to fix it if not.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from preftune.errors import PreftuneError

try:
    import fcntl
except ImportError:  # Windows: threads of one process still queue on the lock
    fcntl = None

DEFAULT_DB_FILE = "preftune-feedback.db"
MIGRATIONS = Path(__file__).parent / "migrations"


def resolve_db_url(url: str | None) -> str:
    """``--db`` value, else ``$PREFTUNE_DB``, else a SQLite file in the working directory.
    A plain path (no ``://``) means a SQLite file."""
    url = url or os.environ.get("PREFTUNE_DB") or DEFAULT_DB_FILE
    if "://" not in url:
        url = f"sqlite:///{url}"
    return url


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite would defer it to the first write).
    dbapi_connection.isolation_level = None
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=FULL")  # an acknowledged judgement survives a crash
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _sqlite_begin(conn) -> None:
    # Writers take the write lock up front: two deferred transactions that both read then write
    # would otherwise deadlock, and one would fail with "database is locked". Readers (WAL) don't.
    conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get("readonly") else "BEGIN IMMEDIATE")


class WriteLock:
    """SQLite's writers, one at a time: a thread lock for this process's threads, then (where the
    platform has ``flock``) an exclusive lock on ``DB-writelock`` beside the database for the
    other processes; waiters sleep in the kernel and are woken as soon as it is free."""

    def __init__(self, database: str | None) -> None:
        self._threads = threading.Lock()
        self._file = None
        if database is not None and fcntl is not None:
            self._file = open(f"{database}-writelock", "a+b")  # open for the engine's life

    def __enter__(self) -> None:
        self._threads.acquire()
        if self._file is not None:
            try:
                fcntl.flock(self._file, fcntl.LOCK_EX)
            except BaseException:
                self._threads.release()
                raise

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
        self._threads.release()


def make_engine(url: str | None = None, *, pool_size: int = 20) -> Engine:
    url = resolve_db_url(url)
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise PreftuneError(f"--db: not a database URL: {url!r}") from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            parent = Path(parsed.database).parent
            if not parent.exists():
                raise PreftuneError(f"--db: directory {parent} does not exist")
        engine = create_engine(parsed, connect_args={"check_same_thread": False, "timeout": 30},
                               pool_size=pool_size, max_overflow=20)
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        # Writers queue on a lock instead of in SQLite's busy handler (sleep and retry), which
        # starves some of them under load: with 50 concurrent annotators the p99 submit latency
        # fell from 5.6 s to 1.7 s (docs/benchmarks.md). The lock is shared by every process on
        # the database file, so `annotate serve --workers N` queues the same way.
        engine.write_lock = WriteLock(parsed.database if parsed.database not in (None, "", ":memory:") else None)
        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")  # psycopg 3 is the driver we ship
    try:
        return create_engine(parsed, pool_size=pool_size, max_overflow=20, pool_pre_ping=True)
    except Exception as e:  # a missing driver for an unsupported database
        raise PreftuneError(f"--db: cannot use {parsed.render_as_string()}: {e}") from None


def is_postgres(engine_or_session) -> bool:
    bind = engine_or_session.get_bind() if isinstance(engine_or_session, Session) else engine_or_session
    return bind.dialect.name == "postgresql"


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session], readonly: bool = False) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error. ``readonly`` transactions
    don't queue for SQLite's write lock."""
    lock = None if readonly else getattr(factory.kw.get("bind"), "write_lock", None)
    with lock or nullcontext(), factory() as session:
        if readonly:
            session.connection(execution_options={"readonly": True})  # begins the transaction
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


# ---------------------------------------------------------------- schema version


def _alembic_config(engine: Engine):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return cfg


def head_revision(engine: Engine) -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config(engine)).get_current_head()


def current_revision(engine: Engine) -> str | None:
    try:
        with engine.connect() as conn:
            if not inspect(conn).has_table("alembic_version"):
                return None
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except OperationalError as e:
        raise PreftuneError(f"cannot open database {engine.url.render_as_string()}: "
                            f"{str(e.orig).splitlines()[0]}") from None


def migrate(engine: Engine) -> tuple[str | None, str]:
    """Create or upgrade the schema; returns (revision before, revision after)."""
    from alembic import command

    before = current_revision(engine)
    cfg = _alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    return before, head_revision(engine)


def check_schema(engine: Engine) -> None:
    """Raise a one-line error unless the database has the newest schema."""
    current = current_revision(engine)
    if current != head_revision(engine):
        where = engine.url.render_as_string()
        state = "has no preftune schema" if current is None else f"has an old schema ({current})"
        raise PreftuneError(f"database {where} {state}: run `preftune annotate init --db {where}`")


def open_database(url: str | None = None) -> tuple[Engine, sessionmaker[Session]]:
    """An engine and session factory for a database whose schema is current."""
    engine = make_engine(url)
    check_schema(engine)
    return engine, session_factory(engine)
