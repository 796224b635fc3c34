"""Options of ``preftune ppo``, ``rloo``, ``grpo`` and ``reinforce`` (torch-free, so ``--help`` is fast).

``OnlineRLConfig`` holds what every online method shares (inputs, sampling, the KL leash, the
clipped update, monitoring); each method's config adds its own options and defaults.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import AliasChoices, Field, model_validator

from preftune.config import EngineName, TrainConfig, engine_field


class OnlineRLConfig(TrainConfig):
    algorithm: ClassVar[str]

    policy: str = Field(..., description="SFT model to tune (and the KL reference unless --reference): a Hugging "
                                         "Face directory, a .gguf file, or smollm2-135m-instruct.")
    reference: str | None = Field(None, description="The KL reference when it is not --policy, e.g. the SFT model "
                                                    "while a later round of iterated RLHF continues from the last "
                                                    "round's policy (kept as a frozen copy).")
    reward: str = Field(..., description="The reward, a scorer (docs/scoring.md): a reward-model directory, a "
                                         "built-in (sentiment, helpful, ...), module:function or "
                                         "file.py:function, or a weighted sum like '0.8*runs/rm + 0.2*ends'.")
    prompts: str = Field(..., description="Prompts JSONL ({prompt} or {messages}).")
    out: str = Field(..., description="Output directory (final policy at its top level).")
    eval_prompts: str | None = Field(None, description="Held-out prompts JSONL, sampled and scored every "
                                                       "--eval-every steps.")
    gold: str | None = Field(None, description="Gold scorer (docs/scoring.md), scored on the eval samples next to "
                                               "the proxy (over-optimisation monitoring; best policy kept in "
                                               "OUT/best).")
    resume: bool = Field(False, description="Continue from the newest checkpoint in OUT/checkpoints.")

    steps: int = Field(0, ge=0, description="Rollout+update steps (0: --epochs passes over the prompts).")
    epochs: float = Field(1.0, gt=0, description="Passes over the prompts when --steps is 0.")
    max_steps: int = Field(0, ge=0, description="Stop after this many rollout steps (0: no limit).")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per mini-batch (saves memory, same gradient).")
    log_every: int = Field(1, ge=1, description="Write metrics every N rollout steps.")
    eval_every: int = Field(0, ge=0, description="Sample --eval-prompts (or log training samples) every N steps "
                                                 "(0: only at the end).")
    batch_size: int = Field(16, ge=1, description="Episodes (sampled responses) per rollout step on each process.")
    mini_batches: int = Field(2, ge=1, description="Mini-batches (optimiser steps) per pass over a rollout batch.")
    ppo_epochs: int = Field(4, ge=1, description="Clipped passes over each rollout batch (TRL's num_iterations).")
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

    kl_coef: float = Field(0.05, ge=0, description="KL coefficient beta (initial value if adaptive; 0: no leash).",
                           validation_alias=AliasChoices("kl_coef", "beta"), json_schema_extra={"flags": ["--beta"]})
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k1", description="Per-token KL estimate: k1 = log pi/pi_ref, "
                                                    "k2 = (log pi/pi_ref)^2 / 2, k3 = (r - 1) - log r with r = "
                                                    "pi_ref/pi (non-negative, lower variance).")
    adaptive_kl: bool = Field(False, description="Adapt beta towards --kl-target (Ziegler et al. 2019).")
    kl_target: float = Field(6.0, gt=0, description="Target KL per episode in nats for --adaptive-kl.")
    kl_horizon: int = Field(10_000, ge=1, description="Horizon of the adaptive controller in episodes.")
    kl_warn: float = Field(30.0, ge=0, description="Warn when objective/kl exceeds this many nats (0: never).")
    kl_stop: float = Field(0.0, ge=0, description="Stop training when objective/kl exceeds this (0: never).")
    clip_ratio: float = Field(0.2, gt=0, description="Policy ratio clip eps: the ratio is kept within [1 - eps, "
                                                     "1 + eps].")
    clip_ratio_high: float | None = Field(None, gt=0, description="Upper clip (DAPO's clip-higher, e.g. 0.28: "
                                                                  "[1 - eps, 1 + high]; unset: --clip-ratio).")
    sampler_correction_cap: float | None = Field(None, gt=0, description="Truncated importance sampling: weight "
                                                 "each token's policy loss by min(pi_old / pi_sampler, CAP), "
                                                 "correcting for an engine that samples slightly differently "
                                                 "from the trainer (e.g. 2; unset: off).")
    missing_eos_penalty: float | None = Field(None, description="Score for a response that hits --response-length "
                                                                "without EOS or a stop string (unset: the reward's "
                                                                "own score; -1 suits normalised reward models).")
    ptx_coef: float = Field(0.0, ge=0, description="PPO-ptx: weight of an LM loss on --ptx-data.")
    ptx_data: str | None = Field(None, description="Demonstrations JSONL for the PPO-ptx loss.")
    overopt_drop: float = Field(0.1, gt=0, le=1, description="Warn when the gold reward has lost this share of "
                                                             "its gain while the proxy still rises.")
    engine: EngineName = engine_field()
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


class PPOConfig(OnlineRLConfig):
    algorithm: ClassVar[str] = "ppo"

    gamma: float = Field(1.0, ge=0, le=1, description="Discount factor.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    clip_value: float = Field(0.2, gt=0, description="Value clip around the rollout's values.")
    vf_coef: float = Field(0.1, ge=0, description="Value loss coefficient.")
    whiten_rewards: bool = Field(False, description="Whiten per-token rewards (shortens outputs; off by default).")
    value_model: str = Field("head", description="Value function: head (on the policy trunk), policy (separate, "
                                                 "from the SFT model), reward (separate, from the reward model) "
                                                 "or a model directory.")


class CriticFreeConfig(OnlineRLConfig):
    """What RLOO, GRPO and REINFORCE++ share: no value function; K samples per prompt."""

    samples_per_prompt: int = Field(4, ge=2, description="Responses sampled per prompt (K); --batch-size counts "
                                                         "responses and must be a multiple of K.")
    kl_in: Literal["reward", "loss"] = Field("reward", description="Where the KL leash acts: reward (beta x "
                                             "the KL subtracted from the reward) or loss (beta x the per-token "
                                             "KL estimate added to the loss).")

    @model_validator(mode="after")
    def _check_groups(self):
        if self.batch_size % self.samples_per_prompt:
            raise ValueError(f"--batch-size {self.batch_size} is not a multiple of --samples-per-prompt "
                             f"{self.samples_per_prompt}")
        if self.kl_in == "loss" and self.kl_estimator == "k1" and self.kl_coef > 0:
            raise ValueError("--kl-estimator k1 pulls nothing as a loss term (its expected gradient is zero): with "
                             "--kl-in loss use k2 (the gradient of KL(pi || ref)) or k3 (GRPO's)")
        return self


class RLOOConfig(CriticFreeConfig):
    algorithm: ClassVar[str] = "rloo"
    normalize_advantages: bool = Field(False, description="Whiten the leave-one-out advantages over the batch.")


class GRPOConfig(CriticFreeConfig):
    algorithm: ClassVar[str] = "grpo"
    kl_in: Literal["reward", "loss"] = Field("loss", description="Where the KL leash acts: loss (beta x the "
                                             "per-token KL estimate added to the loss, as GRPO) or reward.")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k3", description="Per-token KL estimate: k3 = (r - 1) - "
                                                    "log r (GRPO's, non-negative), k2 = (log pi/pi_ref)^2 / 2, or k1 "
                                                    "= log pi/pi_ref (with --kl-in reward only).")
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = Field("dapo", description="How per-token terms are "
                                                          "averaged: grpo (each sequence's mean, then over "
                                                          "sequences), dr_grpo (sum over sequences x "
                                                          "--response-length), dapo (mean over the batch's tokens).")
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description="Divide the centred rewards by "
                                                             "the group's std, the batch's, or nothing (Dr. GRPO).")
    dynamic_sampling: bool = Field(False, description="DAPO: leave out of the update the prompts whose K rewards "
                                                      "are all equal (counted in val/groups_dropped).")


class ReinforceConfig(CriticFreeConfig):
    """REINFORCE++ (Hu 2025): per-token KL penalty in the reward, returns to go, whitened over the batch."""

    algorithm: ClassVar[str] = "reinforce"
    samples_per_prompt: int = Field(1, ge=1, description="Responses sampled per prompt (K; REINFORCE++ needs no "
                                                         "group: 1 is its default).")


ALGORITHMS: dict[str, type[OnlineRLConfig]] = {c.algorithm: c for c in (PPOConfig, RLOOConfig, GRPOConfig,
                                                                        ReinforceConfig)}
