"""Online RL against a reward, with a KL leash to the SFT model: PPO, RLOO, GRPO and REINFORCE++ as
one thin loop over ``core``'s functions; the methods differ only in phase 4 and in the loss of phase 5.

One step (CleanRL style, every phase named and timed):

1. **generation** -- sample ``samples_per_prompt`` responses per prompt (PPO: one) with the
   engine (the sampler's log-probabilities are kept only to measure how far they are from the
   trainer's);
2. **scoring** -- the reward on the decoded text (any tokenizer), or ``missing_eos_penalty``;
3. **old and reference** -- the trainer's own forward passes, in the micro-batches of the first
   update epoch: the old policy's log-probabilities (under logits / temperature) and values (PPO),
   and the reference's log-probabilities (LoRA: adapters disabled). The update's first mini-batch
   sees the same numbers again, so its ratio is exactly 1;
4. **advantages** (``advantages``) -- PPO: per-token rewards ``-beta * KL_t`` + score at the last
   token, GAE, whitening. RLOO: the sequence reward (score - beta * KL) minus the mean of the other
   samples of its prompt. GRPO: the reward centred on its prompt's group and scaled by the group's
   (or batch's) std. REINFORCE++: PPO's per-token rewards, returns to go, whitened over the batch;
5. **update** -- ``ppo_epochs`` passes over ``mini_batches`` shuffled mini-batches: the clipped
   policy loss (RLOO: the whole response as one action) + ``vf_coef`` * clipped value loss (PPO) +
   ``beta`` * KL (``kl_in = "loss"``) + ``ptx_coef`` * LM loss on ``ptx_data``.

Every forward pass runs under the run's precision (bf16 autocast with fp32 master weights, or fp32);
log-probabilities, values, losses and advantages are fp32 either way.

Under torchrun (DDP, or FSDP2 with ``--fsdp``) each rank samples and scores its share of the step's
prompts; every statistic that mixes episodes (whitening, KL, metrics) is computed from all-reduced
sums and counts; the mini-batches are drawn from one global permutation of the step's episodes,
each rank computing the members it holds, with every mean over the mini-batch's global counts. Each
prompt is sampled from its own random stream, seeded from (seed, step, position in the step's
global batch). So a run on N ranks with batch B matches one process with batch N x B up to
floating-point rounding.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, ContextManager

import torch

from preftune.data.batching import collate, count_targets, encode_demonstrations, epoch_order
from preftune.data.jsonl import read_jsonl, write_json
from preftune.errors import PreftuneError
from preftune.models.engines import HFEngine, VLLMEngine, choose_engine
from preftune.models.generation import Generation, generate, row_seed, stop_token_ids
from preftune.models.loading import load_causal_lm, load_tokenizer, resolve_model_path, same_vocabulary
from preftune.models.logits import ResponseLogits, unwrap
from preftune.models.saving import save_final_model, save_model_copy
from preftune.rl.config import CriticFreeConfig, GRPOConfig, OnlineRLConfig, PPOConfig, RLOOConfig
from preftune.rl.core import (
    AdaptiveKLController,
    Aggregation,
    FixedKLController,
    aggregate,
    discounted_returns,
    final_scores,
    gae_advantages,
    group_advantages,
    kl_penalty,
    leave_one_out_advantages,
    masked_mean,
    masked_sum_rows,
    minibatch_shares,
    per_token_rewards,
    policy_loss,
    sequence_policy_loss,
    sequence_to_tokens,
    truncated_importance_weights,
    value_loss,
    varied_groups,
    whiten,
)
from preftune.rl.models import ValueHead, load_value_model, reference_mode
from preftune.rl.rollout import Prompt, Rollout, load_prompts, policy_forward, prompt_indices, value_forward
from preftune.scoring import load_scorer, scorer_from_function, single_reward_model
from preftune.training.distributed import (
    DistInfo,
    all_gather_lists,
    all_gather_tensor,
    all_ranks_done,
    all_reduce_sum,
    distribute,
    gradient_sync,
    summing,
)
from preftune.training.lm_loss import lm_loss_sum
from preftune.training.lora import apply_lora
from preftune.training.monitor import OveroptimisationMonitor
from preftune.training.optim import clip_gradients
from preftune.training.scaffold import TrainingRun, keep_rows_up_to, timed, train_in_fp32

# ---------------------------------------------------------------- set-up


def build_value_function(cfg: OnlineRLConfig, policy, tokenizer, device, compute: str = "fp32"):
    """(value_head, value_model): for PPO exactly one is not None (see ``preftune.rl.models``); both
    train, so their weights are fp32 (the master weights of mixed precision). Critic-free: neither."""
    if not isinstance(cfg, PPOConfig):
        return None, None
    if cfg.value_model == "head":
        return ValueHead(unwrap(policy).config.hidden_size).to(device=device, dtype=torch.float32), None
    if cfg.value_model == "policy":
        path = cfg.policy
    elif cfg.value_model == "reward":
        path = single_reward_model(cfg.reward)
        if path is None:
            raise PreftuneError(f"--value-model reward needs --reward to be one reward-model directory, "
                                f"not {cfg.reward!r}")
    else:
        path = cfg.value_model
    if not same_vocabulary(load_tokenizer(path), tokenizer):
        raise PreftuneError(f"value model {path}: its tokenizer differs from the policy's; a value model reads the "
                            f"policy's tokens (use --value-model head or policy)")
    return None, load_value_model(path, device, torch.float32, compute)


def build_sampler(cfg: OnlineRLConfig, policy, tokenizer, run: TrainingRun) -> HFEngine | VLLMEngine | None:
    """The engine rollouts sample from, synced after every update; None: the policy itself.

    ``hf`` with LoRA keeps a plain copy with the adapters merged (in the compute precision), which
    samples without the adapters' extra products (under FSDP the policy samples itself: its weights
    are sharded); full fine-tuning samples from the policy. ``vllm`` keeps vLLM's own copy."""
    chosen = choose_engine(cfg.engine, run.precision, run.torch_device)
    run.say(f"engine: {chosen}" + (" (auto)" if cfg.engine == "auto" else ""))
    if chosen == "vllm":
        if run.sharded:
            raise PreftuneError("--engine vllm with --fsdp: the engine needs the whole weights on every rank "
                                "(use --engine hf, or DDP without --fsdp)")
        if cfg.sampler_correction_cap and (cfg.top_p < 1 or cfg.top_k):
            # vLLM reports log-probs of the top-p/top-k renormalised distribution, the trainer of the
            # whole one: every weight pi_old / pi_sampler would be below 1 (about the nucleus' mass).
            raise PreftuneError("--sampler-correction-cap with --engine vllm needs --top-p 1 and --top-k 0: vLLM's "
                                "log-probs are of the truncated distribution, the trainer's of the whole one")
        from transformers import AutoConfig

        path = resolve_model_path(cfg.policy)
        rows, declared = policy.get_input_embeddings().weight.shape[0], AutoConfig.from_pretrained(path).vocab_size
        if rows != declared:  # vLLM loads the directory; the synced weights must have its shapes
            raise PreftuneError(f"{cfg.policy}: the embeddings were resized to {rows} rows (a pad token was added), "
                                f"the directory declares {declared}: vLLM cannot take these weights (use --engine hf)")
        return VLLMEngine(path, tokenizer, precision=run.precision, device=run.torch_device,
                          seed=cfg.seed, max_model_len=cfg.max_length)
    if cfg.lora and not run.sharded:
        return HFEngine.copy_of(policy, tokenizer, run.weights_dtype(trained=False), run.precision)
    return None


