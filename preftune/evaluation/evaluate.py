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

import torch
from pydantic import Field

from preftune.config import StageConfig
from preftune.data.jsonl import read_dicts, read_jsonl, write_jsonl
from preftune.data.records import prompt_text
from preftune.errors import PreftuneError
from preftune.evaluation import report as R
from preftune.evaluation.judges import HumanJudge, is_human, score_judge
from preftune.evaluation.sampling import SamplingOptions, response_logprobs, same_vocabulary, sample_responses
from preftune.evaluation.stats import (
    bootstrap_mean_ci,
    length_controlled_win_rate,
    length_stats,
    mean_and_se,
    pairwise_outcomes,
    sequence_kl,
    win_rate,
)
from preftune.models.loading import load_causal_lm, set_threads
from preftune.progress import console, progress_bar
from preftune.training import seed_everything, write_json


class EvalConfig(StageConfig):
    model: str | None = Field(None, description="Model A to evaluate: a Hugging Face directory, a .gguf file "
                                                "or smollm2-135m-instruct (not needed with --collect).")
    baseline: str | None = Field(None, description="Model B to compare A with (win rates and KL(A || B) "
                                                   "need it).")
    prompts: str | None = Field(None, description="Prompts JSONL ({prompt} or {messages}); not needed "
                                                  "with --collect.")
    judge: list[str] = Field(default_factory=list, description="A judge (repeatable): reward-model dir, "
                                                               "labeler:NAME, file.py:function or "
                                                               "human:PROJECT.")
    out: str = Field(..., description="Output directory (eval.json, samples.jsonl, report.html).")
    samples: int = Field(0, ge=0, description="Evaluate this many prompts, drawn with --seed (0: all).")
    max_new_tokens: int = Field(64, ge=1, description="Longest response in tokens.")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature (KL is measured between the "
                                                      "temperature-scaled distributions).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling (keep 1.0 for an unbiased KL).")
    batch_size: int = Field(16, ge=1, description="Prompts per generation batch.")
    tie_margin: float = Field(0.0, ge=0, description="Score differences up to this count as ties.")
    bootstrap: int = Field(2000, ge=100, description="Bootstrap resamples for the score intervals.")
    feedback_url: str | None = Field(None, description="Feedback app address for human:PROJECT judges "
                                                       "(token from PREFTUNE_FEEDBACK_TOKEN).")
    collect: bool = Field(False, description="Pull the human judgements of an earlier run in --out and "
                                             "update eval.json and report.html (no sampling).")


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


def kl_per_sequence(model_b, samples_a, temperature: float) -> list[float]:
    """Sampled KL(A || B) of each of A's responses (``samples_a`` sampled with ``logprobs=True``)."""
    kls = []
    for gen in samples_a.batches:
        logp_b = response_logprobs(model_b, gen, temperature)
        kls += sequence_kl(gen.logprobs, logp_b, gen.response_mask).tolist()
    return kls


def score_all(fn, prompts, responses, batch_size: int, description: str = "scoring",
              quiet: bool = False) -> list[float]:
    """A reward function's scores of every response, ``batch_size`` at a time (a progress bar)."""
    out = []
    with progress_bar(len(responses), description, disable=quiet) as bar:
        for i in range(0, len(responses), batch_size):
            out += fn(prompts[i:i + batch_size], responses[i:i + batch_size]).tolist()
            bar.advance(len(responses[i:i + batch_size]))
    return out


