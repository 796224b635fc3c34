"""Turning comparisons, rankings and ratings into groups of (winner, loser) pairs.

* a comparison is a group of 2 responses and 1 pair, with margin ``margin_scale * strength``;
* a ranking of K is a group of K responses and every pair whose members sit in different tie
  groups (C(K,2) pairs without ties); pairs inside a tie group are skipped and counted;
* ratings of the same prompt by the same annotator form one group; every two responses with
  different ratings make a pair, equal ratings (ties) are skipped and counted, and a prompt rated
  only once gives no pair (counted too).

Pairs of two identical response texts carry no preference and are skipped (counted).

``group_by_prompt`` then merges the groups of one prompt (e.g. several annotators' comparisons among
the same K candidates) into one group whose distinct responses are scored once: C(K,2) pairs from
two annotators cost K forward passes instead of 2 * K * (K-1).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from itertools import combinations

from preftune.data.records import Comparison, Messages, Ranking, Rating, Source


@dataclass
class Pair:
    winner: int  # index into the group's responses
    loser: int
    margin: float = 0.0
    annotator: str | None = None


@dataclass
class PreferenceGroup:
    """One batch element: the responses to one prompt and the pairs among them."""

    messages: Messages
    responses: list[str]
    pairs: list[Pair]
    annotator: str | None = None
    source: Source = field(default_factory=Source)
    split: str | None = None  # the record's "split" field (train / eval), for train_eval_split


def ranking_pairs(ranking: list[list[int]]) -> tuple[list[tuple[int, int]], int]:
    """All (better, worse) index pairs of a ranking given as tie groups, best first, and the
    number of tied pairs skipped. ``[[2], [0, 1], [3]]`` -> (2,0) (2,1) (2,3) (0,3) (1,3); 1 tie."""
    pairs = []
    for g, better in enumerate(ranking):
        for worse_group in ranking[g + 1:]:
            pairs.extend((w, l) for w in better for l in worse_group)
    ties = sum(len(g) * (len(g) - 1) // 2 for g in ranking)
    return pairs, ties


def rating_pairs(ratings: list[float]) -> tuple[list[tuple[int, int]], int]:
    """(higher, lower) index pairs among ratings of one prompt, and the number of ties skipped."""
    pairs, ties = [], 0
    for i, j in combinations(range(len(ratings)), 2):
        if ratings[i] > ratings[j]:
            pairs.append((i, j))
        elif ratings[j] > ratings[i]:
            pairs.append((j, i))
        else:
            ties += 1
    return pairs, ties


@dataclass
class Expansion:
    groups: list[PreferenceGroup]
    counts: Counter  # comparisons, rankings, ratings, pairs, tied_pairs_skipped, ...

    def summary(self) -> str:
        c = self.counts
        parts = [f"{c[k]} {k}" for k in ("comparisons", "rankings", "ratings") if c[k]]
        text = f"{', '.join(parts)} -> {c['pairs']} pairs in {len(self.groups)} groups"
        skipped = [f"{c[k]} {k.replace('_', ' ')}" for k in
                   ("tied_pairs_skipped", "identical_pairs_skipped", "single_rating_prompts") if c[k]]
        return text + (f" (skipped: {', '.join(skipped)})" if skipped else "")


def _without_identical(responses: list[str], pairs: list[Pair], counts: Counter) -> list[Pair]:
    kept = [p for p in pairs if responses[p.winner] != responses[p.loser]]
    counts["identical_pairs_skipped"] += len(pairs) - len(kept)
    return kept


def expand_preferences(records: list[Comparison | Ranking | Rating], margin_scale: float = 1.0) -> Expansion:
    """Groups of pairs for a mixed list of comparisons, rankings and ratings (see module docstring)."""
    counts: Counter = Counter()
    groups: list[PreferenceGroup] = []
    rated: dict[tuple[str, str | None, str | None], list[Rating]] = {}
    for rec in records:
        if isinstance(rec, Comparison):
            counts["comparisons"] += 1
            margin = margin_scale * rec.strength if rec.strength is not None else 0.0
            groups.append(PreferenceGroup(rec.messages, [rec.chosen, rec.rejected],
                                          [Pair(0, 1, margin, rec.annotator)], rec.annotator, rec.source, rec.split))
        elif isinstance(rec, Ranking):
            counts["rankings"] += 1
            index_pairs, ties = ranking_pairs(rec.ranking)
            counts["tied_pairs_skipped"] += ties
            pairs = _without_identical(rec.responses, [Pair(w, l, 0.0, rec.annotator) for w, l in index_pairs],
                                       counts)
            if pairs:
                groups.append(PreferenceGroup(rec.messages, list(rec.responses), pairs, rec.annotator, rec.source,
                                              rec.split))
        elif isinstance(rec, Rating):
            counts["ratings"] += 1
            key = (json.dumps(rec.messages, sort_keys=True), rec.annotator, rec.split)
            rated.setdefault(key, []).append(rec)
        else:
            raise TypeError(f"not a preference record: {type(rec).__name__}")
    for (_, annotator, _), recs in rated.items():
        if len(recs) < 2:
            counts["single_rating_prompts"] += 1
            continue
        # Scales may differ between records: compare positions on [0, 1].
        index_pairs, ties = rating_pairs([(r.rating - 1) / (r.scale - 1) for r in recs])
        counts["tied_pairs_skipped"] += ties
        responses = [r.response for r in recs]
        pairs = _without_identical(responses, [Pair(w, l, 0.0, annotator) for w, l in index_pairs], counts)
        if pairs:
            groups.append(PreferenceGroup(recs[0].messages, responses, pairs, annotator, recs[0].source,
                                          recs[0].split))
    counts["pairs"] = sum(len(g.pairs) for g in groups)
    return Expansion(groups, counts)


def group_by_prompt(groups: list[PreferenceGroup]) -> list[PreferenceGroup]:
    """Merge groups of the same prompt (and split) that share a response text, transitively (e.g. two
    annotators' comparisons among the same K candidates become one group of K responses), in order of
    first appearance. Equal texts become one response; every pair is kept with its annotator and margin.
    Groups whose responses appear nowhere else stay as they are. The merged group's annotator is the
    common one, or None when several annotators contributed."""
    parent = list(range(len(groups)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[tuple[str, str | None, str], int] = {}  # (prompt, split, response) -> a group holding it
    for i, g in enumerate(groups):
        prompt = json.dumps(g.messages, sort_keys=True)
        for r in g.responses:
            j = owner.setdefault((prompt, g.split, r), i)
            a, b = root(i), root(j)
            if a != b:
                parent[max(a, b)] = min(a, b)  # the earliest group is the root: first-appearance order
    merged: dict[int, PreferenceGroup] = {}
    position: dict[int, dict[str, int]] = {}
    for i, g in enumerate(groups):
        k = root(i)
        if k not in merged:
            merged[k] = PreferenceGroup(g.messages, [], [], g.annotator, g.source, g.split)
            position[k] = {}
        target, index = merged[k], position[k]
        for r in g.responses:
            if r not in index:
                index[r] = len(target.responses)
                target.responses.append(r)
        target.pairs += [Pair(index[g.responses[p.winner]], index[g.responses[p.loser]], p.margin, p.annotator)
                         for p in g.pairs]
        if target.annotator != g.annotator:
            target.annotator = None
    return list(merged.values())
