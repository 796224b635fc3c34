"""The JSON API under ``/api/v1`` (OpenAPI docs at ``/api/v1/docs``), authenticated by
``Authorization: Bearer TOKEN`` (or, for the app's own pages, the session cookie plus an
``X-CSRF-Token`` header on writes)."""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import select

from preftune.data.records import RecordError
from preftune.feedback.app import export as exporting
from preftune.feedback.app import service
from preftune.feedback.app.models import Project, User
from preftune.feedback.app.stats import project_stats
from preftune.feedback.app.tasks import parse_tasks
from preftune.feedback.app.web import api_caller, tx


class ErrorOut(BaseModel):
    detail: str = Field(..., description="one line saying what is wrong")


# Every error is {"detail": "one line"}, validation errors included (not FastAPI's list of errors).
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorOut, "description": description} for status, description in (
        (400, "bad request"), (401, "authentication required"), (403, "not allowed for this user"),
        (404, "no such project or assignment (for this user)"), (409, "conflicts with the current state"),
        (413, "request body too large"), (422, "invalid request"))}

router = APIRouter(prefix="/api/v1", responses=ERRORS)


def any_user(request: Request) -> User:
    """Authenticate before anything else is looked at (body fields included)."""
    with tx(request, readonly=True) as s:
        return api_caller(request, s)


def admin_user(request: Request) -> User:
    with tx(request, readonly=True) as s:
        return api_caller(request, s, admin=True)


AnyUser = Annotated[User, Depends(any_user)]
Admin = Annotated[User, Depends(admin_user)]


class ProjectIn(BaseModel):
    name: str = Field(..., max_length=100)
    kind: Literal["pairwise", "ranking", "rating"]
    overlap: int = 1
    scale: int = 3
    gold_rate: float = 0.0
    lease_seconds: int = 600
    guidelines: str = Field("", max_length=service.MAX_GUIDELINES, description="markdown shown to annotators")


class GuidelinesIn(BaseModel):
    guidelines: str = Field(..., max_length=service.MAX_GUIDELINES, description="markdown shown to annotators")


class UserIn(BaseModel):
    name: str = Field(..., max_length=100)
    role: Literal["admin", "annotator"] = "annotator"


class JudgementIn(BaseModel):
    """Fields as fit the project's kind. Positions refer to the responses in the order shown."""
    choice: Literal["A", "B", "tie", "both_bad"] | None = Field(None, description="pairwise: A = first shown")
    strength: int | None = Field(None, description="pairwise: 1 slightly .. 4 much better")
    ranking: list[int | list[int]] | None = Field(None, description="ranking: shown positions best first; "
                                                                     "a list of positions is a tie")
    rating: int | None = Field(None, description="rating: 1 .. the project's scale")
    flags: list[str] | None = Field(None, description="rating: hallucination, harmful, ignores_instruction, "
                                                      "unhelpful, other")
    rationale: str | None = None
    client_key: str | None = Field(None, max_length=100, description="idempotency key: the same key again "
                                                                     "returns the stored judgement")


def _project_json(p: Project) -> dict[str, Any]:
    return {"name": p.name, "kind": p.kind, "overlap": p.overlap, "scale": p.scale, "gold_rate": p.gold_rate,
            "lease_seconds": p.lease_seconds, "guidelines": p.guidelines}


@router.get("/me", summary="Who am I")
def me(user: AnyUser) -> dict[str, Any]:
    return {"user": user.name, "role": user.role}


@router.get("/projects", summary="Projects (with what is left for me)")
def list_projects(request: Request, user: AnyUser) -> list[dict[str, Any]]:
    with tx(request, readonly=True) as s:
        return [{**_project_json(p), "remaining_for_me": service.remaining_for(s, p, user)}
                for p in s.scalars(select(Project).order_by(Project.name))]


@router.post("/projects", status_code=201, summary="Create a project (admin)")
def create_project(request: Request, _: Admin, body: ProjectIn) -> dict[str, Any]:
    with tx(request) as s:
        return _project_json(service.create_project(s, **body.model_dump()))


@router.put("/projects/{project}/guidelines", summary="Replace a project's guidelines (admin)")
def set_guidelines(request: Request, _: Admin, project: str, body: GuidelinesIn) -> dict[str, Any]:
    with tx(request) as s:
        return _project_json(service.set_guidelines(s, project, body.guidelines))


@router.post("/users", status_code=201, summary="Create a user (admin); answers the credentials once")
def create_user(request: Request, _: Admin, body: UserIn) -> dict[str, Any]:
    with tx(request) as s:
        new = service.create_user(s, body.name, body.role)
        return {"user": new.user.name, "role": new.user.role, "password": new.password, "token": new.token}


@router.post("/projects/{project}/tasks", status_code=201, summary="Import tasks (admin)")
def import_tasks(request: Request, _: Admin, project: str, records: list[Any] = Body(
        ..., description='task records: {"prompt", "responses": [...], "id"?, "gold"?, "meta"?}, samples '
                         '{"prompt", "response"} or comparisons')) -> dict[str, int]:
    with tx(request) as s:
        p = service.get_project(s, project)
        try:
            parsed = parse_tasks(enumerate(records, start=1), p.kind, p.scale, request.app.state.settings.limits)
        except RecordError as e:
            raise service.Invalid(f"record {e.line}: {e}") from None
        result = service.add_tasks(s, p, parsed.specs)
        return {"imported": result.added, "unchanged": result.unchanged, "too_few_responses": len(parsed.too_few)}


