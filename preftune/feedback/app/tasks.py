"""Task import: JSONL records -> tasks of a project's kind, with input limits.

Accepted records (one JSON object each):
- a task: ``{"prompt", "responses": [...], "id"?, "gold"?, "meta"?}``;
- a sample (what ``preftune sample`` writes): ``{"prompt", "response", ...}``, grouped by prompt;
- a comparison in any format ``preftune.data`` reads: its two responses become the task's.

A pairwise project turns K > 2 responses into all K(K-1)/2 pairs; a rating project rates each
response separately. Known answers (``"gold"``) are normalised to the form judgements are
stored in (see ``canonical_gold``), so grading is a comparison.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Iterable

from preftune.data.jsonl import decode_json, numbered_lines
from preftune.data.records import RecordError, parse_comparison, parse_prompt
from preftune.errors import DataError

KINDS = ("pairwise", "ranking", "rating")
PAIR_LABELS = ("0", "1", "tie", "both_bad")  # canonical pairwise labels: index of the better response


@dataclass(frozen=True)
class Limits:
    max_responses: int = 16
    max_text_chars: int = 20_000  # per prompt message, response and rationale
    max_meta_chars: int = 10_000
    max_id_chars: int = 200


@dataclass
class TaskSpec:
    ext_id: str
    prompt: list[dict[str, str]]
    responses: list[str]
    gold: Any = None
    meta: Any = None
    line: int = field(default=0, compare=False)

    @property
    def is_gold(self) -> bool:
        return self.gold is not None


def numbered_json_lines(lines: Iterable[bytes], name: str) -> list[tuple[int, Any]]:
    """(line number, decoded JSON) for each non-blank line; ``DataError`` names file and line."""
    out = []
    for lineno, text in numbered_lines(lines, name):
        try:
            out.append((lineno, decode_json(text)))
        except RecordError as e:
            raise DataError(name, lineno, str(e)) from None
    if not out:
        raise DataError(name, None, "file is empty (no records)")
    return out


def _content_id(prompt: list[dict], responses: list[str]) -> str:
    blob = json.dumps([prompt, responses], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _record_id(obj: dict) -> str | None:
    value = obj.get("id")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RecordError('"id" must be a string or an integer')
    return str(value)


def _check_text(text: str, what: str, limits: Limits) -> None:
    if len(text) > limits.max_text_chars:
        raise RecordError(f"{what} is {len(text)} characters long (limit {limits.max_text_chars})")


def unstorable(text: str) -> str | None:
    """What in ``text`` the database cannot hold, or None: a NUL character (PostgreSQL's text
    refuses it) or a lone UTF-16 surrogate (a JSON escape such as "\\ud800", not encodable as UTF-8)."""
    if "\x00" in text:
        return "a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"a lone surrogate (U+{ord(text[e.start]):04X})"
    return None


def storable(value: Any) -> Any:
    """``value`` with every character the database cannot hold (see ``unstorable``) in its strings
    replaced by U+FFFD, as a browser would show it: for a model's own samples, which may hold a NUL
    (a byte-level token), where a person's import is refused instead."""
    if isinstance(value, str):
        if not unstorable(value):
            return value
        return "".join("\ufffd" if c == "\x00" or 0xD800 <= ord(c) <= 0xDFFF else c for c in value)
    if isinstance(value, dict):
        return {storable(k): storable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [storable(v) for v in value]
    return value


def _check_storable(value: Any, where: str = "the record") -> None:
    """Every string of a record (keys included) storable, or a ``RecordError`` naming the field."""
    if isinstance(value, str):
        if problem := unstorable(value):
            raise RecordError(f"{where} contains {problem}, which cannot be stored")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_storable(k, f"a key of {where}")
            _check_storable(v, f'"{k}"' if where == "the record" else where)
    elif isinstance(value, list):
        for v in value:
            _check_storable(v, where)


def canonical_gold(kind: str, gold: Any, n_responses: int, scale: int) -> Any:
    """A known answer in stored form: pairwise "0"/"1"/"tie"/"both_bad" (index of the better
    response; "A"/"B" also name responses 0/1), ranking tie groups best first, rating an int."""
    if kind == "pairwise":
        aliases = {0: "0", 1: "1", "0": "0", "1": "1", "A": "0", "B": "1", "tie": "tie", "both_bad": "both_bad"}
        if isinstance(gold, bool) or not isinstance(gold, (int, str)) or gold not in aliases:
            raise RecordError('"gold" of a pairwise task must be 0, 1 (the better response), "tie" or "both_bad"')
        return aliases[gold]
    if kind == "ranking":
        return ranking_groups(gold, n_responses, "gold")
    if isinstance(gold, bool) or not isinstance(gold, int) or not 1 <= gold <= scale:
        raise RecordError(f'"gold" of a rating task must be an integer from 1 to {scale}')
    return gold


def ranking_groups(raw: Any, n: int, key: str = "ranking") -> list[list[int]]:
    """Validate a ranking of ``n`` responses: indices best first, a list of indices for a tie,
    every response exactly once."""
    if not isinstance(raw, list) or not raw:
        raise RecordError(f'"{key}" must be a list of response indices, best first (a list of indices for a tie)')
    groups = []
    for item in raw:
        group = item if isinstance(item, list) else [item]
        if not group or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in group):
            raise RecordError(f'"{key}" entries must be response indices 0..{n - 1} or lists of them (ties)')
        groups.append(list(group))
    flat = sorted(i for g in groups for i in g)
    if flat != list(range(n)):
        raise RecordError(f'"{key}" must place each of the {n} responses exactly once')
    return groups


