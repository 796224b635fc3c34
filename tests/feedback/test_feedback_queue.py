"""The task queue: each task counts the judgements it still needs, the project its open tasks,
and the next-task query reads the queue index in order (no scan or sort of the project's tasks)."""

from __future__ import annotations

import threading
from datetime import timedelta
from unittest import mock

import pytest
from sqlalchemy import event, select, text

from preftune.feedback.app import service
from preftune.feedback.app.db import transaction
from preftune.feedback.app.models import Assignment, Project, Task, User, utcnow

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


# ---------------------------------------------------------------- leases at once (PostgreSQL)
# SQLite runs one writer at a time, so these interleavings exist only on PostgreSQL: an open
# transaction here holds a lease while another annotator's lease runs in a thread.


def lease(env, user: str) -> tuple[int | None, str | None]:
    with transaction(env.client.app.state.sessions) as s:
        _, assignment, task = service.next_assignment(s, "q", s.scalar(select(User).where(User.name == user)))
        return (assignment.id, task.ext_id) if assignment else (None, None)


def lease_in_thread(env, user: str) -> tuple[threading.Thread, list]:
    out: list = []
    thread = threading.Thread(target=lambda: out.append(lease(env, user)), daemon=True)
    thread.start()
    return thread, out


def holding_a_lease(env, user: str, overlap: int, n_tasks: int):
    """Project q; ``user`` leases its first task in a transaction the caller keeps open."""
    if env.url.startswith("sqlite"):
        pytest.skip("SQLite serialises writers: no two leases are ever in flight")
    env.project("q", overlap=overlap)
    env.tasks("q", pair_tasks(n_tasks))
    s = env.client.app.state.sessions()
    _, held, task = service.next_assignment(s, "q", s.scalar(select(User).where(User.name == user)))
    return s, held, task


def test_a_lease_takes_another_task_instead_of_waiting_for_one_in_flight(env):
    s, _, task = holding_a_lease(env, "ann1", overlap=2, n_tasks=3)
    try:
        thread, out = lease_in_thread(env, "ann2")
        thread.join(10)
        assert not thread.is_alive(), "the second lease waited for the first one's transaction"
        assert out[0][1] not in (None, task.ext_id)  # the held task skipped, though it has a free slot
    finally:
        s.commit()
        s.close()


@pytest.mark.parametrize("overlap", [1, 2])
def test_at_a_projects_end_a_lease_waits_for_the_held_task_and_counts_its_slots_again(env, overlap):
    s, _, task = holding_a_lease(env, "ann1", overlap=overlap, n_tasks=1)
    thread, out = lease_in_thread(env, "ann2")
    thread.join(0.5)
    assert thread.is_alive()  # not "nothing left" while the only task may still have room
    s.commit()
    s.close()
    thread.join(10)
    # overlap 2: the second slot; overlap 1: none, though the waiting read began before ann1's commit
    expected = [(mock.ANY, task.ext_id)] if overlap == 2 else [(None, None)]
    assert out == expected


def test_one_annotator_asking_twice_at_once_gets_one_lease(env):
    s, held, _ = holding_a_lease(env, "ann1", overlap=1, n_tasks=3)
    thread, out = lease_in_thread(env, "ann1")  # e.g. a second tab
    thread.join(0.5)
    assert thread.is_alive()
    s.commit()
    s.close()
    thread.join(10)
    assert out[0][0] == held.id


