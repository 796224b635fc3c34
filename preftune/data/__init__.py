"""Data formats: JSONL records every stage reads and writes, and their rendering to tokens."""

from preftune.data.chat import encode_pair, encode_prompt, render_prompt, render_response
from preftune.data.jsonl import ReadResult, read_dicts, read_jsonl, write_jsonl
from preftune.data.records import (
    RATING_FLAGS,
    Comparison,
    Demonstration,
    PromptRecord,
    Ranking,
    Rating,
    RecordError,
    prompt_text,
    to_json,
)
from preftune.data.split import train_eval_split

__all__ = [
    "RATING_FLAGS", "Comparison", "Demonstration", "PromptRecord", "Ranking", "Rating", "ReadResult",
    "RecordError", "encode_pair", "encode_prompt", "prompt_text", "read_dicts", "read_jsonl",
    "render_prompt", "render_response", "to_json", "train_eval_split", "write_jsonl",
]
