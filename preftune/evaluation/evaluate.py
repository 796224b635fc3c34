"""``preftune eval``: model A against baseline B, scored by one or more judges.

For each prompt, A and B each sample one response. Every judge scores both (or, for
``human:PROJECT``, people compare them in the feedback app). Per judge the report gives the mean
score of each model with a bootstrap 95 % interval, A's win rate over B (ties as half) with a
Wilson interval, the length-controlled win rate, and the sampled KL(A || B) with its standard
error. Output: ``OUT/eval.json``, ``OUT/samples.jsonl`` and a self-contained ``OUT/report.html``.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from preftune.data.jsonl import read_dicts, read_jsonl, write_json, write_jsonl
from preftune.data.records import prompt_text
from preftune.errors import PreftuneError
from preftune.evaluation import report as R
from preftune.evaluation.config import EvalConfig
from preftune.evaluation.harness import mean_with_ci, sample_models, score_models, win_rate_summary
from preftune.evaluation.judges import HumanJudge, resolve_judge
from preftune.evaluation.stats import length_controlled_win_rate, length_stats, mean_and_se, pairwise_outcomes
from preftune.models.generation import SamplingOptions
from preftune.models.loading import inference_precision, set_threads
from preftune.progress import console
from preftune.scoring import Scorer
from preftune.training.checkpoints import seed_everything


def prompt_subset(cfg) -> list:
    """The prompt records of ``cfg.prompts``, or ``cfg.samples`` of them drawn with ``cfg.seed``."""
    read = read_jsonl(cfg.prompts, "prompts", skip_invalid=cfg.skip_invalid)
    if read.skipped:
        console.print(f"[yellow]{read.summary()}")
    records = read.records
    if cfg.samples and cfg.samples < len(records):
        keep = sorted(random.Random(cfg.seed).sample(range(len(records)), cfg.samples))
        records = [records[i] for i in keep]
    return records


def judge_summary(judge: str, scores_a: list[float] | None, scores_b: list[float] | None,
                  outcomes: list[float] | None, length_diff: list[float] | None, kl: list[float] | None,
                  *, seed: int, resamples: int) -> dict:
    """One entry of ``eval.json``'s ``judges`` list from raw per-prompt numbers."""
    entry: dict = {"judge": judge}
    for side, scores in (("a", scores_a), ("b", scores_b)):
        summary = mean_with_ci(scores, seed=seed, resamples=resamples) if scores else {"mean": None, "ci": None}
        entry[f"mean_{side}"], entry[f"ci_{side}"] = summary["mean"], summary["ci"]
    wr = win_rate_summary(outcomes) if outcomes else None
    entry.update({"winrate": wr["rate"] if wr else None, "winrate_ci": wr["ci"] if wr else None,
                  "wins": wr["wins"] if wr else None, "ties": wr["ties"] if wr else None,
                  "losses": wr["losses"] if wr else None,
                  "lc_winrate": (length_controlled_win_rate(outcomes, length_diff)
                                 if outcomes and length_diff and len(length_diff) == len(outcomes) else None)})
    kl_mean, kl_se = mean_and_se(kl) if kl else (None, None)
    entry.update({"kl": kl_mean, "kl_se": kl_se,
                  "n": len(outcomes) if outcomes else len(scores_a or [])})
    return entry


