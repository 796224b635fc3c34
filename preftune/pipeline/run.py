"""The main job: the whole RLHF loop, one stage after another, each a preftune stage.

    demonstrations -> sft -> sample (base + SFT) -> label (ratings and comparisons, by simulated
    annotators or people in the feedback app) -> reward -> ppo | rloo | grpo | reinforce (KL leash
    to SFT, gold monitored) or dpo (on the comparisons)
    [-> rounds 2..N: sample (SFT + the last policy) -> label -> reward (on everything judged so
    far) -> tune (from the last policy; online RL keeps its KL leash to SFT, DPO's implicit
    reference is the model it starts from)]
    -> eval (held-out prompts: base / SFT / the tuned model by gold and proxy) [-> human_eval
    (people compare SFT and tuned answers)] -> probes (hallucination, adversarial) -> report

Every stage writes under ``OUT`` (round r > 1 under ``OUT/round<r>``) and is recorded in
``OUT/stages.json`` with its time and summary; a re-run reuses finished stages (``--force`` re-runs
them all). A stage waiting for people stops the run (``people.WaitingForPeople``) and the re-run
continues there. Prompts: the demonstrations' prompts, each round's comparison prompts and the
held-out prompts are disjoint (rounds reuse comparison prompts only when the training prompts run
out); online RL trains on every training prompt.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from preftune.config import build_config, read_config_file
from preftune.data.jsonl import read_dicts, read_jsonl, write_json, write_jsonl
from preftune.data.records import HELD_OUT_TAGS, prompt_text, to_json
from preftune.data.split import random_split, split_by_tags
from preftune.errors import ConfigError, PreftuneError
from preftune.pipeline.config import METHOD_TITLES, RunConfig
from preftune.pipeline.labels import stage_label
from preftune.progress import console

OUTPUT_DIRS = ["sft", "rm", *METHOD_TITLES, "eval", "probes", "models"]
ROUND_STAGES = ["sample", "label", "reward"]  # then the tuning method


def round_stage(name: str, r: int) -> str:
    """A stage's name in round ``r`` (round 1 keeps the plain names)."""
    return name if r == 1 else f"{name}.r{r}"


def stage_names(method: str, rounds: int = 1, human_eval: bool = False, probes: bool = True) -> list[str]:
    """The stages in order; the tuning stage is named after the method (``[run] algorithm``)."""
    per_round = [round_stage(n, r) for r in range(1, rounds + 1) for n in (*ROUND_STAGES, method)]
    return ["sft", *per_round, "eval", *(["human_eval"] if human_eval else []), *(["probes"] if probes else [])]


