"""The task queue: each task counts the judgements it still needs, the project its open tasks,
and the next-task query reads the queue index in order (no scan or sort of the project's tasks)."""

from __future__ import annotations

from sqlalchemy import select, text

from preftune.feedback.app import service
from preftune.feedback.app.db import transaction
from preftune.feedback.app.models import Project, Task, User, utcnow

from .conftest import pair_tasks


def counts(env, project: str) -> tuple[int, dict[str, int]]:
    with transaction(env.client.app.state.sessions, readonly=True) as s:
        p = s.scalar(select(Project).where(Project.name == project))
        return p.open_tasks, {t.ext_id: t.needed for t in s.scalars(select(Task).where(Task.project_id == p.id))}


def remaining(env, project: str, user: str) -> int:
    r = env.client.get("/api/v1/projects", headers=env.auth(user))
    return next(p["remaining_for_me"] for p in r.json() if p["name"] == project)


def test_judgements_use_up_tasks_and_the_project_counts_its_open_ones(env):
    env.project("q", overlap=2)
    env.tasks("q", pair_tasks(3) + [{"id": "gold", "prompt": "G", "responses": ["x", "y"], "gold": 0}])
    assert counts(env, "q") == (3, {"t0": 2, "t1": 2, "t2": 2, "gold": 0})
    env.tasks("q", pair_tasks(3))  # a re-import adds nothing
    assert counts(env, "q")[0] == 3
    a = env.next("q", "ann1")
    assert remaining(env, "q", "ann1") == 3  # the one held counts as left
    env.judge(a["assignment_id"], "ann1", choice="A")
    assert counts(env, "q")[1][a["task_id"]] == 1 and remaining(env, "q", "ann1") == 2
    b = env.next("q", "ann2")
    assert b["task_id"] == a["task_id"]  # closest to complete first
    env.judge(b["assignment_id"], "ann2", choice="B")
    open_tasks, needed = counts(env, "q")
    assert open_tasks == 2 and needed[a["task_id"]] == 0
    assert remaining(env, "q", "ann3") == 2
    c = env.next("q", "ann1")
    env.client.post(f"/api/v1/assignments/{c['assignment_id']}/skip", headers=env.auth("ann1"))
    assert remaining(env, "q", "ann1") == 1 and counts(env, "q")[0] == 2  # a skip uses nothing up
    # a repeated submit (same client key) counts once
    d = env.next("q", "ann3")
    for _ in range(2):
        env.judge(d["assignment_id"], "ann3", choice="A", client_key="same")
    assert counts(env, "q")[1][d["task_id"]] == 1


def test_the_next_task_query_reads_the_queue_index_in_order(env):
    env.project("plan", overlap=2)
    env.tasks("plan", pair_tasks(50))
    with transaction(env.client.app.state.sessions, readonly=True) as s:
        p = s.scalar(select(Project).where(Project.name == "plan"))
        user = s.scalar(select(User).where(User.name == "ann1"))
        bind = s.get_bind()
        query = service.NEXT_TASK.params(project_id=p.id, user_id=user.id, now=utcnow())  # as a lease runs it
        sql = str(query.compile(bind, compile_kwargs={"literal_binds": True}))
        if bind.dialect.name == "sqlite":
            plan = " | ".join(row[3] for row in s.execute(text("EXPLAIN QUERY PLAN " + sql)))
            assert "ix_tasks_queue" in plan and "TEMP B-TREE" not in plan, plan
        else:
            s.execute(text("SET LOCAL enable_seqscan = off"))  # a 50-row table: make the planner show its index use
            plan = " | ".join(row[0] for row in s.execute(text("EXPLAIN " + sql)))
            assert "ix_tasks_queue" in plan and "Sort" not in plan, plan
