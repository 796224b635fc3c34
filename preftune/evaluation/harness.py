"""The evaluation harness: several models answer the same prompts, scorers judge every answer.

``preftune eval`` runs it on model A and baseline B; the main job on the base, SFT and tuned
models. The recipe:

1. each model, in order, samples one response per prompt with the chosen engine
   (``models.engines``), from its own generator seeded with ``seed`` (the same random numbers for
   every model, so differences come from the models);
2. for each ``kl_to`` pair (model -> reference), the sampled KL of the model from its reference on
   the model's own samples, sum_t log p_model - log p_reference, both from full forward passes (a
   model is kept in memory only until its KLs are measured);
3. every judge scores every model's responses.

Summaries with their uncertainty (``mean_with_ci``, ``win_rate_summary``) are what reports show.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from preftune.data.records import Messages
from preftune.evaluation.stats import bootstrap_mean_ci, mean_and_se, sequence_kl, win_rate
from preftune.models.engines import open_engine
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
    # judge -> model -> per prompt: an ensemble judge's disagreement (the members' standard deviation)
    uncertainty: dict[str, dict[str, list[float]]] = field(default_factory=dict)


def kl_per_sequence(model, reference, samples: Samples, temperature: float) -> list[float]:
    """Sampled KL(model || reference) of each of the model's responses: both log-probabilities from
    full forward passes (the same computation on both sides, whatever engine sampled)."""
    kls = []
    for gen in samples.batches:
        kls += sequence_kl(response_logprobs(model, gen, temperature), response_logprobs(reference, gen, temperature),
                           gen.response_mask).tolist()
    return kls


def sample_models(models: dict[str, str], prompts: Sequence[Messages], options: SamplingOptions, *, seed: int,
                  device: str | None, dtype: str | None, engine: str = "auto", kl_to: dict[str, str] | None = None,
                  quiet: bool = False) -> Answers:
    """Steps 1 and 2 of the recipe: ``models`` maps a name to a model path, in sampling order;
    ``kl_to`` maps a model to its reference. A model stays in memory only until every KL it takes
    part in is measured (a reference sampled first, then the models measured against it: two at a
    time)."""
    kl_to = kl_to or {}
    for name, reference in kl_to.items():
        if name not in models or reference not in models:
            raise ValueError(f"KL({name} || {reference}): both must be among the models")
    answers = Answers(samples={})
    loaded: dict[str, tuple] = {}  # name -> (transformers model, tokenizer) while a KL still needs it
    measured: set[str] = set()
    for name in models:
        sampler = open_engine(engine, models[name], device=device, dtype=dtype, seed=seed, quiet=quiet)
        generator = torch.Generator().manual_seed(seed)  # the same random numbers for every model
        answers.samples[name] = sample_responses(sampler, prompts, options, generator=generator,
                                                 description=f"sampling {name}", quiet=quiet)
        tokenizer, model = sampler.tokenizer, getattr(sampler, "model", None)
        in_kl = name in kl_to or name in kl_to.values()
        if model is None and in_kl:  # a vLLM engine: log-probabilities come from the transformers model
            model, _ = load_causal_lm(models[name], device=device, dtype=dtype)
        sampler.close()
        if in_kl:
            loaded[name] = (model, tokenizer)
        for a, b in kl_to.items():
            if a not in measured and a in loaded and b in loaded:  # KL(a || b), on a's samples
                _measure_kl(answers, a, *loaded[a], b, *loaded[b], options.temperature)
                measured.add(a)
        for held in list(loaded):  # free what no KL needs any more
            if all(a in measured for a, b in kl_to.items() if held in (a, b)):
                del loaded[held]
    return answers


def _measure_kl(answers: Answers, name: str, model, tokenizer, reference_name: str, reference, reference_tokenizer,
                temperature: float) -> None:
    if not same_vocabulary(tokenizer, reference_tokenizer):
        note = f"{name} and {reference_name} have different tokenizers: KL({name} || {reference_name}) is not measured"
        answers.kl_notes[name] = note
        console.print(f"[yellow]{note}")
        return
    answers.kl[name] = kl_per_sequence(model, reference, answers.samples[name], temperature)


def score_all(scorer: Scorer, prompts: Sequence[Messages], responses: Sequence[str], batch_size: int,
              description: str = "scoring", quiet: bool = False,
              uncertainty: list[float] | None = None) -> list[float]:
    """A scorer's scores of every response, ``batch_size`` at a time (a progress bar); an
    ensemble's per-response disagreement is appended to ``uncertainty`` when one is given."""
    out: list[float] = []
    with progress_bar(len(responses), description, disable=quiet) as bar:
        for i in range(0, len(responses), batch_size):
            out += scorer(prompts[i:i + batch_size], responses[i:i + batch_size]).tolist()
            spread = getattr(scorer, "last_uncertainty", None)
            if uncertainty is not None and spread is not None:
                uncertainty += spread.tolist()
            bar.advance(len(responses[i:i + batch_size]))
    return out


def score_models(answers: Answers, judges: dict[str, Scorer], prompts: Sequence[Messages], batch_size: int,
                 quiet: bool = False) -> None:
    """Step 3: every judge scores every model's responses (into ``answers.scores``)."""
    for judge, scorer in judges.items():
        answers.scores[judge], spreads = {}, {}
        for name, samples in answers.samples.items():
            spreads[name] = []
            answers.scores[judge][name] = score_all(scorer, prompts, samples.texts, batch_size,
                                                    f"scoring {name}: {judge}", quiet, spreads[name])
        if all(spreads.values()):
            answers.uncertainty[judge] = spreads


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