RUN_WIDE = ("seed", "device", "dtype", "threads", "engine", "skip_invalid")  # [run] options every stage takes


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

    @property
    def stages(self) -> list[str]:
        return stage_names(self.method, self.cfg.rounds, self.cfg.eval_judge == "human", self.cfg.probes)

    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    def round_path(self, r: int, *parts: str) -> Path:
        """Round 1's outputs at the top of OUT (data/, rm/, ppo/...), round r's under OUT/round<r>."""
        return self.path(*parts) if r == 1 else self.path(f"round{r}", *parts)

    def candidates(self, r: int) -> Path:
        return self.round_path(r, "data", "candidates.jsonl")

    def policy(self, r: int) -> Path:
        """The tuned model of round ``r`` (round 0: the SFT model)."""
        return self.path("sft") if r == 0 else self.round_path(r, self.method)

    @property
    def final_policy(self) -> Path:
        return self.policy(self.cfg.rounds)

    @property
    def final_rm(self) -> Path:
        """The last round's reward model: the proxy the final policy was optimised against."""
        return self.round_path(self.cfg.rounds, "rm")

    def say(self, message: str) -> None:
        if not self.quiet:
            console.print(message)

    def stage_config(self, cls, section: str, defaults: dict[str, Any] | None = None, **fixed):
        """Every stage's config, built one way: the stage's own defaults < ``defaults`` (what the
        run chooses, e.g. its response length) < the config file's ``[section]`` table < the run's
        ``RUN_WIDE`` options (seed, device, ...) < ``fixed`` (the paths between stages)."""
        self._refuse_run_wide_keys(section)
        common = {k: getattr(self.cfg, k) for k in RUN_WIDE}
        return build_config(cls, file=self.config_file, section=section, defaults=defaults,
                            overrides={**{k: v for k, v in common.items() if k in cls.model_fields}, **fixed})

    def _refuse_run_wide_keys(self, section: str) -> None:
        """The run's ``RUN_WIDE`` options hold for every stage, so the same key
        in a stage's table would be ignored: it is refused instead, in one line."""
        if not self.config_file:
            return
        node: Any = read_config_file(self.config_file)
        tables = section.split(".")
        for depth, name in enumerate(tables):  # [probes] and [probes.hallucination] both reach a probe
            node = node.get(name) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                return
            clash = sorted(k for k in node if k.replace("-", "_") in RUN_WIDE)
            if clash:
                raise ConfigError(f"{self.config_file}: [{'.'.join(tables[:depth + 1])}] {clash[0]}: set it in [run] "
                                  f"or on the command line (the run's {', '.join(RUN_WIDE)} hold for every stage)")

    # ------------------------------------------------------------ stage bookkeeping

    def load_state(self) -> None:
        path = self.path("stages.json")
        self.state = json.loads(path.read_text()) if path.exists() and not self.cfg.force else {}

    def save_state(self) -> None:
        write_json(self.path("stages.json"), self.state)

    def run_stage(self, name: str, func: Callable[[], dict], outputs: list[Path], of: str | None = None) -> dict:
        """Run a stage, or reuse its finished outputs; ``of``: the stage whose model it uses (a finished
        evaluation of another method's or another round's model is not reused)."""
        done = self.state.get(name)
        index, total = self.stages.index(name) + 1, len(self.stages)
        if done and done.get("of") == of and all(p.exists() for p in outputs):
            console.print(f"[dim]stage {index}/{total} {name}: reusing the finished stage "
                          f"({done['seconds']:.0f} s earlier; --force re-runs it)")
            return done["summary"]
        console.rule(f"stage {index}/{total}: {name}")
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
    prompts, demos = (read_jsonl(path, kind, skip_invalid=run.cfg.skip_invalid)
                      for path, kind in ((run.cfg.prompts, "prompts"), (run.cfg.demos, "demonstrations")))
    for read in (prompts, demos):
        if read.skipped:
            run.say(read.summary())
    records = prompts.records
    demo_prompts = {prompt_text(r.messages) for r in demos.records}
    train, held = split_by_tags(records)
    if not held:
        raise PreftuneError(f"{run.cfg.prompts}: no held-out prompts (records with \"split\": \"eval\"; "
                            f"any of {', '.join(HELD_OUT_TAGS)} holds out)")
    rng = random.Random(run.cfg.seed)
    free = [r for r in train if prompt_text(r.messages) not in demo_prompts]
    comparison = rng.sample(free, min(run.cfg.comparison_prompts, len(free)))
    evaluation = rng.sample(held, min(run.cfg.eval_prompts, len(held)))
    monitor = evaluation[:run.cfg.monitor_prompts]
    data = run.path("data")
    paths = {"comparison": data / "comparison_prompts.jsonl", "rl": data / "rl_prompts.jsonl",
             "eval": data / "eval_prompts.jsonl", "monitor": data / "monitor_prompts.jsonl"}
    subsets = {"comparison": comparison, "rl": train, "eval": evaluation, "monitor": monitor}
    used = {prompt_text(r.messages) for r in comparison}
    for r in range(2, run.cfg.rounds + 1):  # each round answers new prompts while there are any
        unused = [p for p in free if prompt_text(p.messages) not in used]
        pool = unused if len(unused) >= run.cfg.comparison_prompts else free
        subsets[f"comparison.r{r}"] = random.Random(run.cfg.seed * 1000 + r).sample(
            pool, min(run.cfg.comparison_prompts, len(pool)))
        used |= {prompt_text(p.messages) for p in subsets[f"comparison.r{r}"]}
        paths[f"comparison.r{r}"] = data / f"comparison_prompts.r{r}.jsonl"
    for key, rows in subsets.items():
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


