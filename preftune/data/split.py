"""Deterministic train / held-out splits."""

from __future__ import annotations

import json
import random
from typing import Callable, Hashable, Protocol, Sequence, TypeVar

from preftune.data.jsonl import read_jsonl
from preftune.data.records import HELD_OUT_TAGS, TRAIN_TAGS

T = TypeVar("T")


class Tagged(Protocol):
    """A record that may say which split it belongs to ("train", "eval", ...; None: not tagged)."""

    split: str | None


class TaggedPrompt(Tagged, Protocol):
    """A tagged record of one prompt (its conversation up to the answer)."""

    messages: list


R = TypeVar("R", bound=Tagged)
P = TypeVar("P", bound=TaggedPrompt)


def random_split(items: Sequence[T], eval_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Hold out ``eval_fraction`` of the items at random (seeded; at least one when there are two
    or more and the fraction is positive). Returns (train, held out), each in the input order."""
    if eval_fraction <= 0:
        return list(items), []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(items) * eval_fraction)) if len(items) > 1 else 0
    held_idx = set(order[:n_eval])
    return ([r for i, r in enumerate(items) if i not in held_idx],
            [r for i, r in enumerate(items) if i in held_idx])


def train_eval_split(records: Sequence[R], eval_fraction: float, seed: int,
                     key: Callable[[R], Hashable] | None = None) -> tuple[list[R], list[R]]:
    """Split records by their ``split`` field when any record has one ("train", or one of
    ``HELD_OUT_TAGS``, in any case; untagged records train), else ``random_split``: of the records,
    or of their distinct ``key`` values (records of one key, one prompt say, land on the same side;
    with distinct keys the split is the records' own). Returns (train, eval). The readers refuse any
    other tag, so no record is in neither."""
    if any(r.split is not None for r in records):
        return split_by_tags(records)
    if key is None:
        return random_split(records, eval_fraction, seed)
    keys = [key(r) for r in records]
    held_keys = set(random_split(list(dict.fromkeys(keys)), eval_fraction, seed)[1])
    return ([r for r, k in zip(records, keys) if k not in held_keys],
            [r for r, k in zip(records, keys) if k in held_keys])


def split_by_tags(records: Sequence[R]) -> tuple[list[R], list[R]]:
    """(train, held out) by the records' ``split`` tags: untagged or "train" trains, any of
    ``HELD_OUT_TAGS`` (in any case) is held out."""
    train = [r for r in records if r.split is None or r.split.lower() in TRAIN_TAGS]
    held = [r for r in records if r.split is not None and r.split.lower() in HELD_OUT_TAGS]
    return train, held


def prompt_key(record: TaggedPrompt) -> str:
    """What makes two records "the same prompt": their whole conversation up to the answer."""
    return json.dumps(record.messages, sort_keys=True)


def split_by_prompt(records: Sequence[P], eval_fraction: float, seed: int,
                    source: str) -> tuple[list[P], list[P], list[str]]:
    """``train_eval_split`` over prompts, so that no prompt is both trained on and held out (its
    held-out metrics would flatter). With fewer prompts than 1/eval_fraction (one prompt judged
    many times, say) whole prompts would hold out far more than asked or nothing, so the split is
    over the records and a note (naming ``source``) says so. Returns (train, held out, notes)."""
    n_prompts = len({prompt_key(r) for r in records})
    by_prompt = any(r.split is not None for r in records) or n_prompts * eval_fraction >= 1
    notes = []
    if eval_fraction > 0 and not by_prompt:
        notes.append(f"{source}: {n_prompts} prompt(s), too few to hold out whole prompts at "
                     f"eval_split={eval_fraction}: held out by records (a prompt may be on both sides)")
    train, held = train_eval_split(records, eval_fraction, seed, key=prompt_key if by_prompt else None)
    return train, held, notes


def read_train_eval(data: str, eval_data: str | None, kind: str, *, eval_split: float, seed: int,
                    skip_invalid: bool) -> tuple[list, list, list[str]]:
    """(training records, held-out records, notes) of a stage's ``--data`` and ``--eval-data`` (or
    ``split_by_prompt`` of ``--data`` when there is none), read and validated before any model
    loads, so bad input fails fast."""
    notes: list[str] = []
    read = read_jsonl(data, kind, skip_invalid=skip_invalid)
    if read.skipped:
        notes.append(read.summary())
    if not eval_data:
        train, held, split_notes = split_by_prompt(read.records, eval_split, seed, data)
        return train, held, notes + split_notes
    held_read = read_jsonl(eval_data, kind, skip_invalid=skip_invalid)
    if held_read.skipped:
        notes.append(held_read.summary())
    return read.records, held_read.records, notes
