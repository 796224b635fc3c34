"""The JSON API against SQLite and PostgreSQL: assignment, overlap, leases, gold, idempotency,
export in the foundation's formats, input limits."""

from __future__ import annotations

import json
from datetime import timedelta
from urllib.parse import quote

from .conftest import page_csrf, pair_tasks
from sqlalchemy import func, select

from preftune.data.jsonl import read_jsonl
from preftune.feedback.app.db import transaction
from preftune.feedback.app.models import Assignment, Judgement


def test_overlap_distinct_annotators_and_204_when_done(env):
    env.project("p", overlap=2)
    env.tasks("p", pair_tasks(3))
    seen: dict[str, list[str]] = {}
    for user in ("ann1", "ann2", "ann3"):
        while (a := env.next("p", user)) is not None:
            assert a["task_id"] not in seen.get(user, [])  # never the same task twice
            seen.setdefault(user, []).append(a["task_id"])
            assert env.judge(a["assignment_id"], user, choice="A").status_code == 201
    per_task = {}
    for user, tasks in seen.items():
        for t in tasks:
            per_task.setdefault(t, []).append(user)
    assert sorted(per_task) == ["t0", "t1", "t2"]
    assert all(len(users) == 2 for users in per_task.values())  # exactly overlap, no more
    assert sum(len(v) for v in seen.values()) == 6


def test_next_returns_the_same_lease_until_judged(env):
    env.project("p")
    env.tasks("p", pair_tasks(2))
    a, again = env.next("p", "ann1"), env.next("p", "ann1")
    assert a["assignment_id"] == again["assignment_id"] and a["responses"] == again["responses"]


def test_shown_order_maps_choice_to_the_right_response(env):
    env.project("p")
    env.tasks("p", pair_tasks(12))
    orders = set()
    for _ in range(12):
        a = env.next("p", "ann1")
        orders.add(tuple(a["responses"]) == tuple(sorted(a["responses"], key=lambda r: not r.startswith("good"))))
        choice = "A" if a["responses"][0].startswith("good") else "B"
        assert env.judge(a["assignment_id"], "ann1", choice=choice, strength=3).status_code == 201
    assert orders == {True, False}  # both orders were shown (2 ** -11 chance of a false failure)
    rows = env.export("p")
    assert len(rows) == 12
    assert all(r["chosen"].startswith("good") and r["rejected"].startswith("bad") for r in rows)
    assert {r["strength"] for r in rows} == {3.0}
    raw = env.export("p", "raw")
    assert {tuple(r["shown_order"]) for r in raw} == {(0, 1), (1, 0)}


def run_out(env, assignment: dict) -> None:
    """Let a lease of 10 seconds run out."""
    with transaction(env.client.app.state.sessions) as s:
        s.get(Assignment, assignment["assignment_id"]).expires_at -= timedelta(seconds=11)


def test_expired_lease_goes_to_someone_else_and_late_submit_is_refused(env):
    env.project("p", overlap=1, lease_seconds=10)
    env.tasks("p", pair_tasks(1))
    a1 = env.next("p", "ann1")
    assert env.next("p", "ann2") is None  # the only slot is leased
    run_out(env, a1)
    a2 = env.next("p", "ann2")
    assert a2 is not None and a2["task_id"] == a1["task_id"]
    late = env.judge(a1["assignment_id"], "ann1", choice="A")
    assert late.status_code == 409 and "expired" in late.json()["detail"]
    assert env.judge(a2["assignment_id"], "ann2", choice="B").status_code == 201
    assert len(env.export("p")) == 1


def test_late_submit_on_expired_lease_is_kept_when_nobody_took_it(env):
    env.project("p", overlap=1, lease_seconds=10)
    env.tasks("p", pair_tasks(1))
    a1 = env.next("p", "ann1")
    run_out(env, a1)
    assert env.judge(a1["assignment_id"], "ann1", choice="A").status_code == 201


def test_an_annotators_own_expired_lease_is_renewed_not_duplicated(env):
    env.project("p", overlap=1, lease_seconds=10)
    env.tasks("p", pair_tasks(1))
    a1 = env.next("p", "ann1")
    run_out(env, a1)
    a2 = env.next("p", "ann1")
    assert (a2["assignment_id"], a2["task_id"]) == (a1["assignment_id"], a1["task_id"]) and a2["seconds_left"] > 5
    assert env.judge(a2["assignment_id"], "ann1", choice="A").status_code == 201
    with transaction(env.client.app.state.sessions) as s:
        assert s.scalar(select(func.count(Assignment.id))) == 1


