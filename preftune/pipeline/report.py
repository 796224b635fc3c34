"""The main job's report: one self-contained HTML page a person can read without the code."""

from __future__ import annotations

from typing import Any

from preftune.data.jsonl import read_dicts
from preftune.evaluation import report as R
from preftune.pipeline.config import METHOD_TITLES

STAGE_TITLES = {"sft": "1. Supervised fine-tuning", "sample": "2a. Candidate responses",
                "label": "2b. Simulated annotators", "reward": "3. Reward model",
                **{m: f"4. {title}" for m, title in METHOD_TITLES.items()},
                "eval": "5. Evaluation on held-out prompts", "human_eval": "5b. People's evaluation",
                "probes": "6. Probes: hallucination and unsafe replies"}


def stage_title(name: str) -> str:
    """``label`` -> "2b. Simulated annotators"; a later round's ``label.r2`` -> "... (round 2)"."""
    stage, _, r = name.partition(".r")
    return f"{STAGE_TITLES.get(stage, stage)} (round {r})" if r else STAGE_TITLES.get(name, name)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def _num(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}"


def _ci_row(label: str, entry: dict) -> list[Any]:
    return [label, R.fmt(entry["mean"]), R.fmt_ci(entry["ci"])]


def _non_overlapping(a: dict, b: dict) -> bool:
    """True when a's interval lies entirely above b's."""
    return a["ci"][0] > b["ci"][1]


