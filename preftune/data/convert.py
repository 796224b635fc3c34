"""``preftune convert``: rewrite a file of records in preftune's format or TRL's, keeping its meaning.

Every reader accepts every shape (docs/data-formats.md); converting matters when another tool
reads the file. TRL reads string records as raw text, concatenated without roles; its
conversational format (messages) means what preftune means, so ``--to trl`` writes that.
"""

from __future__ import annotations

from pathlib import Path

from preftune.data.jsonl import ReadResult, first_object, read_jsonl, write_jsonl
from preftune.errors import DataError

KINDS = ("comparisons", "demonstrations", "prompts")
"""What TRL has a format for (rankings and ratings it has not)."""


def guess_kind(obj: dict) -> str:
    """The kind of records a file holds, from its first object's keys."""
    if "chosen" in obj or "rejected" in obj:
        return "comparisons"
    if "responses" in obj or "ranking" in obj:
        return "rankings"
    if "rating" in obj:
        return "ratings"
    messages = obj.get("messages")
    ends_with_reply = isinstance(messages, list) and bool(messages) and isinstance(messages[-1], dict) \
        and messages[-1].get("role") == "assistant"
    if "completion" in obj or ends_with_reply:
        return "demonstrations"
    return "prompts"


def convert_file(src: str | Path, out: str | Path, to: str, kind: str | None = None,
                 skip_invalid: bool = False) -> tuple[str, ReadResult, int]:
    """Read ``src`` (every accepted shape of ``kind``, guessed when None) and write it to ``out``
    in format ``to`` (preftune | trl); (kind, what was read, lines written)."""
    kind = kind or guess_kind(first_object(src))
    if to == "trl" and kind not in KINDS:
        raise DataError(str(src), None, f"TRL has no format for {kind}: convert {', '.join(KINDS)} "
                                        f"(`preftune reward` reads {kind} as they are)")
    if Path(out).resolve() == Path(src).resolve():
        raise DataError(str(out), None, "the output would overwrite the input: choose another --out")
    read = read_jsonl(src, kind, skip_invalid=skip_invalid)
    return kind, read, write_jsonl(out, read.records, format=to)
