"""People in the loop: the main job's labels and final evaluation from the feedback app's database.

    candidates -> a rating project (every response, 1-3 with flags) and a pairwise project (the
    selected pairs, most informative first) -> people judge them in the app -> export -> the reward
    model's training data; held-out SFT-vs-tuned pairs -> an evaluation project -> a human win rate

The run writes to the database directly (no server needed); people judge through
``preftune annotate serve`` on the same database. Until every task has its overlap, the stage
either waits (``--wait``, polling) or stops (``WaitingForPeople``, exit status 3) with a line
saying what is missing; re-running the same command continues (imports are idempotent, finished stages reused).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select

from preftune.data.records import CandidateSet
from preftune.errors import ConfigError, PreftuneError, WaitingForPeople
from preftune.progress import console, progress_bar


@dataclass
class FeedbackDB:
    url: str
    sessions: Any

    @classmethod
    def open(cls, url: str | None) -> "FeedbackDB":
        """The database (created or migrated to the current schema, as ``annotate init`` would)."""
        try:
            from preftune.feedback.app.db import make_engine, migrate, session_factory
        except ImportError as e:
            raise PreftuneError(f"[run] feedback = \"app\" needs the feedback extra: pip install "
                                f"'preftune[feedback]' ({e.name} is missing)") from None
        engine = make_engine(url)
        migrate(engine)
        return cls(engine.url.render_as_string(hide_password=False), session_factory(engine))

    def transaction(self, readonly: bool = False):
        from preftune.feedback.app.db import transaction

        return transaction(self.sessions, readonly=readonly)

    def ensure_project(self, name: str, kind: str, overlap: int) -> None:
        """Create the project, or reuse it when it exists with the same kind and overlap."""
        from preftune.feedback.app.service import NotFound, create_project, get_project

        with self.transaction() as s:
            try:
                p = get_project(s, name)
            except NotFound:
                create_project(s, name, kind, overlap=overlap)
                return
            if (p.kind, p.overlap) != (kind, overlap):
                raise ConfigError(f"project {name!r} in {self.url} is a {p.kind} project with overlap {p.overlap}, "
                                  f"this run needs {kind} with overlap {overlap}: choose another [run] project")

    def import_records(self, name: str, records: list[dict]) -> tuple[int, int]:
        """Import task records (all or nothing; tasks already there are left as they are);
        returns (added, already present)."""
        from preftune.feedback.app.service import add_tasks, get_project
        from preftune.feedback.app.tasks import parse_tasks, storable

        records = [storable(r) for r in records]  # a sample may hold a NUL: shown (and stored) as U+FFFD
        with self.transaction() as s:
            p = get_project(s, name)
            result = add_tasks(s, p, parse_tasks(enumerate(records, start=1), p.kind, p.scale).specs)
        return result.added, result.unchanged

    def progress(self, name: str) -> tuple[int, int]:
        """(judgements made, judgements needed) over the project's regular tasks."""
        from preftune.feedback.app.models import Task
        from preftune.feedback.app.service import get_project

        with self.transaction(readonly=True) as s:
            p = get_project(s, name)
            tasks, open_ = s.execute(select(func.count(Task.id), func.coalesce(func.sum(Task.needed), 0))
                                     .where(Task.project_id == p.id, Task.is_gold.is_(False))).one()
            return tasks * p.overlap - open_, tasks * p.overlap

    def export(self, name: str, fmt: str) -> list[dict]:
        from preftune.feedback.app.export import export_rows
        from preftune.feedback.app.service import get_project

        with self.transaction(readonly=True) as s:
            return list(export_rows(s, get_project(s, name), fmt, Counter()))

    def stats(self, name: str) -> dict:
        from preftune.feedback.app.service import get_project
        from preftune.feedback.app.stats import project_stats

        with self.transaction(readonly=True) as s:
            return project_stats(s, get_project(s, name))


