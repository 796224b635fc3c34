"""``preftune label``: simulated annotators judge candidate responses.

Recipe: read the candidates, score every response with the gold scorer once, choose the noise
(a fixed temperature or one calibrated to a target agreement), then draw each annotator's
comparisons, rankings or ratings (``simulated.simulate_labels``) and report their agreement.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from preftune.annotators.config import LabelConfig
from preftune.annotators.simulated import calibrate_temperature, simulate_labels
from preftune.data.jsonl import read_jsonl, write_jsonl
from preftune.data.records import CandidateSet, parse_comparison
from preftune.errors import ConfigError
from preftune.progress import console, progress_bar
from preftune.scoring import Scorer, load_scorer


def gold_scores(scorer: Scorer, items: list[CandidateSet], chunk: int = 256, quiet: bool = False) -> list[np.ndarray]:
    """The gold score of every response of every candidate set (empty responses score 0, unused)."""
    flat = [(n, item.messages, r) for n, item in enumerate(items) for r in item.responses]
    scores = np.zeros(len(flat))
    with progress_bar(len(flat), "gold scores", disable=quiet) as bar:
        for i in range(0, len(flat), chunk):
            part = [(m, r) for _, m, r in flat[i:i + chunk] if r.strip()]
            idx = [i + k for k, (_, _, r) in enumerate(flat[i:i + chunk]) if r.strip()]
            if part:
                scores[idx] = scorer([m for m, _ in part], [r for _, r in part]).double().numpy()
            bar.advance(len(flat[i:i + chunk]))
    out, pos = [], 0
    for item in items:
        out.append(scores[pos:pos + len(item.responses)])
        pos += len(item.responses)
    return out


def annotator_temperatures(cfg: LabelConfig, items: list[CandidateSet], gold: list[np.ndarray]) -> list[float]:
    """One Bradley-Terry temperature per annotator: calibrated to ``--target-agreement`` on these
    items' distinct non-empty pairs, or ``--noise``."""
    if cfg.target_agreement is not None:
        diffs = [g[i] - g[j] for item, g in zip(items, gold)
                 for i in range(len(g)) for j in range(i + 1, len(g))
                 if item.responses[i].strip() and item.responses[j].strip()
                 and item.responses[i] != item.responses[j]]
        temperatures = [calibrate_temperature(np.array(diffs), cfg.target_agreement)] * cfg.annotators
    elif len(cfg.noise) == 1:
        temperatures = cfg.noise * cfg.annotators
    elif len(cfg.noise) == cfg.annotators:
        temperatures = list(cfg.noise)
    else:
        raise ConfigError(f"--noise has {len(cfg.noise)} values for {cfg.annotators} annotators "
                          f"(give one, or one per annotator)")
    if any(t < 0 for t in temperatures):
        raise ConfigError("--noise: temperatures must be >= 0")
    return temperatures


def write_labels(cfg: LabelConfig, items: list[CandidateSet], gold: list[np.ndarray]) -> dict:
    """Draw the annotators' labels of ``cfg.kind`` from the gold scores, write them to ``cfg.out``
    and the agreement statistics next to it; returns the statistics."""
    temperatures = annotator_temperatures(cfg, items, gold)
    rows, stats = simulate_labels(items, gold, cfg.kind, temperatures, scale=cfg.scale,
                                  pairs_per_prompt=cfg.pairs_per_prompt, seed=cfg.seed)
    if cfg.format == "trl":
        rows = [parse_comparison(row) for row in rows]
    write_jsonl(cfg.out, rows, format=cfg.format)
    all_gold = np.concatenate(gold)
    stats = {"labeler": cfg.labeler, "records": len(rows), **stats,
             "gold_mean": float(all_gold.mean()), "gold_std": float(all_gold.std())}
    stats_path = Path(cfg.out).with_suffix(".stats.json")
    stats_path.write_text(json.dumps(stats, indent=2) + "\n")
    stats["stats_path"] = str(stats_path)
    return stats


def read_candidates(cfg: LabelConfig) -> list[CandidateSet]:
    read = read_jsonl(cfg.candidates, "candidates", skip_invalid=cfg.skip_invalid)
    if read.skipped:
        console.print(f"[yellow]{read.summary()}")
    return read.records


def run_label(cfg: LabelConfig, quiet: bool = False) -> dict:
    items = read_candidates(cfg)
    gold = gold_scores(load_scorer(cfg.labeler, cfg.device, cfg.dtype), items, quiet=quiet)
    return write_labels(cfg, items, gold)


def describe_agreement(stats: dict) -> str:
    parts = [f"{stats['records']} {stats['kind']} from {stats['annotators']} annotator(s)"]
    fmt = lambda key: f"{100 * stats[key]:.1f}%"  # noqa: E731
    if "inter_annotator_agreement" in stats:
        expected = (f" (expected {fmt('expected_inter_annotator_agreement')})"
                    if "expected_inter_annotator_agreement" in stats else "")
        parts.append(f"inter-annotator agreement {fmt('inter_annotator_agreement')}{expected}")
    expected = f" (expected {fmt('expected_gold_agreement')})" if "expected_gold_agreement" in stats else ""
    parts.append(f"agreement with gold {fmt('gold_agreement')}{expected}")
    if "noise_ceiling" in stats:
        parts.append(f"noise ceiling {fmt('noise_ceiling')}")
    return "; ".join(parts)