def test_idempotent_submit_same_client_key(env):
    env.project("p")
    env.tasks("p", pair_tasks(2))
    a = env.next("p", "ann1")
    first = env.judge(a["assignment_id"], "ann1", choice="B", strength=4, client_key="key-1")
    again = env.judge(a["assignment_id"], "ann1", choice="A", client_key="key-1")  # a retry, even if garbled
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json() == first.json() and again.json()["choice"] == "B"
    other = env.judge(a["assignment_id"], "ann1", choice="A", client_key="key-2")
    assert other.status_code == 409
    b = env.next("p", "ann1")
    assert env.judge(b["assignment_id"], "ann1", choice="A", client_key="key-1").status_code == 409
    with transaction(env.client.app.state.sessions) as s:
        assert s.scalar(select(func.count(Judgement.id))) == 1


def test_submit_with_next_answers_the_next_lease_in_the_same_round_trip(env):
    env.project("p", overlap=1)
    env.tasks("p", pair_tasks(2))
    a = env.next("p", "ann1")
    url = f"/api/v1/assignments/{a['assignment_id']}/judgement?next=true&html=true"
    first = env.client.post(url, json={"choice": "A", "client_key": "k1"}, headers=env.auth("ann1"))
    assert first.status_code == 201 and first.json()["choice"] == "A"
    given = first.json()["next"]
    assert given["task_id"] != a["task_id"] and given["progress"] == {"done": 1, "remaining": 1}
    assert given["html"]["responses"][0].startswith("<p>")
    shown = env.next("p", "ann1")  # the lease /next gives now is the one the submit answered
    assert shown["assignment_id"] == given["assignment_id"] and shown["responses"] == given["responses"]
    # A retried submit (same key) answers the stored judgement and the same next lease, not another.
    again = env.client.post(url, json={"choice": "B", "client_key": "k1"}, headers=env.auth("ann1"))
    assert again.status_code == 200 and again.json()["choice"] == "A"
    assert again.json()["next"]["assignment_id"] == given["assignment_id"]
    last = env.client.post(f"/api/v1/assignments/{given['assignment_id']}/judgement?next=true",
                           json={"choice": "B"}, headers=env.auth("ann1"))
    assert last.status_code == 201 and last.json()["next"] is None  # nothing left
    assert "next" not in env.judge(a["assignment_id"], "ann1", choice="A", client_key="k1").json()  # not asked
    assert len(env.export("p")) == 2


def test_skip_frees_the_task_for_others_and_never_returns(env):
    env.project("p", overlap=1)
    env.tasks("p", pair_tasks(1))
    a = env.next("p", "ann1")
    r = env.client.post(f"/api/v1/assignments/{a['assignment_id']}/skip", headers=env.auth("ann1"))
    assert r.status_code == 200
    assert env.next("p", "ann1") is None
    assert env.next("p", "ann2")["task_id"] == a["task_id"]


def test_gold_tasks_mixed_in_and_accuracy_per_annotator(env):
    env.project("p", overlap=1, gold_rate=0.5)
    env.tasks("p", pair_tasks(20) + [
        {"id": f"g{i}", "prompt": f"gold {i}", "responses": [f"right {i}", f"wrong {i}"], "gold": 0} for i in range(4)])
    gold_seen = 0
    while (a := env.next("p", "ann1")) is not None:
        is_gold = a["task_id"].startswith("g")
        gold_seen += is_gold
        pick = "A" if a["responses"][0].startswith("right") else "B"
        # ann1 answers gold tasks right except g0
        if a["task_id"] == "g0":
            pick = "B" if pick == "A" else "A"
        assert env.judge(a["assignment_id"], "ann1", choice=pick).status_code == 201
    assert gold_seen == 4  # rate 0.5 over 20 regular tasks: all 4 golds drawn (chance of fewer < 1e-3)
    stats = env.client.get("/api/v1/projects/p/stats", headers=env.auth("admin")).json()
    ann = stats["annotators"]["ann1"]
    assert (ann["gold_done"], ann["gold_correct"], ann["gold_accuracy"]) == (4, 3, 0.75)
    assert stats["progress"]["done"] == 20 and stats["progress"]["remaining"] == 0


