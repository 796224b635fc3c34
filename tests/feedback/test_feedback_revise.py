"""Annotators change their own judgements: the export has the latest answer, the earlier ones are
kept (raw export), gold grading follows the change, nobody touches anyone else's."""

from __future__ import annotations

import re

from .conftest import pair_tasks


def revise(env, judgement_id: int, user: str, **body):
    return env.client.put(f"/api/v1/judgements/{judgement_id}", json=body, headers=env.auth(user))


def judged(env, project: str, user: str, **body) -> dict:
    a = env.next(project, user)
    r = env.judge(a["assignment_id"], user, **body)
    assert r.status_code == 201, r.text
    return {**a, **r.json()}


def test_a_changed_pairwise_judgement_exports_the_new_answer_and_keeps_the_old(env):
    env.project("p")
    env.tasks("p", pair_tasks(2))
    j = judged(env, "p", "ann1", choice="A", strength=3, rationale="first thought")
    chosen_before = env.export("p")[0]["chosen"]
    assert chosen_before == j["responses"][0]
    r = revise(env, j["judgement_id"], "ann1", choice="B", rationale="on reflection")
    assert r.status_code == 200
    body = r.json()
    assert (body["choice"], body["strength"], body["rationale"], body["revisions"]) == ("B", None, "on reflection", 1)
    assert body["revised_at"] is not None
    [row] = env.export("p")
    assert row["chosen"] == j["responses"][1] and row["rejected"] == j["responses"][0] and "strength" not in row
    [raw] = env.export("p", "raw")
    assert raw["choice"] == "B" and raw["rationale"] == "on reflection"
    [old] = raw["revisions"]
    assert (old["choice"], old["strength"], old["rationale"]) == ("A", 3, "first thought")
    assert old["label"] == str(raw["shown_order"][0]) and old["until"] == raw["revised_at"]
    # the same answer again changes nothing and records nothing
    assert revise(env, j["judgement_id"], "ann1", choice="B", rationale="on reflection").json()["revisions"] == 1
    # a tie: no strength, as on first submission
    assert revise(env, j["judgement_id"], "ann1", choice="tie", strength=2).status_code == 422
    assert revise(env, j["judgement_id"], "ann1", choice="tie").json()["revisions"] == 2
    assert env.export("p") == []  # ties are left out of comparisons


def test_nobody_changes_someone_elses_judgement(env):
    env.project("p")
    env.tasks("p", pair_tasks(1))
    j = judged(env, "p", "ann1", choice="A")
    for user in ("ann2", "admin"):
        assert revise(env, j["judgement_id"], user, choice="B").status_code == 404
    assert revise(env, 2 ** 40, "ann1", choice="B").status_code == 404
    assert env.export("p", "raw")[0]["choice"] == "A"


def test_rankings_ratings_and_gold_are_revised_in_their_own_terms(env):
    env.project("k", kind="ranking")
    env.tasks("k", [{"id": "k0", "prompt": "Q", "responses": ["a", "b", "c"]}])
    j = judged(env, "k", "ann1", ranking=[0, 1, 2])
    shown = j["responses"]
    r = revise(env, j["judgement_id"], "ann1", ranking=[2, [0, 1]])
    assert r.status_code == 200 and r.json()["ranking"] == [[2], [0, 1]]
    raw = env.export("k", "raw")[0]
    assert [[raw["responses"][i] for i in g] for g in raw["ranking"]] == [[shown[2]], sorted([shown[0], shown[1]],
                                                                                                key=raw["responses"].index)]
    assert revise(env, j["judgement_id"], "ann1", ranking=[0, 1]).status_code == 422  # every response ranked

    env.project("r", kind="rating", gold_rate=0.99)
    env.tasks("r", [{"id": "g", "prompt": "Q", "responses": ["gold one"], "gold": 3}]
              + [{"id": f"n{i}", "prompt": f"Q{i}", "responses": ["plain"]} for i in range(20)])
    # gold comes at rate 0.99 while regular work remains: skip regular tasks until it does
    while (a := env.next("r", "ann2"))["task_id"] != "g":
        assert env.client.post(f"/api/v1/assignments/{a['assignment_id']}/skip", headers=env.auth("ann2")).is_success
    r = env.judge(a["assignment_id"], "ann2", rating=1, flags=["harmful"])
    assert r.status_code == 201, r.text
    j = {**a, **r.json()}
    assert env.client.get("/api/v1/projects/r/stats", headers=env.auth("admin")).json()["annotators"]["ann2"][
        "gold_accuracy"] == 0
    assert revise(env, j["judgement_id"], "ann2", rating=3).json()["flags"] == []
    assert env.client.get("/api/v1/projects/r/stats", headers=env.auth("admin")).json()["annotators"]["ann2"][
        "gold_accuracy"] == 1
    assert revise(env, j["judgement_id"], "ann2", choice="A").status_code == 422