def samples_per_prompt(cfg: OnlineRLConfig) -> int:
    """K: responses sampled per prompt (PPO: 1)."""
    return cfg.samples_per_prompt if isinstance(cfg, CriticFreeConfig) else 1


def kl_in_loss(cfg: OnlineRLConfig) -> bool:
    """Whether the KL leash is a loss term (``--kl-in loss``) rather than part of the reward (PPO: reward)."""
    return isinstance(cfg, CriticFreeConfig) and cfg.kl_in == "loss"


def total_rollout_steps(cfg: OnlineRLConfig, n_prompts: int, world: int = 1) -> int:
    prompts_per_step = cfg.batch_size // samples_per_prompt(cfg) * world
    steps = cfg.steps or math.ceil(cfg.epochs * n_prompts / prompts_per_step)
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


class PtxStream:
    """Endless shuffled stream of demonstrations for the PPO-ptx loss (every rank holds all of them
    and advances the same position)."""

    def __init__(self, cfg: OnlineRLConfig, tokenizer) -> None:
        demos = read_jsonl(cfg.ptx_data, "demonstrations", skip_invalid=cfg.skip_invalid).records
        self.examples, _ = encode_demonstrations(demos, tokenizer, cfg.max_length, cfg.truncate, cfg.skip_invalid)
        if not self.examples:
            raise PreftuneError(f"{cfg.ptx_data}: no demonstrations left")
        self.seed, self.position, self.pad_id = cfg.seed, 0, tokenizer.pad_token_id

    def take(self, n: int) -> list:
        """The next ``n`` demonstrations (``Example``s)."""
        picked = []
        for k in range(self.position, self.position + n):
            epoch, pos = divmod(k, len(self.examples))
            picked.append(self.examples[epoch_order(len(self.examples), self.seed, epoch)[pos]])
        self.position += n
        return picked


# ---------------------------------------------------------------- the models and how they run


class Dispatch(torch.nn.Module):
    """One root module over the models a stage trains, whose forward runs any function of them.
    DDP and FSDP act in the forward of the module they wrap, and PPO uses its models in several
    ways (sampling, reference and value passes, the update's loss): each use is a function passed
    to ``forward``."""

    def __init__(self, **modules: torch.nn.Module | None) -> None:
        super().__init__()
        for name, module in modules.items():
            if module is not None:
                self.add_module(name, module)

    def forward(self, fn: Callable, *args, **kwargs):
        return fn(*args, **kwargs)


