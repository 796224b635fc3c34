"""Load and crash benchmark of the feedback app: N concurrent simulated annotators label
pairwise tasks against one real server process over loopback.

Checks that every acknowledged judgement is in the export exactly once and that no task
exceeds its overlap; reports submit latency (p50/p95/p99) and throughput. With --crash-after K
the server is killed with SIGKILL once K judgements are acknowledged, restarted on the same
database, and the annotators carry on (retrying unacknowledged submits with the same client key).

    python benchmarks/feedback_load.py --annotators 50 --tasks 2500 --overlap 2          # 5,000 judgements
    python benchmarks/feedback_load.py --db postgresql+psycopg://USER@127.0.0.1:PORT/DB --crash-after 1000
    python benchmarks/feedback_load.py --tasks 1000000 --judgements 5000     # a large project, partly labelled
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def empty_database(engine) -> None:
    """Delete every row of the feedback schema (a benchmark starts from nothing)."""
    from sqlalchemy import text

    from preftune.feedback.app.models import Base

    with engine.begin() as conn:
        tables = [t.name for t in reversed(Base.metadata.sorted_tables)]
        if engine.dialect.name == "postgresql":
            conn.execute(text(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE"))
        else:
            for t in tables:
                conn.execute(text(f"DELETE FROM {t}"))


def insert_tasks(engine, project_id: int, n_tasks: int, overlap: int) -> None:
    """Bulk-insert ``n_tasks`` pairwise tasks into the project (a million take about a minute; the
    app's import path validates each record and would take far longer)."""
    from sqlalchemy import insert, inspect, text

    from preftune.feedback.app.models import Task

    queue = "needed" in {c["name"] for c in inspect(engine).get_columns("tasks")}  # also runs on older schemas
    with engine.begin() as conn:
        for start in range(0, n_tasks, 50_000):
            rows = [{"project_id": project_id, "ext_id": f"t{i}",
                     "prompt": [{"role": "user", "content": f"Question {i}?"}],
                     "responses": [f"first {i}", f"second {i}"], "is_gold": False,
                     **({"needed": overlap} if queue else {})}
                    for i in range(start, min(n_tasks, start + 50_000))]
            conn.execute(insert(Task), rows)
        if queue:
            conn.execute(text("UPDATE projects SET open_tasks = open_tasks + :n WHERE id = :id"),
                         {"n": n_tasks, "id": project_id})
        if engine.dialect.name == "postgresql":
            conn.execute(text("ANALYZE"))


def prepare(db_url: str, n_annotators: int, n_tasks: int, overlap: int, fresh: bool = True) -> dict[str, str]:
    """Migrate, create an admin and annotators (tokens only: nobody logs in by password here),
    a pairwise project and its tasks. Returns {user: token}."""
    from preftune.feedback.app.db import make_engine, migrate, session_factory, transaction
    from preftune.feedback.app.models import User
    from preftune.feedback.app.security import hash_password, new_secret, token_hash
    from preftune.feedback.app.service import create_project

    engine = make_engine(db_url)
    migrate(engine)
    if fresh:
        empty_database(engine)
    tokens = {}
    unusable = hash_password(new_secret())
    with transaction(session_factory(engine)) as s:
        for i in range(n_annotators + 1):
            name = "admin" if i == n_annotators else f"annotator{i:03d}"
            tokens[name] = new_secret(32)
            s.add(User(name=name, role="admin" if name == "admin" else "annotator", password_hash=unusable,
                       token_hash=token_hash(tokens[name])))
        project_id = create_project(s, "load", "pairwise", overlap=overlap).id
    insert_tasks(engine, project_id, n_tasks, overlap)
    engine.dispose()
    return tokens


class Server:
    """``preftune annotate serve`` in a child process (its click command called directly, which
    skips importing the training stages)."""

    def __init__(self, db_url: str, port: int, log: Path, workers: int = 1) -> None:
        self.db_url, self.port, self.log, self.workers = db_url, port, log, workers
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> None:
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "OMP_NUM_THREADS": "1"}
        code = "import sys; from preftune.feedback.cli import annotate; annotate(sys.argv[1:])"
        self.proc = subprocess.Popen([sys.executable, "-c", code, "serve", "--db", self.db_url,
                                      "--port", str(self.port), "--workers", str(self.workers)], env=env, cwd=ROOT,
                                     stdout=open(self.log, "a"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/login", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("server did not start in time")

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server and its worker processes so far (Linux /proc;
        0 elsewhere)."""
        stats = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
                stats[int(stat.parent.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])))  # ppid, ticks
            except (OSError, IndexError, ValueError):
                continue
        tree, ticks = {self.proc.pid}, 0
        for _ in range(3):  # the server, its workers (and anything they start)
            tree |= {pid for pid, (ppid, _) in stats.items() if ppid in tree}
        ticks = sum(stats[pid][1] for pid in tree if pid in stats)
        return ticks / os.sysconf("SC_CLK_TCK")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class Results:
    acked: dict[str, str] = field(default_factory=dict)  # client_key -> task id
    latencies: list[float] = field(default_factory=list)  # acknowledged submits
    next_latencies: list[float] = field(default_factory=list)  # GET /next answered with a task
    statuses: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def annotate_until_done(base: str, token: str, results: Results, deadline: float, on_ack=None,
                        think: tuple[float, float] = (0.0, 0.0), cap: int = 0, submit_next: bool = False) -> None:
    """One simulated annotator: next, think, judge, repeat; retries through connection failures
    with the same client key until acknowledged, and stops at 204, the deadline, or once ``cap``
    judgements are acknowledged in all (0: no cap). ``submit_next``: each submit asks for the next
    assignment in its answer (``?next=true``, as the annotate page does), so a judgement is one round
    trip; /next is called only for the first task and after a failed submit."""
    import random

    rng = random.Random(token)
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
        pending = None  # (assignment, body) submitted but not acknowledged yet
        given = None  # the next assignment, as a submit answered it
        url = "/api/v1/assignments/{}/judgement" + ("?next=true" if submit_next else "")
        while time.monotonic() < deadline:
            try:
                if pending is None:
                    if cap and len(results.acked) >= cap:
                        return
                    if given is not None:
                        a, given = given, None
                    else:
                        t0 = time.perf_counter()
                        r = client.get("/api/v1/projects/load/next")
                        if r.status_code == 204:
                            return
                        r.raise_for_status()
                        with results.lock:
                            results.next_latencies.append(time.perf_counter() - t0)
                        a = r.json()
                    pending = (a, {"choice": "A" if hash(a["task_id"]) % 3 else "B", "strength": 2,
                                   "client_key": uuid.uuid4().hex})
                a, body = pending
                if think[1] > 0:
                    time.sleep(rng.uniform(*think))
                t0 = time.perf_counter()
                r = client.post(url.format(a["assignment_id"]), json=body)
                elapsed = time.perf_counter() - t0
                with results.lock:
                    results.statuses[r.status_code] += 1
                if r.status_code in (200, 201):
                    with results.lock:
                        results.acked[body["client_key"]] = a["task_id"]
                        results.latencies.append(elapsed)
                    pending = None
                    if on_ack:
                        on_ack()
                    if submit_next:
                        given = r.json()["next"]
                        if given is None:
                            return  # nothing left
                else:
                    with results.lock:
                        results.errors.append(f"{r.status_code} {r.text[:200]}")
                    pending = None
            except (httpx.TransportError, httpx.HTTPStatusError):
                time.sleep(0.2)  # server down or restarting: retry the same submit


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")


def run(db_url: str, annotators: int, tasks: int, overlap: int, crash_after: int = 0,
        time_limit: float = 600.0, workdir: Path | None = None, workers: int = 1,
        think: tuple[float, float] = (0.0, 0.0), judgements: int = 0, submit_next: bool = False) -> dict:
    workdir = workdir or Path(tempfile.mkdtemp(prefix="feedback-load-"))
    tokens = prepare(db_url, annotators, tasks, overlap)
    server = Server(db_url, free_port(), workdir / "server.log", workers)
    server.start()
    base = f"http://127.0.0.1:{server.port}"
    results = Results()
    crashed = threading.Event()

    def on_ack():
        if crash_after and not crashed.is_set() and len(results.acked) >= crash_after:
            crashed.set()

    deadline = time.monotonic() + time_limit
    threads = [threading.Thread(target=annotate_until_done, args=(base, tokens[f"annotator{i:03d}"], results, deadline,
                                                                  on_ack, think, judgements, submit_next),
                                daemon=True)
               for i in range(annotators)]
    t0 = time.perf_counter()
    cpu0 = os.times()
    server_cpu = 0.0
    try:
        for t in threads:
            t.start()
        restarted_at = None
        if crash_after:
            while not crashed.wait(0.05):
                if not any(t.is_alive() for t in threads):
                    break
            if crashed.is_set():
                server_cpu += server.cpu_seconds()
                server.kill()  # mid-load: requests are in flight
                acked_before = len(results.acked)
                time.sleep(0.5)
                server.start()
                restarted_at = acked_before
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()) + 5)
        wall = time.perf_counter() - t0
        server_cpu += server.cpu_seconds()
        cpu1 = os.times()
        r = httpx.get(f"{base}/api/v1/projects/load/export", params={"format": "raw"},
                      headers={"Authorization": f"Bearer {tokens['admin']}"}, timeout=120)
        r.raise_for_status()
    finally:
        server.stop()
    rows = [json.loads(line) for line in r.text.splitlines()]
    exported = Counter(row["client_key"] for row in rows)
    per_task = Counter(row["task_id"] for row in rows)
    missing = [k for k in results.acked if exported[k] != 1]
    return {
        "db": db_url.split("://")[0], "workers": workers, "think_s": list(think), "annotators": annotators,
        "tasks": tasks, "overlap": overlap, "judgements_cap": judgements, "submit_next": submit_next,
        "acknowledged": len(results.acked), "exported": len(rows),
        "acknowledged_missing_or_duplicated": len(missing),
        "duplicates_in_export": sum(1 for n in exported.values() if n > 1),
        "tasks_over_overlap": sum(1 for n in per_task.values() if n > overlap),
        # every task at its overlap; with a cap, every acknowledged judgement exported and the cap reached
        "all_done": (len(rows) == len(results.acked) >= judgements) if judgements else len(rows) == tasks * overlap,
        "errors": len(results.errors), "first_errors": results.errors[:3],
        "statuses": dict(results.statuses),
        "killed_after_acks": restarted_at,
        "wall_s": round(wall, 2), "judgements_per_s": round(len(results.acked) / wall, 1),
        "submit_p50_ms": round(1000 * percentile(results.latencies, 50), 1),
        "submit_p95_ms": round(1000 * percentile(results.latencies, 95), 1),
        "submit_p99_ms": round(1000 * percentile(results.latencies, 99), 1),
        "next_p50_ms": round(1000 * percentile(results.next_latencies, 50), 1),
        "next_p95_ms": round(1000 * percentile(results.next_latencies, 95), 1),
        # where the 2 cores went, per acknowledged judgement (a next + a submit): the server and
        # this process's simulated annotators share the machine
        "server_cpu_ms_per_judgement": round(1000 * server_cpu / max(1, len(results.acked)), 2),
        "client_cpu_ms_per_judgement": round(1000 * ((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system))
                                             / max(1, len(results.acked)), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default=None, help="database URL (default: a new SQLite file in a temp dir)")
    parser.add_argument("--annotators", type=int, default=50)
    parser.add_argument("--tasks", type=int, default=2500)
    parser.add_argument("--overlap", type=int, default=2)
    parser.add_argument("--judgements", type=int, default=0,
                        help="stop once this many judgements are acknowledged (0: label every task to its overlap)")
    parser.add_argument("--crash-after", type=int, default=0, help="SIGKILL the server after this many acks")
    parser.add_argument("--time-limit", type=float, default=900.0)
    parser.add_argument("--workers", type=int, default=1, help="server processes (annotate serve --workers)")
    parser.add_argument("--think", default="0,0", metavar="MIN,MAX",
                        help="seconds each annotator thinks before submitting, drawn uniformly (e.g. 2,5)")
    parser.add_argument("--submit-next", action="store_true",
                        help="one round trip per judgement: each submit answers the next assignment "
                             "(POST .../judgement?next=true, as the annotate page does) instead of a GET /next")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="feedback-load-"))
    db = args.db or f"sqlite:///{workdir / 'load.db'}"
    think = tuple(float(x) for x in args.think.split(","))
    result = run(db, args.annotators, args.tasks, args.overlap, args.crash_after, args.time_limit, workdir,
                 args.workers, think, args.judgements, args.submit_next)
    print(json.dumps(result, indent=2))
    ok = (result["acknowledged_missing_or_duplicated"] == 0 and result["tasks_over_overlap"] == 0
          and result["duplicates_in_export"] == 0 and result["all_done"])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