@router.get("/projects/{project}/next", summary="My next assignment (204 when nothing is left)",
            responses={204: {"description": "nothing left for you in this project"}})
def next_task(request: Request, user: AnyUser, project: str,
              html: bool = Query(False, description="add the prompt and responses rendered from markdown "
                                                    "as safe HTML (what the annotate page shows)")):
    view = _next_view(request, user, project, html)
    # JSON types already: answered as they are (FastAPI's encoder would walk them again)
    return Response(status_code=204) if view is None else JSONResponse(view)


def _next_view(request: Request, user: User, project: str, html: bool) -> dict[str, Any] | None:
    with tx(request) as s:  # one short write transaction: the lease, its task, the progress line
        p, assignment, task = service.next_assignment(s, project, user)
        if assignment is None:
            return None
        return {**service.assignment_json(assignment, task, p, html=html), "progress": service.progress(s, p, user)}


@router.post("/assignments/{assignment_id}/judgement", status_code=201,
             summary="Submit a judgement (201; 200 with the stored one for a repeated client_key)")
def submit(request: Request, user: AnyUser, assignment_id: int, body: JudgementIn,
           then_next: bool = Query(False, alias="next", description=(
               'also answer my next assignment in this project under "next", as /next answers it (null when '
               "nothing is left): one round trip per judgement. The judgement commits first, on its own; "
               "should the lease fail, the same submit again (same client_key) is safe")),
           html: bool = Query(False, description='with next: add "html" to it, as /next?html=true')):
    with tx(request) as s:
        judgement, assignment, project, created = service.submit_judgement(
            s, assignment_id, user, body.model_dump(), request.app.state.settings.limits)
        content = service.judgement_json(judgement, assignment)
    if then_next:
        content["next"] = _next_view(request, user, project.name, html)
    return JSONResponse(content, status_code=201 if created else 200)


@router.get("/projects/{project}/judgements", summary="My recent judgements in a project, newest first")
def my_judgements(request: Request, user: AnyUser, project: str,
                  limit: int = Query(20, ge=1, le=200)) -> list[dict[str, Any]]:
    with tx(request, readonly=True) as s:
        p = service.get_project(s, project)
        return [{**service.judgement_json(j, a), "task_id": t.ext_id, "messages": t.prompt,
                 "responses": [t.responses[i] for i in a.shown_order], "revisions": service.revision_count(s, j)}
                for j, a, t in service.recent_judgements(s, p, user, limit)]


@router.put("/judgements/{judgement_id}", summary="Change my judgement (exports use the latest; "
                                                 "the earlier answer is kept)")
def revise(request: Request, user: AnyUser, judgement_id: int, body: JudgementIn) -> dict[str, Any]:
    with tx(request) as s:
        judgement, assignment = service.revise_judgement(s, judgement_id, user, body.model_dump(),
                                                         request.app.state.settings.limits)
        return {**service.judgement_json(judgement, assignment), "revisions": service.revision_count(s, judgement)}


@router.post("/assignments/{assignment_id}/skip", summary="Skip an assignment")
def skip(request: Request, user: AnyUser, assignment_id: int) -> dict[str, Any]:
    with tx(request) as s:
        service.skip_assignment(s, assignment_id, user)
    return {"assignment_id": assignment_id, "status": "skipped"}


@router.post("/assignments/{assignment_id}/unskip",
             summary="Take a skip back: the assignment again, as /next answers it (409 if the task is gone)")
def unskip(request: Request, user: AnyUser, assignment_id: int, html: bool = Query(False)) -> dict[str, Any]:
    with tx(request) as s:
        assignment, task, p = service.unskip_assignment(s, assignment_id, user)
        body = service.assignment_json(assignment, task, p, html=html)
        body["progress"] = service.progress(s, p, user)
    return body


@router.get("/projects/{project}/export", summary="Export labels as JSONL (admin)",
            response_class=Response, responses={200: {"content": {"application/x-ndjson": {}}}})
def export(request: Request, _: Admin, project: str,
           format: Literal["comparisons", "trl", "raw", "ratings"] = Query("comparisons"),
           include_ties: bool = Query(False, description="comparisons: write ties with strength 0")):
    counts: Counter = Counter()
    with tx(request, readonly=True) as s:
        p = service.get_project(s, project)
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n"
                       for r in exporting.export_rows(s, p, format, counts, include_ties))
    filename = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{project}-{format}") + ".jsonl"
    return Response(text, media_type="application/x-ndjson", headers={
        "Content-Disposition": f'attachment; filename="{filename}"',
        "X-Preftune-Counts": json.dumps(dict(counts), sort_keys=True)})


@router.get("/projects/{project}/stats", summary="Progress, gold accuracy, agreement (admin)")
def stats(request: Request, _: Admin, project: str) -> dict[str, Any]:
    with tx(request, readonly=True) as s:
        return project_stats(s, service.get_project(s, project))