def stage_sample(run: Run, base: str, prompts: dict[str, Path], r: int) -> dict:
    """Candidates of round ``r``: the base and SFT models in round 1, then SFT and the last round's policy."""
    from preftune.sampling.config import SampleConfig
    from preftune.sampling.sample import sample_candidates

    models = [base, str(run.path("sft"))] if r == 1 else [str(run.path("sft")), str(run.policy(r - 1))]
    cfg = run.stage_config(SampleConfig, "sample", defaults={"n": run.cfg.samples_per_model,
                                                             "max_new_tokens": run.cfg.max_new_tokens,
                                                             "batch_size": run.cfg.batch_size},
                           model=models, prompts=str(prompts[round_stage("comparison", r)]),
                           out=str(run.candidates(r)))
    return sample_candidates(cfg, quiet=run.quiet)


def prompt_key(row: dict) -> str:
    """A label's prompt as one string (a prompt is a string or a message list)."""
    return json.dumps(row["prompt"] if "prompt" in row else row["messages"], sort_keys=True)


def held_out_prompts(run: Run, eval_split: float, seed: int, upto: int) -> list[set[str]]:
    """Per round 1..``upto``: the comparison prompts held out from the reward model (each round's
    split seeded on its own, so a later round never moves an earlier round's prompts)."""
    held = []
    for r in range(1, upto + 1):
        keys = list(dict.fromkeys(map(prompt_key, read_dicts(run.round_path(r, "data", "comparisons.jsonl")))))
        held.append(set(random_split(keys, eval_split, seed if r == 1 else seed + r)[1]))
    return held


def reward_data(run: Run, eval_split: float, seed: int, upto: int = 1) -> tuple[Path, Path | None]:
    """(training, held-out) preference files for the reward model of round ``upto``: everything
    judged in rounds 1..upto. Each round's comparison prompts are split (seeded); training gets
    every judgement of the training prompts (comparisons, and with ``reward_ratings`` the pairs
    implied by the ratings), the held-out file only the comparisons of the other prompts, so the
    held-out accuracy is measured on the same kind of label as the annotators' agreement with the
    gold. A prompt held out in any round is held out in all."""
    held = set().union(*held_out_prompts(run, eval_split, seed, upto))
    comparisons, ratings = [], []
    for r in range(1, upto + 1):
        comparisons += read_dicts(run.round_path(r, "data", "comparisons.jsonl"))
        ratings += read_dicts(run.round_path(r, "data", "ratings.jsonl")) if run.cfg.reward_ratings else []
    train_path = run.round_path(upto, "data", "rm_train.jsonl")
    eval_path = run.round_path(upto, "data", "rm_eval.jsonl")
    write_jsonl(train_path, [r for r in comparisons + ratings if prompt_key(r) not in held])
    if not held:
        return train_path, None
    write_jsonl(eval_path, [r for r in comparisons if prompt_key(r) in held])
    return train_path, eval_path


def stage_reward(run: Run, base: str, r: int) -> dict:
    """The reward model of round ``r``, trained from the backbone on every round's labels so far;
    also how well it (and the last round's model) orders the newest round's held-out comparisons,
    which come from the policy it is about to be optimised against."""
    from preftune.reward.config import RewardConfig
    from preftune.reward.fit import fit_reward

    cfg = run.stage_config(RewardConfig, "reward", model=resolve_backbone(run, base), data="",
                           out=str(run.round_path(r, "rm")))
    own_split = cfg.eval_data is None  # unless the config names its own held-out file
    if own_split:
        train_path, eval_path = reward_data(run, cfg.eval_split, cfg.seed, upto=r)
        cfg = cfg.model_copy(update={"data": str(train_path), "eval_data": str(eval_path) if eval_path else None})
    else:
        cfg = cfg.model_copy(update={"data": str(reward_data(run, 0.0, cfg.seed, upto=r)[0])})
    summary = fit_reward(cfg, quiet=run.quiet)
    summary = {**summary, **gold_on_held_out(cfg, run.cfg.gold)}
    # The newest round's held-out prompts exist only when the run split them (a config's own
    # held-out file leaves every round's prompts in training).
    if run.cfg.rounds > 1 and own_split and cfg.eval_data is not None:
        newest = held_out_prompts(run, cfg.eval_split, cfg.seed, r)[-1]
        rows = [row for row in read_dicts(run.round_path(r, "data", "comparisons.jsonl")) if prompt_key(row) in newest]
        summary["newest_round_accuracy"] = comparison_accuracy(str(run.round_path(r, "rm")), rows, cfg)
        if r > 1:
            summary["previous_rm_newest_round_accuracy"] = comparison_accuracy(str(run.round_path(r - 1, "rm")),
                                                                               rows, cfg)
    return summary


