"""Judges: who decides whether A's response is better than B's.

* Any scorer (``preftune.scoring``): a reward-model directory, a built-in such as ``helpful``,
  ``file.py:function`` / ``python:module:function``, weighted sums. These score each response; A
  beats B on a prompt when its score is higher.
* ``human:PROJECT``: A-vs-B pairs go to the feedback app's project (``push``); a later
  ``preftune eval --collect`` pulls the people's judgements (``collect``) and the project's
  agreement statistics. The app's JSON API (admin bearer token from ``PREFTUNE_FEEDBACK_TOKEN``):

  - ``POST {url}/api/v1/projects/{project}/tasks`` -- a JSON list of
    ``{"prompt", "responses": [x, y], "id", "meta"}``;
  - ``GET {url}/api/v1/projects/{project}/export?format=raw`` -- JSONL, one judgement a line;
  - ``GET {url}/api/v1/projects/{project}/stats`` -- JSON with the agreement statistics.

  Which of the two pushed responses is A is randomised per pair and recorded in ``meta`` and in
  ``OUT/human-PROJECT.jsonl`` (the app also shuffles the order it shows them in, per annotator;
  people favour one position). The project must exist (a ``pairwise`` project).
"""

from __future__ import annotations

import json
import os
import random
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from preftune.errors import PreftuneError
from preftune.scoring import Scorer, load_scorer

HUMAN_PREFIX = "human:"
TOKEN_ENV = "PREFTUNE_FEEDBACK_TOKEN"


def is_human(spec: str) -> bool:
    return spec.startswith(HUMAN_PREFIX)


def resolve_judge(spec: str, feedback_url: str | None = None, device: str | None = None,
                  dtype: str | None = None) -> "HumanJudge | Scorer":
    """The judge a ``--judge`` value names: ``human:PROJECT`` or a scorer."""
    if is_human(spec):
        return HumanJudge.from_spec(spec, feedback_url)
    return load_scorer(spec, device=device, dtype=dtype)


# ---------------------------------------------------------------- human judges


@dataclass
class HumanJudge:
    project: str
    url: str
    token: str | None = None
    timeout: float = 30.0

    @classmethod
    def from_spec(cls, spec: str, url: str | None) -> "HumanJudge":
        project = spec[len(HUMAN_PREFIX):].strip()
        if not project:
            raise PreftuneError(f"judge {spec!r}: expected human:PROJECT")
        if not url:
            raise PreftuneError(f"judge {spec!r} needs --feedback-url (the feedback app's address)")
        return cls(project=project, url=url.rstrip("/"), token=os.environ.get(TOKEN_ENV))

    def _request(self, method: str, path: str, body: Any = None) -> bytes:
        url = f"{self.url}/api/v1/projects/{urllib.request.quote(self.project, safe='')}{path}"
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as e:
            hint = f" (set {TOKEN_ENV})" if e.code in (401, 403) and not self.token else ""
            try:
                detail = json.loads(e.read()).get("detail")
            except (ValueError, AttributeError, OSError):
                detail = None
            why = f": {detail}" if isinstance(detail, str) else ""
            raise PreftuneError(f"feedback app: {method} {url} failed: HTTP {e.code} {e.reason}{why}{hint}") from None
        except (urllib.error.URLError, OSError) as e:
            raise PreftuneError(f"feedback app: cannot reach {url}: {getattr(e, 'reason', e)}") from None

    def push(self, prompts: Sequence[str], responses_a: Sequence[str], responses_b: Sequence[str], *,
             run: str, seed: int, out: Path) -> int:
        """Send one A-vs-B task per prompt (positions shuffled); record them in ``out``."""
        rng = random.Random(seed)
        tasks = []
        for i, (p, a, b) in enumerate(zip(prompts, responses_a, responses_b)):
            a_first = rng.random() < 0.5
            tasks.append({"prompt": p, "responses": [a, b] if a_first else [b, a], "id": f"{run}-{i}",
                          "meta": {"eval_run": run, "index": i, "a_position": 0 if a_first else 1}})
        self._request("POST", "/tasks", tasks)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in tasks), encoding="utf-8")
        return len(tasks)

    def collect(self, tasks_file: Path) -> tuple[list[float], dict | None, int]:
        """Outcomes (1: A preferred, 0.5: tie, 0: B preferred; one per judgement) for the tasks in
        ``tasks_file``, the project's stats, and the number of tasks still without a judgement."""
        if not tasks_file.exists():
            raise PreftuneError(f"{tasks_file}: no pushed tasks for {HUMAN_PREFIX}{self.project}; "
                                f"run preftune eval without --collect first")
        a_position = {}
        for line in tasks_file.read_text(encoding="utf-8").splitlines():
            if line.strip():
                task = json.loads(line)
                a_position[task["id"]] = task["meta"]["a_position"]
        raw = self._request("GET", "/export?format=raw").decode("utf-8")
        outcomes, judged = [], set()
        for lineno, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise PreftuneError(f"feedback app export line {lineno}: invalid JSON") from None
            task_id = str(row.get("task_id", row.get("id")))
            if task_id not in a_position:
                continue  # other tasks of the same project
            choice = judgement_choice(row)
            if choice is None:
                continue  # skipped by the annotator
            judged.add(task_id)
            outcomes.append(0.5 if choice == "tie" else float(choice == a_position[task_id]))
        try:
            stats = json.loads(self._request("GET", "/stats"))
        except (PreftuneError, json.JSONDecodeError):
            stats = None
        return outcomes, stats, len(set(a_position) - judged)


def judgement_choice(row: dict) -> int | str | None:
    """The index (0 or 1, into the pushed ``responses``) a judgement preferred, ``"tie"``, or None.

    Reads the app's canonical ``label`` ("0", "1", "tie"; "both_bad" counts as a tie: neither
    response is preferred). Other exports may give ``preferred``/``winner`` as 0/1/"tie" or a
    ``ranking`` of indices best first (``[[0, 1]]`` is a tie). The app's ``choice`` ("A"/"B") is
    the position *as shown*, which the app shuffles per annotator, so it is never used."""
    for key in ("label", "preferred", "winner"):
        if key in row:
            value = row[key]
            if value is None or value == "skip":
                return None
            if value in ("tie", "both_bad"):
                return "tie"
            if value in (0, 1, "0", "1"):
                return int(value)
            raise PreftuneError(f"feedback app export: cannot read {key}={value!r}")
    ranking = row.get("ranking")
    if isinstance(ranking, list) and ranking:
        first = ranking[0] if isinstance(ranking[0], list) else [ranking[0]]
        return "tie" if len(first) > 1 else int(first[0])
    return None
