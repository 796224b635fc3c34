"""PPO against a reward, with a KL leash to the SFT model: a thin loop over ``core``'s functions.

One step (CleanRL style, every phase named and timed):

1. **generation** -- sample one response per prompt with the KV cache; keep the sampled tokens'
   log-probabilities (the old policy's, under logits / temperature) and, with a value head on the
   policy trunk, its values, so no forward pass is repeated;
2. **scoring** -- the reward on the decoded text (any tokenizer), or ``missing_eos_penalty``;
3. **reference** -- one batched forward of the reference policy (LoRA: adapters disabled);
4. **values** -- one batched forward of a separate value model (when there is one);
5. **advantages** -- per-token rewards ``-beta * KL_t`` + score at the last token, GAE, whitening;
6. **update** -- ``ppo_epochs`` passes over ``mini_batches`` shuffled mini-batches: clipped policy
   loss + ``vf_coef`` * clipped value loss (+ ``ptx_coef`` * LM loss on ``ptx_data``).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Literal

import torch
from pydantic import Field, model_validator

from preftune.config import TrainConfig
from preftune.distributed import require_single_process
from preftune.errors import PreftuneError
from preftune.models.generation import generate
from preftune.models.loading import load_causal_lm, set_threads
from preftune.models.logits import _unwrap
from preftune.ppo.core import (
    AdaptiveKLController,
    FixedKLController,
    final_scores,
    gae_advantages,
    kl_penalty,
    masked_mean,
    per_token_rewards,
    policy_loss,
    value_loss,
    whiten,
)
from preftune.ppo.models import ValueHead, load_value_model, reference_mode, same_tokenizer
from preftune.ppo.monitor import OveroptimisationMonitor
from preftune.ppo.rollout import (
    Prompt,
    Rollout,
    load_prompts,
    policy_forward,
    prompt_indices,
    value_forward,
)
from preftune.progress import console, progress_bar
from preftune.reward.spec import checked, load_reward
from preftune.training import (
    MetricsLogger,
    apply_lora,
    latest_checkpoint,
    load_checkpoint,
    make_optimizer,
    make_scheduler,
    save_checkpoint,
    save_final_model,
    seed_everything,
    write_json,
)


class PPOConfig(TrainConfig):
    policy: str = Field(..., description="SFT model to tune (and the KL reference): a Hugging Face directory, a "
                                         ".gguf file, or smollm2-135m-instruct.")
    reward: str = Field(..., description="Reward: a reward-model directory, labeler:NAME, python:module:function "
                                         "or file.py:function; weighted sums like '0.5*A + B'.")
    prompts: str = Field(..., description="Prompts JSONL ({prompt} or {messages}).")
    out: str = Field(..., description="Output directory (final policy at its top level).")
    eval_prompts: str | None = Field(None, description="Held-out prompts JSONL, sampled and scored every "
                                                       "--eval-every steps.")
    gold: str | None = Field(None, description="Gold reward spec, scored on the eval samples next to the proxy "
                                               "(over-optimisation monitoring; best policy kept in OUT/best).")
    resume: bool = Field(False, description="Continue from the newest checkpoint in OUT/checkpoints.")

    steps: int = Field(0, ge=0, description="Rollout+update steps (0: --epochs passes over the prompts).")
    epochs: float = Field(1.0, gt=0, description="Passes over the prompts when --steps is 0.")
    max_steps: int = Field(0, ge=0, description="Stop after this many rollout steps (0: no limit).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per mini-batch (saves memory, same gradient).")
    log_every: int = Field(1, ge=1, description="Write metrics every N rollout steps.")
    eval_every: int = Field(0, ge=0, description="Sample --eval-prompts (or log training samples) every N steps "
                                                 "(0: only at the end).")
    batch_size: int = Field(16, ge=1, description="Prompts (episodes) per rollout step on each process.")
    mini_batches: int = Field(2, ge=1, description="Mini-batches (optimiser steps) per PPO epoch.")
    ppo_epochs: int = Field(4, ge=1, description="Passes over each rollout batch.")
    response_length: int = Field(64, ge=1, description="Most new tokens per response.")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature; log-probabilities are always taken "
                                                      "under logits / temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling (shapes sampling only, not the PPO ratio).")
    top_k: int = Field(0, ge=0, description="Top-k sampling (0: off).")
    stop: list[str] = Field(default_factory=list, description="Stop strings ending a response (besides EOS).")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (full fine-tuning wants ~1e-5).")
    schedule: Literal["cosine", "linear", "constant"] = Field("constant", description="Learning-rate schedule "
                                                                                      "over rollout steps.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Share of steps spent warming up linearly.")
    lora: bool = Field(True, description="Train LoRA adapters; the reference is the same weights with adapters "
                                         "disabled (one copy in memory).")

    kl_coef: float = Field(0.05, ge=0, description="KL penalty coefficient beta (initial value if adaptive).")
    kl_estimator: Literal["k1", "k3"] = Field("k1", description="Per-token KL estimate: k1 = log pi/pi_ref, k3 = "
                                                                "(r - 1) - log r (non-negative, lower variance).")
    adaptive_kl: bool = Field(False, description="Adapt beta towards --kl-target (Ziegler et al. 2019).")
    kl_target: float = Field(6.0, gt=0, description="Target KL per episode in nats for --adaptive-kl.")
    kl_horizon: int = Field(10_000, ge=1, description="Horizon of the adaptive controller in episodes.")
    kl_warn: float = Field(30.0, ge=0, description="Warn when objective/kl exceeds this many nats (0: never).")
    kl_stop: float = Field(0.0, ge=0, description="Stop training when objective/kl exceeds this (0: never).")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount factor.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    clip_ratio: float = Field(0.2, gt=0, description="PPO policy ratio clip.")
    clip_value: float = Field(0.2, gt=0, description="Value clip around the rollout's values.")
    vf_coef: float = Field(0.1, ge=0, description="Value loss coefficient.")
    whiten_rewards: bool = Field(False, description="Whiten per-token rewards (shortens outputs; off by default).")
    missing_eos_penalty: float | None = Field(None, description="Score for a response that hits --response-length "
                                                                "without EOS or a stop string (unset: the reward's "
                                                                "own score; -1 suits normalised reward models).")
    value_model: str = Field("head", description="Value function: head (on the policy trunk), policy (separate, "
                                                 "from the SFT model), reward (separate, from the reward model) "
                                                 "or a model directory.")
    ptx_coef: float = Field(0.0, ge=0, description="PPO-ptx: weight of an LM loss on --ptx-data.")
    ptx_data: str | None = Field(None, description="Demonstrations JSONL for the PPO-ptx loss.")
    overopt_drop: float = Field(0.1, gt=0, le=1, description="Warn when the gold reward has lost this share of "
                                                             "its gain while the proxy still rises.")
    samples: int = Field(4, ge=0, description="Rows per evaluation written to OUT/samples.jsonl (all eval prompts "
                                              "when --eval-prompts is given).")

    @model_validator(mode="after")
    def _check(self):
        if self.response_length >= self.max_length:
            raise ValueError(f"--response-length {self.response_length} leaves no room for the prompt within "
                             f"--max-length {self.max_length}")
        if self.ptx_coef > 0 and not self.ptx_data:
            raise ValueError("--ptx-coef needs --ptx-data")
        return self


# ---------------------------------------------------------------- set-up


def build_value_function(cfg: PPOConfig, policy, tokenizer, device, dtype):
    """(value_head, value_model): exactly one is not None (see ``preftune.ppo.models``)."""
    if cfg.value_model == "head":
        return ValueHead(_unwrap(policy).config.hidden_size).to(device=device, dtype=dtype), None
    if cfg.value_model == "policy":
        path = cfg.policy
    elif cfg.value_model == "reward":
        spec = cfg.reward.strip()
        path = spec[3:] if spec.startswith("rm:") else spec
        if not Path(path).is_dir():
            raise PreftuneError(f"--value-model reward needs --reward to be one reward-model directory, "
                                f"not {cfg.reward!r}")
    else:
        path = cfg.value_model
    from preftune.models.loading import load_tokenizer

    if not same_tokenizer(load_tokenizer(path), tokenizer):
        raise PreftuneError(f"value model {path}: its tokenizer differs from the policy's; a value model reads the "
                            f"policy's tokens (use --value-model head or policy)")
    return None, load_value_model(path, device, dtype)


def total_rollout_steps(cfg: PPOConfig, n_prompts: int) -> int:
    steps = cfg.steps or math.ceil(cfg.epochs * n_prompts / cfg.batch_size)
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


class PtxStream:
    """Endless shuffled stream of demonstration batches for the PPO-ptx loss."""

    def __init__(self, cfg: PPOConfig, tokenizer) -> None:
        from preftune.data.jsonl import read_jsonl
        from preftune.sft.data import encode_demonstrations

        demos = read_jsonl(cfg.ptx_data, "demonstrations", skip_invalid=cfg.skip_invalid).records
        self.examples, _ = encode_demonstrations(demos, tokenizer, cfg.max_length, cfg.truncate, cfg.skip_invalid)
        if not self.examples:
            raise PreftuneError(f"{cfg.ptx_data}: no demonstrations left")
        self.seed, self.position, self.pad_id = cfg.seed, 0, tokenizer.pad_token_id

    def next(self, n: int):
        from preftune.sft.data import collate
        from preftune.sft.trainer import epoch_order

        picked = []
        for k in range(self.position, self.position + n):
            epoch, pos = divmod(k, len(self.examples))
            picked.append(self.examples[epoch_order(len(self.examples), self.seed, epoch)[pos]])
        self.position += n
        return collate(picked, self.pad_id)


@contextmanager
def timed(times: dict[str, float], phase: str):
    t = time.perf_counter()
    yield
    times[f"time/{phase}"] = times.get(f"time/{phase}", 0.0) + time.perf_counter() - t


# ---------------------------------------------------------------- the loop's phases


@torch.no_grad()
def rollout(policy, reference, value_head, value_model, tokenizer, prompts: list[Prompt], reward: Callable,
            cfg: PPOConfig, generator: torch.Generator, times: dict) -> tuple[Rollout, torch.Tensor, torch.Tensor, list[str]]:
    """Phases 1-4: (episodes with old log-probs, reference log-probs and values; scores; ended; texts)."""
    with timed(times, "generation"):
        gen = generate(policy, tokenizer, [p.ids for p in prompts], max_new_tokens=cfg.response_length,
                       temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, stop=cfg.stop,
                       generator=generator, return_logprobs=True, return_hidden=value_head is not None)
        episodes = Rollout(gen.prompt_ids, gen.prompt_mask, gen.response_ids, gen.response_mask.float(),
                           gen.logprobs)
        if value_head is not None:
            episodes.values = value_head(gen.hidden) * episodes.response_mask
    with timed(times, "scoring"):
        device = episodes.logprobs.device
        scores = reward([p.messages for p in prompts], gen.texts).to(device)
    with timed(times, "reference"), reference_mode(policy, reference) as ref:
        episodes.ref_logprobs = policy_forward(ref, episodes, cfg.temperature, with_entropy=False).logprobs
    if value_model is not None:
        with timed(times, "values"):
            episodes.values = value_forward(value_model, episodes)
    return episodes, scores, gen.ended.to(device), gen.texts


def ppo_update(policy, value_head, value_model, optimizer, episodes: Rollout, cfg: PPOConfig,
               shuffle: torch.Generator, ptx: PtxStream | None) -> dict[str, float]:
    """Phase 6: ppo_epochs x mini_batches optimiser steps; returns the mean diagnostics."""
    from preftune.models.logits import ResponseLogits
    from preftune.sft.trainer import lm_loss_sum

    params = [p for group in optimizer.param_groups for p in group["params"]]
    n = len(episodes)
    mb_size = math.ceil(n / cfg.mini_batches)
    micro_size = math.ceil(mb_size / cfg.grad_accum)
    stats: dict[str, list[float]] = defaultdict(list)
    device = episodes.logprobs.device
    for epoch in range(cfg.ppo_epochs):
        order = torch.randperm(n, generator=shuffle)
        for mb_start in range(0, n, mb_size):
            mb = order[mb_start:mb_start + mb_size]
            for micro_start in range(0, len(mb), micro_size):
                part = episodes.subset(mb[micro_start:micro_start + micro_size].to(device))
                # Entropy is a diagnostic: one pass over the batch (the first epoch) measures it.
                out = policy_forward(policy, part, cfg.temperature, value_head, with_entropy=epoch == 0)
                values = out.values if value_head is not None else value_forward(value_model, part)
                mask = part.response_mask
                pg_loss, pg = policy_loss(out.logprobs, part.logprobs, part.advantages, mask, cfg.clip_ratio)
                vf_loss, vf = value_loss(values, part.values, part.returns, mask, cfg.clip_value)
                loss = pg_loss + cfg.vf_coef * vf_loss
                if ptx is not None:
                    lm_sum, lm_tokens = lm_loss_sum(ResponseLogits(policy), ptx.next(len(part)), device)
                    loss = loss + cfg.ptx_coef * lm_sum / max(lm_tokens, 1)
                    stats["loss/ptx_avg"].append(lm_sum.item() / max(lm_tokens, 1))
                (loss * len(part) / len(mb)).backward()
                stats["loss/policy_avg"].append(pg_loss.item())
                stats["loss/value_avg"].append(vf_loss.item())
                stats["policy/approxkl_avg"].append(pg["approxkl"].item())
                stats["policy/clipfrac_avg"].append(pg["clipfrac"].item())
                stats["val/ratio"].append(pg["ratio"].item())
                stats["val/clipfrac_avg"].append(vf["clipfrac"].item())
                if out.entropy is not None:
                    stats["policy/entropy_avg"].append(masked_mean(out.entropy, mask).item())
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return {k: sum(v) / len(v) for k, v in stats.items()}


@torch.no_grad()
def evaluate(policy, reference, tokenizer, prompts: list[Prompt], reward, gold, cfg: PPOConfig,
             device) -> tuple[dict[str, float], list[dict]]:
    """Sample the held-out prompts at the training temperature with a fixed seed (the same random
    numbers at every evaluation, so differences come from the policy), score them with the proxy
    (and gold) reward, and estimate KL(pi || pi_ref) on those samples (summed k1 per episode)."""
    generator = torch.Generator(device=device).manual_seed(cfg.seed + 7919)
    proxies, golds, kls, lengths, rows = [], [], [], [], []
    for i in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[i:i + cfg.batch_size]
        gen = generate(policy, tokenizer, [p.ids for p in chunk], max_new_tokens=cfg.response_length,
                       temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, stop=cfg.stop,
                       generator=generator, return_logprobs=True)
        episodes = Rollout(gen.prompt_ids, gen.prompt_mask, gen.response_ids, gen.response_mask.float(),
                           gen.logprobs)
        with reference_mode(policy, reference) as ref:
            ref_logprobs = policy_forward(ref, episodes, cfg.temperature, with_entropy=False).logprobs
        kl = (kl_penalty(episodes.logprobs, ref_logprobs, "k1") * episodes.response_mask).sum(1)
        proxy = reward([p.messages for p in chunk], gen.texts)
        g = gold([p.messages for p in chunk], gen.texts) if gold is not None else None
        proxies += proxy.tolist()
        golds += g.tolist() if g is not None else []
        kls += kl.tolist()
        lengths += gen.response_lengths.tolist()
        for j, p in enumerate(chunk):
            row = {"prompt": p.messages[-1]["content"], "response": gen.texts[j], "score": proxy[j].item(),
                   "kl": kl[j].item()}
            if g is not None:
                row["gold"] = g[j].item()
            rows.append(row)
    mean = lambda xs: sum(xs) / len(xs)
    kl_mean = mean(kls)
    metrics = {"eval/proxy": mean(proxies), "eval/kl": kl_mean, "eval/sqrt_kl": math.sqrt(max(kl_mean, 0.0)),
               "eval/response_length": mean(lengths)}
    if golds:
        metrics["eval/gold"] = mean(golds)
    return metrics, rows


# ---------------------------------------------------------------- the loop


def train_ppo(cfg: PPOConfig, *, reward_fn: Callable | None = None, gold_fn: Callable | None = None,
              stop_after: int | None = None, quiet: bool = False) -> dict:
    """Run PPO; returns the final summary. ``reward_fn``/``gold_fn`` (``(prompts, responses) ->
    floats``) replace the specs in ``cfg``; ``stop_after`` ends the run after that step's checkpoint,
    as an interruption would (used by the resume tests)."""
    require_single_process("ppo")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    policy, tokenizer = load_causal_lm(cfg.policy, device=cfg.device, dtype=cfg.dtype)
    device, dtype = next(policy.parameters()).device, next(policy.parameters()).dtype

    notes: list[str] = []
    max_prompt = cfg.max_length - cfg.response_length
    prompts = load_prompts(cfg.prompts, tokenizer, max_prompt, cfg.truncate, cfg.skip_invalid, notes)
    eval_prompts = (load_prompts(cfg.eval_prompts, tokenizer, max_prompt, cfg.truncate, cfg.skip_invalid, notes)
                    if cfg.eval_prompts else [])
    for note in notes:
        console.print(f"[yellow]{note}")
    reward = checked(getattr(reward_fn, "__name__", "reward_fn"), reward_fn) if reward_fn else load_reward(cfg.reward)
    gold = (checked(getattr(gold_fn, "__name__", "gold_fn"), gold_fn) if gold_fn
            else load_reward(cfg.gold) if cfg.gold else None)

    # Reference: LoRA adapters disabled (one copy of the weights) or a frozen second copy.
    reference = None
    if cfg.lora:
        policy = apply_lora(policy, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    else:
        reference, _ = load_causal_lm(cfg.policy, device=device, dtype=dtype)
        reference.requires_grad_(False)
    value_head, value_model = build_value_function(cfg, policy, tokenizer, device, dtype)
    value_module = value_head if value_head is not None else value_model
    optimizer = make_optimizer(list(policy.parameters()) + list(value_module.parameters()), cfg.lr,
                               cfg.weight_decay)
    total_steps = total_rollout_steps(cfg, len(prompts))
    scheduler = make_scheduler(optimizer, total_steps, cfg.warmup_ratio, cfg.schedule)
    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
              else FixedKLController(cfg.kl_coef))
    sampling = torch.Generator(device=device).manual_seed(cfg.seed)
    shuffle = torch.Generator().manual_seed(cfg.seed + 1)
    monitor = OveroptimisationMonitor(cfg.overopt_drop)
    ptx = PtxStream(cfg, tokenizer) if cfg.ptx_coef > 0 else None
    modules = {"policy": policy, "value": value_module}

    start = 0
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and ckpt is None:
        console.print(f"[yellow]--resume: no checkpoint in {out / 'checkpoints'}, starting from step 0")
    if ckpt is not None:
        state = load_checkpoint(ckpt, modules, optimizer, scheduler)
        start = state["step"]
        kl_ctl.load_state_dict(state["kl_controller"])
        sampling.set_state(state["sampling_rng"])
        shuffle.set_state(state["shuffle_rng"])
        monitor.load_state_dict(state["monitor"])
        if ptx is not None:
            ptx.position = state["ptx_position"]
        console.print(f"resuming from {ckpt} (step {start})")
    write_json(out / "run_config.json", {"stage": "ppo", **cfg.model_dump()})
    logger = MetricsLogger(out, cfg.tensorboard, resume_step=start if ckpt is not None else None)
    samples_path = out / "samples.jsonl"
    _truncate_samples(samples_path, start if ckpt is not None else None)

    eos_ids = torch.tensor([tokenizer.eos_token_id], device=device)
    summary: dict = {"steps": total_steps, "prompts": len(prompts)}
    last: dict = {}
    t_start = time.perf_counter()
    with progress_bar(total_steps, "ppo", disable=quiet) as bar:
        bar.set(start)
        for step in range(start, total_steps):
            done = step + 1
            times: dict[str, float] = {}
            t0 = time.perf_counter()
            batch = [prompts[i] for i in prompt_indices(step, cfg.batch_size, len(prompts), cfg.seed)]

            # 1-4: sample, score, reference log-probs, values
            episodes, raw_scores, ended, texts = rollout(policy, reference, value_head, value_model, tokenizer,
                                                         batch, reward, cfg, sampling, times)
            # 5: per-token rewards and advantages
            mask = episodes.response_mask
            kl = kl_penalty(episodes.logprobs, episodes.ref_logprobs, cfg.kl_estimator) * mask
            scores = final_scores(raw_scores, ended, cfg.missing_eos_penalty)
            rewards, non_score = per_token_rewards(scores, kl, mask, kl_ctl.value)
            if cfg.whiten_rewards:
                rewards = whiten(rewards, mask, shift_mean=False)
            advantages, episodes.returns = gae_advantages(rewards, episodes.values, mask, cfg.gamma, cfg.lam)
            episodes.advantages = whiten(advantages, mask)
            # 6: update
            with timed(times, "update"):
                update_stats = ppo_update(policy, value_head, value_model, optimizer, episodes, cfg, shuffle, ptx)
            scheduler.step()

            mean_kl = kl.sum(1).mean().item()
            metrics = {
                "objective/kl": mean_kl,
                "objective/entropy": (-episodes.logprobs * mask).sum(1).mean().item(),
                "objective/non_score_reward": non_score.sum(1).mean().item(),
                "objective/rlhf_reward": (scores + non_score.sum(1)).mean().item(),
                "objective/scores": scores.mean().item(),
                **update_stats,
                "val/num_eos_tokens": int((torch.isin(episodes.response_ids, eos_ids) & mask.bool()).sum()),
                "val/ended": ended.float().mean().item(),
                "response_length_mean": mask.sum(1).mean().item(),
                "kl_coef": kl_ctl.value,
                "lr": scheduler.get_last_lr()[0],
            }
            kl_ctl.update(mean_kl, len(batch))
            times["time/step"] = time.perf_counter() - t0
            metrics["eps"] = len(batch) / times["time/step"]
            metrics.update(times)

            stop_reason = check_kl(mean_kl, done, cfg)
            evaluating = (cfg.eval_every and done % cfg.eval_every == 0) or done == total_steps or stop_reason
            if evaluating:
                rows = [{"prompt": p.messages[-1]["content"], "response": t, "score": s}
                        for p, t, s in zip(batch[:cfg.samples], texts, raw_scores.tolist())]
                if eval_prompts:
                    eval_metrics, rows = evaluate(policy, reference, tokenizer, eval_prompts, reward, gold, cfg, device)
                    metrics.update(eval_metrics)
                    if "eval/gold" in eval_metrics:
                        best, warning = monitor.update(done, eval_metrics["eval/proxy"], eval_metrics["eval/gold"])
                        if warning:
                            console.print(f"[yellow]{warning}")
                        if best:
                            save_final_model(copy.deepcopy(policy), tokenizer, out / "best", cfg.keep_adapter)
                            write_json(out / "best" / "preftune_best.json", {"step": done, **eval_metrics})
                with open(samples_path, "a", encoding="utf-8") as f:
                    for row in rows:
                        f.write(json.dumps({"step": done, **row}) + "\n")
            if done % cfg.log_every == 0 or done == total_steps or stop_reason:
                logger.log(done, metrics)
            last = metrics
            bar.advance(1, score=metrics["objective/scores"], kl=mean_kl, eps=metrics["eps"])
            if stop_reason:
                summary["stopped"] = stop_reason
                console.print(f"[red]{stop_reason}")
                break
            if cfg.save_every and done % cfg.save_every == 0 and done != total_steps:
                save_checkpoint(out, done, modules, optimizer, scheduler,
                                {"kl_controller": kl_ctl.state_dict(), "sampling_rng": sampling.get_state(),
                                 "shuffle_rng": shuffle.get_state(), "monitor": monitor.state_dict(),
                                 "ptx_position": ptx.position if ptx is not None else 0},
                                cfg.keep_checkpoints)
            if stop_after is not None and done >= stop_after:
                logger.close()
                return {"stopped_at": done}
    logger.close()
    save_final_model(policy, tokenizer, out, keep_adapter=cfg.keep_adapter)
    summary.update({k: last.get(k) for k in ("objective/scores", "objective/kl", "eval/proxy", "eval/gold")
                    if k in last})
    summary["seconds"] = time.perf_counter() - t_start
    if monitor.best_step is not None:
        summary["best_gold_step"] = monitor.best_step
    write_json(out / "metrics.json", summary)
    return summary


def check_kl(mean_kl: float, step: int, cfg: PPOConfig) -> str | None:
    """Warn when the KL runs away; a reason to stop when it passes --kl-stop or is not finite."""
    if not math.isfinite(mean_kl):
        return f"step {step}: objective/kl is {mean_kl}; stopping (lower --lr or raise --kl-coef)"
    if cfg.kl_stop and mean_kl > cfg.kl_stop:
        return f"step {step}: objective/kl {mean_kl:.4g} nats passed --kl-stop {cfg.kl_stop}; stopping"
    if cfg.kl_warn and mean_kl > cfg.kl_warn:
        console.print(f"[yellow]step {step}: objective/kl {mean_kl:.4g} nats is above --kl-warn {cfg.kl_warn} "
                      f"(the policy is drifting far from the reference)")
    return None


def _truncate_samples(path: Path, resume_step: int | None) -> None:
    """Like the metrics file: start empty, or on resume keep only rows up to the checkpoint."""
    if resume_step is None or not path.exists():
        path.write_text("")
        return
    kept = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= resume_step]
    path.write_text("".join(l + "\n" for l in kept))
