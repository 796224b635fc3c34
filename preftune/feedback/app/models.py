"""The database schema (SQLAlchemy 2 ORM). Alembic migrations in ``migrations/`` create it.

Who judged what is kept as assignments (a task leased to one annotator, with the order in which
its responses were shown) and judgements (what the annotator answered, in the task's own
response order so that exports need no bookkeeping; answers they changed later keep their
earlier versions as revisions).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    """Naive UTC: SQLite keeps no time zones, so every timestamp is stored as naive UTC."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    role: Mapped[str] = mapped_column(String(20))  # "admin" | "annotator"
    password_hash: Mapped[str] = mapped_column(String(200))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of the API token
    created_at: Mapped[datetime] = mapped_column(DateTime(), default=utcnow)


class WebSession(Base):
    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of the cookie value
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[datetime] = mapped_column(DateTime())


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    kind: Mapped[str] = mapped_column(String(20))  # "pairwise" | "ranking" | "rating"
    overlap: Mapped[int] = mapped_column(Integer, default=1)
    scale: Mapped[int] = mapped_column(Integer, default=3)
    gold_rate: Mapped[float] = mapped_column(Float, default=0.0)
    lease_seconds: Mapped[int] = mapped_column(Integer, default=600)
    guidelines: Mapped[str] = mapped_column(Text, default="", server_default="")  # markdown, shown to annotators
    open_tasks: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # regular tasks with needed > 0
    created_at: Mapped[datetime] = mapped_column(DateTime(), default=utcnow)


class Task(Base):
    __tablename__ = "tasks"
    # The queue: a project's tasks that still need judgements, closest to complete first, read in
    # index order, so finding the next task costs the same in a project of any size.
    __table_args__ = (UniqueConstraint("project_id", "ext_id"),
                      Index("ix_tasks_queue", "project_id", "is_gold", "needed", "id"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    ext_id: Mapped[str] = mapped_column(String(200))  # the record's "id" (or a content hash)
    prompt: Mapped[list[dict[str, str]]] = mapped_column(JSON)  # chat messages
    responses: Mapped[list[str]] = mapped_column(JSON)
    is_gold: Mapped[bool] = mapped_column(Boolean, default=False)
    needed: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # overlap minus judgements
    gold: Mapped[Any] = mapped_column(JSON, nullable=True)  # canonical known answer (see tasks.py)
    meta: Mapped[Any] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(), default=utcnow)


class Assignment(Base):
    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("task_id", "user_id"),  # never the same task twice
                      Index("ix_assignments_project_user", "project_id", "user_id"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    shown_order: Mapped[list[int]] = mapped_column(JSON)  # shown position -> index into task.responses
    status: Mapped[str] = mapped_column(String(10), default="leased")  # leased | done | skipped
    leased_at: Mapped[datetime] = mapped_column(DateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime())
    done_at: Mapped[datetime | None] = mapped_column(DateTime(), nullable=True)


class Judgement(Base):
    __tablename__ = "judgements"
    __table_args__ = (UniqueConstraint("user_id", "client_key"),)  # idempotent submissions

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignments.id", ondelete="CASCADE"), unique=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    client_key: Mapped[str] = mapped_column(String(100))
    choice: Mapped[str | None] = mapped_column(String(10), nullable=True)  # as shown: A | B | tie | both_bad
    label: Mapped[str | None] = mapped_column(String(20), nullable=True)  # canonical: "0" | "1" | tie | both_bad
    strength: Mapped[int | None] = mapped_column(Integer, nullable=True)
    ranking: Mapped[list[list[int]] | None] = mapped_column(JSON, nullable=True)  # canonical tie groups
    rating: Mapped[int | None] = mapped_column(Integer, nullable=True)
    flags: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    rationale: Mapped[str | None] = mapped_column(Text, nullable=True)
    gold_correct: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)  # lease to submit
    created_at: Mapped[datetime] = mapped_column(DateTime(), default=utcnow)
    revised_at: Mapped[datetime | None] = mapped_column(DateTime(), nullable=True)  # last changed by its annotator


class JudgementRevision(Base):
    """An answer its annotator later changed: the judgement holds the latest, these the earlier ones."""

    __tablename__ = "judgement_revisions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    judgement_id: Mapped[int] = mapped_column(ForeignKey("judgements.id", ondelete="CASCADE"), index=True)
    previous: Mapped[dict[str, Any]] = mapped_column(JSON)  # the answer's fields before the change
    revised_at: Mapped[datetime] = mapped_column(DateTime(), default=utcnow)