def comparison_accuracy(reward: str, rows: list[dict], cfg) -> float | None:
    """How often the reward model ``reward`` scores the chosen response of each comparison higher."""
    from preftune.data.records import parse_comparison
    from preftune.reward.losses import pair_accuracy
    from preftune.scoring import load_scorer

    if not rows:
        return None
    pairs = [parse_comparison(row) for row in rows]
    scorer = load_scorer(reward, cfg.device, cfg.dtype)
    prompts = [prompt_text(p.messages) for p in pairs]
    chosen = scorer(prompts, [p.chosen for p in pairs])
    rejected = scorer(prompts, [p.rejected for p in pairs])
    return pair_accuracy(chosen, rejected).item()


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


def stage_tune(run: Run, prompts: dict[str, Path], r: int) -> dict:
    """Stage 4 of round ``r``: the SFT model (round 1) or the last round's policy tuned by the run's
    method against this round's reward model, leashed to the SFT model (DPO: see ``stage_dpo``); its
    options come from the method's own table."""
    if run.method == "dpo":
        return stage_dpo(run, r)
    from preftune.rl.config import ALGORITHMS
    from preftune.rl.trainer import train_rl

    monitor = {"eval_prompts": str(prompts["monitor"]), "gold": run.cfg.gold} if run.cfg.monitor_prompts else {}
    cfg = run.stage_config(ALGORITHMS[run.method], run.method, policy=str(run.policy(r - 1)),
                           reference=str(run.path("sft")), reward=str(run.round_path(r, "rm")),
                           prompts=str(prompts["rl"]), out=str(run.policy(r)), **monitor)
    return train_rl(cfg, quiet=run.quiet)


def stage_dpo(run: Run, r: int) -> dict:
    """DPO from the SFT model (round 1) or the last round's model on the round's comparisons (the
    reward model's training labels; the gold, not DPO, judges the result in the evaluation). DPO's
    implicit reference is the model it starts from, so from round 2 it is leashed to the last
    round's model, not to SFT, and learns from this round's comparisons only."""
    from preftune.dpo.config import DPOConfig
    from preftune.dpo.trainer import train_dpo

    cfg = run.stage_config(DPOConfig, "dpo", defaults={"lora": True, "lr": 5e-5}, model=str(run.policy(r - 1)),
                           data=str(run.round_path(r, "data", "comparisons.jsonl")), out=str(run.policy(r)))
    return train_dpo(cfg, quiet=run.quiet)


def eval_config(run: Run, prompts: Path):
    """The evaluation's options: the run's response length and batch size, then the ``[eval]``
    table; the models, prompts and judges are the run's."""
    from preftune.evaluation.config import EvalConfig

    return run.stage_config(EvalConfig, "eval", defaults={"max_new_tokens": run.cfg.max_new_tokens,
                                                          "batch_size": run.cfg.batch_size},
                            model=str(run.final_policy), baseline=str(run.path("sft")), prompts=str(prompts),
                            judge=[run.cfg.gold, str(run.final_rm)], out=str(run.path("eval")))


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
              "proxy": load_scorer(str(run.final_rm), cfg.device, cfg.dtype)}
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
    models = {"base": base, "sft": str(run.path("sft")), m: str(run.final_policy)}
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

    fixed = {"model": str(run.final_policy), "baseline": base}
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


