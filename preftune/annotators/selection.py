"""Which pairs annotators judge: all of them, a random share, or the ones the reward model is least
sure of (active selection).

The reward model's preference between responses a and b is P(a > b) = sigmoid(r_a - r_b). An
ensemble also says how unsure it is of each score (the members' spread); treating the margin as
Gaussian with that spread, the probit approximation (MacKay 1992) gives
P(a > b) ~ sigmoid(margin / sqrt(1 + pi * spread^2 / 8)). The pairs whose P is closest to 1/2, i.e.
whose preference entropy is highest, go to people first.

That entropy mixes two things: how unsure the model is, and how close the two answers are (a near-tie
that a person's label will not settle either). Members' disagreement alone, the mutual information
between a label and which member is right (BALD, Houlsby et al. 2011), measures only the former.
On SmolLM2 answers neither beat random selection; the disagreement taken in rounds over the prompts
(``spread_over_items``) matched random's final accuracy with 90 % of its labels, within the seeds'
spread (docs/benchmarks.md, benchmarks/active_labels.py).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from preftune.annotators.config import Selection
from preftune.data.records import CandidateSet


@dataclass(frozen=True)
class Pair:
    """Responses ``i`` and ``j`` of candidate set ``item``."""

    item: int
    i: int
    j: int


def preference_entropy(margin: torch.Tensor, spread: torch.Tensor | None = None) -> torch.Tensor:
    """Binary entropy (nats) of P(a > b) for reward margins r_a - r_b; ``spread``: the standard
    deviation of each margin (an ensemble's disagreement), which pulls P towards 1/2."""
    margin = margin.double()
    if spread is not None:
        margin = margin / torch.sqrt(1 + math.pi * spread.double() ** 2 / 8)
    p = torch.sigmoid(margin)
    # -p log p - (1 - p) log(1 - p), written with logsigmoid so large margins stay finite.
    return -(p * torch.nn.functional.logsigmoid(margin) + (1 - p) * torch.nn.functional.logsigmoid(-margin))


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """-p ln p - (1 - p) ln(1 - p) in nats, 0 at p = 0 and p = 1."""
    return -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p))


def mutual_information(margins: torch.Tensor) -> torch.Tensor:
    """BALD score of each pair from the members' margins ``[K, P]`` (r_a - r_b per member): the
    entropy of the members' mean P(a > b) minus the mean of their own entropies. It is 0 when all
    members agree, however close to 1/2 their P is, and at most ln 2."""
    margins = margins.double()
    mean_p = torch.sigmoid(margins).mean(0)
    return binary_entropy(mean_p) - preference_entropy(margins).mean(0)


def candidate_pairs(items: list[CandidateSet], across_models: bool = False) -> list[Pair]:
    """Every pair of distinct, non-empty responses of each candidate set; ``across_models``: only
    pairs written by different models, one pair per sample index (base response k against SFT
    response k, the classic recipe)."""
    pairs = []
    for n, item in enumerate(items):
        valid = [i for i, r in enumerate(item.responses) if r.strip()]
        if across_models:
            by_model: dict[str, list[int]] = {}
            for i in valid:
                by_model.setdefault(item.models[i], []).append(i)
            groups = list(by_model.values())
            candidates = [(a[k], b[k]) for g, a in enumerate(groups) for b in groups[g + 1:]
                          for k in range(min(len(a), len(b)))]
        else:
            candidates = [(i, j) for a, i in enumerate(valid) for j in valid[a + 1:]]
        pairs += [Pair(n, i, j) for i, j in candidates if item.responses[i] != item.responses[j]]
    return pairs


def order_pairs(pairs: list[Pair], how: Selection, seed: int, entropy: torch.Tensor | None = None) -> list[Pair]:
    """The pairs in the order people should judge them: shuffled (``random``, or ``uncertainty``
    without a reward model yet), or by ``entropy`` (one value per pair), most uncertain first."""
    if how == "uncertainty" and entropy is not None:
        ranked = sorted(range(len(pairs)), key=lambda k: (-float(entropy[k]), k))
        return [pairs[k] for k in ranked]
    shuffled = list(pairs)
    random.Random(seed).shuffle(shuffled)
    return shuffled


def pair_entropy(pairs: list[Pair], scores: list[torch.Tensor], spreads: list[torch.Tensor] | None) -> torch.Tensor:
    """Preference entropy of each pair from per-response reward scores (``scores[item][i]``) and,
    for an ensemble, their spreads (margin spread sqrt(s_a^2 + s_b^2): members' errors on two
    responses taken as independent)."""
    margin = torch.stack([scores[p.item][p.i] - scores[p.item][p.j] for p in pairs]).double()
    spread = None
    if spreads is not None:
        spread = torch.stack([torch.sqrt(spreads[p.item][p.i] ** 2 + spreads[p.item][p.j] ** 2) for p in pairs])
    return preference_entropy(margin, spread)


def pair_items(items: list[CandidateSet], pairs: list[Pair]) -> list[CandidateSet]:
    """Each pair as a two-response candidate set (id ``ITEM:i-j``), so that every downstream step
    (simulated labels, task import) treats a selected pair like any candidate set."""
    out = []
    for p in pairs:
        item = items[p.item]
        base = item.id if item.id is not None else f"item-{p.item}"
        out.append(CandidateSet(messages=item.messages, responses=[item.responses[p.i], item.responses[p.j]],
                                models=[item.models[p.i], item.models[p.j]],
                                ended=None if item.ended is None else [item.ended[p.i], item.ended[p.j]],
                                id=f"{base}:{p.i}-{p.j}", split=item.split))
    return out


def pair_disagreement(pairs: list[Pair], member_scores: list[torch.Tensor]) -> torch.Tensor:
    """``mutual_information`` of each pair from every member's score of every response
    (``member_scores[item]``: ``[K, responses]``)."""
    margins = torch.stack([member_scores[p.item][:, p.i] - member_scores[p.item][:, p.j] for p in pairs], dim=1)
    return mutual_information(margins)


def spread_over_items(pairs: list[Pair], score: torch.Tensor, labelled: dict[int, int] | None = None) -> list[int]:
    """Indices of ``pairs`` by ``score``, highest first, in rounds over the items: an item's n-th pair
    comes after every item's (n-1)-th, counting the pairs of it ``labelled`` already. A plain ranking
    piles its picks onto the prompts it finds hardest; this keeps them spread over the prompts."""
    seen = dict(labelled or {})
    rank_in_item = {}
    for k in sorted(range(len(pairs)), key=lambda k: (-float(score[k]), k)):
        rank_in_item[k] = seen.get(pairs[k].item, 0)
        seen[pairs[k].item] = rank_in_item[k] + 1
    return sorted(range(len(pairs)), key=lambda k: (rank_in_item[k], -float(score[k]), k))
