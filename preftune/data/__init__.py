"""Data: the JSONL records every stage reads and writes (``records``, ``jsonl``), their rendering to
text and tokens (``chat``), held-out splits (``split``) and token batches (``batching``, which needs
torch and is not imported here)."""

from preftune.data.chat import encode_pair, encode_prompt, render_prompt, render_response
from preftune.data.jsonl import ReadResult, read_dicts, read_jsonl, write_json, write_jsonl
from preftune.data.records import (
    RATING_FLAGS,
    CandidateSet,
    Comparison,
    Demonstration,
    PromptRecord,
    Ranking,
    Rating,
    RecordError,
    prompt_text,
    to_json,
)
from preftune.data.split import random_split, train_eval_split

__all__ = [
    "RATING_FLAGS", "CandidateSet", "Comparison", "Demonstration", "PromptRecord", "Ranking", "Rating",
    "ReadResult", "RecordError", "encode_pair", "encode_prompt", "prompt_text", "random_split", "read_dicts",
    "read_jsonl", "render_prompt", "render_response", "to_json", "train_eval_split", "write_json",
    "write_jsonl",
]