def test_export_comparisons_read_by_foundation_reader(env, tmp_path):
    env.project("p", overlap=2)
    env.tasks("p", pair_tasks(3) + [{"id": "multi", "prompt": [{"role": "system", "content": "Be brief."},
                                                               {"role": "user", "content": "Hi"}],
                                     "responses": ["Hello.", "Greetings, traveller."]}])
    answers = {"ann1": ["A", "tie", "both_bad", "B"], "ann2": ["A", "A", "B", "B"]}
    for user, choices in answers.items():
        for c in choices:
            a = env.next("p", user)
            strength = 2 if c in ("A", "B") else None  # a tie has no strength
            assert env.judge(a["assignment_id"], user, choice=c, strength=strength).status_code == 201
    r = env.client.get("/api/v1/projects/p/export", params={"format": "comparisons"}, headers=env.auth("admin"))
    counts = json.loads(r.headers["X-Preftune-Counts"])
    assert counts == {"comparisons": 6, "tie_excluded": 1, "both_bad_excluded": 1}
    path = tmp_path / "comparisons.jsonl"
    path.write_text(r.text)
    records = read_jsonl(path, "comparisons").records
    assert len(records) == 6
    assert {rec.annotator for rec in records} == {"ann1", "ann2"}
    assert all(rec.strength == 2.0 for rec in records)
    multi = [rec for rec in records if rec.messages[0]["role"] == "system"]
    assert multi and multi[0].messages[1] == {"role": "user", "content": "Hi"}
    with_ties = env.export("p", include_ties="true")
    assert len(with_ties) == 7 and sum(1 for x in with_ties if x.get("tie")) == 1
    raw = env.export("p", "raw")
    assert len(raw) == 8 and {x["choice"] for x in raw} == {"A", "B", "tie", "both_bad"}


def test_ranking_project_ties_and_export(env, tmp_path):
    env.project("r", kind="ranking")
    env.tasks("r", [{"id": "k", "prompt": "Rank these", "responses": ["best", "mid", "also mid", "worst"]}])
    a = env.next("r", "ann1")
    pos = {text: i for i, text in enumerate(a["responses"])}
    ranking = [pos["best"], [pos["mid"], pos["also mid"]], pos["worst"]]
    r = env.judge(a["assignment_id"], "ann1", ranking=ranking)
    assert r.status_code == 201, r.text
    assert r.json()["ranking"] == [[pos["best"]], sorted([pos["mid"], pos["also mid"]]), [pos["worst"]]]
    rows = env.export("r")
    pairs = {(x["chosen"], x["rejected"]) for x in rows}
    assert pairs == {("best", "mid"), ("best", "also mid"), ("best", "worst"), ("mid", "worst"), ("also mid", "worst")}
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    assert len(read_jsonl(path, "comparisons").records) == 5


def test_ranking_must_place_every_response_once(env):
    env.project("r", kind="ranking")
    env.tasks("r", [{"prompt": "Rank", "responses": ["a", "b", "c"]}])
    a = env.next("r", "ann1")
    for bad in ([0, 1], [0, 1, 1], [0, 1, 5], "first"):
        r = env.judge(a["assignment_id"], "ann1", ranking=bad)
        assert r.status_code == 422, bad


def test_rating_project_flags_and_ratings_export(env, tmp_path):
    env.project("q", kind="rating", scale=5)
    env.tasks("q", [{"id": "x", "prompt": "Capital of France?", "responses": ["Paris", "Lyon"]}])
    a = env.next("q", "ann1")
    assert env.judge(a["assignment_id"], "ann1", rating=6).status_code == 422
    assert env.judge(a["assignment_id"], "ann1", rating=2, flags=["made_up"]).status_code == 422
    assert env.judge(a["assignment_id"], "ann1", choice="A").status_code == 422  # wrong fields for the kind
    assert env.judge(a["assignment_id"], "ann1", rating=5, flags=["other", "hallucination"]).status_code == 201
    rows = env.export("q", "ratings")
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in rows))
    (rec,) = read_jsonl(path, "ratings").records
    assert (rec.rating, rec.scale, rec.flags, rec.annotator) == (5, 5, ["hallucination", "other"], "ann1")
    r = env.client.get("/api/v1/projects/q/export", params={"format": "comparisons"}, headers=env.auth("admin"))
    assert r.status_code == 422


