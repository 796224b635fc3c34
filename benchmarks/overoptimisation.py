"""Over-optimisation and its defences: a single reward model against an ensemble's mean, WCO and UWO.

Gao et al.'s synthetic set-up at this machine's scale (Coste et al., ICLR 2024, for the defences):
the gold labeler (`helpful`, through simulated annotators with people's agreement) has labelled
comparisons of SmolLM2 samples in a finished main job (`make demo`: RUN/data/rm_train.jsonl).
For each seed:

1. proxy reward models: an ensemble of K MiniLM reward models (`preftune reward --ensemble K`) on the
   labels of only --train-prompts of the run's training prompts (few enough that one model is
   over-optimised), held out on RUN/data/rm_eval.jsonl; member 0 is "the single reward model";
2. best-of-n up to --n-max on --prompts held-out prompts of the run's SFT policy: the same samples
   picked by each objective (single, mean, wco, uwo), gold and proxy against sqrt(KL_bon(n));
3. PPO from the SFT policy with a small fixed KL coefficient against each objective (the main job's
   [ppo] settings otherwise), gold and proxy on the same held-out prompts every 2 steps.

Reported per method and objective, averaged over seeds: the peak gold, the final gold and the drop
between them, and whether each defence drops at least 50 % less than the single model at no worse
peak gold. Writes OUT/overoptimisation.json and OUT/overoptimisation.png.

    python benchmarks/overoptimisation.py --run runs/demo --seeds 0,1 --out runs/overopt
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OBJECTIVES = ("single", "mean", "wco", "uwo")


def objective_specs(ensemble: Path, uwo_coef: float) -> dict[str, str]:
    return {"single": f"rm:{ensemble / 'member-0'}", "mean": f"rm:{ensemble}", "wco": f"wco({ensemble})",
            "uwo": f"uwo({ensemble}, {uwo_coef:g})"}


def subset_by_prompt(src: Path, dst: Path, n_prompts: int, seed: int) -> int:
    """The records of ``n_prompts`` prompts of ``src`` drawn with ``seed``; returns the record count."""
    lines = [line for line in src.read_text().splitlines() if line.strip()]
    key = lambda line: json.dumps(json.loads(line).get("prompt"), sort_keys=True)  # noqa: E731
    prompts = sorted({key(line) for line in lines})
    keep = set(random.Random(seed).sample(prompts, min(n_prompts, len(prompts))))
    chosen = [line for line in lines if key(line) in keep]
    dst.write_text("\n".join(chosen) + "\n")
    return len(chosen)


def train_proxies(run: Path, out: Path, args, seed: int) -> dict:
    from preftune.models.loading import bundled_minilm_path
    from preftune.reward.config import RewardConfig
    from preftune.reward.fit import fit_reward

    data = out / "rm_train.jsonl"
    records = subset_by_prompt(run / "data" / "rm_train.jsonl", data, args.train_prompts, seed)
    cfg = RewardConfig(model=str(bundled_minilm_path("the benchmark")), data=str(data),
                       eval_data=str(run / "data" / "rm_eval.jsonl"), out=str(out / "ensemble"), epochs=2, lr=2e-4,
                       batch_size=8, max_length=128, ensemble=args.members, seed=seed, threads=args.threads,
                       length_head=args.length_head, resume=True)
    t = time.perf_counter()
    summary = fit_reward(cfg, quiet=True)
    return {"records": records, "seconds": time.perf_counter() - t,
            **{k: summary[k] for k in ("eval_accuracy", "eval_accuracy_wco", "member_eval_accuracy",
                                       "eval_disagreement", "eval_length_correlation") if k in summary}}


def best_of_n(run: Path, ensemble: Path, prompts: list, args, seed: int) -> dict:
    import numpy as np
    import torch

    from preftune.evaluation.bon import bon_curve
    from preftune.evaluation.harness import score_all
    from preftune.models.engines import open_engine
    from preftune.models.generation import SamplingOptions, sample_responses
    from preftune.models.reward_ensemble import RewardEnsemble, aggregate
    from preftune.scoring import load_scorer

    N = args.n_max
    messages = [p.messages for p in prompts for _ in range(N)]
    sampler = open_engine(args.engine, str(run / "sft"), device=None, dtype="auto", seed=seed, quiet=True)
    samples = sample_responses(sampler, messages, SamplingOptions(args.max_new_tokens, args.temperature, 1.0, 32),
                               generator=torch.Generator().manual_seed(seed), quiet=True)
    sampler.close()
    members = RewardEnsemble.load(ensemble).member_scores(messages, samples.texts)  # [K, P*N]
    gold = np.array(score_all(load_scorer("helpful"), messages, samples.texts, 64, quiet=True))
    objectives = {"single": members[0], "mean": aggregate(members, "mean"), "wco": aggregate(members, "wco"),
                  "uwo": aggregate(members, "uwo", args.uwo_coef)}
    ns = [n for n in (1, 2, 4, 8, 16, 32, 64, 128) if n <= N]
    shape = (len(prompts), N)
    return {name: bon_curve(values.numpy().reshape(shape), gold.reshape(shape), ns, seed=seed, resamples=200)
            for name, values in objectives.items()}


def ppo(run: Path, out: Path, spec: str, eval_prompts: Path, args, seed: int) -> list[dict]:
    from preftune.rl.config import PPOConfig
    from preftune.rl.trainer import train_rl

    table = tomllib.loads((ROOT / "examples" / "demo" / "demo.toml").read_text())["ppo"]
    table.update(policy=str(run / "sft"), reward=spec, gold="helpful", prompts=str(run / "data" / "rl_prompts.jsonl"),
                 eval_prompts=str(eval_prompts), out=str(out), steps=args.ppo_steps, eval_every=2, save_every=0,
                 kl_coef=args.kl_coef, adaptive_kl=False, seed=seed, threads=args.threads)
    if args.lr is not None:
        table["lr"] = args.lr
    train_rl(PPOConfig(**table), quiet=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{"step": r["step"], "kl": r["eval/kl"], "sqrt_kl": r["eval/sqrt_kl"], "gold": r["eval/gold"],
             "proxy": r["eval/proxy"], "uncertainty": r.get("eval/proxy_uncertainty"),
             "length": r.get("eval/response_length")}
            for r in rows if "eval/gold" in r]


def drop_from_peak(curve: list[dict]) -> dict:
    """Peak gold (and where), the last point's gold, and the fall between them."""
    peak = max(curve, key=lambda r: r["gold"])
    return {"peak_gold": peak["gold"], "peak_sqrt_kl": peak["sqrt_kl"], "final_gold": curve[-1]["gold"],
            "final_sqrt_kl": curve[-1]["sqrt_kl"], "drop": peak["gold"] - curve[-1]["gold"]}