class RLModels:
    """The policy, its reference, the value function (PPO), and how each pass over them runs.

    One process or DDP: passes without gradients (sampling, reference, values, evaluation) call the
    modules directly (every rank holds the same weights, and DDP's wrapper would add collectives to
    passes whose number differs between ranks); the update's forward goes through the DDP wrapper.
    FSDP: every pass goes through the sharded root's forward, which gathers the weights, and
    sampling continues until every rank's batch has ended, so all ranks run the same passes.
    Every pass runs under ``autocast`` (bf16 mixed precision, or nothing in fp32)."""

    def __init__(self, policy, reference, value_head, value_model, info: DistInfo, fsdp: bool,
                 autocast: Callable[[], ContextManager] = nullcontext, sampler=None) -> None:
        self.policy, self.reference, self.value_head, self.value_model = policy, reference, value_head, value_model
        self.fsdp = info.enabled and fsdp
        self.autocast = autocast
        self.sampler = sampler  # an engine with its own copy of the weights (see build_sampler), or None
        self.inner = Dispatch(policy=policy, value=value_head if value_head is not None else value_model)
        self.net = distribute(self.inner, policy, info, fsdp)
        self.ref_net = (distribute(Dispatch(reference=reference), reference, info, True)
                        if self.fsdp and reference is not None else None)
        self.all_done = all_ranks_done(info) if self.fsdp else None

    def run(self, fn: Callable, *args):
        """``fn(*args)`` without gradients: through the FSDP root when sharded, else directly."""
        with self.autocast():
            return self.net(fn, *args) if self.fsdp else fn(*args)

    def sample(self, tokenizer, prompt_ids: list[list[int]], seeds: list[int], cfg: OnlineRLConfig) -> Generation:
        """One response per prompt, each from its own random stream (``seeds``), with the sampler's
        log-probabilities: from the sampler engine when there is one, else from the policy itself."""
        options = dict(max_new_tokens=cfg.response_length, temperature=cfg.temperature, top_p=cfg.top_p,
                       top_k=cfg.top_k, stop=cfg.stop, row_seeds=seeds, return_logprobs=True)
        if self.sampler is not None:
            return self.sampler.generate(prompt_ids, **options)
        return self.run(lambda: generate(self.policy, tokenizer, prompt_ids, all_done=self.all_done, **options))

    def sync_sampler(self) -> None:
        """After an update: the sampler engine samples from the new weights."""
        if self.sampler is not None:
            self.sampler.sync(self.policy)

    def policy_pass(self, episodes: Rollout, temperature: float, values: bool = True):
        """(log-probabilities, values or None) of the current policy: the update's own forward, without
        gradients."""
        def fn():
            out = policy_forward(self.policy, episodes, temperature, self.value_head if values else None,
                                 with_entropy=False)
            if values and self.value_model is not None:
                return out.logprobs, value_forward(self.value_model, episodes)
            return out.logprobs, out.values

        return self.run(fn)

    def reference_logprobs(self, episodes: Rollout, temperature: float) -> torch.Tensor:
        def fn():
            with reference_mode(self.policy, self.reference) as ref:
                return policy_forward(ref, episodes, temperature, with_entropy=False).logprobs

        if self.reference is None:  # LoRA: the policy with its adapters disabled
            return self.run(fn)
        with self.autocast():
            return self.ref_net(fn) if self.ref_net is not None else fn()

    @property
    def has_values(self) -> bool:
        return self.value_head is not None or self.value_model is not None

    def update_forward(self, part: Rollout, temperature: float, with_entropy: bool, ptx_batch: dict | None):
        """The update's pass (with gradients, through DDP/FSDP): (log-probs, entropy or None, values or
        None (critic-free), summed PPO-ptx LM loss or None)."""
        with self.autocast():
            return self.net(self._update_pass, part, temperature, with_entropy, ptx_batch)

    def _update_pass(self, part, temperature, with_entropy, ptx_batch):
        out = policy_forward(self.policy, part, temperature, self.value_head, with_entropy=with_entropy)
        values = value_forward(self.value_model, part) if self.value_model is not None else out.values
        lm_sum = None
        if ptx_batch is not None:
            lm_sum, _ = lm_loss_sum(ResponseLogits(self.policy), ptx_batch, part.logprobs.device)
        return out.logprobs, out.entropy, values, lm_sum


# ---------------------------------------------------------------- the loop's phases


def update_layout(cfg: OnlineRLConfig, step: int, epoch: int, per_rank: int, info: DistInfo) -> list[tuple[list[int], list[list[int]]]]:
    """The mini-batches of one PPO epoch: (members as positions in the step's global batch, this
    rank's micro-batches as local indices). The permutation is seeded from (seed, step, epoch), the
    same on every rank; see ``core.minibatch_shares``."""
    n = per_rank * info.world
    mb_size = math.ceil(n / cfg.mini_batches)
    micro_size = max(1, math.ceil(mb_size / (info.world * cfg.grad_accum)))
    shuffle = torch.Generator().manual_seed(row_seed(cfg.seed, step, epoch, "minibatches"))
    order = torch.randperm(n, generator=shuffle).tolist()
    return [(order[k:k + mb_size], minibatch_shares(order[k:k + mb_size], per_rank, info.world, micro_size)[info.rank])
            for k in range(0, n, mb_size)]