def stage_human_eval(run: Run) -> dict:
    """People compare the SFT model's and the tuned model's answers to the held-out prompts (the
    evaluation stage's samples) in the PREFIX-eval-METHOD-DIGEST project: the human win rate with its Wilson
    interval, and the people's agreement."""
    from preftune.evaluation.harness import win_rate_summary
    from preftune.pipeline.labels import project_names
    from preftune.pipeline.people import FeedbackDB, agreement_summary, await_judgements, eval_records, tuned_outcomes

    m = run.method
    rows = read_dicts(run.path("eval", "samples.jsonl"))
    records = eval_records([r["prompt"] for r in rows], [r["sft"] for r in rows], [r[m] for r in rows],
                           seed=run.cfg.seed)
    # One project per set of compared answers: another method, round or --force gets its own, and a
    # re-run that continues finds the same one (people's judgements of other answers stay there).
    digest = hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()[:6]
    name = f"{project_names(run, 1)['eval']}-{m}-{digest}"
    db = FeedbackDB.open(run.cfg.db)
    db.ensure_project(name, "pairwise", overlap=run.cfg.annotators)
    db.import_records(name, records)
    await_judgements(db, [name], "human evaluation", run.cfg.wait, run.cfg.poll_seconds, run.quiet)
    tuned_index = {r["id"]: r["meta"]["tuned"] for r in records}
    outcomes = tuned_outcomes(db.export(name, "raw"), tuned_index)
    return {"project": name, "tasks": len(records), "identical_or_empty_pairs": len(rows) - len(records),
            f"winrate_{m}_vs_sft": win_rate_summary(outcomes), **agreement_summary(db.stats(name))}


def stage_round(run: Run, base: str, prompts: dict[str, Path], r: int) -> dict[str, dict]:
    """One round of the loop: candidates, labels, reward model, tuning."""
    m = run.method
    name = lambda stage: round_stage(stage, r)  # noqa: E731
    of = None if r == 1 else round_stage(m, r - 1)  # later rounds sample the previous round's policy
    return {
        "sample": run.run_stage(name("sample"), lambda: stage_sample(run, base, prompts, r), [run.candidates(r)], of),
        "label": run.run_stage(name("label"), lambda: stage_label(run, r),
                               [run.round_path(r, "data", "comparisons.jsonl")], of),
        "reward": run.run_stage(name("reward"), lambda: stage_reward(run, base, r),
                                [run.round_path(r, "rm", "metrics.json")], of),
        m: run.run_stage(name(m), lambda: stage_tune(run, prompts, r), [run.policy(r) / "config.json"]),
    }


def round_summary(r: int, results: dict[str, dict], method: str) -> dict:
    """What the report and metrics say about a round."""
    reward, tuned, label = results["reward"], results[method], results["label"]
    return {"round": r, "labels": label["comparisons"].get("records"),
            "human_judgements": label.get("human_judgements"), "selection": label.get("selection"),
            "rm_eval_accuracy": reward.get("eval_accuracy"),
            "newest_round_accuracy": reward.get("newest_round_accuracy"),
            "previous_rm_newest_round_accuracy": reward.get("previous_rm_newest_round_accuracy"),
            "gold": tuned.get("eval/gold"), "proxy": tuned.get("eval/proxy"), "kl": tuned.get("eval/kl")}