def write_report(run, results: dict, metrics: dict) -> None:
    cfg, m = run.cfg, run.method
    name = METHOD_TITLES[m]
    sft, sample, label, reward, ev = (results[k] for k in ("sft", "sample", "label", "reward", "eval"))
    cmp_stats, rating_stats = label["comparisons"], label["ratings"]
    gold, proxy = ev["gold_reward"], ev["proxy_reward"]
    people = cfg.feedback == "app"
    who = (f"{metrics['annotators']} people ({metrics['human_judgements']} judgements)" if people
           else f"{cfg.annotators} simulated annotators")
    sections = []

    ordered = _non_overlapping(gold[m], gold["sft"]) and _non_overlapping(gold["sft"], gold["base"])
    verdict = (f"Gold reward went from base {_num(gold['base']['mean'])} to SFT {_num(gold['sft']['mean'])} to "
               f"{name} {_num(gold[m]['mean'])}; {name} beats SFT on {_pct(metrics[f'winrate_{m}_vs_sft_gold'])} of "
               f"held-out prompts by the gold preference. "
               + ("Each step's 95 % interval lies above the previous one's." if ordered else
                  "Not every step's 95 % interval clears the previous one's: see the evaluation table."))
    sections.append(R.section(
        "Summary",
        R.paragraph(f"Model {cfg.model} ({metrics.get('precision', 'fp32')}), tuned with {name}"
                    f"{f' in {cfg.rounds} rounds' if cfg.rounds > 1 else ''}; labels by {who}; gold preference "
                    f"'{cfg.gold}'; {ev['n_prompts']} held-out prompts. Whole loop: "
                    f"{metrics['seconds_total'] / 60:.1f} minutes."),
        R.paragraph(verdict),
        R.table(["stage", "seconds"], [[stage_title(k), f"{v:.1f}"]
                                       for k, v in metrics["seconds_per_stage"].items()]
                + [["total", f"{metrics['seconds_total']:.1f}"]])))

    sections.append(R.section(
        STAGE_TITLES["sft"],
        R.paragraph(f"The base model was fine-tuned on {sft.get('train_examples')} demonstrations (loss on the "
                    f"response tokens only) for {sft.get('steps')} steps. Held-out loss per token went from "
                    f"{_num(sft.get('initial_eval_loss'))} to {_num(sft.get('eval_loss'))}.")))
    sections.append(R.section(
        STAGE_TITLES["sample"],
        R.paragraph(f"The base and SFT models each answered {sample.get('prompts')} training prompts "
                    f"({sample.get('responses')} responses, {_pct(sample.get('ended_share'))} of them finished "
                    f"before the length limit) for the annotators to judge.")))
    flags = rating_stats.get("flag_counts") or {}
    if people:
        sections.append(people_section(label, flags))
    else:
        sections.append(R.section(
            STAGE_TITLES["label"],
            R.paragraph(f"{cfg.annotators} simulated annotators compared pairs of responses to the same prompt "
                        f"({cmp_stats['records']} comparisons) and rated each response 1-3 with flags "
                        f"({rating_stats['records']} ratings). Their noise was calibrated so two annotators agree "
                        f"about as often as people do (target {_pct(cfg.target_agreement)})."),
            R.table(["measure", "value"], [
                ["agreement between annotators (comparisons)", _pct(cmp_stats.get("inter_annotator_agreement"))],
                ["agreement of an annotator with the noiseless gold", _pct(cmp_stats.get("gold_agreement"))],
                ["best achievable accuracy on these labels (noise ceiling)", _pct(cmp_stats.get("noise_ceiling"))],
                ["rating flags", ", ".join(f"{k}: {v}" for k, v in sorted(flags.items())) or "none"],
            ])))
    sections.append(R.section(
        STAGE_TITLES["reward"],
        R.paragraph(f"A reward model ({cfg.reward_backbone} backbone) was trained on the comparisons"
                    f"{' and the pairs implied by the ratings (ties skipped)' if cfg.reward_ratings else ''} "
                    f"with the Bradley-Terry loss. On the comparisons of held-out prompts it agrees with the "
                    f"annotators' choice {_pct(reward.get('eval_accuracy'))} of the time; a single annotator "
                    f"agrees with the noiseless gold {_pct(cmp_stats.get('gold_agreement'))} of the time, which "
                    f"bounds what any model can reach on these labels."),
        R.table(["measure", "value"], [["held-out accuracy", _pct(reward.get("eval_accuracy"))],
                                       ["the noiseless gold on the same held-out labels (best achievable)",
                                        _pct(reward.get("gold_eval_accuracy"))],
                                       ["held-out pairs ordered as the noiseless gold orders them",
                                        _pct(reward.get("rm_gold_agreement"))],
                                       ["held-out loss", _num(reward.get("eval_loss"))],
                                       ["calibration error (ECE)", _num(reward.get("eval_ece"))],
                                       ["training pairs", reward.get("train_pairs")]])))

    sections.append(tuning_section(run, results[m]))

    sections.append(R.section(
        STAGE_TITLES["eval"],
        R.paragraph(f"Each model answered the {ev['n_prompts']} held-out prompts once (temperature "
                    f"{ev.get('sampling', {}).get('temperature', 0.7)}). Means "
                    f"with bootstrap 95 % intervals; win rate with a Wilson interval (ties count half)."),
        R.table(["model", "gold mean", "gold 95 % CI", "proxy (RM) mean", "proxy 95 % CI", "mean length (tokens)",
                 "finished"],
                [[k, R.fmt(gold[k]["mean"]), R.fmt_ci(gold[k]["ci"]), R.fmt(proxy[k]["mean"]), R.fmt_ci(proxy[k]["ci"]),
                  R.fmt(ev["length"][k]), R.esc(_pct(ev["ended"][k]))] for k in ("base", "sft", m)], raw=True),
        R.table(["measure", "value"], [
            [f"win rate {name} over SFT (gold)", R.fmt_rate(ev[f"winrate_{m}_vs_sft"]["gold"])],
            [f"win rate {name} over SFT (reward model)", R.fmt_rate(ev[f"winrate_{m}_vs_sft"]["proxy"])],
            ["KL(SFT || base), nats per response", R.esc(_kl(ev["kl_sft_base"]))],
            [f"KL({name} || SFT), nats per response", R.esc(_kl(ev[f"kl_{m}_sft"]))]], raw=True)))

    if "human_eval" in results:
        sections.append(human_eval_section(results["human_eval"], name, m))
    if cfg.rounds > 1:
        sections.append(rounds_section(metrics["rounds"], name))

    samples = read_dicts(run.path("eval", "samples.jsonl"))[:6]
    sections.append(R.section(
        "Sample replies (the same held-out prompts)",
        R.table(["prompt", "base", "SFT", name],
                [[R.esc(s["prompt"]), *(R.sample_text(s[k]) + R.paragraph(f"gold {s[f'gold_{k}']:.2f}", note=True)
                                        for k in ("base", "sft", m))] for s in samples], raw=True)))

    if "probes" in results:
        from preftune.evaluation.probes.adversarial import adversarial_section
        from preftune.evaluation.probes.hallucination import hallucination_section

        probes = results["probes"]
        sections.append(R.section(
            STAGE_TITLES["probes"],
            R.paragraph(f"Before (base model) and after ({name} model) tuning: closed-book questions with known "
                        "answers (correct, wrong = hallucinated, abstained) and adversarial prompts (unsafe "
                        "replies, refusals, over-refusal of benign controls)."),
            hallucination_section(probes["hallucination"]), adversarial_section(probes["adversarial"])))
    run.path("report.html").write_text(R.page("preftune run: " + str(cfg.out), *sections), encoding="utf-8")


def _agreement_rows(stats: dict) -> list[list[Any]]:
    bias = stats.get("position_bias")
    kappas = ", ".join(f"{' / '.join(c['annotators'])}: {_num(c['kappa'])} ({c['items']} items)"
                       for c in stats.get("cohen_kappa") or [])
    return [["judgements", stats.get("judgements")], ["annotators", ", ".join(stats.get("annotators") or []) or "none"],
            ["percent agreement (tasks judged twice or more)", _pct(stats.get("percent_agreement"))],
            ["Fleiss' kappa", _num(stats.get("fleiss_kappa"))],
            ["Krippendorff's alpha", _num(stats.get("krippendorff_alpha"))],
            ["Cohen's kappa per pair of annotators", kappas or "n/a"],
            *([["first-shown response chosen (position bias; 50 % = none)", _pct(bias.get("rate"))]] if bias else [])]


