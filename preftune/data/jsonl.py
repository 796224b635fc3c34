"""Reading and writing JSONL files of records, with one-line errors that name file and line.

Every record is validated. The first invalid record raises ``DataError`` ("file:line: what"),
unless ``skip_invalid`` is set: then invalid records are collected in ``ReadResult.skipped``
and the caller reports how many were skipped and why. Nothing is dropped silently.

``numbered_lines`` is the one place that turns bytes into lines (UTF-8, blank lines, a JSON array
given where JSONL is expected); every reader of JSONL, the feedback app's import included, goes
through it.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from preftune.data.records import PARSERS, WRITERS, Record, RecordError, Source, other_keys
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


def numbered_lines(lines: Iterable[bytes], name: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line, stripped. Bytes that are not UTF-8, or a JSON
    array where JSONL is expected, raise ``DataError`` naming ``name`` and the line."""
    started = False
    for lineno, raw in enumerate(lines, start=1):
        try:
            text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").strip()  # (a byte-order mark)
        except UnicodeDecodeError as e:
            raise DataError(name, lineno,
                            f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
        if not text:
            continue
        if not started and text.startswith("["):
            raise DataError(name, lineno, "this is a JSON array; expected JSONL (one JSON object per line)")
        started = True
        yield lineno, text


def decode_json(text: str) -> Any:
    """One line's JSON value; ``RecordError`` with the column when it is not JSON."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    except ValueError:  # Python refuses integers of more than 4,300 digits
        raise RecordError("invalid JSON (a number with more than 4,300 digits)") from None
    except RecursionError:
        raise RecordError("invalid JSON (nested too deeply)") from None
    if "\\ud" in text.lower():  # an escaped UTF-16 surrogate: fine in a pair, unwritable alone
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise RecordError("a string holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), "
                              "which cannot be written as UTF-8") from None
    return value


def decode_object(text: str) -> dict:
    """One line's JSON object; ``RecordError`` when it is not JSON or not an object."""
    obj = decode_json(text)
    if not isinstance(obj, dict):
        raise RecordError(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _file_lines(path: Path) -> Iterator[tuple[int, str]]:
    if not path.exists():
        raise DataError(str(path), None, "no such file")
    if path.is_dir():
        raise DataError(str(path), None, "is a directory, expected a JSONL file")
    with open(path, "rb") as f:
        yield from numbered_lines(f, str(path))


def read_jsonl(path: str | Path, kind: str, *, skip_invalid: bool = False,
               check: Callable[[Any], None] | None = None) -> ReadResult:
    """Read a JSONL file of ``kind`` (a key of ``preftune.data.records.PARSERS``: prompts,
    demonstrations, comparisons, rankings, ratings, preferences, candidates, prompt_sources).
    ``check`` may raise ``RecordError`` for extra per-record rules (e.g. a token limit)."""
    path = Path(path)
    parse = PARSERS[kind]
    result = ReadResult(path=str(path))
    seen_ids: dict[str, int] = {}
    any_content = False
    for lineno, text in _file_lines(path):
        any_content = True
        try:
            obj = decode_object(text)
            record = parse(obj)
            record.source = Source(str(path), lineno)
            if kind not in ("prompt_sources", "candidates"):  # (a prompt taken from a demonstration drops the rest)
                record.extra = other_keys(obj, record)
            if record.id is not None:
                key = str(record.id)  # 7 and "7" name the same record downstream (task ids, pair ids)
                if key in seen_ids:
                    raise RecordError(f'duplicate id "{record.id}" (first on line {seen_ids[key]})')
                seen_ids[key] = lineno
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


def read_numbered_dicts(path: str | Path) -> list[tuple[int, dict]]:
    """(line number, JSON object) of every line of a JSONL file; any bad line is a ``DataError``."""
    path = Path(path)
    out = []
    for lineno, text in _file_lines(path):
        try:
            out.append((lineno, decode_object(text)))
        except RecordError as e:
            raise DataError(str(path), lineno, str(e)) from None
    return out


def first_object(path: str | Path, lines: int = 100) -> dict:
    """The first JSON object among the first ``lines`` lines, to tell which kind of records a file
    holds ({} when there is none: the reader that follows reports the bad lines with their
    numbers). A bad first line does not decide the kind of the rest."""
    for n, (_, text) in enumerate(_file_lines(Path(path))):
        if n >= lines:
            break
        try:
            return decode_object(text)
        except RecordError:
            continue
    return {}


def read_dicts(path: str | Path) -> list[dict]:
    """Plain JSON objects of a JSONL file (for outputs of preftune itself, such as samples)."""
    return [obj for _, obj in read_numbered_dicts(path)]


def write_jsonl(path: str | Path, rows: Iterable[Record | dict], format: str = "preftune") -> int:
    """Write records (or plain dicts, as they are) as JSONL, records in ``format`` (a key of
    ``records.WRITERS``: preftune, trl); returns the number of lines written."""
    writer = WRITERS[format]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            obj = row if isinstance(row, dict) else writer(row)
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
            n += 1
    return n


def plain(value: Any) -> Any:
    """A value as JSON can hold it: one-element tensors as numbers, other tensors as lists,
    non-finite floats as null."""
    if hasattr(value, "tolist") and hasattr(value, "numel"):  # a torch tensor, without importing torch
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: str | Path, data: Any) -> None:
    """Write one JSON document (summaries, configs), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=plain) + "\n")
