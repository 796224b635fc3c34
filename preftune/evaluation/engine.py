"""The evaluation engine: several models answer the same prompts, scorers judge every answer.

``preftune eval`` runs it on model A and baseline B; the main job on the base, SFT and tuned
models. The recipe:

1. each model, in order, samples one response per prompt from its own generator seeded with
   ``seed`` (the same random numbers for every model, so differences come from the models);
2. for each ``kl_to`` pair (model -> reference, neighbours in the order), the sampled KL of the
   model from its reference on the model's own samples, sum_t log p_model - log p_reference
   (two models in memory at a time);
3. every judge scores every model's responses.

Summaries with their uncertainty (``mean_with_ci``, ``win_rate_summary``) are what reports show.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from preftune.data.records import Messages
from preftune.evaluation.stats import bootstrap_mean_ci, mean_and_se, sequence_kl, win_rate
from preftune.models.generation import Samples, SamplingOptions, response_logprobs, sample_responses
from preftune.models.loading import load_causal_lm, same_vocabulary
from preftune.progress import console, progress_bar
from preftune.scoring import Scorer


@dataclass
class Answers:
    """What the engine measured: per model its samples and KL, per judge and model the scores."""

    samples: dict[str, Samples]
    kl: dict[str, list[float]] = field(default_factory=dict)  # model -> KL(model || reference) per prompt
    kl_notes: dict[str, str] = field(default_factory=dict)  # model -> why its KL was not measured
    scores: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # judge -> model -> per prompt


def kl_per_sequence(reference, samples: Samples, temperature: float) -> list[float]:
    """Sampled KL(model || reference) of each of the model's responses (sampled with log-probs)."""
    kls = []
    for gen in samples.batches:
        logp_reference = response_logprobs(reference, gen, temperature)
        kls += sequence_kl(gen.logprobs, logp_reference, gen.response_mask).tolist()
    return kls


def sample_models(models: dict[str, str], prompts: Sequence[Messages], options: SamplingOptions, *, seed: int,
                  device: str | None, dtype: str | None, kl_to: dict[str, str] | None = None,
                  quiet: bool = False) -> Answers:
    """Steps 1 and 2 of the recipe: ``models`` maps a name to a model path, in sampling order."""
    kl_to = kl_to or {}
    names = list(models)
    for name, reference in kl_to.items():
        if abs(names.index(name) - names.index(reference)) != 1:
            raise ValueError(f"KL({name} || {reference}): a model and its reference must be neighbours in the order")
    answers = Answers(samples={})
    previous = None  # (name, model, tokenizer): kept for a KL with the next model
    for name in names:
        model, tokenizer = load_causal_lm(models[name], device=device, dtype=dtype)
        if previous is not None and kl_to.get(previous[0]) == name:  # KL(previous || this), on previous' samples
            _measure_kl(answers, previous[0], previous[2], model, tokenizer, options.temperature, name)
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
        answers.samples[name] = sample_responses(model, tokenizer, prompts, options, generator=generator,
                                                 description=f"sampling {name}", quiet=quiet,
                                                 logprobs=name in kl_to)
        if previous is not None and kl_to.get(name) == previous[0]:  # KL(this || previous), on this one's samples
            _measure_kl(answers, name, tokenizer, previous[1], previous[2], options.temperature, previous[0])
        previous = (name, model, tokenizer)
    return answers


def _measure_kl(answers: Answers, name: str, tokenizer, reference, reference_tokenizer, temperature: float,
                reference_name: str) -> None:
    if not same_vocabulary(tokenizer, reference_tokenizer):
        note = f"{name} and {reference_name} have different tokenizers: KL({name} || {reference_name}) is not measured"
        answers.kl_notes[name] = note
        console.print(f"[yellow]{note}")
        return
    answers.kl[name] = kl_per_sequence(reference, answers.samples[name], temperature)


def score_all(scorer: Scorer, prompts: Sequence[Messages], responses: Sequence[str], batch_size: int,
              description: str = "scoring", quiet: bool = False) -> list[float]:
    """A scorer's scores of every response, ``batch_size`` at a time (a progress bar)."""
    out: list[float] = []
    with progress_bar(len(responses), description, disable=quiet) as bar:
        for i in range(0, len(responses), batch_size):
            out += scorer(prompts[i:i + batch_size], responses[i:i + batch_size]).tolist()
            bar.advance(len(responses[i:i + batch_size]))
    return out


def score_models(answers: Answers, judges: dict[str, Scorer], prompts: Sequence[Messages], batch_size: int,
                 quiet: bool = False) -> None:
    """Step 3: every judge scores every model's responses (into ``answers.scores``)."""
    for judge, scorer in judges.items():
        answers.scores[judge] = {name: score_all(scorer, prompts, samples.texts, batch_size,
                                                 f"scoring {name}: {judge}", quiet)
                                 for name, samples in answers.samples.items()}


# ---------------------------------------------------------------- summaries


def mean_with_ci(values: Sequence[float], *, seed: int, resamples: int) -> dict:
    """``{"mean", "ci"}``: the mean and its percentile-bootstrap 95 % interval."""
    return {"mean": mean_and_se(values)[0], "ci": list(bootstrap_mean_ci(values, seed=seed, resamples=resamples))}


def win_rate_summary(outcomes: Sequence[float]) -> dict:
    """The win rate of outcomes (1 win, 0.5 tie, 0 loss: ``pairwise_outcomes`` of paired scores,
    or people's judgements) with its Wilson interval."""
    wr = win_rate(outcomes)
    return {"rate": wr.rate, "ci": list(wr.ci), "wins": wr.wins, "ties": wr.ties, "losses": wr.losses}


def kl_summary(values: list[float] | None) -> dict | None:
    """``{"mean", "se"}`` of per-prompt KL values (None when not measured)."""
    if not values:
        return None
    mean, se = mean_and_se(values)
    return {"mean": mean, "se": se}