def test_import_accepts_samples_and_comparisons(env):
    env.project("p")
    samples = [{"prompt": "Say hi", "response": r} for r in ("hi", "hello", "hey")]
    assert env.tasks("p", samples)["imported"] == 3  # 3 candidates -> 3 pairs
    comparison = {"prompt": "2+2?", "chosen": "4", "rejected": "5", "annotator": "earlier"}
    assert env.tasks("p", [comparison])["imported"] == 1
    again = env.tasks("p", [comparison])
    assert again == {"imported": 0, "unchanged": 1, "too_few_responses": 0}


def test_import_of_preftune_sample_output_keeps_who_wrote_what(env):
    env.project("p")
    sampled = [{"id": "p1", "prompt": "Say hi", "responses": ["hi", "hello", "hi"], "models": ["base", "sft", "sft"],
                "ended": [True, True, False], "num_tokens": [2, 3, 2], "sampling": {"temperature": 0.7}},
               {"id": "p2", "prompt": "Say bye", "responses": ["bye", "bye"], "models": ["base", "sft"],
                "ended": [True, True], "num_tokens": [2, 2], "sampling": {"temperature": 0.7}}]
    # p1: the repeated "hi" is dropped -> one pair; p2 has no two distinct responses: counted, not imported.
    assert env.tasks("p", sampled) == {"imported": 1, "unchanged": 0, "too_few_responses": 1}
    a = env.next("p", "ann1")
    assert a["task_id"] == "p1" and sorted(a["responses"]) == ["hello", "hi"]
    hello = a["responses"].index("hello")
    assert env.judge(a["assignment_id"], "ann1", choice="AB"[hello]).status_code == 201
    (raw,) = env.export("p", "raw")
    assert raw["meta"]["per_response"] == {"models": ["base", "sft"], "ended": [True, True], "num_tokens": [2, 3]}
    assert raw["responses"][raw["meta"]["per_response"]["models"].index("sft")] == "hello"


def test_import_is_all_or_nothing_with_a_clear_message(env):
    env.project("p")
    records = pair_tasks(2) + [{"prompt": "x", "responses": "not a list"}]
    r = env.client.post("/api/v1/projects/p/tasks", json=records, headers=env.auth("admin"))
    assert r.status_code == 422 and r.json()["detail"].startswith("record 3:")
    assert env.next("p", "ann1") is None  # nothing was written


def test_input_limits(env):
    env.project("p", kind="ranking")
    too_many = [{"prompt": "x", "responses": [f"r{i}" for i in range(17)]}]
    r = env.client.post("/api/v1/projects/p/tasks", json=too_many, headers=env.auth("admin"))
    assert r.status_code == 422 and "limit 16" in r.json()["detail"]
    too_long = [{"prompt": "x" * 20_001, "responses": ["a", "b"]}]
    r = env.client.post("/api/v1/projects/p/tasks", json=too_long, headers=env.auth("admin"))
    assert r.status_code == 422 and "20000" in r.json()["detail"]
    body = json.dumps([{"prompt": "x", "responses": ["a" * 19_000, "b"]}] * 300)
    r = env.client.post("/api/v1/projects/p/tasks", content=body, headers={**env.auth("admin"),
                                                                           "Content-Type": "application/json"})
    assert r.status_code == 413


def test_malformed_json_is_a_4xx_with_a_message(env):
    env.project("p")
    env.tasks("p", pair_tasks(1))
    a = env.next("p", "ann1")
    headers = {**env.auth("ann1"), "Content-Type": "application/json"}
    for body in ('{"choice": "A"', "[]", '"A"', '{"choice": "C"}', '{"choice": "A", "strength": 9}'):
        r = env.client.post(f"/api/v1/assignments/{a['assignment_id']}/judgement", content=body, headers=headers)
        assert 400 <= r.status_code < 500, body
        assert isinstance(r.json()["detail"], str) and r.json()["detail"]
    r = env.client.post("/api/v1/projects/p/tasks", content="{nope", headers={**env.auth("admin"),
                                                                              "Content-Type": "application/json"})
    assert r.status_code == 422 and "malformed JSON" in r.json()["detail"]
    assert env.judge(a["assignment_id"], "ann1", choice="A").status_code == 201  # nothing half-written


SQL_NASTY = "Robert'); DROP TABLE judgements;-- \" ; SELECT * FROM users WHERE '1'='1' % _ \\ ? # & ="