def _responses(obj: dict, limits: Limits) -> list[str]:
    responses = obj["responses"]
    if not isinstance(responses, list) or not responses:
        raise RecordError('"responses" must be a non-empty list of strings')
    if len(responses) > limits.max_responses:
        raise RecordError(f'"responses" has {len(responses)} entries (limit {limits.max_responses})')
    for i, r in enumerate(responses):
        if not isinstance(r, str) or not r.strip():
            raise RecordError(f'"responses"[{i}] must be a non-empty string')
        _check_text(r, f'"responses"[{i}]', limits)
    return responses


RECORD_KEYS = {"id", "prompt", "messages", "responses", "response", "gold", "meta", "split", "prompt_id"}


def _base_record(obj: dict, limits: Limits) -> tuple[list[dict], list[str], dict[str, list], Any]:
    """(prompt messages, responses, per-response fields, meta) of one record in any accepted shape.
    Per-response fields are lists as long as ``responses`` (``preftune sample`` writes ``models``,
    ``ended``, ``num_tokens``); they travel with their responses into the tasks' meta."""
    if "chosen" in obj or "rejected" in obj:
        comp = parse_comparison(obj)
        prior = {k: v for k, v in (("strength", comp.strength), ("annotator", comp.annotator)) if v is not None}
        return comp.messages, [comp.chosen, comp.rejected], {}, {"prior_chosen": 0, **prior}
    prompt = parse_prompt(obj).messages
    if "responses" in obj:
        responses = _responses(obj, limits)
    elif isinstance(obj.get("response"), str) and obj["response"].strip():
        responses = [obj["response"]]
    else:
        raise RecordError('missing "responses" (a list of strings), "response" or "chosen"/"rejected"')
    per_response = {k: v for k, v in obj.items()
                    if k not in RECORD_KEYS and isinstance(v, list) and len(v) == len(responses)}
    meta = obj.get("meta")
    if meta is not None:
        try:
            size = len(json.dumps(meta, allow_nan=False))
        except ValueError:
            raise RecordError('"meta" holds NaN or Infinity, which JSON cannot carry (exports must stay valid '
                              'JSON)') from None
        if size > limits.max_meta_chars:
            raise RecordError(f'"meta" is longer than {limits.max_meta_chars} characters as JSON')
    return prompt, responses, per_response, meta


def _with_info(meta: Any, per_response: dict[str, list], picked: list[int]) -> Any:
    """The task's meta: the record's, plus the per-response fields of the responses it shows."""
    if not per_response:
        return meta
    base = meta if isinstance(meta, dict) else ({} if meta is None else {"meta": meta})
    return {**base, "per_response": {k: [v[i] for i in picked] for k, v in per_response.items()}}