@torch.no_grad()
def rollout(models: RLModels, tokenizer, prompts: list[Prompt], seeds: list[int], reward: Callable,
            cfg: OnlineRLConfig, step: int, info: DistInfo, times: dict) -> tuple[Rollout, torch.Tensor, torch.Tensor, list[str]]:
    """Phases 1-3: (episodes with the old policy's log-probabilities and values and the reference's
    log-probabilities, all computed by the trainer; scores; ended; texts). ``episodes.sampler_logprobs``
    keeps what the sampler reported, for the gap metric."""
    with timed(times, "generation"):
        gen = models.sample(tokenizer, [p.ids for p in prompts], seeds, cfg)
        episodes = Rollout(gen.prompt_ids, gen.prompt_mask, gen.response_ids, gen.response_mask.float(),
                           gen.logprobs)
    with timed(times, "scoring"):
        device = episodes.response_ids.device
        scores = reward([p.messages for p in prompts], gen.texts).to(device)
    with timed(times, "old_and_reference"):
        trainer_view(models, episodes, update_layout(cfg, step, 0, len(episodes), info), cfg.temperature)
    return episodes, scores, gen.ended.to(device), gen.texts


@torch.no_grad()
def trainer_view(models: RLModels, episodes: Rollout, layout, temperature: float) -> None:
    """Phase 3: the old policy's log-probabilities and values, and the reference's, from the
    trainer's own forward passes over exactly the micro-batches of the first update epoch. The first
    mini-batch of the update then sees its own numbers again: its ratio is exactly 1, whatever the
    sampler (KV cache, another precision, another engine) computed."""
    mask = episodes.response_mask
    logprobs, ref_logprobs, values = torch.zeros_like(mask), torch.zeros_like(mask), torch.zeros_like(mask)
    for _, parts in layout:
        for part_index in parts:
            index = torch.tensor(part_index or [0], device=mask.device)  # an empty share still runs (collectives)
            part = episodes.subset(index)
            lp, v = models.policy_pass(part, temperature, values=models.has_values)
            ref = models.reference_logprobs(part, temperature)
            if part_index:
                width = part.response_mask.shape[1]
                logprobs[index, :width], ref_logprobs[index, :width] = lp, ref
                if v is not None:
                    values[index, :width] = v
    episodes.sampler_logprobs, episodes.logprobs = episodes.logprobs, logprobs
    episodes.ref_logprobs, episodes.values = ref_logprobs, values if models.has_values else None


def advantages(cfg: OnlineRLConfig, episodes: Rollout, scores: torch.Tensor, kl: torch.Tensor, kl_coef: float,
               reduce) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, dict[str, float]]:
    """Phase 4: (per-token advantages [B, T], PPO's returns or None, the KL part of the reward [B, T],
    metrics of the phase). ``kl`` is the per-token KL estimate (masked); it enters the reward unless
    the method's KL acts in the loss (``kl_in = "loss"``). Statistics over the batch use every rank's
    episodes (``reduce``); groups of K samples never straddle ranks."""
    mask = episodes.response_mask
    in_reward = 0.0 if kl_in_loss(cfg) else kl_coef
    if isinstance(cfg, PPOConfig):
        rewards, non_score = per_token_rewards(scores, kl, mask, in_reward)
        if cfg.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False, reduce=reduce)
        adv, returns = gae_advantages(rewards, episodes.values, mask, cfg.gamma, cfg.lam)
        return whiten(adv, mask, reduce=reduce), returns, non_score, {}
    if cfg.algorithm == "reinforce":  # REINFORCE++: PPO's per-token rewards, no critic: returns, whitened
        rewards, non_score = per_token_rewards(scores, kl, mask, in_reward)
        return whiten(discounted_returns(rewards, mask), mask, reduce=reduce), None, non_score, {}
    K = cfg.samples_per_prompt
    non_score = -in_reward * kl
    rewards = scores + masked_sum_rows(non_score, mask)  # score - beta * KL of the whole response
    stats: dict[str, float] = {}
    if isinstance(cfg, RLOOConfig):
        seq = leave_one_out_advantages(rewards, K)
        if cfg.normalize_advantages:
            seq = whiten(seq, torch.ones_like(seq), reduce=reduce)
    else:
        seq = group_advantages(rewards, K, cfg.scale_rewards, reduce=reduce)
        if cfg.dynamic_sampling:  # out of the loss (masked: the batch keeps its shape on every rank)
            kept = varied_groups(scores, K)  # by the scores: a KL in the reward would make every group vary
            episodes.response_mask = mask * kept[:, None].to(mask.dtype)
            counts = torch.tensor([float((~kept).sum()), float(len(kept))], dtype=torch.float64)
            dropped, total = (reduce(counts) if reduce else counts).tolist()
            stats = {"val/groups_dropped": dropped / K, "val/groups_dropped_frac": dropped / total}
    return sequence_to_tokens(seq, mask), None, non_score, stats


def aggregation(cfg: OnlineRLConfig) -> Aggregation:
    """How the method averages its per-token loss terms (GRPO's --loss-type; the others: per token)."""
    if isinstance(cfg, GRPOConfig):
        return {"grpo": "sequence_mean", "dr_grpo": "constant", "dapo": "token_mean"}[cfg.loss_type]
    return "token_mean"


