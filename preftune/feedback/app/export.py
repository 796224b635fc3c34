"""Exports in the foundation's JSONL formats (``preftune.data``): comparisons that
``preftune reward`` trains on, ratings, and every judgement raw."""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, Iterator

from sqlalchemy import select
from sqlalchemy.orm import Session

from preftune.data.records import Comparison, Rating, to_json, to_trl_json
from preftune.feedback.app.models import Assignment, Judgement, JudgementRevision, Project, Task, User
from preftune.feedback.app.service import Invalid

FORMATS = ("comparisons", "trl", "raw", "ratings")
"""comparisons: preftune's format; trl: the same comparisons in TRL's conversational format."""


def _judged(session: Session, project: Project):
    return session.execute(select(Judgement, Task, User.name, Assignment.shown_order)
                           .join(Task, Judgement.task_id == Task.id).join(User, Judgement.user_id == User.id)
                           .join(Assignment, Judgement.assignment_id == Assignment.id)
                           .where(Judgement.project_id == project.id).order_by(Judgement.id))


def comparisons(session: Session, project: Project, counts: Counter, include_ties: bool = False,
                writer: Callable[[Comparison], dict] = to_json) -> Iterator[dict]:
    """Chosen/rejected records, written by ``writer`` (preftune's ``to_json`` or ``to_trl_json``).
    Pairwise ties and both-bad have no preferred side: they are left out and counted
    (``include_ties`` writes ties with ``"tie": true`` and strength 0). A ranking gives one record
    per pair of responses in different places."""
    for j, task, annotator, _ in _judged(session, project):
        base = {"messages": task.prompt, "annotator": annotator}
        if project.kind == "pairwise":
            if j.label in ("0", "1"):
                w = int(j.label)
                counts["comparisons"] += 1
                yield writer(Comparison(chosen=task.responses[w], rejected=task.responses[1 - w],
                                         strength=None if j.strength is None else float(j.strength),
                                         id=f"{task.ext_id}#{j.id}", **base))
            elif j.label == "tie" and include_ties:
                counts["comparisons"] += 1
                counts["ties_included"] += 1
                yield {**writer(Comparison(chosen=task.responses[0], rejected=task.responses[1], strength=0.0,
                                            id=f"{task.ext_id}#{j.id}", **base)), "tie": True}
            else:
                counts[f"{j.label}_excluded"] += 1
            continue
        for better, group in enumerate(j.ranking):
            for worse_group in j.ranking[better + 1:]:
                for w in group:
                    for l in worse_group:
                        counts["comparisons"] += 1
                        yield writer(Comparison(chosen=task.responses[w], rejected=task.responses[l],
                                                 id=f"{task.ext_id}#{j.id}:{w}>{l}", **base))
        counts["tied_pairs_excluded"] += sum(len(g) * (len(g) - 1) // 2 for g in j.ranking)


def ratings(session: Session, project: Project, counts: Counter) -> Iterator[dict]:
    for j, task, annotator, _ in _judged(session, project):
        counts["ratings"] += 1
        yield to_json(Rating(messages=task.prompt, response=task.responses[0], rating=j.rating, scale=project.scale,
                             flags=j.flags or [], annotator=annotator, id=f"{task.ext_id}#{j.id}"))


def raw(session: Session, project: Project, counts: Counter) -> Iterator[dict]:
    """Every judgement with everything known about it, including the order it was shown in and,
    for an answer its annotator changed, the earlier answers (``revisions``, oldest first)."""
    earlier: dict[int, list[dict]] = {}
    for r in session.scalars(select(JudgementRevision).join(Judgement, JudgementRevision.judgement_id == Judgement.id)
                             .where(Judgement.project_id == project.id).order_by(JudgementRevision.id)):
        earlier.setdefault(r.judgement_id, []).append({**r.previous, "until": r.revised_at.isoformat() + "Z"})
    for j, task, annotator, order in _judged(session, project):
        counts["judgements"] += 1
        row: dict[str, Any] = {
            "judgement_id": j.id, "task_id": task.ext_id, "kind": project.kind, "annotator": annotator,
            "prompt": task.prompt, "responses": task.responses, "shown_order": order,
            "choice": j.choice, "label": j.label, "strength": j.strength, "ranking": j.ranking,
            "rating": j.rating, "flags": j.flags, "rationale": j.rationale,
            "gold": task.gold if task.is_gold else None, "gold_correct": j.gold_correct,
            "seconds": j.seconds, "client_key": j.client_key, "created_at": j.created_at.isoformat() + "Z",
        }
        if j.revised_at is not None:
            row.update(revised_at=j.revised_at.isoformat() + "Z", revisions=earlier.get(j.id, []))
        if task.meta is not None:
            row["meta"] = task.meta
        yield row


def export_rows(session: Session, project: Project, fmt: str, counts: Counter,
                include_ties: bool = False) -> Iterator[dict]:
    """Rows of ``fmt``; ``counts`` fills in as they are consumed (written, excluded)."""
    if fmt in ("comparisons", "trl") and project.kind == "rating":
        raise Invalid("a rating project has no comparisons: export format ratings or raw")
    if fmt == "trl" and include_ties:
        raise Invalid("TRL's format has no ties: export ties in format comparisons")
    if fmt == "ratings" and project.kind != "rating":
        raise Invalid(f"a {project.kind} project has no ratings: export format comparisons or raw")
    if fmt == "comparisons":
        return comparisons(session, project, counts, include_ties)
    if fmt == "trl":
        return comparisons(session, project, counts, writer=to_trl_json)
    if fmt == "ratings":
        return ratings(session, project, counts)
    if fmt == "raw":
        return raw(session, project, counts)
    raise Invalid(f"format must be one of {', '.join(FORMATS)}")
