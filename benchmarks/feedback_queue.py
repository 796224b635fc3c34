"""Cost of the feedback app's next-task path against project size.

For each size (default 1,000 and 1,000,000 pairwise tasks, overlap 2), a fresh database gets the
project's tasks (bulk-inserted), 50 annotators and a first round of judgements (each annotator judges
--warm tasks, so the queue's head is partly used up and leased); then one annotator at a time asks
for a task and judges it, --calls times, through the app's ASGI interface (in-process, no network).
Reported per size: the median and p95 of ``GET /next`` and of ``POST /judgement``, and the ratio of
the largest size's medians to the smallest's (1.0 = cost independent of project size).

    python benchmarks/feedback_queue.py                        # SQLite
    python benchmarks/feedback_queue.py --db postgresql+psycopg://USER@127.0.0.1:PORT/DB
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def fill(db_url: str, n_tasks: int, annotators: int) -> dict[str, str]:
    from benchmarks.feedback_load import empty_database, insert_tasks
    from preftune.feedback.app.db import make_engine, migrate, session_factory, transaction
    from preftune.feedback.app.models import User
    from preftune.feedback.app.security import new_secret, token_hash
    from preftune.feedback.app.service import create_project

    engine = make_engine(db_url)
    migrate(engine)
    empty_database(engine)
    tokens = {f"a{i:02d}": new_secret(32) for i in range(annotators)}
    with transaction(session_factory(engine)) as s:
        for name, token in tokens.items():
            s.add(User(name=name, role="annotator", password_hash="-", token_hash=token_hash(token)))
        project_id = create_project(s, "size", "pairwise", overlap=2).id
    insert_tasks(engine, project_id, n_tasks, overlap=2)
    engine.dispose()
    return tokens


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def measure(db_url: str, n_tasks: int, annotators: int, warm: int, calls: int) -> dict:
    from fastapi.testclient import TestClient

    from preftune.feedback.app import create_app

    t_fill, tokens = timed(lambda: fill(db_url, n_tasks, annotators))
    app = create_app(db_url)
    nexts, judges = [], []
    with TestClient(app) as client:
        def one(token: str, record: bool) -> None:
            headers = {"Authorization": f"Bearer {token}"}
            dt, r = timed(lambda: client.get("/api/v1/projects/size/next", headers=headers))
            assert r.status_code == 200, r.text
            a = r.json()
            dj, r = timed(lambda: client.post(f"/api/v1/assignments/{a['assignment_id']}/judgement", headers=headers,
                                             json={"choice": "A", "strength": 2}))
            assert r.status_code == 201, r.text
            if record:
                nexts.append(dt)
                judges.append(dj)

        for _ in range(warm):  # the queue's head partly used up
            for token in tokens.values():
                one(token, record=False)
        for token in list(tokens.values())[:annotators // 2]:  # and some tasks leased, not judged yet
            r = client.get("/api/v1/projects/size/next", headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200, r.text
        names = list(tokens.values())[annotators // 2:]
        for k in range(calls):
            one(names[k % len(names)], record=True)
    app.state.engine.dispose()
    ms = lambda xs, q: round(1000 * (statistics.median(xs) if q == 50 else sorted(xs)[int(0.95 * (len(xs) - 1))]), 2)  # noqa: E731
    return {"tasks": n_tasks, "fill_s": round(t_fill, 1), "next_p50_ms": ms(nexts, 50), "next_p95_ms": ms(nexts, 95),
            "judgement_p50_ms": ms(judges, 50), "judgement_p95_ms": ms(judges, 95)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", help="a PostgreSQL URL (emptied first); default: a new SQLite file per size")
    p.add_argument("--sizes", default="1000,1000000")
    p.add_argument("--annotators", type=int, default=50)
    p.add_argument("--warm", type=int, default=4, help="judgements per annotator before measuring")
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args()
    results = []
    for n in map(int, args.sizes.split(",")):
        url = args.db or f"sqlite:///{tempfile.mkdtemp(prefix='feedback-queue-')}/size.db"
        r = measure(url, n, args.annotators, args.warm, args.calls)
        results.append(r)
        print(json.dumps(r), flush=True)
    small, large = results[0], results[-1]
    ratios = {k: round(large[k] / small[k], 2) for k in ("next_p50_ms", "judgement_p50_ms")}
    print(f"{large['tasks']:,} vs {small['tasks']:,} tasks: median GET /next x{ratios['next_p50_ms']}, "
          f"median POST /judgement x{ratios['judgement_p50_ms']}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results, "ratios": ratios}, indent=1))


if __name__ == "__main__":
    main()
