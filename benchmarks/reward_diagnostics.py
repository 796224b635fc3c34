"""Which parts of the gold a trained reward model has learnt, on the held-out answers of a
``benchmarks/reward_backbones.py`` run.

For a weighted labeler (``helpful`` = 0.4 similarity + 0.3 sentiment + 0.15 ends + 0.15
nonrepetitive) it prints, on the held-out rankings of ``--bench``:

* the pair accuracy of the RM, of the noiseless gold, and of the gold without each part;
* the correlation of the RM's scores with the gold and with each part *within a prompt* (scores
  minus the prompt's mean: a reward model only has to order the answers of one prompt).

Usage::

    python benchmarks/reward_diagnostics.py --bench runs/bench-n8 --rm runs/bench-n8/rm-minilm
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bench", required=True, help="output directory of reward_backbones.py")
    parser.add_argument("--rm", required=True, help="a reward model trained on its labels")
    parser.add_argument("--labeler", default="helpful")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()

    from benchmarks.reward_backbones import accuracy_of, eval_pairs, read_jsonl
    from preftune.models.loading import set_threads
    from preftune.models.reward_model import RewardModel
    from preftune.scoring import load_scorer, parse_scorer

    set_threads(args.threads)
    rows = read_jsonl(Path(args.bench) / "rankings.jsonl")
    held = [r for r in rows if r.get("split") == "eval"]
    answers = list(dict.fromkeys((r["prompt"], t) for r in held for t in r["responses"]))
    prompts, responses = [p for p, _ in answers], [t for _, t in answers]
    # each weighted part of the labeler, by its own text (e.g. "length(max=50)")
    weights = {term.atom: term.weight for term in parse_scorer(args.labeler)}
    parts = {c: load_scorer(c, "cpu")(prompts, responses).numpy().astype(float) for c in weights}
    gold = sum(weights[c] * parts[c] for c in parts)
    rm = RewardModel.load(args.rm).raw_scores(prompts, responses, batch_size=32).numpy().astype(float)

    def accuracy(values: np.ndarray) -> float:
        return accuracy_of(eval_pairs(held, {(json.dumps(p), t): v for (p, t), v in zip(answers, values)}))

    prompt_ids = np.unique(prompts, return_inverse=True)[1]

    def within_prompt(values: np.ndarray) -> np.ndarray:
        means = np.bincount(prompt_ids, values) / np.bincount(prompt_ids)
        return values - means[prompt_ids]

    def correlation(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.corrcoef(within_prompt(a), within_prompt(b))[0, 1])

    print(f"{len(held)} held-out rankings, {len(answers)} answers")
    print(f"pair accuracy: RM {100 * accuracy(rm):.1f}%, gold {100 * accuracy(gold):.1f}%")
    for c in parts:
        print(f"  gold without {c:14s} {100 * accuracy(gold - weights[c] * parts[c]):.1f}%   "
              f"{c} alone {100 * accuracy(parts[c]):.1f}%")
    print(f"within-prompt correlation of the RM with the gold: {correlation(rm, gold):.2f}; with each part: "
          + ", ".join(f"{c} {correlation(rm, parts[c]):.2f}" for c in parts))


if __name__ == "__main__":
    main()