def run_eval(cfg: EvalConfig, quiet: bool = False) -> dict:
    if cfg.collect:
        return collect_human(cfg)
    if not cfg.model or not cfg.prompts:
        raise PreftuneError("preftune eval needs --model and --prompts (or --collect)")
    if not cfg.judge:
        raise PreftuneError("preftune eval needs at least one --judge")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    records = prompt_subset(cfg)
    messages = [r.messages for r in records]
    texts = [prompt_text(m) for m in messages]
    # Resolve every judge before sampling, so a bad one fails in seconds, not after minutes.
    judges = {spec: resolve_judge(spec, cfg.feedback_url, cfg.device, cfg.dtype) for spec in cfg.judge}
    humans = {spec: j for spec, j in judges.items() if isinstance(j, HumanJudge)}
    if humans and not cfg.baseline:
        raise PreftuneError("human judges compare A with B: give --baseline")

    models = {"A": cfg.model, **({"B": cfg.baseline} if cfg.baseline else {})}
    options = SamplingOptions(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.batch_size)
    answers = sample_models(models, messages, options, seed=cfg.seed, device=cfg.device, dtype=cfg.dtype,
                            engine=cfg.engine, kl_to={"A": "B"} if cfg.baseline else None, quiet=quiet)
    score_models(answers, {s: j for s, j in judges.items() if isinstance(j, Scorer)}, messages, cfg.batch_size,
                 quiet)
    samples_a, samples_b = answers.samples["A"], answers.samples.get("B")
    kl = answers.kl.get("A")

    length_diff = ([a - b for a, b in zip(samples_a.lengths, samples_b.lengths)] if samples_b else None)
    entries = []
    run_id = f"{out.name or 'eval'}-{int(time.time())}"
    for spec, judge in judges.items():
        if isinstance(judge, HumanJudge):
            pushed = judge.push(texts, samples_a.texts, samples_b.texts, run=run_id, seed=cfg.seed,
                                out=out / f"human-{judge.project}.jsonl")
            entry = judge_summary(spec, None, None, None, None, kl, seed=cfg.seed, resamples=cfg.bootstrap)
            entry.update({"kind": "human", "pending": pushed, "n": 0})
            console.print(f"pushed {pushed} pairs to {spec}; run again with --collect once people have judged")
        else:
            sa, sb = answers.scores[spec]["A"], answers.scores[spec].get("B")
            outcomes = pairwise_outcomes(sa, sb, cfg.tie_margin).tolist() if sb else None
            entry = {**judge_summary(spec, sa, sb, outcomes, length_diff, kl, seed=cfg.seed,
                                     resamples=cfg.bootstrap), "kind": "score"}
            if spec in answers.uncertainty:  # an ensemble: its members' mean disagreement on each model
                entry["uncertainty"] = {m: sum(u) / len(u) for m, u in answers.uncertainty[spec].items()}
        entries.append(entry)

    kl_mean, kl_se = mean_and_se(kl) if kl else (None, None)
    result = {"model": cfg.model, "baseline": cfg.baseline, "prompts": cfg.prompts, "n_prompts": len(records),
              "precision": inference_precision(cfg.dtype, cfg.device),
              "sampling": {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
                           "top_p": cfg.top_p, "seed": cfg.seed},
              "kl": kl_mean, "kl_se": kl_se,
              "kl_note": answers.kl_notes.get("A"),
              "length_a": length_stats(samples_a.lengths),
              "length_b": length_stats(samples_b.lengths) if samples_b else None,
              "ended_a": sum(samples_a.ended) / len(records),
              "ended_b": sum(samples_b.ended) / len(records) if samples_b else None,
              "judges": entries}
    rows = []
    for i, rec in enumerate(records):
        row = {"id": rec.id if rec.id is not None else str(i), "prompt": texts[i],
               "response_a": samples_a.texts[i], "length_a": samples_a.lengths[i]}
        if samples_b:
            row.update({"response_b": samples_b.texts[i], "length_b": samples_b.lengths[i]})
        if kl:
            row["kl"] = kl[i]
        row["scores"] = {j: [by_model["A"][i], by_model["B"][i] if "B" in by_model else None]
                         for j, by_model in answers.scores.items()}
        if answers.uncertainty:
            row["uncertainty"] = {j: [by_model["A"][i], by_model["B"][i] if "B" in by_model else None]
                                  for j, by_model in answers.uncertainty.items()}
        rows.append(row)
    write_jsonl(out / "samples.jsonl", rows)
    write_outputs(out, result, rows)
    return result


def collect_human(cfg: EvalConfig) -> dict:
    """Pull the judgements of the human judges of an earlier ``preftune eval`` in ``--out``."""
    out = Path(cfg.out)
    if not (out / "eval.json").exists():
        raise PreftuneError(f"{out}: no eval.json; run preftune eval without --collect first")
    result = json.loads((out / "eval.json").read_text())
    rows = read_dicts(out / "samples.jsonl")
    for i, entry in enumerate(result["judges"]):
        if entry.get("kind") != "human":
            continue
        judge = HumanJudge.from_spec(entry["judge"], cfg.feedback_url)
        outcomes, stats, pending = judge.collect(out / f"human-{judge.project}.jsonl")
        # No length control: with overlapping annotators judgements are not one per pair.
        updated = judge_summary(entry["judge"], None, None, outcomes or None, None, None, seed=cfg.seed,
                                resamples=cfg.bootstrap)
        updated.update({"kind": "human", "kl": entry.get("kl"), "kl_se": entry.get("kl_se"),
                        "pending": pending, "agreement": stats})
        result["judges"][i] = updated
        console.print(f"{entry['judge']}: {len(outcomes)} judgements, {pending} pairs still unjudged")
    write_outputs(out, result, rows)
    return result


