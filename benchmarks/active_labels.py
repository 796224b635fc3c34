"""Active selection of labels: held-out reward-model accuracy against the number of labels, when the
pairs to label are drawn at random or chosen by the reward model's uncertainty or its ensemble's
disagreement.

1. Candidates (e.g. SmolLM2-135M-Instruct's answers, ``preftune sample --n 4``) are split by prompt
   into a pool (80 %) and a held-out set (20 %); every pair of distinct answers of a pool prompt is
   one pair that could be labelled.
2. One simulated annotator labels each pair once (Bradley-Terry noise on the gold scores, the
   temperature calibrated to 73 % agreement between two annotators, as the main job does); its label
   of a pair is drawn up front, so all methods reveal the same labels and differ only in which pairs.
3. For each seed, all methods start from the same random ``--budgets[0]`` labels and the same reward
   model. ``random`` then adds pairs in a fixed random order; ``uncertainty`` adds the unlabelled pairs
   of highest preference entropy under the reward model trained on the labels so far
   (``preftune.annotators.selection``, what ``preftune run --select uncertainty`` uses);
   ``disagreement`` the pairs of highest mutual information (BALD) between ``--members`` models: the
   one trained on the labels so far and members trained on bootstrap resamples of them; ``spread``
   the same disagreement ranking taken in rounds over the prompts (every prompt's best pair before
   any prompt's second, counting the labels it has, ``selection.spread_over_items``). A reward
   model is trained (the main job's MiniLM settings) at every budget, and its held-out accuracy is
   what each curve shows. A point already in ``--out`` (``point.json``) is reused, so an interrupted
   run continues and more seeds can be added later; ``--out`` records the candidates' hash and the
   settings (``setup.json``) and refuses a run with others.
4. Held-out accuracy is the expected agreement of the reward model with a fresh label of the same
   annotator on every held-out pair (the mean of P(annotator agrees), a lower-variance estimate of
   accuracy on drawn labels); its agreement with the noiseless gold is printed next to it.

The script prints the learning curves (mean and per seed), the labels each method needs to reach
random's final accuracy (linear interpolation between budgets) and their ratio.

    python benchmarks/active_labels.py --candidates runs/bench-prec540/candidates.jsonl \
        --out runs/bench-active --seeds 0 1 2 --methods random,uncertainty,disagreement
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from preftune.annotators.selection import (  # noqa: E402
    Pair,
    candidate_pairs,
    pair_disagreement,
    pair_entropy,
    spread_over_items,
)
from preftune.annotators.simulated import bt_probability, calibrate_temperature, noise_ceiling  # noqa: E402
from preftune.data.jsonl import read_jsonl, write_jsonl  # noqa: E402
from preftune.data.records import CandidateSet, PromptRecord, to_json  # noqa: E402

# The main job's reward model (examples/demo/demo.toml [reward], reward_backbone = "minilm").
RM_OPTIONS = {"epochs": 2, "lr": 2e-4, "batch_size": 8, "max_length": 128, "eval_split": 0.0}


def split_items(items: list[CandidateSet], eval_share: float, seed: int
                ) -> tuple[list[CandidateSet], list[CandidateSet]]:
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = round(len(items) * eval_share)
    held = set(order[:n_eval])
    return [it for k, it in enumerate(items) if k not in held], [it for k, it in enumerate(items) if k in held]


def draw_labels(pairs: list[Pair], gold: list[np.ndarray], temperature: float, seed: int) -> np.ndarray:
    """One annotator's label of each pair: True when it prefers response i to response j."""
    diff = np.array([gold[p.item][p.i] - gold[p.item][p.j] for p in pairs])
    return np.random.default_rng(seed).random(len(pairs)) < bt_probability(diff, temperature)


def comparison_rows(items: list[CandidateSet], pairs: list[Pair], prefers_i: np.ndarray) -> list[dict]:
    rows = []
    for p, first in zip(pairs, prefers_i):
        item = items[p.item]
        w, lo = (p.i, p.j) if first else (p.j, p.i)
        rows.append({"id": f"{item.id}-{p.i}-{p.j}", **to_json(PromptRecord(item.messages)),
                     "chosen": item.responses[w], "rejected": item.responses[lo]})
    return rows