def test_a_lease_that_finds_its_task_full_lets_go_of_it(env):
    """Found by CI (deadlock detected, 500s in the SIGKILL load test on PostgreSQL): a lease whose
    claimed task had been filled by a lease committed meanwhile kept that row locked while it
    claimed, or waited for, the next one; two such leases could each hold what the other waited for."""
    if env.url.startswith("sqlite"):
        pytest.skip("SQLite serialises writers: no lease commits while another is in flight")
    env.project("q", overlap=1)
    env.tasks("q", pair_tasks(2))
    sessions = env.client.app.state.sessions
    s = sessions()
    ann1, ann2 = (s.scalar(select(User).where(User.name == n)) for n in ("ann1", "ann2"))

    def lease_committed_meanwhile(state) -> None:  # ann2 takes the task ann1 has just claimed
        if state.statement is service.OTHERS_LIVE_LEASES and not filled:
            filled.append(state.parameters["task_id"])
            with transaction(sessions) as s2:
                now = utcnow()
                s2.add(Assignment(task_id=filled[0], user_id=ann2.id, project_id=state.parameters["project_id"],
                                  shown_order=[0, 1], status="leased", leased_at=now,
                                  expires_at=now + timedelta(hours=1)))

    filled: list[int] = []
    event.listen(s, "do_orm_execute", lease_committed_meanwhile)
    try:
        _, assignment, task = service.next_assignment(s, "q", ann1)
        assert filled and task.id != filled[0]  # the filled task missed; the other one was taken
        with transaction(sessions) as s3:  # the task ann1 found full is free to lock again
            free = s3.scalars(select(Task.id).where(Task.project_id == task.project_id)
                              .with_for_update(skip_locked=True)).all()
        assert free == [filled[0]]
    finally:
        s.rollback()
        s.close()


def test_a_skip_racing_a_submit_of_the_same_assignment_never_unjudges_it(env):
    """Found by reading the code: the skip read the assignment without a lock, so on PostgreSQL its
    UPDATE waited for the submit's commit and then marked the judged assignment skipped."""
    if env.url.startswith("sqlite"):
        pytest.skip("SQLite serialises writers: no skip runs while a submit is in flight")
    env.project("q", overlap=1)
    env.tasks("q", pair_tasks(1))
    assignment_id = env.next("q", "ann1")["assignment_id"]
    s = env.client.app.state.sessions()
    ann1 = s.scalar(select(User).where(User.name == "ann1"))
    service.submit_judgement(s, assignment_id, ann1, {"choice": "A"})  # in flight: not committed yet
    out: list = []

    def skip() -> None:
        try:
            with transaction(env.client.app.state.sessions) as s2:
                service.skip_assignment(s2, assignment_id, s2.scalar(select(User).where(User.name == "ann1")))
            out.append("skipped")
        except service.Conflict as e:
            out.append(str(e))

    thread = threading.Thread(target=skip, daemon=True)
    thread.start()
    thread.join(0.5)
    s.commit()
    s.close()
    thread.join(10)
    assert out == ["this assignment is already judged"]
    assert [row["choice"] for row in env.export("q", "raw")] == ["A"]


def test_a_submit_whose_clock_is_behind_the_next_lease_cannot_overfill_its_task(env, monkeypatch):
    """Found by reading the code: a submit trusted its lease while its own clock said it was live,
    but a lease claimed by a clock a moment ahead (another request, another app host) had already
    taken the slot as expired, and the task ended with two judgements at overlap 1."""
    env.project("q", overlap=1, lease_seconds=10)
    env.tasks("q", pair_tasks(1))
    first = env.next("q", "ann1")

    def ahead() -> None:  # ann2's requests run on a clock 11 s ahead: ann1's lease is over by it
        monkeypatch.setattr(service, "utcnow", lambda: utcnow() + timedelta(seconds=11))

    ahead()
    second = env.next("q", "ann2")
    assert second is not None and second["task_id"] == first["task_id"]  # the slot goes to ann2
    monkeypatch.undo()
    late = env.judge(first["assignment_id"], "ann1", choice="A")  # by the real clock ann1's lease is live
    assert late.status_code == 409 and "given to someone else" in late.json()["detail"]
    ahead()
    assert env.judge(second["assignment_id"], "ann2", choice="B").status_code == 201
    monkeypatch.undo()
    assert [row["choice"] for row in env.export("q", "raw")] == ["B"]
    assert counts(env, "q") == (0, {"t0": 0})
