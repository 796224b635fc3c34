"""Deterministic train / held-out splits."""

from __future__ import annotations

import random
from typing import Sequence, TypeVar

T = TypeVar("T")


def train_eval_split(records: Sequence[T], eval_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Split records by their ``split`` field when any record has one ("train" / "eval" or "test"),
    else hold out ``eval_fraction`` of them at random (seeded). Returns (train, eval)."""
    tagged = [getattr(r, "split", None) for r in records]
    if any(t is not None for t in tagged):
        train = [r for r, t in zip(records, tagged) if t in (None, "train")]
        held = [r for r, t in zip(records, tagged) if t in ("eval", "test", "validation", "held_out")]
        return train, held
    if eval_fraction <= 0:
        return list(records), []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(records) * eval_fraction)) if len(records) > 1 else 0
    held_idx = set(order[:n_eval])
    return ([r for i, r in enumerate(records) if i not in held_idx],
            [r for i, r in enumerate(records) if i in held_idx])