def train_rm(model: str, rows: list[dict], out: Path, seed: int, threads: int, **options) -> None:
    from preftune.reward.config import RewardConfig
    from preftune.reward.fit import fit_reward

    write_jsonl(out / "train.jsonl", rows)
    cfg = RewardConfig(model=model, data=str(out / "train.jsonl"), out=str(out / "rm"), seed=seed,
                       threads=threads, **RM_OPTIONS, **options)
    fit_reward(cfg, quiet=True)


def scores_of(rm_dir: Path, items: list[CandidateSet]) -> list[torch.Tensor]:
    from preftune.pipeline.labels import response_scores
    from preftune.scoring import load_scorer

    scores, _ = response_scores(load_scorer(str(rm_dir), "auto", "auto"), items)
    return scores


def held_out_accuracy(scores: list[torch.Tensor], pairs: list[Pair], gold: list[np.ndarray],
                      temperature: float) -> tuple[float, float]:
    """(expected agreement with a fresh annotator label, agreement with the noiseless gold)."""
    margin = np.array([float(scores[p.item][p.i] - scores[p.item][p.j]) for p in pairs])
    gold_diff = np.array([gold[p.item][p.i] - gold[p.item][p.j] for p in pairs])
    p_first = bt_probability(gold_diff, temperature)  # P(the annotator prefers i)
    expected = np.where(margin > 0, p_first, 1 - p_first)
    expected = np.where(margin == 0, 0.5, expected)
    return float(expected.mean()), float(np.mean(np.sign(margin) == np.sign(gold_diff)))


def labels_to_reach(budgets: list[int], curve: list[float], target: float) -> float | None:
    """The first budget at which the curve reaches ``target``, interpolating linearly between budgets."""
    for k, acc in enumerate(curve):
        if acc >= target:
            if k == 0:
                return float(budgets[0])
            a, b = curve[k - 1], acc
            return budgets[k - 1] + (budgets[k] - budgets[k - 1]) * (target - a) / (b - a)
    return None


def member_scores_of(rm_dirs: list[Path], items: list[CandidateSet]) -> list[torch.Tensor]:
    """Every model's score of every response, per candidate set: ``[models, responses]``."""
    per_model = [scores_of(d, items) for d in rm_dirs]
    return [torch.stack([scores[n] for scores in per_model]) for n in range(len(items))]


def run_seed(args, seed: int, pool_items, eval_items, pool, eval_pairs, gold_pool, gold_eval, temperature) -> dict:
    labels = draw_labels(pool, gold_pool, temperature, seed=1000 + seed)
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    start = order[:args.budgets[0]]
    curves: dict[str, list[dict]] = {}
    root = Path(args.out) / f"seed{seed}"
    # The first budget's point is shared: the same labels and seed give the same reward model.
    shared = root / "start" / f"n{args.budgets[0]}"
    for method in args.methods:
        chosen = list(start)
        curves[method] = []
        previous = shared
        for k, budget in enumerate(args.budgets):
            if k > 0:
                have = set(chosen)
                rest = [n for n in order if n not in have]
                if method != "random":
                    rest_pairs = [pool[n] for n in rest]
                    if method == "uncertainty":
                        score = pair_entropy(rest_pairs, scores_of(previous / "rm", pool_items), None)
                    else:
                        members = [previous / "rm"] + [previous / f"member-{m}" / "rm" for m in range(1, args.members)]
                        score = pair_disagreement(rest_pairs, member_scores_of(members, pool_items))
                    if method == "spread":  # the same ranking, in rounds over the prompts
                        ranked = spread_over_items(rest_pairs, score, Counter(pool[n].item for n in chosen))
                    else:
                        ranked = sorted(range(len(rest)), key=lambda m: (-float(score[m]), m))
                    rest = [rest[m] for m in ranked]
                chosen += rest[:budget - len(chosen)]
            out = shared if k == 0 else root / method / f"n{budget}"
            rows = comparison_rows(pool_items, [pool[n] for n in chosen], labels[chosen])
            point = train_and_evaluate(args, rows, out, seed, eval_items, eval_pairs, gold_eval, temperature)
            point["train_label_agreement_with_gold"] = float(np.mean(
                [labels[n] == (gold_pool[pool[n].item][pool[n].i] > gold_pool[pool[n].item][pool[n].j])
                 for n in chosen]))
            curves[method].append(point)
            print(f"seed {seed} {method:12s} {len(chosen):5d} labels: held-out {point['accuracy']:.1%} "
                  f"(gold {point['gold_accuracy']:.1%}), labels agreeing with gold "
                  f"{point['train_label_agreement_with_gold']:.1%}, {point['seconds']} s", flush=True)
            if method in ("disagreement", "spread") and k < len(args.budgets) - 1:
                # The selecting ensemble: the evaluated model and K - 1 members trained on bootstrap
                # resamples of the same labels' prompts (as `preftune reward --ensemble K` trains them).
                for m in range(1, args.members):
                    if not (out / f"member-{m}" / "rm" / "metrics.json").exists():  # written last
                        train_rm(args.model, rows, out / f"member-{m}", seed + m, args.threads,
                                 resample_seed=seed * 100 + m)
            previous = out
    return curves