def await_judgements(db: FeedbackDB, projects: list[str], what: str, wait: bool, poll_seconds: float,
                     quiet: bool = False) -> None:
    """Return once every task of ``projects`` has its overlap; otherwise wait (``wait``, polling
    the database with a progress bar) or stop with ``WaitingForPeople``."""
    def missing() -> tuple[int, int]:
        made = needed = 0
        for name in projects:
            m, n = db.progress(name)
            made, needed = made + m, needed + n
        return made, needed

    made, needed = missing()
    if made >= needed:
        return
    if not wait:
        raise WaitingForPeople(
            f"{what}: {needed - made} of {needed} judgements are still missing (projects {', '.join(projects)}); "
            f"serve them with `preftune annotate serve --db {db.url}`, then re-run this command "
            f"(or add --wait)")
    console.print(f"{what}: waiting for {needed - made} judgements in {', '.join(projects)} "
                  f"(`preftune annotate serve --db {db.url}`)")
    with progress_bar(needed, f"{what}: judgements", disable=quiet) as bar:
        bar.set(made)
        while made < needed:
            time.sleep(poll_seconds)
            made, needed = missing()
            bar.set(made)


def _task_messages(item: CandidateSet) -> list[dict]:
    return [dict(m) for m in item.messages]


def rating_records(items: list[CandidateSet], round_: int) -> list[dict]:
    """One rating task per non-empty response (id ``ITEM:k``), its model in ``meta``."""
    return [{"id": f"{item.id}:{k}", "messages": _task_messages(item), "response": r,
             "meta": {"model": item.models[k], "round": round_}}
            for item in items for k, r in enumerate(item.responses) if r.strip()]


def pair_records(pairs: list[CandidateSet], round_: int, entropy: list[float] | None) -> list[dict]:
    """One pairwise task per selected pair, in the order given (the app serves lower ids first)."""
    return [{"id": pair.id, "messages": _task_messages(pair), "responses": list(pair.responses),
             "meta": {"models": list(pair.models), "round": round_,
                      **({"uncertainty": entropy[k]} if entropy is not None else {})}}
            for k, pair in enumerate(pairs)]


def eval_records(prompts: list[str], baseline: list[str], tuned: list[str], seed: int) -> list[dict]:
    """Baseline-vs-tuned tasks for the held-out prompts; which response comes first is random per
    task (``meta.tuned``: its index), and the app shuffles the shown order again per annotator."""
    rng = random.Random(seed)
    records = []
    for i, (p, b, t) in enumerate(zip(prompts, baseline, tuned)):
        if not (b.strip() and t.strip()) or b == t:
            continue  # nothing to compare: counted as skipped by the caller
        tuned_first = rng.random() < 0.5
        records.append({"id": f"eval-{i}", "prompt": p, "responses": [t, b] if tuned_first else [b, t],
                        "meta": {"index": i, "tuned": 0 if tuned_first else 1}})
    return records


def tuned_outcomes(raw_rows: list[dict], tuned_index: dict[str, int]) -> list[float]:
    """One outcome per judgement of the tasks in ``tuned_index`` (task id -> index of the tuned
    model's response): 1 the tuned response preferred, 0.5 tie or both bad, 0 the baseline's."""
    outcomes = []
    for row in raw_rows:
        index = tuned_index.get(row["task_id"])
        if index is None or row.get("label") is None:
            continue
        outcomes.append(0.5 if row["label"] in ("tie", "both_bad") else float(int(row["label"]) == index))
    return outcomes


def agreement_summary(stats: dict) -> dict:
    """What the report and metrics say about people's labels of one project."""
    a = stats["agreement"]
    return {"judgements": stats["progress"]["done"], "annotators": sorted(stats["annotators"]),
            "percent_agreement": a["percent_agreement"], "fleiss_kappa": a["fleiss_kappa"],
            "krippendorff_alpha": a["krippendorff_alpha"], "cohen_kappa": a["cohen_kappa"],
            "position_bias": stats["position_bias"]}
