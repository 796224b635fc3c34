"""The main job: the whole RLHF loop, one stage after another, each a preftune stage.

    demonstrations -> sft -> sample (base + SFT) -> label (simulated annotators: ratings and
    comparisons) -> reward -> ppo | rloo | grpo | reinforce (KL leash to SFT, gold monitored) or dpo
    (on the comparisons) -> eval (held-out prompts: base / SFT / the tuned model by gold and proxy)
    -> probes (hallucination, adversarial) -> report

Every stage writes under ``OUT`` and is recorded in ``OUT/stages.json`` with its time and summary;
a re-run reuses finished stages (``--force`` re-runs them all). Prompts: the demonstrations' prompts,
the comparison prompts and the held-out prompts are disjoint; online RL trains on every training prompt.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from preftune.config import build_config
from preftune.data.jsonl import read_dicts, read_jsonl, write_json, write_jsonl
from preftune.data.records import prompt_text, to_json
from preftune.data.split import random_split
from preftune.errors import PreftuneError
from preftune.pipeline.config import METHOD_TITLES, RunConfig
from preftune.progress import console

OUTPUT_DIRS = ["sft", "rm", *METHOD_TITLES, "eval", "probes", "models"]


def stage_names(method: str) -> list[str]:
    """The stages in order; the fifth is named after the tuning method (``[run] algorithm``)."""
    return ["sft", "sample", "label", "reward", method, "eval", "probes"]


@dataclass
class Run:
    cfg: RunConfig
    config_file: str | None
    quiet: bool = False
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def method(self) -> str:
        return self.cfg.algorithm

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    def stage_config(self, cls, section: str, defaults: dict[str, Any] | None = None, **fixed):
        """Every stage's config, built one way: the stage's own defaults < ``defaults`` (what the
        run chooses, e.g. its response length) < the config file's ``[section]`` table < the run's
        seed, device, dtype, threads and engine < ``fixed`` (the paths between stages)."""
        common = {"seed": self.cfg.seed, "device": self.cfg.device, "dtype": self.cfg.dtype,
                  "threads": self.cfg.threads, "engine": self.cfg.engine}
        return build_config(cls, file=self.config_file, section=section, defaults=defaults,
                            overrides={**{k: v for k, v in common.items() if k in cls.model_fields}, **fixed})

    # ------------------------------------------------------------ stage bookkeeping

    def load_state(self) -> None:
        path = self.path("stages.json")
        self.state = json.loads(path.read_text()) if path.exists() and not self.cfg.force else {}

    def save_state(self) -> None:
        write_json(self.path("stages.json"), self.state)

    def run_stage(self, name: str, index: int, func: Callable[[], dict], outputs: list[Path],
                  of: str | None = None) -> dict:
        """Run a stage, or reuse its finished outputs; ``of``: the model the stage judges (a finished
        evaluation of another method's model is not reused)."""
        done = self.state.get(name)
        if done and done.get("of") == of and all(p.exists() for p in outputs):
            console.print(f"[dim]stage {index}/{len(stage_names(self.method))} {name}: reusing the finished stage "
                          f"({done['seconds']:.0f} s earlier; --force re-runs it)")
            return done["summary"]
        console.rule(f"stage {index}/{len(stage_names(self.method))}: {name}")
        t0 = time.perf_counter()
        summary = func()
        seconds = time.perf_counter() - t0
        self.state[name] = {"seconds": seconds, "summary": summary, **({"of": of} if of else {})}
        self.save_state()
        console.print(f"stage {name} finished in {seconds:.1f} s")
        return summary


# ---------------------------------------------------------------- data split


def split_prompts(run: Run) -> dict[str, Path]:
    """Write the prompt subsets of this run under OUT/data (deterministic in the seed)."""
    records = read_jsonl(run.cfg.prompts, "prompts").records
    demo_prompts = {r.messages[-1]["content"] for r in read_jsonl(run.cfg.demos, "demonstrations").records}
    train = [r for r in records if r.split in (None, "train")]
    held = [r for r in records if r.split in ("eval", "test", "validation")]
    if not held:
        raise PreftuneError(f"{run.cfg.prompts}: no held-out prompts (records with \"split\": \"eval\")")
    rng = random.Random(run.cfg.seed)
    free = [r for r in train if prompt_text(r.messages) not in demo_prompts]
    comparison = rng.sample(free, min(run.cfg.comparison_prompts, len(free)))
    evaluation = rng.sample(held, min(run.cfg.eval_prompts, len(held)))
    monitor = evaluation[:run.cfg.monitor_prompts]
    data = run.path("data")
    paths = {"comparison": data / "comparison_prompts.jsonl", "rl": data / "rl_prompts.jsonl",
             "eval": data / "eval_prompts.jsonl", "monitor": data / "monitor_prompts.jsonl"}
    for key, rows in (("comparison", comparison), ("rl", train), ("eval", evaluation), ("monitor", monitor)):
        write_jsonl(paths[key], [{k: v for k, v in to_json(r).items() if k != "split"} for r in rows])
    return paths


def resolve_base(run: Run) -> str:
    """The base model directory ('tiny' builds a small random model for --quick runs)."""
    if run.cfg.model != "tiny":
        from preftune.models.loading import resolve_model_path

        return str(resolve_model_path(run.cfg.model))
    directory = run.path("models", "tiny-base")
    if not (directory / "config.json").exists():
        from preftune.models.tiny import save_tiny

        texts = [r["prompt"] for r in read_dicts(run.cfg.prompts)]
        texts += [r.get("completion", "") for r in read_dicts(run.cfg.demos)]
        save_tiny(directory, texts, hidden_size=64, layers=2, seed=run.cfg.seed)
    return str(directory)


def resolve_backbone(run: Run, base: str) -> str:
    choice = run.cfg.reward_backbone
    if choice == "sft":
        return str(run.path("sft"))
    if choice == "base":
        return base
    if choice == "minilm":
        from preftune.models.loading import bundled_minilm_path

        return str(bundled_minilm_path("reward_backbone = minilm"))
    return choice


# ---------------------------------------------------------------- stages


def stage_sft(run: Run, base: str) -> dict:
    from preftune.sft.config import SFTConfig
    from preftune.sft.trainer import train_sft

    cfg = run.stage_config(SFTConfig, "sft", model=base, data=run.cfg.demos, out=str(run.path("sft")))
    return train_sft(cfg, quiet=run.quiet)


def stage_sample(run: Run, base: str, prompts: Path) -> dict:
    from preftune.sampling.config import SampleConfig
    from preftune.sampling.sample import sample_candidates

    cfg = run.stage_config(SampleConfig, "sample", defaults={"n": run.cfg.samples_per_model,
                                                             "max_new_tokens": run.cfg.max_new_tokens,
                                                             "batch_size": run.cfg.batch_size},
                           model=[base, str(run.path("sft"))], prompts=str(prompts),
                           out=str(run.path("data", "candidates.jsonl")))
    return sample_candidates(cfg, quiet=run.quiet)


def stage_label(run: Run) -> dict:
    """Comparisons and ratings of the candidates by the same simulated annotators: the gold scores
    every response once, and both kinds of label are drawn from those scores."""
    from preftune.annotators.config import LabelConfig
    from preftune.annotators.label import gold_scores, read_candidates, write_labels
    from preftune.scoring import load_scorer

    noise = {"noise": [run.cfg.noise]} if run.cfg.noise is not None else {"target_agreement": run.cfg.target_agreement}
    common = dict(candidates=str(run.path("data", "candidates.jsonl")), labeler=run.cfg.gold,
                  annotators=run.cfg.annotators, **noise)
    configs = {kind: run.stage_config(LabelConfig, "label", kind=kind, out=str(run.path("data", f"{kind}.jsonl")),
                                      **common) for kind in ("comparisons", "ratings")}
    first = configs["comparisons"]
    items = read_candidates(first)
    gold = gold_scores(load_scorer(first.labeler, first.device, first.dtype), items, quiet=run.quiet)
    comparisons, ratings = (write_labels(cfg, items, gold) for cfg in configs.values())
    flags: dict[str, int] = {}
    for row in read_dicts(run.path("data", "ratings.jsonl")):
        for flag in row.get("flags", []):
            flags[flag] = flags.get(flag, 0) + 1
    return {"comparisons": comparisons, "ratings": {**ratings, "flag_counts": flags}}


def reward_data(run: Run, eval_split: float, seed: int) -> tuple[Path, Path | None]:
    """(training, held-out) preference files for the reward model. The comparison prompts are split
    (seeded); training gets every judgement of the training prompts (comparisons, and with
    ``reward_ratings`` the pairs implied by the ratings), the held-out file only the comparisons of
    the other prompts, so the held-out accuracy is measured on the same kind of label as the
    annotators' agreement with the gold."""
    def key(row: dict) -> str:  # a prompt is a string or a message list
        return json.dumps(row["prompt"], sort_keys=True)

    comparisons = read_dicts(run.path("data", "comparisons.jsonl"))
    ratings = read_dicts(run.path("data", "ratings.jsonl")) if run.cfg.reward_ratings else []
    held = set(random_split(list(dict.fromkeys(map(key, comparisons))), eval_split, seed)[1])
    train_path, eval_path = run.path("data", "rm_train.jsonl"), run.path("data", "rm_eval.jsonl")
    write_jsonl(train_path, [r for r in comparisons + ratings if key(r) not in held])
    if not held:
        return train_path, None
    write_jsonl(eval_path, [r for r in comparisons if key(r) in held])
    return train_path, eval_path


def stage_reward(run: Run, base: str) -> dict:
    from preftune.reward.config import RewardConfig
    from preftune.reward.fit import fit_reward

    cfg = run.stage_config(RewardConfig, "reward", model=resolve_backbone(run, base), data="",
                           out=str(run.path("rm")))
    if cfg.eval_data is None:  # unless the config names its own held-out file
        train_path, eval_path = reward_data(run, cfg.eval_split, cfg.seed)
        cfg = cfg.model_copy(update={"data": str(train_path), "eval_data": str(eval_path) if eval_path else None})
    else:
        cfg = cfg.model_copy(update={"data": str(reward_data(run, 0.0, cfg.seed)[0])})
    summary = fit_reward(cfg, quiet=run.quiet)
    return {**summary, **gold_on_held_out(cfg, run.cfg.gold)}


def gold_on_held_out(cfg, gold: str) -> dict:
    """The noiseless gold on the reward model's held-out pairs: how often it agrees with the
    annotators' labels (``gold_eval_accuracy``, the best any model can score on exactly these labels;
    the overall annotator-gold agreement varies by a few points between small held-out sets) and how
    often the trained reward model orders the pair as the gold does (``rm_gold_agreement``)."""
    from preftune.reward.data import read_preferences
    from preftune.reward.losses import pair_accuracy
    from preftune.scoring import load_scorer

    _, held, _ = read_preferences(cfg)  # the trainer's own deterministic split
    if not held:
        return {}
    prompts = [prompt_text(g.messages) for g in held for _ in g.responses]
    responses = [r for g in held for r in g.responses]
    offsets = np.cumsum([0] + [len(g.responses) for g in held])
    winners = torch.tensor([offsets[k] + p.winner for k, g in enumerate(held) for p in g.pairs])
    losers = torch.tensor([offsets[k] + p.loser for k, g in enumerate(held) for p in g.pairs])
    gold_scores = load_scorer(gold, cfg.device, cfg.dtype)(prompts, responses)
    result = {"gold_eval_accuracy": pair_accuracy(gold_scores[winners], gold_scores[losers]).item()}
    if Path(cfg.out, "metrics.json").exists():  # one reward model or an ensemble (its mean)
        rm_scores = load_scorer(str(cfg.out), cfg.device, cfg.dtype)(prompts, responses)
        # Pairs the gold ties carry no order; count the rest.
        order = torch.sign(gold_scores[winners] - gold_scores[losers])
        agree = torch.sign(rm_scores[winners] - rm_scores[losers]) == order
        result["rm_gold_agreement"] = agree[order != 0].float().mean().item()
    return result


def stage_tune(run: Run, prompts: dict[str, Path]) -> dict:
    """Stage 4: the SFT model tuned by the run's method, its options from the method's own table."""
    if run.method == "dpo":
        return stage_dpo(run)
    from preftune.rl.config import ALGORITHMS
    from preftune.rl.trainer import train_rl

    monitor = {"eval_prompts": str(prompts["monitor"]), "gold": run.cfg.gold} if run.cfg.monitor_prompts else {}
    cfg = run.stage_config(ALGORITHMS[run.method], run.method, policy=str(run.path("sft")),
                           reward=str(run.path("rm")), prompts=str(prompts["rl"]), out=str(run.path(run.method)),
                           **monitor)
    return train_rl(cfg, quiet=run.quiet)


def stage_dpo(run: Run) -> dict:
    """DPO from the SFT model on the run's comparisons (the reward model's training labels; the
    gold, not DPO, judges the result in the evaluation)."""
    from preftune.dpo.config import DPOConfig
    from preftune.dpo.trainer import train_dpo

    cfg = run.stage_config(DPOConfig, "dpo", defaults={"lora": True, "lr": 5e-5}, model=str(run.path("sft")),
                           data=str(run.path("data", "comparisons.jsonl")), out=str(run.path("dpo")))
    return train_dpo(cfg, quiet=run.quiet)


def eval_config(run: Run, prompts: Path):
    """The evaluation's options: the run's response length and batch size, then the ``[eval]``
    table; the models, prompts and judges are the run's."""
    from preftune.evaluation.config import EvalConfig

    return run.stage_config(EvalConfig, "eval", defaults={"max_new_tokens": run.cfg.max_new_tokens,
                                                          "batch_size": run.cfg.batch_size},
                            model=str(run.path(run.method)), baseline=str(run.path("sft")), prompts=str(prompts),
                            judge=[run.cfg.gold, str(run.path("rm"))], out=str(run.path("eval")))


def answer_held_out(run: Run, models: dict[str, str], kl_to: dict[str, str], prompts: Path, quiet: bool):
    """``models`` (name -> path) answer the held-out prompts once through the evaluation harness with
    the ``[eval]`` table's options; the gold and the proxy (the run's reward model) score every reply;
    KL of each ``kl_to`` pair on the model's own samples. Returns (the eval config, the prompts'
    messages, the harness's ``Answers``)."""
    from preftune.evaluation.evaluate import prompt_subset
    from preftune.evaluation.harness import sample_models, score_models
    from preftune.models.generation import SamplingOptions
    from preftune.scoring import load_scorer

    cfg = eval_config(run, prompts)
    messages = [r.messages for r in prompt_subset(cfg)]
    judges = {"gold": load_scorer(run.cfg.gold, cfg.device, cfg.dtype),
              "proxy": load_scorer(str(run.path("rm")), cfg.device, cfg.dtype)}
    options = SamplingOptions(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.batch_size)
    answers = sample_models(models, messages, options, seed=cfg.seed, device=cfg.device, dtype=cfg.dtype,
                            engine=cfg.engine, kl_to=kl_to, quiet=quiet)
    score_models(answers, judges, messages, cfg.batch_size, quiet=quiet)
    return cfg, messages, answers


def stage_eval(run: Run, base: str, prompts: Path) -> dict:
    """Held-out prompts through the evaluation harness (``answer_held_out``): base, SFT and the tuned
    model each sample once; KL of SFT from base and of the tuned model from SFT; the tuned model's win
    rates over SFT. The ``[eval]`` table of the config file sets the sampling and statistics options
    (``preftune eval --help``)."""
    from preftune.evaluation.harness import kl_summary, mean_with_ci, win_rate_summary
    from preftune.evaluation.stats import pairwise_outcomes

    m = run.method
    models = {"base": base, "sft": str(run.path("sft")), m: str(run.path(m))}
    cfg, messages, answers = answer_held_out(run, models, {"sft": "base", m: "sft"}, prompts, run.quiet)
    scores = answers.scores
    result = {
        "n_prompts": len(messages), "method": m,
        "gold_reward": {k: mean_with_ci(scores["gold"][k], seed=cfg.seed, resamples=cfg.bootstrap) for k in models},
        "proxy_reward": {k: mean_with_ci(scores["proxy"][k], seed=cfg.seed, resamples=cfg.bootstrap) for k in models},
        f"winrate_{m}_vs_sft": {j: win_rate_summary(pairwise_outcomes(scores[j][m], scores[j]["sft"],
                                                                      cfg.tie_margin).tolist()) for j in scores},
        "kl_sft_base": kl_summary(answers.kl.get("sft")), f"kl_{m}_sft": kl_summary(answers.kl.get(m)),
        "length": {k: float(np.mean(answers.samples[k].lengths)) for k in models},
        "ended": {k: float(np.mean(answers.samples[k].ended)) for k in models},
        "sampling": {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p},
    }
    rows = [{"prompt": prompt_text(msgs), **{name: answers.samples[name].texts[i] for name in models},
             **{f"gold_{name}": scores["gold"][name][i] for name in models},
             **{f"proxy_{name}": scores["proxy"][name][i] for name in models}} for i, msgs in enumerate(messages)]
    write_jsonl(run.path("eval", "samples.jsonl"), rows)
    write_json(run.path("eval", "eval.json"), result)
    return result


def probe_configs(run: Run, base: str):
    """(hallucination, adversarial) options: the run's counts and batch size, then ``[probes]`` (what
    both probes take) and ``[probes.hallucination]`` / ``[probes.adversarial]``; the PPO model is
    tuned model is probed, with the base model as the baseline."""
    from preftune.evaluation.config import AdversarialConfig, HallucinationConfig

    fixed = {"model": str(run.path(run.method)), "baseline": base}
    return (run.stage_config(HallucinationConfig, "probes.hallucination",
                             defaults={"samples": run.cfg.probe_questions, "batch_size": run.cfg.batch_size},
                             out=str(run.path("probes", "hallucination")), **fixed),
            run.stage_config(AdversarialConfig, "probes.adversarial",
                             defaults={"samples": run.cfg.probe_attacks, "batch_size": run.cfg.batch_size},
                             out=str(run.path("probes", "adversarial")), **fixed))


def stage_probes(run: Run, base: str) -> dict:
    """The hallucination and adversarial probes of the tuned model against the base model."""
    from preftune.evaluation.probes.adversarial import run_adversarial_probe
    from preftune.evaluation.probes.hallucination import run_hallucination_probe

    hallucination, adversarial = probe_configs(run, base)
    return {"hallucination": run_hallucination_probe(hallucination, quiet=run.quiet),
            "adversarial": run_adversarial_probe(adversarial, quiet=run.quiet)}


# ---------------------------------------------------------------- the run


def run_loop(cfg: RunConfig, config_file: str | None = None, quiet: bool = False) -> dict:
    """Run (or resume) the whole loop; returns the contents of OUT/metrics.json."""
    from preftune.models.loading import inference_precision, set_threads
    from preftune.pipeline.report import write_report

    run = Run(cfg, config_file, quiet)
    run.out.mkdir(parents=True, exist_ok=True)
    if cfg.force:  # outputs of an earlier run (data/ is rewritten by the stages themselves)
        for name in OUTPUT_DIRS:
            shutil.rmtree(run.path(name), ignore_errors=True)
    set_threads(cfg.threads)
    run.load_state()
    t0 = time.perf_counter()
    write_json(run.path("run_config.json"), {"config_file": config_file, **cfg.model_dump()})
    prompts = split_prompts(run)
    base = resolve_base(run)
    m = run.method
    results = {
        "sft": run.run_stage("sft", 1, lambda: stage_sft(run, base), [run.path("sft", "config.json")]),
        "sample": run.run_stage("sample", 2, lambda: stage_sample(run, base, prompts["comparison"]),
                                [run.path("data", "candidates.jsonl")]),
        "label": run.run_stage("label", 3, lambda: stage_label(run), [run.path("data", "comparisons.jsonl")]),
        "reward": run.run_stage("reward", 4, lambda: stage_reward(run, base), [run.path("rm", "metrics.json")]),
        m: run.run_stage(m, 5, lambda: stage_tune(run, prompts), [run.path(m, "config.json")]),
        "eval": run.run_stage("eval", 6, lambda: stage_eval(run, base, prompts["eval"]),
                              [run.path("eval", "eval.json")], of=m),
    }
    if cfg.probes:
        results["probes"] = run.run_stage("probes", 7, lambda: stage_probes(run, base),
                                          [run.path("probes", "adversarial", "probe.json")], of=m)
    seconds_per_stage = {name: run.state[name]["seconds"] for name in stage_names(m) if name in run.state}
    ev, label = results["eval"], results["label"]["comparisons"]
    metrics = {
        "rm_eval_accuracy": results["reward"].get("eval_accuracy"),
        "rm_eval_gold_accuracy": results["reward"].get("gold_eval_accuracy"),
        "rm_gold_agreement": results["reward"].get("rm_gold_agreement"),
        "annotator_agreement": label.get("gold_agreement"),
        "inter_annotator_agreement": label.get("inter_annotator_agreement"),
        "gold_reward": ev["gold_reward"], "proxy_reward": ev["proxy_reward"],
        f"kl_{m}_sft": ev[f"kl_{m}_sft"]["mean"] if ev[f"kl_{m}_sft"] else None,
        "kl_sft_base": ev["kl_sft_base"]["mean"] if ev["kl_sft_base"] else None,
        f"winrate_{m}_vs_sft_gold": ev[f"winrate_{m}_vs_sft"]["gold"]["rate"],
        f"winrate_{m}_vs_sft_proxy": ev[f"winrate_{m}_vs_sft"]["proxy"]["rate"],
        "response_length": ev["length"],
        "seconds_total": sum(seconds_per_stage.values()),
        "seconds_this_invocation": time.perf_counter() - t0,
        "seconds_per_stage": seconds_per_stage,
        "algorithm": m, "model": cfg.model, "quick": cfg.model == "tiny",
        "precision": inference_precision(cfg.dtype, cfg.device),
    }
    write_json(run.path("metrics.json"), metrics)
    write_report(run, results, metrics)
    return metrics
