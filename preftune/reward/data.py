"""The reward model's data: preference records -> groups of pairs (``pairs.py``) -> token ids.

``read_preferences`` reads and validates every input file before any model loads; ``encode_groups``
tokenises each group's responses with the reward model's own rendering (``RewardModel.encode``);
``flatten`` lays a batch of groups out as one list of sequences with the pairs as indices into it,
so each distinct response is scored once per step.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

import torch

from preftune.data.jsonl import first_object, read_jsonl
from preftune.data.records import Messages, RecordError
from preftune.data.split import split_by_prompt
from preftune.errors import DataError, PreftuneError
from preftune.models.reward_model import RewardModel
from preftune.reward.config import RewardConfig
from preftune.reward.pairs import PreferenceGroup, expand_preferences, group_by_prompt


@dataclass
class EncodedGroup:
    ids: list[list[int]]  # one token-id list per response
    winners: list[int]
    losers: list[int]
    margins: list[float]
    annotators: list[str | None]  # per pair
    lengths: list[int]  # per response: its tokens, read alone (the length the reward should not reward)

    @property
    def tokens(self) -> int:
        return sum(map(len, self.ids))


def encode_groups(groups: list[PreferenceGroup], rm: RewardModel, max_length: int, truncate: bool,
                  skip_invalid: bool) -> tuple[list[EncodedGroup], list[str]]:
    """Tokenise every response of every group; over-long groups are a file:line error or skipped."""
    encoded, skipped = [], []
    for g in groups:
        try:
            ids = [rm.encode(g.messages, r, truncate=truncate) for r in g.responses]
        except RecordError as e:
            if not skip_invalid:
                raise DataError(g.source.path, g.source.line, str(e)) from None
            skipped.append(f"{g.source}: {e}")
            continue
        lengths = [len(rm.tokenizer(r, add_special_tokens=False)["input_ids"]) for r in g.responses]
        encoded.append(EncodedGroup(ids, [p.winner for p in g.pairs], [p.loser for p in g.pairs],
                                    [p.margin for p in g.pairs], [p.annotator for p in g.pairs], lengths))
    return encoded, skipped


def flatten(groups: list[EncodedGroup]):
    """All sequences of a batch of groups and the pairs as indices into them:
    (sequences, winner [P], loser [P], group [P], margin [P])."""
    sequences, winners, losers, group_ids, margins = [], [], [], [], []
    for gi, g in enumerate(groups):
        offset = len(sequences)
        sequences.extend(g.ids)
        winners += [offset + w for w in g.winners]
        losers += [offset + l for l in g.losers]
        group_ids += [gi] * len(g.winners)
        margins += g.margins
    return (sequences, torch.tensor(winners), torch.tensor(losers), torch.tensor(group_ids),
            torch.tensor(margins, dtype=torch.float32))


def flat_lengths(groups: list[EncodedGroup]) -> torch.Tensor:
    """Response lengths [N] in ``flatten``'s order of sequences."""
    return torch.tensor([n for g in groups for n in g.lengths], dtype=torch.float32)


def read_preferences(cfg: RewardConfig) -> tuple[list[PreferenceGroup], list[PreferenceGroup], list[str]]:
    """(train groups, eval groups, notes): records read, validated and expanded to pairs."""
    notes: list[str] = []

    def read(path: str) -> list[PreferenceGroup]:
        result = read_jsonl(path, "preferences", skip_invalid=cfg.skip_invalid)
        if result.skipped:
            notes.append(result.summary())
        expansion = expand_preferences(result.records, cfg.margin_scale)
        notes.append(f"{path}: {expansion.summary()}")
        if not cfg.group_by_prompt:
            return expansion.groups
        groups = group_by_prompt(expansion.groups)
        if len(groups) < len(expansion.groups):
            notes.append(f"{path}: {len(expansion.groups)} groups merged into {len(groups)} prompts")
        return groups

    groups = read(cfg.data)
    if cfg.eval_data:
        train_groups, eval_groups = groups, read(cfg.eval_data)
    else:
        split_seed = cfg.seed if cfg.split_seed is None else cfg.split_seed
        train_groups, eval_groups, split_notes = split_by_prompt(groups, cfg.eval_split, split_seed, cfg.data)
        notes += split_notes
    if not train_groups:
        raise PreftuneError(f"{cfg.data}: no training pairs (all preferences were ties, single ratings or invalid)")
    return train_groups, eval_groups, notes


def bootstrap_resample(groups: list, seed: int) -> list:
    """As many groups as given, drawn with replacement (a seeded bootstrap sample of the prompts)."""
    rng = random.Random(seed)
    return [groups[rng.randrange(len(groups))] for _ in groups]


def read_reference(path: str, skip_invalid: bool) -> list[tuple[Messages, str]]:
    """(prompt, response) pairs of a demonstrations, candidates or preferences file."""
    first = first_object(path)
    if "completion" in first or ("messages" in first and "prompt" not in first and "chosen" not in first):
        demos = read_jsonl(path, "demonstrations", skip_invalid=skip_invalid).records
        return [(d.messages, d.completion) for d in demos]
    if "responses" in first and "ranking" not in first:
        candidates = read_jsonl(path, "candidates", skip_invalid=skip_invalid).records
        return [(c.messages, r) for c in candidates for r in c.responses if r.strip()]
    groups = expand_preferences(read_jsonl(path, "preferences", skip_invalid=skip_invalid).records).groups
    return unique_responses(groups)


def unique_responses(groups: list[PreferenceGroup]) -> list[tuple[Messages, str]]:
    seen, out = set(), []
    for g in groups:
        for r in g.responses:
            key = (json.dumps(g.messages, sort_keys=True), r)
            if key not in seen:
                seen.add(key)
                out.append((g.messages, r))
    return out