def _expand(kind: str, scale: int, ext_id: str, prompt, responses, per_response, gold_raw, meta,
            line) -> list[TaskSpec]:
    """Tasks of one record; [] when its responses are all the same text (nothing to compare)."""
    k = len(responses)
    if kind == "rating":
        if gold_raw is not None and k > 1 and not (isinstance(gold_raw, list) and len(gold_raw) == k):
            raise RecordError(f'"gold" of a rating record with {k} responses must be a list of {k} ratings')
        golds = gold_raw if k > 1 and gold_raw is not None else [gold_raw] * k
        return [TaskSpec(ext_id if k == 1 else f"{ext_id}:{i}", prompt, [r],
                         None if g is None else canonical_gold(kind, g, 1, scale),
                         _with_info(meta, per_response, [i]), line)
                for i, (r, g) in enumerate(zip(responses, golds))]
    if k < 2:
        raise RecordError(f"a {kind} task needs at least 2 responses, got {k}")
    gold = None if gold_raw is None else canonical_gold(kind, gold_raw, k, scale)
    distinct = [i for i, r in enumerate(responses) if r not in responses[:i]]  # samples may repeat
    if len(distinct) < k and gold is not None:
        raise RecordError('"responses" contains the same text twice')
    if len(distinct) < 2:
        return []
    if kind == "ranking" or len(distinct) == 2:
        return [TaskSpec(ext_id, prompt, [responses[i] for i in distinct], gold,
                         _with_info(meta, per_response, distinct), line)]
    if gold is not None:
        raise RecordError('"gold" of a pairwise task needs exactly 2 responses')
    return [TaskSpec(f"{ext_id}:{i}-{j}", prompt, [responses[i], responses[j]], None,
                     _with_info(meta, per_response, [i, j]), line)
            for i, j in itertools.combinations(distinct, 2)]


@dataclass
class ParsedTasks:
    specs: list[TaskSpec]
    too_few: list[int]  # lines of records whose responses are all the same text (pairwise, ranking)

    def note(self) -> str:
        if not self.too_few:
            return ""
        return (f"; skipped {len(self.too_few)} records whose responses are all the same text "
                f"(first on line {self.too_few[0]})")


def parse_tasks(numbered: Iterable[tuple[int, Any]], kind: str, scale: int,
                limits: Limits = Limits()) -> ParsedTasks:
    """Tasks from ``(line, object)`` pairs. Raises ``RecordError`` carrying the line in ``.line``."""
    specs: list[TaskSpec] = []
    too_few: list[int] = []
    samples: dict[str, tuple[int, str | None, list, list[str]]] = {}  # prompt -> (line, id, messages, responses)

    def expand(line, *args) -> None:
        tasks = _expand(kind, scale, *args, line)
        if not tasks:
            too_few.append(line)
        specs.extend(tasks)

    for line, obj in numbered:
        try:
            if not isinstance(obj, dict):
                raise RecordError(f"expected a JSON object, got {type(obj).__name__}")
            _check_storable(obj)
            prompt, responses, per_response, meta = _base_record(obj, limits)
            for i, msg in enumerate(prompt):
                _check_text(msg["content"], "the prompt" if len(prompt) == 1 else f"prompt message {i}", limits)
            rid = _record_id(obj)
            if rid is not None and len(rid) > limits.max_id_chars:
                raise RecordError(f'"id" is longer than {limits.max_id_chars} characters')
            if "response" in obj and "responses" not in obj and "chosen" not in obj \
                    and not (kind == "rating" and rid is not None):
                # One sample per line: gather the candidates of each prompt (a rating record with
                # its own id is its own task, and keeps the id).
                key = json.dumps(prompt, sort_keys=True)
                group_id = obj.get("prompt_id")
                first = samples.setdefault(key, (line, None if group_id is None else str(group_id), prompt, []))
                first[3].append(responses[0])
                if len(first[3]) > limits.max_responses:
                    raise RecordError(f"more than {limits.max_responses} responses for this prompt")
                continue
            ext_id = rid if rid is not None else _content_id(prompt, responses)
            expand(line, ext_id, prompt, responses, per_response, obj.get("gold"), meta)
        except RecordError as e:
            e.line = line
            raise
    for line, group_id, prompt, responses in samples.values():
        try:
            ext_id = group_id if group_id is not None else _content_id(prompt, responses)
            expand(line, ext_id, prompt, responses, {}, None, None)
        except RecordError as e:
            e.line = line
            raise
    seen: dict[str, int] = {}
    for spec in specs:
        if len(spec.ext_id) > limits.max_id_chars:  # a long "id" or "prompt_id" with a pair's ":0-1" added
            err = RecordError(f'task id "{spec.ext_id[:40]}..." is {len(spec.ext_id)} characters long '
                              f'(limit {limits.max_id_chars}, with the ":i-j" of a pair of responses)')
            err.line = spec.line
            raise err
        if spec.ext_id in seen:
            err = RecordError(f'duplicate task id "{spec.ext_id}" (first on line {seen[spec.ext_id]})')
            err.line = spec.line
            raise err
        seen[spec.ext_id] = spec.line
    return ParsedTasks(specs, too_few)