def judge_summary(judge: str, scores_a: list[float] | None, scores_b: list[float] | None,
                  outcomes: list[float] | None, length_diff: list[float] | None, kl: list[float] | None,
                  *, seed: int, resamples: int) -> dict:
    """One entry of ``eval.json``'s ``judges`` list from raw per-prompt numbers."""
    entry: dict = {"judge": judge}
    for side, scores in (("a", scores_a), ("b", scores_b)):
        entry[f"mean_{side}"] = mean_and_se(scores)[0] if scores else None
        entry[f"ci_{side}"] = list(bootstrap_mean_ci(scores, seed=seed, resamples=resamples)) if scores else None
    wr = win_rate(outcomes) if outcomes else None
    entry.update({"winrate": wr.rate if wr else None, "winrate_ci": list(wr.ci) if wr else None,
                  "wins": wr.wins if wr else None, "ties": wr.ties if wr else None,
                  "losses": wr.losses if wr else None,
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
    options = SamplingOptions(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.batch_size)
    # Resolve every judge before sampling, so a bad spec fails in seconds, not after minutes.
    judge_fns = {spec: HumanJudge.from_spec(spec, cfg.feedback_url) if is_human(spec) else
                 score_judge(spec, device=cfg.device) for spec in cfg.judge}
    if any(isinstance(j, HumanJudge) for j in judge_fns.values()) and not cfg.baseline:
        raise PreftuneError("human judges compare A with B: give --baseline")

    model_a, tok_a = load_causal_lm(cfg.model, device=cfg.device, dtype=cfg.dtype)
    gen = torch.Generator(device=next(model_a.parameters()).device).manual_seed(cfg.seed)
    samples_a = sample_responses(model_a, tok_a, messages, options, generator=gen, description="sampling A",
                                 quiet=quiet, logprobs=True)
    samples_b, kl, kl_note = None, None, None
    if cfg.baseline:
        model_b, tok_b = load_causal_lm(cfg.baseline, device=cfg.device, dtype=cfg.dtype)
        if same_vocabulary(tok_a, tok_b):
            kl = kl_per_sequence(model_b, samples_a, cfg.temperature)
        else:
            kl_note = "A and B have different tokenizers: KL(A || B) is not measured"
            console.print(f"[yellow]{kl_note}")
        samples_b = sample_responses(model_b, tok_b, messages, options, generator=gen, description="sampling B",
                                     quiet=quiet)
        del model_b
    del model_a

    length_diff = ([a - b for a, b in zip(samples_a.lengths, samples_b.lengths)] if samples_b else None)
    judges, per_judge_scores = [], {}
    run_id = f"{out.name or 'eval'}-{int(time.time())}"
    for spec, judge in judge_fns.items():
        if isinstance(judge, HumanJudge):
            pushed = judge.push(texts, samples_a.texts, samples_b.texts, run=run_id, seed=cfg.seed,
                                out=out / f"human-{judge.project}.jsonl")
            entry = judge_summary(spec, None, None, None, None, kl, seed=cfg.seed, resamples=cfg.bootstrap)
            entry.update({"kind": "human", "pending": pushed, "n": 0})
            console.print(f"pushed {pushed} pairs to {spec}; run again with --collect once people have judged")
        else:
            sa = score_all(judge, messages, samples_a.texts, cfg.batch_size, f"scoring A: {spec}", quiet)
            sb = (score_all(judge, messages, samples_b.texts, cfg.batch_size, f"scoring B: {spec}", quiet)
                  if samples_b else None)
            per_judge_scores[spec] = (sa, sb)
            outcomes = pairwise_outcomes(sa, sb, cfg.tie_margin).tolist() if sb else None
            entry = {**judge_summary(spec, sa, sb, outcomes, length_diff, kl, seed=cfg.seed,
                                     resamples=cfg.bootstrap), "kind": "score"}
        judges.append(entry)

    kl_mean, kl_se = mean_and_se(kl) if kl else (None, None)
    result = {"model": cfg.model, "baseline": cfg.baseline, "prompts": cfg.prompts, "n_prompts": len(records),
              "sampling": {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature,
                           "top_p": cfg.top_p, "seed": cfg.seed},
              "kl": kl_mean, "kl_se": kl_se,
              "kl_note": kl_note,
              "length_a": length_stats(samples_a.lengths),
              "length_b": length_stats(samples_b.lengths) if samples_b else None,
              "ended_a": sum(samples_a.ended) / len(records),
              "ended_b": sum(samples_b.ended) / len(records) if samples_b else None,
              "judges": judges}
    rows = []
    for i, rec in enumerate(records):
        row = {"id": rec.id if rec.id is not None else str(i), "prompt": texts[i],
               "response_a": samples_a.texts[i], "length_a": samples_a.lengths[i]}
        if samples_b:
            row.update({"response_b": samples_b.texts[i], "length_b": samples_b.lengths[i]})
        if kl:
            row["kl"] = kl[i]
        row["scores"] = {j: [sa[i], sb[i] if sb else None] for j, (sa, sb) in per_judge_scores.items()}
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