def write_outputs(out: Path, result: dict, rows: list[dict]) -> None:
    write_json(out / "eval.json", result)
    (out / "report.html").write_text(eval_report_html(result, rows), encoding="utf-8")


# ---------------------------------------------------------------- report


def eval_section(result: dict) -> str:
    """The per-judge results table (and a win-rate plot): the part other reports embed."""
    rows = []
    for j in result["judges"]:
        wtl = "&ndash;" if j.get("wins") is None else f"{j['wins']} / {j['ties']} / {j['losses']}"
        kl = "&ndash;" if j.get("kl") is None else f"{R.fmt(j['kl'])} &plusmn; {R.fmt(j.get('kl_se'))}"
        rows.append([R.esc(j["judge"]), R.fmt(j.get("n")),
                     f"{R.fmt(j.get('mean_a'))} {R.fmt_ci(j.get('ci_a'))}",
                     f"{R.fmt(j.get('mean_b'))} {R.fmt_ci(j.get('ci_b'))}",
                     f"{R.fmt(j.get('winrate'))} {R.fmt_ci(j.get('winrate_ci'))}", wtl,
                     R.fmt(j.get("lc_winrate")), kl])
    parts = [R.table(["judge", "n", "mean A [95 % CI]", "mean B [95 % CI]", "win rate A>B [95 % CI]",
                      "wins / ties / losses", "length-controlled win rate", "KL(A || B) +- SE"], rows, raw=True)]
    for j in result["judges"]:
        if j.get("kind") == "human":
            parts.append(R.paragraph(f"{j['judge']}: {j.get('pending', 0)} pairs not judged yet; project "
                                     f"agreement: {json.dumps(j.get('agreement'))}", note=True))
    judged = [j for j in result["judges"] if j.get("winrate") is not None]
    if judged and R.plots_available():
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 0.5 + 0.5 * len(judged)))
        for k, j in enumerate(judged):
            low, high = j["winrate_ci"]
            ax.errorbar(j["winrate"], k, xerr=[[j["winrate"] - low], [high - j["winrate"]]], fmt="o", capsize=4)
        ax.axvline(0.5, color="grey", ls="--", lw=1)
        ax.set_yticks(range(len(judged)), [j["judge"] for j in judged])
        ax.set_xlim(0, 1)
        ax.set_xlabel("win rate of A over B (95 % Wilson interval)")
        parts.append(R.figure(fig, "win rates"))
    return R.section("Judges", *parts)


def eval_report_html(result: dict, rows: list[dict], max_examples: int = 20) -> str:
    info = R.table(["", "value"], [["model A", result.get("model")], ["baseline B", result.get("baseline") or "-"],
                              ["prompts", f"{result.get('prompts')} ({result.get('n_prompts')} used)"],
                              ["sampling", json.dumps(result.get("sampling"))],
                              ["KL(A || B), nats per response",
                               "-" if result.get("kl") is None else f"{result['kl']:.4g} +- {result['kl_se']:.2g}"]])
    length_rows = [[name, *(stats[k] for k in ("mean", "std", "median", "min", "max")), ended]
                   for name, stats, ended in (("A", result.get("length_a"), result.get("ended_a")),
                                              ("B", result.get("length_b"), result.get("ended_b"))) if stats]
    lengths = R.table(["model", "mean", "std", "median", "min", "max", "share ended (EOS)"], length_rows)
    examples = []
    for r in rows[:max_examples]:
        scores = "; ".join(f"{j}: {a:.3g} vs {'-' if b is None else format(b, '.3g')}"
                           for j, (a, b) in r.get("scores", {}).items())
        examples.append([R.esc(r["prompt"]), R.sample_text(r["response_a"]),
                         R.sample_text(r.get("response_b", "")), R.esc(scores)])
    notes = R.paragraph("Win rate: share of prompts where the judge scored A above B, ties (differences up to "
                        "--tie-margin) counted as half; 95 % Wilson interval. Length-controlled win rate: the "
                        "win rate predicted at equal response length by a logistic regression of the outcome "
                        "on the length difference (docs/evaluation.md). Mean scores: 95 % percentile "
                        "bootstrap. KL: mean over A's samples of sum_t log pA - log pB.", note=True)
    return R.page("preftune eval", R.section("Run", info), eval_section(result), R.section("Definitions", notes),
                  R.section("Response lengths (tokens)", lengths),
                  R.section("Examples", R.table(["prompt", "A", "B", "scores"], examples, raw=True)))