def train_and_evaluate(args, rows: list[dict], out: Path, seed: int, eval_items, eval_pairs, gold_eval,
                       temperature) -> dict:
    """Train the reward model of one budget (or reuse the one an earlier run left in ``out``) and
    measure its held-out accuracy."""
    cached = out / "point.json"
    if cached.exists():
        return json.loads(cached.read_text())
    t = time.perf_counter()
    train_rm(args.model, rows, out, seed, args.threads)
    acc, gold_acc = held_out_accuracy(scores_of(out / "rm", eval_items), eval_pairs, gold_eval, temperature)
    point = {"labels": len(rows), "accuracy": acc, "gold_accuracy": gold_acc,
             "seconds": round(time.perf_counter() - t, 1)}
    cached.write_text(json.dumps(point) + "\n")
    return point


def check_same_setup(parser: argparse.ArgumentParser, out: Path, args) -> None:
    """The points, gold scores and members reused from ``out`` are only valid for the candidates and
    settings that made them: record those on the first run and refuse another set-up in the same folder."""
    setup = {"candidates_sha256": hashlib.sha256(Path(args.candidates).read_bytes()).hexdigest(),
             "model": args.model, "labeler": args.labeler, "target_agreement": args.target_agreement,
             "eval_share": args.eval_share}
    path = out / "setup.json"
    if path.exists():
        before = json.loads(path.read_text())
        changed = sorted(k for k in setup if before.get(k) != setup[k])
        if changed:
            parser.error(f"--out {out}: holds points made with other {', '.join(changed)} ({path}); "
                         "use a new --out")
    else:
        path.write_text(json.dumps(setup, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", required=True, help="Candidates JSONL (preftune sample).")
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="minilm", help="Reward-model backbone (minilm: the bundled all-MiniLM-L6-v2).")
    parser.add_argument("--labeler", default="helpful", help="Gold scorer of the simulated annotator.")
    parser.add_argument("--target-agreement", type=float, default=0.73)
    parser.add_argument("--budgets", type=lambda s: [int(x) for x in s.split(",")], default=[200, 400, 600, 900, 1300],
                        help="Comma-separated label counts at which a reward model is trained.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", type=lambda s: s.split(","), default=["random", "uncertainty"],
                        help="Comma-separated, random first: random, uncertainty (the entropy of one reward "
                             "model's preference), disagreement (the mutual information of an ensemble's), "
                             "spread (disagreement in rounds over the prompts).")
    parser.add_argument("--members", type=int, default=3,
                        help="disagreement, spread: the selecting ensemble's size (the evaluated model and K - 1 "
                             "bootstrap members).")
    parser.add_argument("--eval-share", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.methods[0] != "random" or not set(args.methods) <= {"random", "uncertainty", "disagreement", "spread"}:
        parser.error(f"--methods: {','.join(args.methods)}: random first, then any of uncertainty, disagreement, "
                     "spread")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    check_same_setup(parser, Path(args.out), args)
    torch.set_num_threads(args.threads)
    if args.model == "minilm":
        from preftune.models.loading import bundled_minilm_path

        args.model = str(bundled_minilm_path("--model minilm"))
    from preftune.annotators.label import gold_scores
    from preftune.scoring import load_scorer

    items = read_jsonl(args.candidates, "candidates").records
    pool_items, eval_items = split_items(items, args.eval_share, seed=0)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    gold_path = Path(args.out) / "gold.json"
    if gold_path.exists():
        gold = [np.array(g) for g in json.loads(gold_path.read_text())]
    else:
        gold = gold_scores(load_scorer(args.labeler, "auto", "auto"), items)
        gold_path.write_text(json.dumps([g.tolist() for g in gold]))
    index = {id(it): n for n, it in enumerate(items)}
    gold_pool = [gold[index[id(it)]] for it in pool_items]
    gold_eval = [gold[index[id(it)]] for it in eval_items]
    pool, eval_pairs = candidate_pairs(pool_items), candidate_pairs(eval_items)
    pool_diffs = np.array([gold_pool[p.item][p.i] - gold_pool[p.item][p.j] for p in pool])
    temperature = calibrate_temperature(pool_diffs, args.target_agreement)
    eval_diffs = np.array([gold_eval[p.item][p.i] - gold_eval[p.item][p.j] for p in eval_pairs])
    ceiling = noise_ceiling(eval_diffs, temperature)
    if args.budgets[-1] > len(pool):
        parser.error(f"--budgets: {args.budgets[-1]} labels asked for, the pool has {len(pool)} pairs")
    print(f"{len(pool_items)} pool prompts ({len(pool)} pairs), {len(eval_items)} held-out prompts "
          f"({len(eval_pairs)} pairs); annotator temperature {temperature:.4f}; noise ceiling {ceiling:.1%}",
          flush=True)
    t0 = time.perf_counter()
    results = {}
    for seed in args.seeds:
        results[seed] = run_seed(args, seed, pool_items, eval_items, pool, eval_pairs, gold_pool, gold_eval,
                                 temperature)
    mean = {m: [float(np.mean([results[s][m][k]["accuracy"] for s in args.seeds])) for k in range(len(args.budgets))]
            for m in args.methods}
    gold_mean = {m: [float(np.mean([results[s][m][k]["gold_accuracy"] for s in args.seeds]))
                     for k in range(len(args.budgets))] for m in args.methods}
    target = mean["random"][-1]
    needed = {m: labels_to_reach(args.budgets, mean[m], target) for m in mean}
    print(f"\nheld-out accuracy (mean of seeds {args.seeds}; gold agreement in brackets), ceiling {ceiling:.1%}:")
    print("labels       " + "".join(f"{b:>16d}" for b in args.budgets))
    for m in mean:
        print(f"{m:12s} " + "".join(f"{a:>8.1%} ({g:.1%})" for a, g in zip(mean[m], gold_mean[m])))
    print(f"random's final accuracy {target:.1%} at {args.budgets[-1]} labels; labels to reach it: " +
          ", ".join(f"{m} {'not reached' if n is None else f'{n:.0f}'}" for m, n in needed.items()))
    for m in args.methods[1:]:
        if needed[m] is not None:
            print(f"{m} needs {needed[m] / args.budgets[-1]:.0%} of random's labels (target <= 70 %)")
    summary = {"pool_pairs": len(pool), "eval_pairs": len(eval_pairs), "temperature": temperature,
               "noise_ceiling": ceiling, "budgets": args.budgets, "seeds": args.seeds, "curves": results,
               "mean_accuracy": mean, "mean_gold_accuracy": gold_mean, "labels_to_reach_random_final": needed,
               "seconds": round(time.perf_counter() - t0)}
    (Path(args.out) / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{summary['seconds']} s; results in {Path(args.out) / 'results.json'}")


if __name__ == "__main__":
    main()