UPDATE_STATS = ["loss/policy_avg", "loss/value_avg", "policy/approxkl_avg", "policy/clipfrac_avg", "val/ratio",
                "val/clipfrac_avg", "policy/entropy_avg", "loss/ptx_avg", "loss/kl_avg"]


def clipped_update(models: RLModels, optimizer, episodes: Rollout, cfg: OnlineRLConfig, step: int,
                   ptx: PtxStream | None, info: DistInfo = DistInfo(), kl_coef: float = 0.0) -> dict[str, float]:
    """Phase 5, every method's: ppo_epochs x mini_batches clipped optimiser steps; returns the mean
    diagnostics. ``kl_coef``: beta of the KL loss term (methods with ``kl_in = "loss"``).

    The step's episodes form one global batch (rank r holds positions r*B .. r*B+B-1), cut into
    mini-batches by ``update_layout``; each rank computes the members it holds. Every mean is over
    the mini-batch's global token count and DDP/FSDP average gradients over ranks, hence the factor
    world size: the gradient is the single-process mini-batch gradient. ``val/ratio_first_max_dev``
    is max |ratio - 1| over the first mini-batch of the first epoch: 0 when the old log-probabilities
    are the trainer's own (``trainer_view``)."""
    per_rank = len(episodes)
    lengths = all_gather_tensor(episodes.response_mask.sum(1).double().cpu(), info)  # every episode's tokens
    how = aggregation(cfg)
    kl_loss_coef = kl_coef if kl_in_loss(cfg) else 0.0
    device = episodes.logprobs.device
    pad_id = ptx.pad_id if ptx is not None else 0
    rows, entropy_rows = [], []  # per mini-batch: this rank's shares of the statistics
    first_dev = torch.zeros(1, dtype=torch.float64)
    for epoch in range(cfg.ppo_epochs):
        for mb, (members, parts) in enumerate(update_layout(cfg, step, epoch, per_rank, info)):
            tokens = float(lengths[members].sum())
            sequences = float((lengths[members] > 0).sum())  # dynamic sampling leaves some out
            # PPO-ptx: one demonstration per member, drawn in the mini-batch's order on every rank.
            demos = ptx.take(len(members)) if ptx is not None else []
            ptx_tokens = max(count_targets(demos), 1) if demos else 1
            my_demos = {m % per_rank: d for m, d in zip(members, demos) if m // per_rank == info.rank}
            row = torch.zeros(len(UPDATE_STATS), dtype=torch.float64)
            for k, part_index in enumerate(parts):
                real = bool(part_index)
                index = part_index or [0]  # an empty share still runs a pass (collectives), weighted 0
                part = episodes.subset(torch.tensor(index, device=device))
                ptx_batch = (collate([my_demos[i] for i in index] if real else demos[:1], pad_id)
                             if ptx is not None else None)
                with gradient_sync(models.net, enabled=k == len(parts) - 1):
                    logprobs, entropy, values, lm_sum = models.update_forward(part, cfg.temperature, epoch == 0,
                                                                             ptx_batch)
                    mask = part.response_mask
                    pg_loss, pg = policy_objective(cfg, logprobs, part, tokens, sequences, how)
                    loss = pg_loss
                    if values is not None:
                        vf_loss, vf = value_loss(values, part.values, part.returns, mask, cfg.clip_value, tokens)
                        loss = loss + cfg.vf_coef * vf_loss
                    else:
                        vf_loss, vf = torch.zeros(()), {"clipfrac": torch.zeros(())}
                    kl_loss = torch.zeros(())
                    if kl_loss_coef > 0:  # the leash in the loss (GRPO): gradients flow through log pi
                        kl_loss = aggregate(kl_penalty(logprobs, part.ref_logprobs, cfg.kl_estimator), mask, how,
                                            tokens, sequences, cfg.response_length)
                        loss = loss + kl_loss_coef * kl_loss
                    if lm_sum is not None:
                        loss = loss + cfg.ptx_coef * lm_sum / ptx_tokens
                    (loss * (info.world if real else 0.0)).backward()
                if real:
                    if epoch == 0 and mb == 0:
                        ratio = torch.exp(logprobs.detach() - part.logprobs)
                        first_dev = torch.maximum(first_dev, ((ratio - 1).abs() * mask).max().double().cpu())
                    row += torch.tensor([pg_loss.item(), vf_loss.item(), pg["approxkl"].item(), pg["clipfrac"].item(),
                                         pg["ratio"].item(), vf["clipfrac"].item(),
                                         masked_mean(entropy, mask, tokens).item() if entropy is not None else 0.0,
                                         lm_sum.item() / ptx_tokens if lm_sum is not None else 0.0,
                                         kl_loss.item()],
                                        dtype=torch.float64)
            clip_gradients(models.inner, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            entropy_rows.append(epoch == 0)
            rows.append(row)
    table = all_reduce_sum(torch.stack(rows), info)
    stats = {name: table[:, k].mean().item() for k, name in enumerate(UPDATE_STATS)}
    stats["policy/entropy_avg"] = table[torch.tensor(entropy_rows), UPDATE_STATS.index("policy/entropy_avg")].mean().item()
    stats["val/ratio_first_max_dev"] = all_gather_tensor(first_dev, info).max().item()
    for name, used in (("loss/ptx_avg", ptx is not None), ("loss/kl_avg", kl_loss_coef > 0),
                       ("loss/value_avg", models.has_values), ("val/clipfrac_avg", models.has_values)):
        if not used:
            del stats[name]
    return stats


def policy_objective(cfg: OnlineRLConfig, logprobs: torch.Tensor, part: Rollout, tokens: float, sequences: float,
                     how: Aggregation) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped policy loss of one micro-batch (its share of the mini-batch's): per token for PPO,
    GRPO and REINFORCE++; RLOO takes the whole response as one action (as TRL's RLOO). With
    ``--sampler-correction-cap``, each token (RLOO: each response) is weighted by the truncated
    pi_old / pi_sampler."""
    mask, cap = part.response_mask, cfg.sampler_correction_cap
    if isinstance(cfg, RLOOConfig):
        weights = (truncated_importance_weights(masked_sum_rows(part.logprobs, mask),
                                                masked_sum_rows(part.sampler_logprobs, mask), cap) if cap else None)
        return sequence_policy_loss(logprobs, part.logprobs, part.advantages[:, 0], mask, cfg.clip_ratio, sequences,
                                    weights, cfg.clip_ratio_high)
    weights = truncated_importance_weights(part.logprobs, part.sampler_logprobs, cap) if cap else None
    return policy_loss(logprobs, part.logprobs, part.advantages, mask, cfg.clip_ratio, tokens, weights,
                       cfg.clip_ratio_high, how, sequences, cfg.response_length)


@torch.no_grad()
def evaluate(models: RLModels, tokenizer, prompts: list[Prompt], reward, gold, cfg: OnlineRLConfig,
             info: DistInfo = DistInfo()) -> tuple[dict[str, float], list[dict]]:
    """Sample the held-out prompts at the training temperature, each from a random stream fixed by
    (seed, its position) (the same random numbers at every evaluation, so differences come from the
    policy, and the same whichever rank samples it), score them with the proxy (and gold) reward,
    and estimate KL(pi || pi_ref) on those samples (summed k1 per episode, both log-probabilities
    from the trainer's forward passes). Under DDP each rank
    takes a share and the rows are gathered; under FSDP every rank samples all of them."""
    everyone = models.fsdp or not info.enabled
    positions = list(range(len(prompts)))
    mine = positions if everyone else info.my_slice(positions)
    rows = []
    for i in range(0, len(mine), cfg.batch_size):
        chunk = [prompts[k] for k in mine[i:i + cfg.batch_size]]
        seeds = [row_seed(cfg.seed, "eval", k) for k in mine[i:i + cfg.batch_size]]
        gen = models.sample(tokenizer, [p.ids for p in chunk], seeds, cfg)
        episodes = Rollout(gen.prompt_ids, gen.prompt_mask, gen.response_ids, gen.response_mask.float(),
                           gen.logprobs)
        # Both sides of the KL from the trainer's forward passes (the same computation: 0 at the start)
        logprobs, _ = models.policy_pass(episodes, cfg.temperature, values=False)
        ref_logprobs = models.reference_logprobs(episodes, cfg.temperature)
        kl = (kl_penalty(logprobs, ref_logprobs, "k1") * episodes.response_mask).sum(1)
        proxy = reward([p.messages for p in chunk], gen.texts)
        spread = getattr(reward, "last_uncertainty", None)  # an ensemble's disagreement
        g = gold([p.messages for p in chunk], gen.texts) if gold is not None else None
        for j, p in enumerate(chunk):
            row = {"prompt": p.messages[-1]["content"], "response": gen.texts[j], "score": proxy[j].item(),
                   "kl": kl[j].item(), "length": int(gen.response_lengths[j])}
            if spread is not None:
                row["uncertainty"] = spread[j].item()
            if g is not None:
                row["gold"] = g[j].item()
            rows.append(row)
    if not everyone:
        rows = all_gather_lists(rows, info)
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    kl_mean = mean("kl")
    metrics = {"eval/proxy": mean("score"), "eval/kl": kl_mean, "eval/sqrt_kl": math.sqrt(max(kl_mean, 0.0)),
               "eval/response_length": mean("length")}
    if gold is not None:
        metrics["eval/gold"] = mean("gold")
    if "uncertainty" in rows[0]:
        metrics["eval/proxy_uncertainty"] = mean("uncertainty")
    return metrics, [{k: v for k, v in r.items() if k != "length"} for r in rows]


# ---------------------------------------------------------------- the loop


def train_rl(cfg: OnlineRLConfig, *, reward_fn: Callable | None = None, gold_fn: Callable | None = None,
             stop_after: int | None = None, quiet: bool = False) -> dict:
    """Run the method ``cfg`` configures (PPOConfig, RLOOConfig, GRPOConfig, ReinforceConfig) in one
    process, or as one rank under torchrun; returns the final summary.
    ``reward_fn``/``gold_fn`` (``(prompts, responses) -> floats``) replace the scorers in ``cfg``;
    ``stop_after`` ends the run after that step's checkpoint, as an interruption would (used by the
    resume tests)."""
    run = TrainingRun(cfg, cfg.algorithm, quiet=quiet, stop_after=stop_after)
    info = run.info
    policy, tokenizer = load_causal_lm(cfg.policy, device=run.device, dtype=run.weights_dtype(trained=not cfg.lora),
                                       compute=run.precision)
    device = next(policy.parameters()).device

    notes: list[str] = []
    max_prompt = cfg.max_length - cfg.response_length
    prompts = load_prompts(cfg.prompts, tokenizer, max_prompt, cfg.truncate, cfg.skip_invalid, notes)
    eval_prompts = (load_prompts(cfg.eval_prompts, tokenizer, max_prompt, cfg.truncate, cfg.skip_invalid, notes)
                    if cfg.eval_prompts else [])
    for note in notes:
        run.warn(note)
    reward = (scorer_from_function(getattr(reward_fn, "__name__", "reward_fn"), reward_fn) if reward_fn
              else load_scorer(cfg.reward, run.device, cfg.dtype))
    gold = (scorer_from_function(getattr(gold_fn, "__name__", "gold_fn"), gold_fn) if gold_fn
            else load_scorer(cfg.gold, run.device, cfg.dtype) if cfg.gold else None)

    # Reference: LoRA adapters disabled (one copy of the weights) or a frozen second copy (full
    # fine-tuning, or a --reference other than the policy tuning starts from).
    reference = None
    if cfg.lora:
        policy = train_in_fp32(apply_lora(policy, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets))
    if not cfg.lora or (cfg.reference and cfg.reference != cfg.policy):
        reference, _ = load_causal_lm(cfg.reference or cfg.policy, device=device,
                                      dtype=run.weights_dtype(trained=False), compute=run.precision)
        reference.requires_grad_(False)
    value_head, value_model = build_value_function(cfg, policy, tokenizer, device, run.precision)
    value_module = value_head if value_head is not None else value_model
    models = RLModels(policy, reference, value_head, value_model, info, cfg.fsdp, autocast=run.autocast,
                      sampler=build_sampler(cfg, policy, tokenizer, run))
    global_batch = run.global_batch
    total_steps = total_rollout_steps(cfg, len(prompts), info.world)
    kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
              else FixedKLController(cfg.kl_coef))
    monitor = OveroptimisationMonitor(cfg.overopt_drop)
    ptx = PtxStream(cfg, tokenizer) if cfg.ptx_coef > 0 else None
    reduce = summing(info)

    trained = {"policy": policy, "value": value_module} if value_module is not None else {"policy": policy}
    optimizer, scheduler, state = run.optimiser(trained, total_steps)
    if state:
        kl_ctl.load_state_dict(state["kl_controller"])
        monitor.load_state_dict(state["monitor"])
        if ptx is not None:
            ptx.position = state["ptx_position"]
        models.sync_sampler()  # the checkpoint's weights
    samples_path = run.out / "samples.jsonl"
    if run.is_main:
        keep_rows_up_to(samples_path, run.start_step if state else None)

    eos_ids = torch.tensor(stop_token_ids(policy, tokenizer), device=device)  # what generation stops at
    summary: dict = {"steps": total_steps, "prompts": len(prompts), "world_size": info.world}
    last: dict = {}
    with run.progress(total_steps) as bar:
        for step in range(run.start_step, total_steps):
            done = step + 1
            times: dict[str, float] = {}
            t0 = time.perf_counter()
            K = samples_per_prompt(cfg)
            indices = prompt_indices(step, cfg.batch_size // K, len(prompts), cfg.seed, info.rank, info.world)
            batch = [prompts[i] for i in indices for _ in range(K)]  # a prompt's K samples side by side
            # Each episode's random stream is fixed by its place in the step's global batch.
            seeds = [row_seed(cfg.seed, step, info.rank * cfg.batch_size + j) for j in range(len(batch))]

            # 1-3: sample, score, the trainer's old and reference log-probs and values
            episodes, raw_scores, ended, texts = rollout(models, tokenizer, batch, seeds, reward, cfg, step, info, times)
            spread = getattr(reward, "last_uncertainty", None)  # an ensemble's disagreement on these samples
            # 4: advantages (statistics over every rank's episodes)
            mask = episodes.response_mask
            kl = kl_penalty(episodes.logprobs, episodes.ref_logprobs, cfg.kl_estimator) * mask
            scores = final_scores(raw_scores, ended, cfg.missing_eos_penalty)
            episodes.advantages, episodes.returns, non_score, advantage_stats = advantages(
                cfg, episodes, scores, kl, kl_ctl.value, reduce)
            # 5: update
            with timed(times, "update"):
                update_stats = clipped_update(models, optimizer, episodes, cfg, step, ptx, info, kl_ctl.value)
            scheduler.step()
            with timed(times, "sync"):
                models.sync_sampler()

            sampler_gap = ((episodes.sampler_logprobs - episodes.logprobs).abs() * mask).sum()
            is_weights = (truncated_importance_weights(episodes.logprobs, episodes.sampler_logprobs,
                                                       cfg.sampler_correction_cap or math.inf) * mask).sum()
            sums = torch.stack([kl.sum(), (-episodes.logprobs * mask).sum(), non_score.sum(), scores.sum(),
                                (torch.isin(episodes.response_ids, eos_ids) & mask.bool()).sum(),
                                ended.sum(), mask.sum(), sampler_gap, is_weights]).double().cpu()
            kl_sum, entropy_sum, non_score_sum, score_sum, eos_count, ended_count, token_sum, gap_sum, weight_sum = \
                all_reduce_sum(sums, info).tolist()
            mean_kl = kl_sum / global_batch
            metrics = {
                "objective/kl": mean_kl,
                "objective/entropy": entropy_sum / global_batch,
                "objective/non_score_reward": non_score_sum / global_batch,
                "objective/rlhf_reward": (score_sum + non_score_sum) / global_batch,
                "objective/scores": score_sum / global_batch,
                **update_stats,
                **advantage_stats,
                "val/num_eos_tokens": int(eos_count),
                "val/ended": ended_count / global_batch,
                "response_length_mean": token_sum / global_batch,
                "policy/sampler_logprob_gap": gap_sum / max(token_sum, 1.0),
                # mean pi_old / pi_sampler per token (truncated at the cap when the correction is on)
                "policy/sampler_is_weight": weight_sum / max(token_sum, 1.0),
                "kl_coef": kl_ctl.value,
                "lr": scheduler.get_last_lr()[0],
            }
            if spread is not None:
                spread_sum = all_reduce_sum(spread.sum().double(), info).item()
                metrics["objective/reward_uncertainty"] = spread_sum / global_batch
            kl_ctl.update(mean_kl, global_batch)
            times["time/step"] = time.perf_counter() - t0
            metrics["eps"] = global_batch / times["time/step"]
            metrics.update(times)

            stop_reason = check_kl(mean_kl, done, cfg, run.say)
            if run.eval_due(done) or stop_reason:
                if eval_prompts:
                    eval_metrics, rows = evaluate(models, tokenizer, eval_prompts, reward, gold, cfg, info)
                    metrics.update(eval_metrics)
                    if "eval/gold" in eval_metrics:
                        best, alert = monitor.update(done, eval_metrics["eval/proxy"], eval_metrics["eval/gold"])
                        if alert is not None:
                            run.warn(alert.message())
                        if best:
                            save_best(policy, tokenizer, run.out / "best", cfg, models.fsdp, info,
                                      {"step": done, **eval_metrics})
                else:  # the first --samples episodes of the step's global batch
                    mine = [{"prompt": p.messages[-1]["content"], "response": t, "score": s}
                            for p, t, s in zip(batch, texts, raw_scores.tolist())][:cfg.samples]
                    rows = all_gather_lists(mine, info)[:cfg.samples]
                if run.is_main:
                    with open(samples_path, "a", encoding="utf-8") as f:
                        for row in rows:
                            f.write(json.dumps({"step": done, **row}) + "\n")
            run.log(done, metrics, force=bool(stop_reason))
            last = metrics
            bar.advance(1, score=metrics["objective/scores"], kl=mean_kl, eps=metrics["eps"])
            if stop_reason:
                summary["stopped"] = stop_reason
                run.say(f"[red]{stop_reason}")
                break
            run.save_if_due(done, {"kl_controller": kl_ctl.state_dict(), "monitor": monitor.state_dict(),
                                   "ptx_position": ptx.position if ptx is not None else 0})
            if run.stopping(done):
                return run.stop(done)
    summary.update({k: last.get(k) for k in ("objective/scores", "objective/kl", "eval/proxy", "eval/gold",
                                             "eval/kl") if k in last})
    if monitor.best_step is not None:
        summary["best_gold_step"] = monitor.best_step
    return run.finish(summary, models.inner, save=lambda: save_final_model(
        policy, tokenizer, run.out, keep_adapter=cfg.keep_adapter, sharded=models.fsdp, is_main=run.is_main))


def save_best(policy, tokenizer, out: Path, cfg: OnlineRLConfig, sharded: bool, info: DistInfo, record: dict) -> None:
    """Keep the policy with the best gold reward so far in ``out`` (every rank calls this)."""
    save_model_copy(policy, tokenizer, out, cfg.keep_adapter, sharded=sharded, is_main=info.is_main)
    if info.is_main:
        write_json(out / "preftune_best.json", record)


def check_kl(mean_kl: float, step: int, cfg: OnlineRLConfig, say: Callable[[str], None]) -> str | None:
    """Warn when the KL runs away; a reason to stop when it passes --kl-stop or is not finite (the
    KL is global, so every rank reaches the same decision)."""
    if not math.isfinite(mean_kl):
        return f"step {step}: objective/kl is {mean_kl}; stopping (lower --lr or raise --kl-coef)"
    if cfg.kl_stop and mean_kl > cfg.kl_stop:
        return f"step {step}: objective/kl {mean_kl:.4g} nats passed --kl-stop {cfg.kl_stop}; stopping"
    if cfg.kl_warn and mean_kl > cfg.kl_warn:
        say(f"[yellow]step {step}: objective/kl {mean_kl:.4g} nats is above --kl-warn {cfg.kl_warn} "
            f"(the policy is drifting far from the reference)")
    return None
