"""CPU time of the feedback app's service layer per judgement, in process (no HTTP, no threads):
what one annotator's `GET /next` + `POST /judgement` cost in the database layer, authentication
included. A steadier figure than the load benchmark's on a shared machine (process CPU time, one
thread), so changes to the hot path can be compared back to back.

    python benchmarks/feedback_cpu.py                      # SQLite in a temp dir
    python benchmarks/feedback_cpu.py --db postgresql+psycopg://USER@127.0.0.1:PORT/DB
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(db_url: str, judgements: int, annotators: int = 50) -> dict[str, float]:
    from benchmarks.feedback_load import prepare
    from preftune.feedback.app import service
    from preftune.feedback.app.db import make_engine, session_factory, transaction
    from preftune.feedback.app.security import token_hash
    from preftune.feedback.app.web import USER_BY_TOKEN

    tokens = prepare(db_url, annotators, judgements, overlap=2)  # half the tasks used, half complete
    engine = make_engine(db_url)
    sessions = session_factory(engine)
    names = [n for n in tokens if n != "admin"]
    spent = {"authenticate": 0.0, "lease": 0.0, "submit": 0.0}

    def timed(part: str, fn):
        t = time.process_time()
        out = fn()
        spent[part] += time.process_time() - t
        return out

    def authenticate(token: str):
        with transaction(sessions, readonly=True) as s:
            return s.scalar(USER_BY_TOKEN, {"hash": token_hash(token)})

    def lease(user) -> int:
        with transaction(sessions) as s:
            project, assignment, task = service.next_assignment(s, "load", user)
            service.assignment_json(assignment, task, project)
            service.progress(s, project, user)
            return assignment.id

    def submit(user, assignment_id: int, key: str) -> None:
        with transaction(sessions) as s:
            judgement, assignment, _, _ = service.submit_judgement(s, assignment_id, user,
                                                                   {"choice": "A", "strength": 2, "client_key": key})
            service.judgement_json(judgement, assignment)

    for k in range(judgements):
        token = tokens[names[k % len(names)]]
        user = timed("authenticate", lambda: authenticate(token))
        assignment_id = timed("lease", lambda: lease(user))
        user = timed("authenticate", lambda: authenticate(token))
        timed("submit", lambda: submit(user, assignment_id, f"key{k}"))
    engine.dispose()
    per = {f"{part}_ms": round(1000 * t / judgements, 3) for part, t in spent.items()}
    return {**per, "total_ms_per_judgement": round(sum(per.values()), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--db", help="a PostgreSQL URL (emptied first); default: a new SQLite file")
    p.add_argument("--judgements", type=int, default=1500)
    args = p.parse_args()
    url = args.db or f"sqlite:///{tempfile.mkdtemp(prefix='feedback-cpu-')}/cpu.db"
    print(json.dumps(measure(url, args.judgements)))


if __name__ == "__main__":
    main()
