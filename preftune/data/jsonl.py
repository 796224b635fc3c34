"""Reading and writing JSONL files of records, with one-line errors that name file and line.

Every record is validated. The first invalid record raises ``DataError`` ("file:line: what"),
unless ``skip_invalid`` is set: then invalid records are collected in ``ReadResult.skipped``
and the caller reports how many were skipped and why. Nothing is dropped silently.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from preftune.data.records import PARSERS, Record, RecordError, Source, to_json
from preftune.errors import DataError


@dataclass
class Skipped:
    line: int
    reason: str


@dataclass
class ReadResult:
    path: str
    records: list = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def summary(self) -> str:
        """One line saying how many records were skipped and the most common reasons."""
        if not self.skipped:
            return f"{self.path}: {len(self.records)} records"
        reasons = Counter(s.reason for s in self.skipped).most_common(3)
        why = "; ".join(f"{n} x {r}" for r, n in reasons)
        return (f"{self.path}: {len(self.records)} records, skipped {len(self.skipped)} invalid "
                f"(first on line {self.skipped[0].line}): {why}")


def _decode_lines(path: Path) -> Iterable[tuple[int, str]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(str(path), lineno,
                                f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None


def read_jsonl(path: str | Path, kind: str, *, skip_invalid: bool = False,
               check: Callable[[Any], None] | None = None) -> ReadResult:
    """Read a JSONL file of ``kind`` (prompts, demonstrations, comparisons, rankings, ratings,
    preferences). ``check`` may raise ``RecordError`` for extra per-record rules (e.g. a token limit)."""
    path = Path(path)
    parse = PARSERS[kind]
    result = ReadResult(path=str(path))
    if not path.exists():
        raise DataError(str(path), None, "no such file")
    if path.is_dir():
        raise DataError(str(path), None, "is a directory, expected a JSONL file")
    seen_ids: dict[str, int] = {}
    any_content = False
    for lineno, text in _decode_lines(path):
        stripped = text.strip()
        if not stripped:
            continue
        if not any_content and stripped.startswith("["):
            raise DataError(str(path), lineno, "this is a JSON array; expected JSONL (one JSON object per line)")
        any_content = True
        try:
            try:
                obj = json.loads(stripped)
            except json.JSONDecodeError as e:
                raise RecordError(f"invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise RecordError(f"expected a JSON object, got {type(obj).__name__}")
            record = parse(obj)
            record.source = Source(str(path), lineno)
            if record.id is not None:
                if record.id in seen_ids:
                    raise RecordError(f'duplicate id "{record.id}" (first on line {seen_ids[record.id]})')
                seen_ids[record.id] = lineno
            if check is not None:
                check(record)
        except RecordError as e:
            if not skip_invalid:
                raise DataError(str(path), lineno, str(e)) from None
            result.skipped.append(Skipped(lineno, str(e)))
            continue
        result.records.append(record)
    if not any_content:
        raise DataError(str(path), None, "file is empty (no records)")
    if not result.records:
        raise DataError(str(path), None, f"no valid records ({len(result.skipped)} skipped as invalid; "
                                         f"first: line {result.skipped[0].line}: {result.skipped[0].reason})")
    return result


def write_jsonl(path: str | Path, rows: Iterable[Record | dict]) -> int:
    """Write records (or plain dicts) as JSONL; returns the number of lines written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            obj = row if isinstance(row, dict) else to_json(row)
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_dicts(path: str | Path) -> list[dict]:
    """Plain JSON objects of a JSONL file (for outputs of preftune itself, such as samples)."""
    path = Path(path)
    out = []
    for lineno, text in _decode_lines(path):
        if text.strip():
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(str(path), lineno, f"invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(str(path), lineno, f"expected a JSON object, got {type(obj).__name__}")
            out.append(obj)
    return out
