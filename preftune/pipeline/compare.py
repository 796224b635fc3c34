"""``preftune compare``: every alignment method from the same start, judged the same way.

The recipe, on one main job's run directory RUN (``preftune run``):

1. each method tunes RUN's SFT model (online RL against RUN's reward model on RUN's training
   prompts, DPO on RUN's comparisons), exactly as ``preftune run --algorithm METHOD`` would, in a
   process of its own (its wall time and peak memory are its own), into ``RUN/<method>``; its
   options come from the method's table of the config file (default: the run's own config file);
2. best-of-n samples ``max(n)`` responses of the SFT model per held-out prompt and picks by the
   reward model (KL: the analytic bound ``log n - (n - 1) / n``);
3. the SFT model and every tuned model answer RUN's held-out prompts once; the gold and the proxy
   score every answer; KL to the SFT model on each model's own samples; win rates over SFT;
4. a table and one plot of gold reward against sqrt(KL) for every method (the RL methods' training
   curves on the monitor prompts, the final held-out points, best-of-n's curve), in
   ``OUT/report.html``, ``OUT/compare.png`` and ``OUT/compare.json``.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import resource
import time
from pathlib import Path
from queue import Empty

from preftune.data.jsonl import read_dicts, write_json
from preftune.errors import PreftuneError
from preftune.pipeline.config import METHOD_TITLES, CompareConfig, RunConfig
from preftune.progress import console

TITLES = {**METHOD_TITLES, "bon": "best-of-n", "sft": "SFT"}


def open_run(cfg: CompareConfig, config_file: str | None, method: str):
    """The run RUN as ``preftune run --algorithm method`` sees it (its seed, device, dtype, threads,
    engine and skip_invalid, unless this command sets them; the method's table from ``config_file``
    or the run's own config file)."""
    from preftune.pipeline.run import RUN_WIDE, Run

    recorded = Path(cfg.run, "run_config.json")
    if not recorded.exists():
        raise PreftuneError(f"{cfg.run}: not a run directory of preftune run (no run_config.json)")
    values = json.loads(recorded.read_text())
    own_file = values.pop("config_file", None)
    given = {k: getattr(cfg, k) for k in RUN_WIDE if k in cfg.model_fields_set}
    run_cfg = RunConfig(**{**values, **given, "out": cfg.run,
                           "algorithm": method if method in METHOD_TITLES else "ppo"})
    return Run(run_cfg, config_file or own_file, quiet=True)


def _prompts(run) -> dict[str, Path]:
    paths = {"rl": run.path("data", "rl_prompts.jsonl"), "monitor": run.path("data", "monitor_prompts.jsonl"),
             "eval": run.path("data", "eval_prompts.jsonl")}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing or not run.path("sft", "config.json").exists() or not run.path("rm", "config.json").exists():
        raise PreftuneError(f"{run.out}: the run has not finished its first stages (missing "
                            f"{', '.join(missing) or 'sft/ or rm/'}); run preftune run first")
    return paths


def _train(cfg: CompareConfig, config_file: str | None, method: str, queue) -> None:
    """In a child process: one method's training (or best-of-n's sampling); reports its summary,
    wall time and peak memory."""
    try:
        run = open_run(cfg, config_file, method)
        prompts = _prompts(run)
        t0 = time.perf_counter()
        if method == "bon":
            summary = _best_of_n(cfg, run, prompts["eval"])
        else:
            from preftune.pipeline.run import stage_tune

            summary = stage_tune(run, prompts, 1)
        queue.put({"summary": summary, "seconds": time.perf_counter() - t0,
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    except BaseException as e:  # the parent reports it in one line
        queue.put({"error": f"{type(e).__name__}: {e}"})


def _best_of_n(cfg: CompareConfig, run, prompts: Path) -> dict:
    from preftune.evaluation.bon import run_bon
    from preftune.evaluation.config import BonConfig
    from preftune.pipeline.run import eval_config

    ev = eval_config(run, prompts)
    bon = run.stage_config(BonConfig, "bon", defaults={"max_new_tokens": ev.max_new_tokens,
                                                       "batch_size": ev.batch_size, "temperature": ev.temperature},
                           model=str(run.path("sft")), reward=str(run.path("rm")), gold=run.cfg.gold,
                           prompts=str(prompts), n=cfg.bon_n, out=str(_out(cfg) / "bon"))
    return run_bon(bon, quiet=True)


def _out(cfg: CompareConfig) -> Path:
    return Path(cfg.out or Path(cfg.run, "compare"))


def train_methods(cfg: CompareConfig, config_file: str | None) -> dict[str, dict]:
    """Step 1 and 2: every method in its own process (spawned: a fresh peak-memory count), or the
    record of an earlier comparison when its output is still there (``force`` re-trains)."""
    records_path = _out(cfg) / "training.json"
    records = json.loads(records_path.read_text()) if records_path.exists() and not cfg.force else {}
    context = multiprocessing.get_context("spawn")
    for method in cfg.methods:
        output = _out(cfg) / "bon" / "bon.json" if method == "bon" else Path(cfg.run, method, "config.json")
        if method in records and output.exists():
            console.print(f"[dim]{TITLES[method]}: reusing the earlier comparison's run")
            continue
        console.rule(f"compare: {TITLES[method]}")
        queue = context.Queue()
        child = context.Process(target=_train, args=(cfg, config_file, method, queue))
        child.start()
        result = _result_of(child, queue)
        child.join()
        if "error" in result:
            raise PreftuneError(f"compare: {method} failed: {result['error']}")
        records[method] = result
        write_json(records_path, records)
        console.print(f"{TITLES[method]}: {result['seconds']:.0f} s, peak {result['peak_rss_mb']:.0f} MB")
    return records


def _result_of(child, queue) -> dict:
    """What the child reported; an error when it died without a word (killed, out of memory)."""
    while True:
        try:
            return queue.get(timeout=5)
        except Empty:
            if not child.is_alive():
                return {"error": f"its process ended with exit code {child.exitcode} and no report"}


def evaluate_methods(cfg: CompareConfig, config_file: str | None) -> dict:
    """Step 3: SFT and the tuned models on the held-out prompts (the main job's evaluation)."""
    from preftune.evaluation.harness import kl_summary, mean_with_ci, win_rate_summary
    from preftune.evaluation.stats import pairwise_outcomes
    from preftune.pipeline.run import answer_held_out

    run = open_run(cfg, config_file, "ppo")
    tuned = [m for m in cfg.methods if m != "bon"]
    models = {"sft": str(run.path("sft")), **{m: str(run.path(m)) for m in tuned}}
    ev, messages, answers = answer_held_out(run, models, {m: "sft" for m in tuned},
                                            run.path("data", "eval_prompts.jsonl"), quiet=False)
    scores = answers.scores
    summary = {}
    for name in models:
        summary[name] = {
            "gold": mean_with_ci(scores["gold"][name], seed=ev.seed, resamples=ev.bootstrap),
            "proxy": mean_with_ci(scores["proxy"][name], seed=ev.seed, resamples=ev.bootstrap),
            "kl": kl_summary(answers.kl.get(name)) if name != "sft" else {"mean": 0.0, "se": 0.0},
            "winrate_vs_sft_gold": None if name == "sft" else win_rate_summary(
                pairwise_outcomes(scores["gold"][name], scores["gold"]["sft"], ev.tie_margin).tolist()),
        }
    return {"n_prompts": len(messages), "models": summary}


def curves(cfg: CompareConfig) -> dict[str, list[tuple[float, float]]]:
    """(sqrt KL, gold) points per method: an RL method's monitor evaluations during training, best-of-
    n's n values; every tuned model's final held-out point is in ``evaluation``."""
    out: dict[str, list[tuple[float, float]]] = {}
    for method in cfg.methods:
        if method == "bon":
            rows = json.loads((_out(cfg) / "bon" / "bon.json").read_text())["results"]
            out[method] = [(r["sqrt_kl"], r["gold"]) for r in rows if r.get("gold") is not None]
        elif method != "dpo" and Path(cfg.run, method, "metrics.jsonl").exists():
            rows = read_dicts(Path(cfg.run, method, "metrics.jsonl"))
            out[method] = [(r["eval/sqrt_kl"], r["eval/gold"]) for r in rows if r.get("eval/gold") is not None]
    return out


def best_within(points: list[tuple[float, float]], kl_budget: float) -> float | None:
    """The highest gold among points whose KL = d^2 is at most ``kl_budget``."""
    inside = [g for d, g in points if d * d <= kl_budget]
    return max(inside) if inside else None


def gold_peak(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """(sqrt KL, gold) where a curve's gold peaked, when it fell afterwards (None: still rising at its end)."""
    if len(points) < 2:
        return None
    k = max(range(len(points)), key=lambda i: points[i][1])
    return points[k] if k < len(points) - 1 else None


def plot(curve_points: dict[str, list[tuple[float, float]]], finals: dict[str, tuple[float, float]]):
    """Gold reward against sqrt(KL to the SFT model): a line per method's curve, a star per final model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    colours = dict(zip(list(TITLES), plt.get_cmap("tab10").colors))
    for method, pts in curve_points.items():
        if pts:
            where = "analytic KL" if method == "bon" else "during training, monitor prompts"
            ax.plot([d for d, _ in pts], [g for _, g in pts], "o-", ms=4, alpha=0.7, color=colours[method],
                    label=f"{TITLES[method]} ({where})")
    for method, (d, g) in finals.items():
        ax.plot([d], [g], "*", ms=13, color=colours.get(method, "black"), markeredgecolor="black",
                label=f"{TITLES.get(method, method)} final (held-out)")
    ax.set_xlabel("sqrt(KL(model || SFT)) [sqrt nats]")
    ax.set_ylabel("gold reward")
    ax.set_title("Gold reward per KL spent, every method from the same SFT model")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def run_compare(cfg: CompareConfig, config_file: str | None = None) -> dict:
    unknown = [m for m in cfg.methods if m not in TITLES or m == "sft"]
    if unknown:
        raise PreftuneError(f"--methods: unknown {', '.join(unknown)} (use {', '.join(list(TITLES)[:-1])})")
    _prompts(open_run(cfg, config_file, "ppo"))  # fail fast on an unfinished run
    out = _out(cfg)
    out.mkdir(parents=True, exist_ok=True)
    training = train_methods(cfg, config_file)
    evaluation = evaluate_methods(cfg, config_file)
    points = curves(cfg)
    finals = {m: (math.sqrt(max(e["kl"]["mean"], 0.0)), e["gold"]["mean"])
              for m, e in evaluation["models"].items() if e["kl"] is not None}
    rows = []
    for method in cfg.methods:
        record, final = training[method], evaluation["models"].get(method)
        summary = record["summary"]
        if method == "bon":
            best = max(summary["results"], key=lambda r: r["n"])
            final = {"gold": {"mean": best["gold"], "ci": best["gold_ci"]},
                     "proxy": {"mean": best["proxy"], "ci": best["proxy_ci"]},
                     "kl": {"mean": best["kl"], "se": 0.0}, "winrate_vs_sft_gold": None}
            episodes = summary["n_prompts"] * summary["samples_per_prompt"]
        elif method == "dpo":
            episodes = 0  # DPO samples nothing: it reads the comparisons
        else:
            cfg_json = json.loads(Path(cfg.run, method, "run_config.json").read_text())
            episodes = summary["steps"] * cfg_json["batch_size"] * cfg_json["world_size"]
        held_out = points["bon"] if method == "bon" else [finals[method]] if method in finals else []
        rows.append({"method": method, "gold": final["gold"], "proxy": final["proxy"], "kl": final["kl"],
                     "winrate_vs_sft_gold": final["winrate_vs_sft_gold"], "episodes": episodes,
                     "seconds": record["seconds"], "peak_rss_mb": record["peak_rss_mb"],
                     "gold_within_budget": best_within(held_out, cfg.kl_budget),
                     "monitor_gold_within_budget": None if method == "bon" else
                     best_within(points.get(method, []), cfg.kl_budget),
                     "gold_peak": gold_peak(points.get(method, []))})
    result = {"run": cfg.run, "kl_budget": cfg.kl_budget, "n_prompts": evaluation["n_prompts"],
              "sft": evaluation["models"]["sft"], "methods": rows, "curves": points}
    write_json(out / "compare.json", result)
    write_compare_report(out, result, points, finals)
    return result


def write_compare_report(out: Path, result: dict, points, finals) -> None:
    from preftune.evaluation import report as R

    budget = result["kl_budget"]
    ranked = [r for r in result["methods"] if r["gold_within_budget"] is not None]
    winner = max(ranked, key=lambda r: r["gold_within_budget"]) if ranked else None
    table = R.table(
        ["method", "gold [95 % CI]", "proxy [95 % CI]", "KL to SFT (nats)", "win rate over SFT (gold)",
         f"gold at KL <= {budget:g}", f"best monitor gold at KL <= {budget:g}", "responses sampled",
         "wall time (s)", "peak memory (MB)"],
        [[TITLES[r["method"]], f"{R.fmt(r['gold']['mean'])} {R.fmt_ci(r['gold']['ci'])}",
          f"{R.fmt(r['proxy']['mean'])} {R.fmt_ci(r['proxy']['ci'])}",
          R.fmt(r["kl"]["mean"]) if r["kl"] else "n/a", R.fmt_rate(r["winrate_vs_sft_gold"]),
          R.fmt(r["gold_within_budget"]), R.fmt(r["monitor_gold_within_budget"]), r["episodes"],
          f"{r['seconds']:.0f}", f"{r['peak_rss_mb']:.0f}"]
         for r in result["methods"]], raw=True)
    sft = result["sft"]
    parts = [R.paragraph(f"Every method started from the SFT model of {result['run']} (gold "
                         f"{R.fmt(sft['gold']['mean'])} {R.fmt_ci(sft['gold']['ci'])} on the same "
                         f"{result['n_prompts']} held-out prompts) and was judged by the same gold and reward model. "
                         + (f"Highest held-out gold within {budget:g} nats of KL: {TITLES[winner['method']]} "
                            f"({R.fmt(winner['gold_within_budget'])})." if winner else "")), table,
             R.paragraph(f"Gold at KL <= {budget:g}: the final model's held-out gold when its KL is within the "
                         f"budget (best-of-n: its best n within it). Best monitor gold: the highest gold of the "
                         f"evaluations during training (on the smaller monitor prompt set) within the budget.",
                         note=True)]
    peaks = [f"{TITLES[r['method']]} at KL {r['gold_peak'][0] ** 2:.2g}" for r in result["methods"] if r["gold_peak"]]
    parts.append(R.paragraph("Gold peaked and then fell (over-optimisation) for: " + "; ".join(peaks) + "."
                             if peaks else "No method's gold curve fell after a peak within its run.", note=True))
    if R.plots_available():
        fig = plot(points, finals)
        fig.savefig(out / "compare.png", dpi=110, bbox_inches="tight")
        parts.append(R.figure(fig, "gold reward against sqrt(KL) for every method"))
    else:
        parts.append(R.NO_PLOTS)
    (out / "report.html").write_text(R.page("preftune compare", R.section("Methods side by side", *parts)),
                                     encoding="utf-8")