def people_section(label: dict, flags: dict) -> str:
    """Stage 2b with people: what they judged in the feedback app, and how much they agreed."""
    cmp, rat = label["comparisons"], label["ratings"]
    return R.section(
        "2b. People's judgements",
        R.paragraph(f"{label['annotators']} people judged the candidates in the feedback app "
                    f"({label.get('database')}, projects {', '.join(label.get('projects', {}).values())}): "
                    f"{cmp['records']} comparisons (ties and both-bad left out of training) and "
                    f"{rat['records']} ratings 1-3 with flags; pairs chosen {label.get('selection')}."),
        R.table(["comparisons", "value"], _agreement_rows(cmp)),
        R.table(["ratings", "value"], _agreement_rows(rat)
                + [["rating flags", ", ".join(f"{k}: {v}" for k, v in sorted(flags.items())) or "none"]]))


def human_eval_section(human: dict, name: str, m: str) -> str:
    rate = human[f"winrate_{m}_vs_sft"]
    return R.section(
        STAGE_TITLES["human_eval"],
        R.paragraph(f"People compared the SFT model's and the {name} model's answers to {human['tasks']} held-out "
                    f"prompts (project {human['project']}; the side each model's answer appears on is random "
                    f"per task and per annotator; {human['identical_or_empty_pairs']} prompts with identical or "
                    f"empty answers were not asked). Win rate with a Wilson interval, ties and both-bad count "
                    f"half."),
        R.table(["measure", "value"], [[f"win rate {name} over SFT (people)", R.fmt_rate(rate)],
                                       *[[R.esc(str(k)), R.esc(str(v))] for k, v in _agreement_rows(human)]],
                raw=True))


def rounds_section(rounds: list[dict], name: str) -> str:
    """Iterated RLHF: per round, the labels, the reward model and the tuned policy on the monitor prompts."""
    return R.section(
        "Rounds of iterated RLHF",
        R.paragraph(f"Each round after the first sampled new candidates from the SFT model and the last round's "
                    f"{name} policy, labelled them, retrained the reward model on every label so far and "
                    f"continued tuning from the last policy (KL leash to SFT). 'Newest held-out' is the "
                    f"accuracy on the held-out comparisons of that round's own candidates: the previous "
                    f"round's reward model on them says whether it still ranked the new policy's answers well."),
        R.table(["round", "comparisons", "pairs chosen", "RM held-out accuracy", "RM on newest held-out",
                 "previous RM on newest held-out", "gold", "proxy", "KL to SFT"],
                [[r["round"], r["labels"], r["selection"], _pct(r["rm_eval_accuracy"]),
                  _pct(r["newest_round_accuracy"]), _pct(r["previous_rm_newest_round_accuracy"]),
                  _num(r["gold"]), _num(r["proxy"]), _num(r["kl"])] for r in rounds]))


def tuning_section(run, summary: dict) -> str:
    """Stage 4: what the method did; for online RL, proxy and gold against sqrt(KL) while it trained."""
    from preftune.evaluation.gao import overoptimisation_section

    m = run.method
    if m == "dpo":
        return R.section(STAGE_TITLES[m], R.paragraph(
            f"The SFT model was tuned with DPO on the annotators' comparisons for {summary.get('steps')} steps "
            f"(held-out preference accuracy of its implicit reward: {_pct(summary.get('eval_accuracy'))}). DPO never "
            f"queries the reward model; the evaluation below "
            f"scores it with the same gold and proxy as the other models."))
    rows = read_dicts(run.path(m, "metrics.jsonl")) if run.path(m, "metrics.jsonl").exists() else []
    eval_rows = [r for r in rows if r.get("eval/gold") is not None or r.get("eval/proxy") is not None]
    last = rows[-1] if rows else {}
    return R.section(
        STAGE_TITLES[m],
        R.paragraph(f"The SFT model was tuned with {METHOD_TITLES[m]} against the reward model for {len(rows)} steps, "
                    f"with a KL leash to the SFT model (last step: KL {_num(last.get('objective/kl'))} nats, "
                    f"reward-model score {_num(last.get('objective/scores'))}). Every few steps held-out prompts "
                    f"were scored by the proxy (the reward model) and by the gold preference; the plot shows "
                    f"both against d = sqrt(KL) from the SFT model. Gold rising with proxy means the reward "
                    f"model is being followed, not gamed."),
        overoptimisation_section(eval_rows))


def _kl(entry: dict | None) -> str:
    return "n/a" if not entry else f"{entry['mean']:.3g} +/- {entry['se']:.2g}"