def run_loop(cfg: RunConfig, config_file: str | None = None, quiet: bool = False) -> dict:
    """Run (or resume) the whole loop; returns the contents of OUT/metrics.json."""
    from preftune.models.loading import inference_precision, set_threads
    from preftune.pipeline.report import write_report

    if cfg.eval_judge == "human" and cfg.feedback != "app" and not (cfg.db or os.environ.get("PREFTUNE_DB")):
        raise ConfigError("eval_judge = \"human\" needs the feedback app's database: set [run] db or $PREFTUNE_DB "
                          "(or feedback = \"app\")")
    run = Run(cfg, config_file, quiet)
    run.out.mkdir(parents=True, exist_ok=True)
    if cfg.force:  # outputs of an earlier run (data/ is rewritten by the stages themselves)
        for name in OUTPUT_DIRS + [p.name for p in run.out.glob("round[0-9]*")]:
            shutil.rmtree(run.path(name), ignore_errors=True)
    set_threads(cfg.threads)
    run.load_state()
    t0 = time.perf_counter()
    write_json(run.path("run_config.json"), {"config_file": config_file, **cfg.model_dump()})
    prompts = split_prompts(run)
    base = resolve_base(run)
    m = run.method
    results = {"sft": run.run_stage("sft", lambda: stage_sft(run, base), [run.path("sft", "config.json")])}
    rounds = []
    for r in range(1, cfg.rounds + 1):
        this = stage_round(run, base, prompts, r)
        rounds.append(round_summary(r, this, m))
        if r == 1:
            results.update(this)
        else:
            results.update({round_stage(k, r): v for k, v in this.items()})
    final = round_stage(m, cfg.rounds)  # the stage whose policy (and reward model) the last stages judge
    results["eval"] = run.run_stage("eval", lambda: stage_eval(run, base, prompts["eval"]),
                                    [run.path("eval", "eval.json")], of=final)
    if cfg.eval_judge == "human":
        results["human_eval"] = run.run_stage("human_eval", lambda: stage_human_eval(run), [], of=final)
    if cfg.probes:
        results["probes"] = run.run_stage("probes", lambda: stage_probes(run, base),
                                          [run.path("probes", "adversarial", "probe.json")], of=final)
    results["rounds"] = rounds
    seconds_per_stage = {name: run.state[name]["seconds"] for name in run.stages if name in run.state}
    ev = results["eval"]
    last_label, last_reward = (results[round_stage(k, cfg.rounds)] for k in ("label", "reward"))
    labels = [results[round_stage("label", r)] for r in range(1, cfg.rounds + 1)]
    metrics = {
        "rm_eval_accuracy": last_reward.get("eval_accuracy"),
        "rm_eval_gold_accuracy": last_reward.get("gold_eval_accuracy"),
        "rm_gold_agreement": last_reward.get("rm_gold_agreement"),
        "annotator_agreement": last_label["comparisons"].get("gold_agreement"),
        "inter_annotator_agreement": last_label["comparisons"].get("inter_annotator_agreement"),
        "feedback": cfg.feedback,
        "human_judgements": sum(label.get("human_judgements") or 0 for label in labels),
        "annotators": max(label.get("annotators") or 0 for label in labels),
        "gold_reward": ev["gold_reward"], "proxy_reward": ev["proxy_reward"],
        f"kl_{m}_sft": ev[f"kl_{m}_sft"]["mean"] if ev[f"kl_{m}_sft"] else None,
        "kl_sft_base": ev["kl_sft_base"]["mean"] if ev["kl_sft_base"] else None,
        f"winrate_{m}_vs_sft_gold": ev[f"winrate_{m}_vs_sft"]["gold"]["rate"],
        f"winrate_{m}_vs_sft_proxy": ev[f"winrate_{m}_vs_sft"]["proxy"]["rate"],
        "response_length": ev["length"],
        "rounds": rounds,
        "seconds_total": sum(seconds_per_stage.values()),
        "seconds_this_invocation": time.perf_counter() - t0,
        "seconds_per_stage": seconds_per_stage,
        "algorithm": m, "model": cfg.model, "quick": cfg.model == "tiny",
        "precision": inference_precision(cfg.dtype, cfg.device),
    }
    if cfg.feedback == "app":
        metrics["people"] = {"comparisons": {k: v for k, v in last_label["comparisons"].items() if k != "records"},
                             "ratings": {k: v for k, v in last_label["ratings"].items() if k != "records"}}
    if "human_eval" in results:
        human = results["human_eval"]
        metrics[f"winrate_{m}_vs_sft_human"] = human[f"winrate_{m}_vs_sft"]["rate"]
        metrics["human_eval"] = human
    write_json(run.path("metrics.json"), metrics)
    write_report(run, results, metrics)
    return metrics
