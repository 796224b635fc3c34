"""The main job's label stage: which pairs are judged (all, a random share, the most uncertain
first) and by whom (simulated annotators, or people in the feedback app).

Both kinds of annotator see the same things: every response of a round's candidates to rate 1-3
with flags, and the selected pairs to compare. Either way the stage writes the round's
``comparisons.jsonl`` and ``ratings.jsonl`` in preftune's formats, which the reward model reads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from preftune.annotators.selection import Pair, candidate_pairs, order_pairs, pair_entropy, pair_items
from preftune.data.jsonl import read_dicts, write_jsonl
from preftune.data.records import CandidateSet


def response_scores(scorer, items: list[CandidateSet], chunk: int = 256
                    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """A reward scorer's score of every response of every candidate set, and the ensemble's spread
    of each (None for a single model)."""
    flat = [(item.messages, r) for item in items for r in item.responses]
    scores, spreads = [], []
    for i in range(0, len(flat), chunk):
        part = flat[i:i + chunk]
        scores.append(scorer([m for m, _ in part], [r for _, r in part]).double())
        spreads.append(scorer.last_uncertainty)
    flat_scores = torch.cat(scores)
    flat_spreads = None if any(s is None for s in spreads) else torch.cat(spreads).double()
    bounds = np.cumsum([0] + [len(item.responses) for item in items])
    per_item = [flat_scores[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    per_spread = None if flat_spreads is None else [flat_spreads[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    return per_item, per_spread


def select_pairs(run, r: int, items: list[CandidateSet]) -> tuple[list[Pair], torch.Tensor | None, str]:
    """The round's pairs to compare, in the order they should be judged, with their preference
    entropy under the last round's reward model (None in round 1) and a note on how they were chosen."""
    cfg = run.cfg
    pairs = candidate_pairs(items, across_models=cfg.feedback == "app")
    entropy = None
    how = cfg.select
    if cfg.select == "uncertainty" and r > 1 and pairs:
        from preftune.scoring import load_scorer

        scorer = load_scorer(str(run.round_path(r - 1, "rm")), cfg.device, cfg.dtype)
        scores, spreads = response_scores(scorer, items)
        entropy = pair_entropy(pairs, scores, spreads)
    elif cfg.select == "uncertainty":
        how = "random (no reward model before round 1)"
    ordered = order_pairs(pairs, cfg.select, seed=cfg.seed + r, entropy=entropy)
    if entropy is not None:
        index = {p: k for k, p in enumerate(pairs)}
        entropy = torch.stack([entropy[index[p]] for p in ordered])
    budget = cfg.labels_per_round or len(ordered)
    chosen = ordered[:budget]
    return chosen, None if entropy is None else entropy[:budget], f"{how}: {len(chosen)} of {len(pairs)} pairs"


def label_simulated(run, r: int, items: list[CandidateSet], pairs: list[Pair]) -> dict:
    """Ratings of every response and comparisons of the selected pairs by the simulated
    annotators; the gold scores every response once and both kinds of label come from it."""
    from preftune.annotators.config import LabelConfig
    from preftune.annotators.label import gold_scores, write_labels
    from preftune.scoring import load_scorer

    cfg = run.cfg
    noise = {"noise": [cfg.noise]} if cfg.noise is not None else {"target_agreement": cfg.target_agreement}
    configs = {kind: run.stage_config(LabelConfig, "label", kind=kind, candidates=str(run.candidates(r)),
                                      out=str(run.round_path(r, "data", f"{kind}.jsonl")), labeler=cfg.gold,
                                      annotators=cfg.annotators, **noise) for kind in ("comparisons", "ratings")}
    first = configs["comparisons"]
    gold = gold_scores(load_scorer(first.labeler, first.device, first.dtype), items, quiet=run.quiet)
    if cfg.labels_per_round is None and cfg.select == "random":
        comparisons = write_labels(first, items, gold)  # every pair of every prompt
    else:
        comparisons = write_labels(first, pair_items(items, pairs),
                                   [np.array([gold[p.item][p.i], gold[p.item][p.j]]) for p in pairs])
    ratings = write_labels(configs["ratings"], items, gold)
    return {"comparisons": comparisons, "ratings": {**ratings, "flag_counts": flag_counts(r, run)},
            "human_judgements": 0, "annotators": cfg.annotators}


