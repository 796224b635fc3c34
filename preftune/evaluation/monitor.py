"""The over-optimisation monitor a training loop calls every ``eval_every`` steps.

``policy_eval_metrics`` samples held-out prompts from the policy and returns the row PPO logs:
``eval/proxy`` (the reward being optimised), ``eval/gold`` (a gold judge, when configured),
``eval/kl`` (sampled KL(policy || reference) per response) and ``eval/sqrt_kl``.
``OveroptimisationMonitor`` keeps those rows, tracks the best step by gold reward (the checkpoint
to keep) and returns an alert once (``gao.overoptimisation_alert``) when gold falls while proxy rises.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from preftune.data.records import Messages
from preftune.evaluation.gao import OveroptimisationAlert, overoptimisation_alert
from preftune.evaluation.sampling import SamplingOptions, response_logprobs, sample_responses
from preftune.evaluation.stats import sequence_kl


@torch.no_grad()
def policy_eval_metrics(policy, reference, tokenizer, prompts: Sequence[Messages], proxy: Callable,
                        gold: Callable | None, options: SamplingOptions,
                        generator: torch.Generator | None = None) -> dict[str, float | None]:
    """Sample one response per held-out prompt and score it (see module docstring).

    ``reference`` is the initial policy (for a LoRA policy, the same peft model is fine when the
    caller wraps this call so that ``reference`` runs with adapters disabled)."""
    was_training = policy.training
    policy.eval()
    samples = sample_responses(policy, tokenizer, prompts, options, generator=generator, quiet=True, logprobs=True)
    policy.train(was_training)
    kls = [kl for gen in samples.batches
           for kl in sequence_kl(gen.logprobs, response_logprobs(reference, gen, options.temperature),
                                 gen.response_mask).tolist()]
    kl = sum(kls) / len(kls)
    return {"eval/proxy": float(proxy(list(prompts), samples.texts).mean()),
            "eval/gold": float(gold(list(prompts), samples.texts).mean()) if gold is not None else None,
            "eval/kl": kl, "eval/sqrt_kl": math.sqrt(max(kl, 0.0)),
            "eval/response_length": sum(samples.lengths) / len(samples.lengths)}


class OveroptimisationMonitor:
    """Collects evaluation rows; ``update`` returns an alert the first time one fires."""

    def __init__(self, drop_fraction: float = 0.2) -> None:
        self.drop_fraction = drop_fraction
        self.rows: list[dict] = []
        self.alert: OveroptimisationAlert | None = None

    def update(self, step: int, metrics: dict) -> OveroptimisationAlert | None:
        self.rows.append({"step": step, **metrics})
        if self.alert is None:
            self.alert = overoptimisation_alert(self.rows, self.drop_fraction)
            return self.alert
        return None

    @property
    def best_step(self) -> int | None:
        """The step with the highest gold reward so far (None without a gold judge)."""
        scored = [r for r in self.rows if r.get("eval/gold") is not None]
        return max(scored, key=lambda r: r["eval/gold"])["step"] if scored else None