def test_my_judgements_newest_first(env):
    env.project("p")
    env.tasks("p", pair_tasks(4))
    ids = [judged(env, "p", "ann1", choice="A")["judgement_id"] for _ in range(3)]
    judged(env, "p", "ann2", choice="B")
    r = env.client.get("/api/v1/projects/p/judgements?limit=2", headers=env.auth("ann1"))
    assert r.status_code == 200
    rows = r.json()
    assert [row["judgement_id"] for row in rows] == ids[::-1][:2]
    assert set(rows[0]) >= {"choice", "messages", "responses", "task_id", "revisions"}
    assert env.client.get("/api/v1/projects/p/judgements?limit=0", headers=env.auth("ann1")).status_code == 422


def test_the_history_page_changes_a_judgement_without_script(env):
    env.project("p")
    env.tasks("p", pair_tasks(2))
    j = judged(env, "p", "ann1", choice="A", strength=2)
    browser = env.login("ann1")
    page = browser.get("/annotate/p/judgements").text
    assert "A is better (somewhat)" in page
    link = f'/annotate/p/judgements/{j["judgement_id"]}'
    assert link in page
    form = browser.get(link).text
    assert re.search(r'value="A" required checked', form) and re.search(r'name="strength" value="2" checked', form)
    assert f'action="{link}"' in form and 'id="skip"' not in form and 'id="lease"' not in form
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', form).group(1)
    r = browser.post(link, data={"csrf_token": csrf, "choice": "B", "strength": "4"})
    assert r.status_code == 200 and "Judgement changed" in r.text and "B is better (much)" in r.text
    assert "changed 1x" in r.text
    assert env.export("p", "raw")[0]["strength"] == 4
    assert browser.post(link, data={"csrf_token": "wrong", "choice": "A"}).status_code == 400
    assert env.login("ann2").get(link).status_code == 404
    env.project("q")
    assert browser.get(f'/annotate/q/judgements/{j["judgement_id"]}').status_code == 404  # not in that project


def test_two_revisions_at_once_both_stay_in_the_history(env):
    """Found by reading the code: on PostgreSQL a revision read the answer while another revision
    was in flight, so both recorded the same earlier answer and the one between was lost."""
    import threading

    import pytest
    from sqlalchemy import select

    from preftune.feedback.app import service
    from preftune.feedback.app.db import transaction
    from preftune.feedback.app.models import User

    if env.url.startswith("sqlite"):
        pytest.skip("SQLite serialises writers: no revision runs while another is in flight")
    env.project("p", overlap=1)
    env.tasks("p", pair_tasks(1))
    a = env.next("p", "ann1")
    judgement_id = env.judge(a["assignment_id"], "ann1", choice="A").json()["judgement_id"]
    s = env.client.app.state.sessions()
    service.revise_judgement(s, judgement_id, s.scalar(select(User).where(User.name == "ann1")), {"choice": "B"})

    def revise_again() -> None:
        with transaction(env.client.app.state.sessions) as s2:
            service.revise_judgement(s2, judgement_id, s2.scalar(select(User).where(User.name == "ann1")),
                                     {"choice": "tie"})

    thread = threading.Thread(target=revise_again, daemon=True)
    thread.start()
    thread.join(0.5)
    s.commit()
    s.close()
    thread.join(10)
    [row] = env.export("p", "raw")
    assert row["choice"] == "tie" and [r["choice"] for r in row["revisions"]] == ["A", "B"]