def flag_counts(r: int, run) -> dict[str, int]:
    flags: dict[str, int] = {}
    for row in read_dicts(run.round_path(r, "data", "ratings.jsonl")):
        for flag in row.get("flags", []):
            flags[flag] = flags.get(flag, 0) + 1
    return flags


def project_names(run, r: int) -> dict[str, str]:
    prefix = run.cfg.project or Path(run.cfg.out).name
    suffix = "" if r == 1 else f"-r{r}"
    return {"ratings": f"{prefix}-ratings{suffix}", "pairs": f"{prefix}-pairs{suffix}", "eval": f"{prefix}-eval"}


def label_people(run, r: int, items: list[CandidateSet], pairs: list[Pair], entropy: torch.Tensor | None) -> dict:
    """Put the round's ratings and pairs into the feedback app (created or reused projects, with
    ``annotators`` judgements per task), wait for people or stop, then export what they judged."""
    from preftune.pipeline.people import FeedbackDB, agreement_summary, await_judgements, pair_records, rating_records

    cfg = run.cfg
    db = FeedbackDB.open(cfg.db)
    names = project_names(run, r)
    records = {"ratings": rating_records(items, r),
               "pairs": pair_records(pair_items(items, pairs), r, None if entropy is None else entropy.tolist())}
    for key, kind in (("ratings", "rating"), ("pairs", "pairwise")):
        db.ensure_project(names[key], kind, overlap=cfg.annotators)
        added, present = db.import_records(names[key], records[key])
        if added:
            run.say(f"imported {added} tasks into {names[key]}" + (f" ({present} already there)" if present else ""))
    await_judgements(db, [names["ratings"], names["pairs"]], f"label (round {r})", cfg.wait, cfg.poll_seconds,
                     run.quiet)
    comparisons = db.export(names["pairs"], "comparisons")
    ratings = db.export(names["ratings"], "ratings")
    write_jsonl(run.round_path(r, "data", "comparisons.jsonl"), comparisons)
    write_jsonl(run.round_path(r, "data", "ratings.jsonl"), ratings)
    people = {key: agreement_summary(db.stats(names[key])) for key in ("pairs", "ratings")}
    annotators = sorted(set(people["pairs"]["annotators"]) | set(people["ratings"]["annotators"]))
    return {
        "comparisons": {"records": len(comparisons), "inter_annotator_agreement": people["pairs"]["percent_agreement"],
                        **people["pairs"]},
        "ratings": {"records": len(ratings), **people["ratings"], "flag_counts": flag_counts(r, run)},
        "human_judgements": people["pairs"]["judgements"] + people["ratings"]["judgements"],
        "annotators": len(annotators), "annotator_names": annotators, "projects": names, "database": db.url,
    }


def stage_label(run, r: int) -> dict:
    """Stage 2b of round ``r``: select the pairs, then have them judged."""
    from preftune.annotators.config import LabelConfig
    from preftune.annotators.label import read_candidates

    items = read_candidates(run.stage_config(LabelConfig, "label", candidates=str(run.candidates(r)), out="-"))
    pairs, entropy, note = select_pairs(run, r, items)
    if run.cfg.feedback == "app":
        summary = label_people(run, r, items, pairs, entropy)
    else:
        summary = label_simulated(run, r, items, pairs)
    return {**summary, "selection": note,
            **({"mean_selected_entropy": float(entropy.mean())} if entropy is not None and len(entropy) else {})}
