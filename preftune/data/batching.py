"""Token-level batches every trainer shares: examples with labels, length limits, padding,
packing, and the seeded order in which a stage visits its data.

An ``Example`` is one tokenised (prompt, response) with labels -100 on the prompt, what SFT, DPO
and PPO-ptx train on. ``step_indices`` gives the examples of one optimiser step of the global
batch (every rank draws from the same order, then takes its slice), fixed by (seed, epoch), so a
resumed run sees exactly the batches of an uninterrupted one."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from preftune.data.chat import EncodedPair, encode_pair
from preftune.data.records import Demonstration
from preftune.errors import DataError


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # -100 on prompt (and later pad) tokens


def fit_length(pair: EncodedPair, max_length: int, truncate: bool) -> EncodedPair | None:
    """The pair itself if it fits; left-truncated prompt (then response) if ``truncate``; else None."""
    if len(pair) <= max_length:
        return pair
    if not truncate:
        return None
    response = pair.response_ids[:max_length - 1] if len(pair.response_ids) >= max_length else pair.response_ids
    keep_prompt = max_length - len(response)
    return EncodedPair(pair.prompt_ids[-keep_prompt:] if keep_prompt else [], response)


def encode_demonstrations(demos: list[Demonstration], tokenizer, max_length: int, truncate: bool,
                          skip_invalid: bool) -> tuple[list[Example], list[str]]:
    """Tokenise demonstrations; over-long ones raise a file:line error, or are skipped (reported)."""
    examples, skipped = [], []
    for demo in demos:
        pair = encode_pair(tokenizer, demo.messages, demo.completion)
        fitted = fit_length(pair, max_length, truncate)
        if fitted is None:
            msg = f"record is {len(pair)} tokens, over --max-length {max_length} (use --truncate to cut it)"
            if not skip_invalid:
                raise DataError(demo.source.path, demo.source.line, msg)
            skipped.append(f"{demo.source}: {msg}")
            continue
        examples.append(Example(fitted.input_ids, fitted.labels))
    return examples, skipped


def pack_examples(examples: list[Example], max_length: int) -> list[Example]:
    """Greedy first-fit packing of whole examples into rows of at most ``max_length`` tokens.

    Rows carry ``position_ids`` that restart at 0 for each example (see ``collate``), which makes
    transformers build a block-diagonal causal mask: packed examples never attend to each other."""
    rows: list[list[Example]] = []
    room: list[int] = []
    for ex in sorted(examples, key=lambda e: -len(e.input_ids)):
        for i, free in enumerate(room):
            if len(ex.input_ids) <= free:
                rows[i].append(ex)
                room[i] -= len(ex.input_ids)
                break
        else:
            rows.append([ex])
            room.append(max_length - len(ex.input_ids))
    return [PackedExample([t for e in row for t in e.input_ids], [t for e in row for t in e.labels],
                          [p for e in row for p in range(len(e.input_ids))]) for row in rows]


@dataclass
class PackedExample(Example):
    position_ids: list[int]


def count_targets(examples: list[Example]) -> int:
    """Response tokens that a causal LM predicts (labels other than -100 after the first position)."""
    return sum(sum(1 for t in e.labels[1:] if t != -100) for e in examples)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch. Packed rows get position ids and no attention mask (block-diagonal mask
    from the position ids); unpacked rows get an attention mask."""
    width = max(len(e.input_ids) for e in examples)
    n = len(examples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e.input_ids)
        input_ids[i, :k] = torch.tensor(e.input_ids)
        labels[i, :k] = torch.tensor(e.labels)
        mask[i, :k] = 1
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
    if all(isinstance(e, PackedExample) for e in examples):
        positions = torch.zeros((n, width), dtype=torch.long)
        for i, e in enumerate(examples):
            k = len(e.position_ids)
            positions[i, :k] = torch.tensor(e.position_ids)
            positions[i, k:] = torch.arange(width - k)  # padding tail: its own "sequence", no labels
        batch["position_ids"] = positions
        batch["attention_mask"] = None
    return batch


# ---------------------------------------------------------------- data order


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation fixed by (seed, epoch), so a resumed run
    sees exactly the batches an uninterrupted run would."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def step_indices(n: int, step: int, steps_per_epoch: int, global_batch: int, seed: int) -> list[int]:
    """Indices of the examples of optimiser step ``step`` (0-based): a slice of its epoch's order
    (the last batch of an epoch may be short)."""
    epoch, position = divmod(step, steps_per_epoch)
    return epoch_order(n, seed, epoch)[position * global_batch:(position + 1) * global_batch]
