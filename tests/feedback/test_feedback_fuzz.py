"""Property-based fuzzing of the whole JSON API from its OpenAPI schema (schemathesis), as an admin
and as an annotator, on a database holding a project of each kind with tasks and judgements: no
call may answer 5xx, and every answer must match the schema and declared content type.

Bounded here (a few examples per operation); ``python scripts/fuzz_feedback_api.py`` runs the same
checks with many more."""

from __future__ import annotations

import os

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="API fuzzing needs schemathesis (the test extra)")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance  # noqa: E402

from .conftest import pair_tasks  # noqa: E402

CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]
EXAMPLES = int(os.environ.get("PREFTUNE_FUZZ_EXAMPLES", "15"))


def populate(env) -> None:
    """Something to find behind the paths: a project of each kind with tasks, one judged."""
    env.project("p")
    env.tasks("p", pair_tasks(3))
    env.project("r", kind="rating")
    env.tasks("r", [{"id": "r0", "prompt": "Q", "responses": ["one"]}])
    env.project("k", kind="ranking")
    env.tasks("k", [{"id": "k0", "prompt": "Q", "responses": ["a", "b", "c"]}])
    a = env.next("p", "ann1")
    assert env.judge(a["assignment_id"], "ann1", choice="A", strength=2).status_code == 201
    env.next("p", "ann2")  # a live lease


def operations(env):
    from schemathesis.config import SchemathesisConfig

    schema = schemathesis.openapi.from_asgi("/api/v1/openapi.json", env.client.app, config=SchemathesisConfig())
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_the_api_never_fails_and_keeps_to_its_schema(env, mode):
    """Every operation, with generated path parameters and with ``project`` pinned to a real
    project (so that bodies reach the code behind it), answered as an admin and as an annotator.
    Negative mode sends what the schema forbids: it must be refused with a 4xx, never a 5xx."""
    from hypothesis import given
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    populate(env)
    generation = GenerationMode.POSITIVE if mode == "positive" else GenerationMode.NEGATIVE
    tried = 0
    for operation in operations(env):
        pins = [None] + ([{"project": "p"}] if "{project}" in operation.path else [])
        for pinned in pins:
            strategy = operation.as_strategy(generation, path_parameters=pinned)

            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=strategy)
            def check(case):
                for role in ("admin", "ann1"):
                    case.call_and_validate(headers=env.auth(role), checks=CHECKS)

            try:
                check()
            except Unsatisfiable:  # nothing of this operation can break its schema (GET /me)
                assert mode == "negative"
            tried += 1
    assert tried >= 12  # every operation of the API was reached
