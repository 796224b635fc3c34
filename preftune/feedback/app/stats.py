"""Project statistics for admins: progress (overall and per annotator), gold accuracy,
agreement and position bias, gathered from the database and computed by ``agreement``."""

from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from preftune.feedback.app import agreement
from preftune.feedback.app.models import Assignment, Judgement, Project, Task, User, utcnow


def agreement_units(kind: str, rows: list[tuple[int, str, Judgement]]) -> dict[Any, dict[str, Any]]:
    """Items and labels that annotators can agree on. Pairwise: the canonical choice per task;
    rating: the rating per task; ranking: the order of every pair of responses of a task
    ("i" better, "j" better or "tie"), so partial agreement on a ranking counts."""
    units: dict[Any, dict[str, Any]] = defaultdict(dict)
    for task_id, annotator, j in rows:
        if kind == "pairwise":
            units[task_id][annotator] = j.label
        elif kind == "rating":
            units[task_id][annotator] = j.rating
        else:
            rank = {i: r for r, group in enumerate(j.ranking) for i in group}
            for a, b in itertools.combinations(sorted(rank), 2):
                units[(task_id, a, b)][annotator] = "tie" if rank[a] == rank[b] else str(a if rank[a] < rank[b] else b)
    return units


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


def project_stats(session: Session, project: Project) -> dict[str, Any]:
    now = utcnow()
    n_tasks = session.scalar(select(func.count(Task.id)).where(Task.project_id == project.id,
                                                               Task.is_gold.is_(False))) or 0
    n_gold = session.scalar(select(func.count(Task.id)).where(Task.project_id == project.id,
                                                              Task.is_gold.is_(True))) or 0
    rows = session.execute(select(Assignment.status, Assignment.expires_at, Task.is_gold, User.name)
                           .join(Task, Assignment.task_id == Task.id).join(User, Assignment.user_id == User.id)
                           .where(Assignment.project_id == project.id)).all()
    per: dict[str, dict[str, Any]] = defaultdict(lambda: {"done": 0, "in_progress": 0, "skipped": 0, "gold_done": 0,
                                                          "gold_correct": 0})
    done = in_progress = 0
    for status, expires_at, is_gold, name in rows:
        p = per[name]
        if status == "done":
            p["done"] += 1
            done += not is_gold
        elif status == "skipped":
            p["skipped"] += 1
        elif expires_at > now:
            p["in_progress"] += 1
            in_progress += not is_gold
    judged = session.execute(select(Task.id, User.name, Judgement, Task.is_gold)
                             .join(Task, Judgement.task_id == Task.id).join(User, Judgement.user_id == User.id)
                             .where(Judgement.project_id == project.id).order_by(Judgement.id)).all()
    seconds: dict[str, list[float]] = defaultdict(list)
    first_shown = decisive = 0
    for _, name, j, is_gold in judged:
        if j.seconds is not None:
            seconds[name].append(j.seconds)
        if is_gold:
            per[name]["gold_done"] += 1
            per[name]["gold_correct"] += bool(j.gold_correct)
        if j.choice in ("A", "B"):
            decisive += 1
            first_shown += j.choice == "A"
    complete = session.scalar(select(func.count()).select_from(
        select(Judgement.task_id).join(Task, Judgement.task_id == Task.id)
        .where(Judgement.project_id == project.id, Task.is_gold.is_(False))
        .group_by(Judgement.task_id).having(func.count() >= project.overlap).subquery())) or 0
    annotators = {}
    for name, p in sorted(per.items()):
        times = sorted(seconds[name])
        annotators[name] = {**p, "gold_accuracy": _round(p["gold_correct"] / p["gold_done"]) if p["gold_done"] else None,
                            "median_seconds": _round(times[len(times) // 2], 1) if times else None}
    units = agreement_units(project.kind, [(t, n, j) for t, n, j, _ in judged])
    multi = {k: v for k, v in units.items() if len(v) >= 2}
    needed = n_tasks * project.overlap
    return {
        "project": project.name, "kind": project.kind, "overlap": project.overlap, "scale": project.scale,
        "gold_rate": project.gold_rate,
        "progress": {"tasks": n_tasks, "gold_tasks": n_gold, "judgements_needed": needed, "done": done,
                     "in_progress": in_progress, "remaining": max(needed - done - in_progress, 0),
                     "tasks_complete": complete},
        "annotators": annotators,
        "agreement": {
            "items": len(multi),  # what agreement is measured on: tasks, or a ranking's response pairs
            "item_kind": "response pairs" if project.kind == "ranking" else "tasks",
            "tasks": len({k[0] if isinstance(k, tuple) else k for k in multi}),
            "percent_agreement": _round(agreement.percent_agreement(multi)),
            "fleiss_kappa": _round(agreement.fleiss_from_units(multi)),
            "krippendorff_alpha": _round(agreement.krippendorff_alpha(
                multi, "ordinal" if project.kind == "rating" else "nominal")),
            "alpha_level": "ordinal" if project.kind == "rating" else "nominal",
            "cohen_kappa": [{"annotators": list(pair), "kappa": _round(k), "items": n}
                            for pair, (k, n) in sorted(agreement.pairwise_cohen(multi).items())],
        },
        "position_bias": ({"decisive": decisive, "first_shown_chosen": first_shown,
                           "rate": _round(first_shown / decisive) if decisive else None}
                          if project.kind == "pairwise" else None),
    }


def format_stats(stats: dict[str, Any]) -> str:
    """The stats as a short text report (``preftune annotate stats``)."""
    def f(x):
        return "-" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))

    p, a = stats["progress"], stats["agreement"]
    lines = [f"project {stats['project']} ({stats['kind']}, overlap {stats['overlap']})",
             f"tasks {p['tasks']} (+{p['gold_tasks']} gold)  complete {p['tasks_complete']}  judgements: done "
             f"{p['done']} / {p['judgements_needed']}, in progress {p['in_progress']}, remaining {p['remaining']}",
             "", f"{'annotator':<20} {'done':>6} {'active':>6} {'skipped':>7} {'gold acc':>9} {'median s':>9}"]
    for name, s in stats["annotators"].items():
        gold = f"{f(s['gold_accuracy'])} ({s['gold_done']})" if s["gold_done"] else "-"
        lines.append(f"{name:<20} {s['done']:>6} {s['in_progress']:>6} {s['skipped']:>7} {gold:>9} "
                     f"{f(s['median_seconds']):>9}")
    over = a["item_kind"] + (f" of {a['tasks']} task{'s' * (a['tasks'] != 1)}" if a["item_kind"] != "tasks" else "")
    lines += ["", f"agreement over {a['items']} {over} with 2+ judgements:",
              f"  percent agreement {f(a['percent_agreement'])}   Fleiss' kappa {f(a['fleiss_kappa'])}   "
              f"Krippendorff's alpha ({a['alpha_level']}) {f(a['krippendorff_alpha'])}"]
    for c in a["cohen_kappa"]:
        lines.append(f"  Cohen's kappa {c['annotators'][0]} / {c['annotators'][1]}: {f(c['kappa'])} "
                     f"on {c['items']} {a['item_kind']}")
    if stats["position_bias"]:
        b = stats["position_bias"]
        lines.append(f"position bias: first-shown response chosen in {f(b['rate'])} of {b['decisive']} "
                     "decisive judgements (0.5 = none)")
    return "\n".join(lines)