def test_sql_metacharacters_stored_and_returned_verbatim(env):
    env.project(SQL_NASTY[:90])
    name = SQL_NASTY[:90]
    env.tasks(name, [{"id": SQL_NASTY, "prompt": SQL_NASTY, "responses": [SQL_NASTY + " A", SQL_NASTY + " B"],
                      "meta": {"note": SQL_NASTY}}])
    env.add_user(SQL_NASTY[:60])
    user = SQL_NASTY[:60]
    a = env.next(name, user)
    assert a["task_id"] == SQL_NASTY and a["prompt"] == SQL_NASTY
    assert sorted(a["responses"]) == [SQL_NASTY + " A", SQL_NASTY + " B"]
    r = env.judge(a["assignment_id"], user, choice="A", rationale=SQL_NASTY, client_key=SQL_NASTY[:100])
    assert r.status_code == 201 and r.json()["rationale"] == SQL_NASTY
    (raw,) = env.export(name, "raw")
    assert raw["rationale"] == SQL_NASTY and raw["annotator"] == user and raw["meta"] == {"note": SQL_NASTY}
    assert raw["task_id"] == SQL_NASTY and raw["client_key"] == SQL_NASTY[:100]
    stats = env.client.get(f"/api/v1/projects/{quote(name, safe='')}/stats", headers=env.auth("admin")).json()
    assert stats["project"] == name and user in stats["annotators"]


def test_lease_lasts_the_project_setting(env):
    from datetime import datetime, timezone

    env.project("p", overlap=1, lease_seconds=90)
    env.tasks("p", pair_tasks(1))
    a = env.next("p", "ann1")
    expires = datetime.fromisoformat(a["expires_at"].replace("Z", "+00:00"))
    left = (expires - datetime.now(timezone.utc)).total_seconds()
    assert 80 < left <= 90


def test_malformed_form_data_is_a_4xx_and_writes_nothing(env):
    import io
    import re


    env.project("p")
    env.tasks("p", pair_tasks(1))
    browser = env.login("ann1")
    page = browser.get("/annotate/p")
    csrf = page_csrf(page.text)
    assignment_id = re.search(r'name="assignment_id" id="assignment_id" value="(\d+)"', page.text).group(1)
    for data in ({"assignment_id": "x"}, {"assignment_id": assignment_id, "choice": "Z"},
                 {"assignment_id": assignment_id, "choice": "A", "strength": "9"}, {}):
        r = browser.post("/annotate/p/submit", data={**data, "csrf_token": csrf}, follow_redirects=False)
        assert 400 <= r.status_code < 500 and "error" in r.text, data
    admin = env.login("admin")
    csrf = page_csrf(admin.get("/admin").text)
    for content in (b"\xff\xfe not utf-8\n", b'{"prompt": "x", "responses": ["a", "b"]}\n{oops\n', b"", b"[1, 2]"):
        r = admin.post("/admin/projects/p/import", data={"csrf_token": csrf},
                       files={"file": ("t.jsonl", io.BytesIO(content), "application/json")}, follow_redirects=False)
        assert r.status_code == 422 and "t.jsonl" in r.text, content
    r = admin.post("/admin/projects", data={"csrf_token": csrf, "name": "q", "kind": "pairwise", "overlap": "many"},
                   follow_redirects=False)
    assert r.status_code == 422 and "overlap must be a number" in r.text
    with transaction(env.client.app.state.sessions) as s:
        assert s.scalars(select(Judgement)).all() == []
    assert env.export("p", "raw") == []


def test_lease_is_bounded_huge_ids_are_404_and_a_500_keeps_the_security_headers(env, monkeypatch):
    """Found in a browser session: lease_seconds 10**12 was accepted and broke every /next (500),
    10**30 made the create call 500, a 23-digit assignment id answered 500, and 500s had no
    security headers."""
    for lease in (10 ** 12, 10 ** 30, 5):
        r = env.client.post("/api/v1/projects", json={"name": f"p{lease}", "kind": "pairwise", "lease_seconds": lease},
                            headers=env.auth("admin"))
        assert r.status_code == 422 and "lease must be between 10 and 604800 seconds" in r.text, r.text
    env.project("p", overlap=1, lease_seconds=604800)
    env.tasks("p", pair_tasks(1))
    assert env.next("p", "ann1") is not None  # the longest lease still works
    for path in ("judgement", "skip"):
        r = env.client.post(f"/api/v1/assignments/99999999999999999999999/{path}", json={"choice": "A"},
                            headers=env.auth("ann1"))
        assert r.status_code == 404, r.text
    import preftune.feedback.app.api as api

    def broken(*_):
        raise RuntimeError("a bug")

    monkeypatch.setattr(api, "project_stats", broken)
    r = env.client.get("/api/v1/projects/p/stats", headers=env.auth("admin"))
    assert r.status_code == 500 and r.json() == {"detail": "internal error"}
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"
    assert "content-security-policy" in r.headers