def summarise(per_seed: list[dict], method: str, objectives: list[str], min_drop: float = 0.02) -> dict:
    """Per objective, averaged over seeds: peak and final gold and the drop between them; for the
    defences, their drop against the single model's and whether they meet the target (None when
    the single model's own drop is under ``min_drop``, the noise of the evaluation: nothing to prevent)."""
    out = {}
    for name in objectives:
        stats = [drop_from_peak(s[method][name]) for s in per_seed]
        out[name] = {k: sum(x[k] for x in stats) / len(stats) for k in stats[0]}
        lengths = [(c[0]["length"], c[-1]["length"]) for c in (s[method][name] for s in per_seed)
                   if c[0].get("length") is not None]
        if lengths:  # PPO: the mean response length at the first and the last evaluation
            out[name]["length_first"] = sum(a for a, _ in lengths) / len(lengths)
            out[name]["length_last"] = sum(b for _, b in lengths) / len(lengths)
    if "single" not in out:
        return out
    single = out["single"]
    for name in [o for o in objectives if o != "single"]:
        d = out[name]
        d["drop_vs_single"] = d["drop"] / single["drop"] if single["drop"] > 1e-9 else None
        d["meets_target"] = (None if single["drop"] < min_drop else
                             bool(d["drop"] <= 0.5 * single["drop"] and d["peak_gold"] >= single["peak_gold"]))
    return out