def test_rating_ids_survive_nan_meta_is_refused_chunked_uploads_are_413_and_exports_are_named(env):
    env.project("r", kind="rating", overlap=1)
    env.tasks("r", [{"id": "my-rating-1", "prompt": "Q?", "response": "An answer."}])
    a = env.next("r", "ann1")
    assert env.judge(a["assignment_id"], "ann1", rating=2).status_code == 201
    (row,) = env.export("r", "ratings")
    assert row["id"].startswith("my-rating-1#")  # the import's id, then the judgement's

    bad = b'[{"prompt": "q", "responses": ["a", "b"], "meta": {"score": NaN}}]'
    env.project("p", overlap=1)
    r = env.client.post("/api/v1/projects/p/tasks", content=bad,
                        headers={**env.auth("admin"), "content-type": "application/json"})
    assert r.status_code == 422 and "NaN or Infinity" in r.text, r.text

    limit = env.client.app.state.settings.max_body_bytes

    def chunks():  # no content-length: transfer-encoding chunked
        for _ in range(limit // 65536 + 2):
            yield b" " * 65536

    r = env.client.post("/api/v1/projects/p/tasks", content=chunks(),
                        headers={**env.auth("admin"), "content-type": "application/json"})
    assert r.status_code == 413 and r.headers["x-content-type-options"] == "nosniff", r.text
    small = env.client.post("/api/v1/projects/p/tasks", content=iter([json.dumps(pair_tasks(1)).encode()]),
                            headers={**env.auth("admin"), "content-type": "application/json"})
    assert small.status_code == 201, small.text  # a chunked body within the limit is read as usual

    r = env.client.get("/api/v1/projects/r/export", params={"format": "raw"}, headers=env.auth("admin"))
    assert r.headers["content-disposition"] == 'attachment; filename="r-raw.jsonl"'


def test_strength_with_a_tie_is_refused_not_dropped(env):
    env.project("p", overlap=1)
    env.tasks("p", pair_tasks(1))
    a = env.next("p", "ann1")
    for choice in ("tie", "both_bad"):
        r = env.judge(a["assignment_id"], "ann1", choice=choice, strength=3)
        assert r.status_code == 422 and "has none" in r.text, r.text
    assert env.judge(a["assignment_id"], "ann1", choice="tie").status_code == 201


def test_names_are_normalised_and_unshowable_ones_refused(env):
    """Found in a browser session: look-alike and control-character names were accepted, and a
    project named ".." was created and then unreachable."""
    def create(name: str):
        return env.client.post("/api/v1/projects", json={"name": name, "kind": "pairwise"}, headers=env.auth("admin"))

    for name, why in [("..", "dots only"), (".", "dots only"), ("a\u200bb", "U+200B"), ("evil\u202etxt", "U+202E"),
                      ("nul\x00byte", "U+0000"), ("two\nlines", "U+000A"), ("b\u043ess", "Cyrillic and Latin"),
                      ("a/b", "'/'"), ("   ", "1 to 100")]:
        r = create(name)
        assert r.status_code == 422 and why in r.text, (name, r.text)
        user = env.client.post("/api/v1/users", json={"name": name, "role": "annotator"}, headers=env.auth("admin"))
        assert user.status_code == 422, (name, user.text)
    assert create("\uff44\uff45\uff4d\uff4f").status_code == 201  # full-width "demo": stored as NFKC "demo"
    assert create("demo").status_code == 409
    assert env.client.get("/api/v1/projects/%EF%BD%84emo/stats", headers=env.auth("admin")).status_code == 200
    assert create("Привет").status_code == 201 and create("日本語のプロジェクト").status_code == 201  # one script: fine


def test_ranking_agreement_says_it_counts_response_pairs(env):
    """Found in a browser session: the ranking agreement card called response pairs "items"."""
    env.project("r", kind="ranking", overlap=2)
    env.tasks("r", [{"id": "one", "prompt": "Rank", "responses": ["x", "y", "z"]}])
    for user in ("ann1", "ann2"):
        a = env.next("r", user)
        assert env.judge(a["assignment_id"], user, ranking=[0, 1, 2]).status_code == 201
    agreement = env.client.get("/api/v1/projects/r/stats", headers=env.auth("admin")).json()["agreement"]
    assert (agreement["items"], agreement["item_kind"], agreement["tasks"]) == (3, "response pairs", 1)
    page = env.login("admin").get("/admin/projects/r")
    assert "Over 3 response pairs (of 1 tasks) judged by two or more annotators" in page.text


def test_text_the_database_cannot_hold_is_a_4xx_naming_it(env):
    """Found by reading the code: a lone surrogate (JSON "\\ud800") was imported, and then every
    /next of its task answered 500 (its JSON cannot be encoded) to the same annotator forever; a
    NUL made PostgreSQL refuse the statement (500) in names, rationales and client keys; a
    200-character id grew past its column with a pair's ":0-1"."""
    env.project("p", overlap=1)
    admin, json_type = env.auth("admin"), {"content-type": "application/json"}
    for raw, expected in ((r'[{"prompt": "q", "responses": ["ok \ud800 x", "fine"]}]', "lone surrogate (U+D800)"),
                          (r'[{"prompt": "q\u0000", "responses": ["a", "b"]}]', "NUL character"),
                          (r'[{"prompt": "q", "responses": ["a", "b"], "meta": {"note": "x\udfff"}}]', "meta")):
        r = env.client.post("/api/v1/projects/p/tasks", content=raw, headers={**admin, **json_type})
        assert r.status_code == 422 and r.json()["detail"].startswith("record 1:") and expected in r.text, r.text
    long_id = {"id": "x" * 200, "prompt": "q", "responses": ["a", "b", "c"]}  # the id itself is at the limit
    r = env.client.post("/api/v1/projects/p/tasks", json=[long_id], headers=admin)
    assert r.status_code == 422 and "204 characters long (limit 200" in r.text, r.text
    env.tasks("p", pair_tasks(1))
    a = env.next("p", "ann1")
    for raw in (r'{"choice": "A", "rationale": "x\ud800"}', r'{"choice": "A", "client_key": "k\u0000"}'):
        r = env.client.post(f"/api/v1/assignments/{a['assignment_id']}/judgement", content=raw,
                            headers={**env.auth("ann1"), **json_type})
        assert r.status_code == 422, r.text
    r = env.client.put("/api/v1/projects/p/guidelines", content=r'{"guidelines": "x\ud800"}',
                       headers={**admin, **json_type})
    assert r.status_code == 422, r.text  # (typed fields: pydantic refuses a lone surrogate itself)
    for path in ("/api/v1/projects/p%00q/next", "/api/v1/projects/p%00q/export"):
        assert env.client.get(path, headers=admin).status_code == 404
    import re

    from fastapi.testclient import TestClient

    browser = TestClient(env.client.app)
    token = re.search(r'name="csrf_token" value="([^"]+)"', browser.get("/login").text).group(1)
    r = browser.post("/login", data={"username": "ann1\x00", "password": "x" * 12, "csrf_token": token})
    assert r.status_code < 500 and "Wrong user name or password" in r.text
    assert env.judge(a["assignment_id"], "ann1", choice="A").status_code == 201  # nothing was half-stored


def test_form_numbers_in_other_digits_are_a_4xx(env):
    """Found by reading the code: str.isdigit() accepts "²", which int() refuses (500)."""
    import re

    for kind, field in (("pairwise", {"choice": "A", "strength": "²"}), ("rating", {"rating": "²"}),
                        ("ranking", {"rank_0": "²", "rank_1": "1"})):
        env.project(kind, kind=kind, overlap=1)
        env.tasks(kind, [{"prompt": "q", "responses": ["a", "b"]}])
        browser = env.login("ann1")
        page = browser.get(f"/annotate/{kind}")
        assignment_id = re.search(r'name="assignment_id" id="assignment_id" value="(\d+)"', page.text).group(1)
        r = browser.post(f"/annotate/{kind}/submit", follow_redirects=False,
                         data={"assignment_id": assignment_id, "csrf_token": page_csrf(page.text), **field})
        assert r.status_code == 422 and "must be a number" in r.text, (kind, r.status_code)