def plot(per_seed: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex="row")
    colours = dict(zip(OBJECTIVES, ("tab:red", "tab:blue", "tab:green", "tab:purple")))
    for row, method in enumerate(("bon", "ppo")):
        for col, key in enumerate(("gold", "proxy")):
            ax = axes[row][col]
            for k, seed in enumerate(per_seed):
                for name in seed[method]:
                    curve = seed[method][name]
                    ax.plot([r["sqrt_kl"] for r in curve], [r[key] for r in curve], color=colours[name],
                            linestyle=("-", "--", ":")[k % 3], marker="o", markersize=3,
                            label=f"{name} (seed {seed['seed']})")
            ax.set_title(f"{'best-of-n' if method == 'bon' else 'PPO'}: {key}")
            ax.set_xlabel("sqrt(KL) (nats^0.5)")
            ax.set_ylabel(f"{key} reward")
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/demo", help="a finished main job (its sft/ and data/)")
    p.add_argument("--out", default="runs/overoptimisation")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--members", type=int, default=4)
    p.add_argument("--train-prompts", type=int, default=24, help="training prompts whose labels the proxies see")
    p.add_argument("--prompts", type=int, default=24, help="held-out prompts for best-of-n and PPO's evaluations")
    p.add_argument("--n-max", type=int, default=64)
    p.add_argument("--ppo-steps", type=int, default=16)
    p.add_argument("--kl-coef", type=float, default=0.01)
    p.add_argument("--lr", type=float, default=None, help="PPO's learning rate (default: the main job's [ppo] lr)")
    p.add_argument("--uwo-coef", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--engine", default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--length-head", action="store_true", help="length-debiased proxies (--length-head)")
    p.add_argument("--objectives", default=",".join(OBJECTIVES), help="which to optimise with PPO")
    p.add_argument("--skip-ppo", action="store_true")
    p.add_argument("--skip-bon", action="store_true")
    p.add_argument("--min-drop", type=float, default=0.02,
                   help="the single model's gold must fall at least this much from its peak for the target to be "
                        "judged (below it the fall is evaluation noise)")
    args = p.parse_args()

    from preftune.data.jsonl import read_jsonl, write_jsonl

    run, out = Path(args.run), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = read_jsonl(run / "data" / "eval_prompts.jsonl", "prompts").records[:args.prompts]
    eval_prompts = out / "eval_prompts.jsonl"
    write_jsonl(eval_prompts, prompts)
    per_seed = []
    for seed in map(int, args.seeds.split(",")):
        t = time.perf_counter()
        here = out / f"seed-{seed}"
        here.mkdir(exist_ok=True)
        result = {"seed": seed, "proxies": train_proxies(run, here, args, seed)}
        print(f"seed {seed}: proxies {json.dumps(result['proxies'])}", flush=True)
        result["bon"] = {} if args.skip_bon else best_of_n(run, here / "ensemble", prompts, args, seed)
        gc.collect()
        result["ppo"] = {}
        if not args.skip_ppo:
            specs = objective_specs(here / "ensemble", args.uwo_coef)
            for name in args.objectives.split(","):
                spec = specs[name]
                result["ppo"][name] = ppo(run, here / f"ppo-{name}", spec, eval_prompts, args, seed)
                gc.collect()
                print(f"seed {seed}: PPO {name}: {json.dumps(drop_from_peak(result['ppo'][name]))}", flush=True)
        result["seconds"] = time.perf_counter() - t
        per_seed.append(result)
        (out / "overoptimisation.json").write_text(json.dumps({"args": vars(args), "seeds": per_seed}, indent=1))
    summary = {} if args.skip_bon else {"bon": summarise(per_seed, "bon", list(OBJECTIVES), args.min_drop)}
    if not args.skip_ppo:
        summary["ppo"] = summarise(per_seed, "ppo", args.objectives.split(","), args.min_drop)
    (out / "overoptimisation.json").write_text(json.dumps({"args": vars(args), "summary": summary,
                                                           "seeds": per_seed}, indent=1))
    plot(per_seed, out / "overoptimisation.png")
    for method, table in summary.items():
        print(f"\n{method}: objective, peak gold (at sqrt KL), final gold (at sqrt KL), drop, drop / single's")
        for name, d in table.items():
            ratio = d.get("drop_vs_single")
            length = (f"  length {d['length_first']:.1f} -> {d['length_last']:.1f} tokens"
                      if "length_first" in d else "")
            print(f"  {name:6s} {d['peak_gold']:.4f} ({d['peak_sqrt_kl']:.2f})  {d['final_gold']:.4f} "
                  f"({d['final_sqrt_kl']:.2f})  {d['drop']:+.4f}  "
                  f"{'' if ratio is None else f'{ratio:.2f}'} "
                  f"{ {True: 'meets the target', False: 'misses the target', None: ''}[d.get('meets_target')]}"
                  f"{length}")
    print(f"-> {out / 'overoptimisation.json'}, {out / 'overoptimisation.png'}")


if __name__ == "__main__":
    main()
