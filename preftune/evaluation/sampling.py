"""Sampling many prompts in batches, and scoring sampled responses under another model.

Both wrap the shared pieces (``preftune.models.generation.generate`` and
``preftune.models.logits.selected_logits``); evaluation, best-of-n and the probes all sample
through ``sample_responses``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from preftune.data.chat import encode_prompt
from preftune.data.records import Messages
from preftune.models.generation import Generation, generate
from preftune.models.logits import selected_logits
from preftune.progress import progress_bar


@dataclass
class SamplingOptions:
    max_new_tokens: int = 64
    temperature: float = 0.7
    top_p: float = 1.0
    batch_size: int = 16


@dataclass
class Samples:
    """Responses to a list of prompts, with token-level detail kept per batch for KL estimates."""

    texts: list[str]
    lengths: list[int]  # response tokens, EOS included
    ended: list[bool]
    batches: list[Generation]


def sample_responses(model, tokenizer, prompts: Sequence[Messages], options: SamplingOptions, *,
                     generator: torch.Generator | None = None, description: str = "sampling",
                     quiet: bool = False, logprobs: bool = False) -> Samples:
    """One response per prompt, sampled in batches of ``options.batch_size`` (a progress bar)."""
    encoded = [encode_prompt(tokenizer, m) for m in prompts]
    texts, lengths, ended, batches = [], [], [], []
    with progress_bar(len(encoded), description, disable=quiet) as bar:
        for i in range(0, len(encoded), options.batch_size):
            chunk = encoded[i:i + options.batch_size]
            gen = generate(model, tokenizer, chunk, max_new_tokens=options.max_new_tokens,
                           temperature=options.temperature, top_p=options.top_p, generator=generator,
                           return_logprobs=logprobs)
            texts += gen.texts
            lengths += gen.response_lengths.tolist()
            ended += gen.ended.tolist()
            batches.append(gen)
            bar.advance(len(chunk))
    return Samples(texts, lengths, ended, batches)


@torch.no_grad()
def response_logprobs(model, gen: Generation, temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities [B, T] of ``gen``'s response tokens under ``model`` (logits / temperature,
    as at sampling time), 0 on padding. ``model`` must share the sampling model's tokenizer."""
    device = next(model.parameters()).device
    ids = torch.cat([gen.prompt_ids, gen.response_ids.to(gen.prompt_ids.device)], 1).to(device)
    mask = torch.cat([gen.prompt_mask, gen.response_mask.to(gen.prompt_mask.device)], 1).to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    P = gen.prompt_ids.shape[1]
    response_mask = gen.response_mask.to(device).bool()
    # Logits at column P - 1 + t predict response token t.
    select = torch.zeros_like(mask, dtype=torch.bool)
    select[:, P - 1:P - 1 + response_mask.shape[1]] = response_mask
    logits = selected_logits(model, ids, mask, select, positions).float()
    if temperature > 0:
        logits = logits / temperature
    targets = gen.response_ids.to(device)[response_mask]
    token_lp = torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1)
    out = torch.zeros(response_mask.shape, dtype=torch.float32, device=device)
    out[response_mask] = token_lp
    return out.cpu()


def same_vocabulary(tokenizer_a, tokenizer_b) -> bool:
    """Whether token ids mean the same in both tokenizers (needed for a token-level KL)."""
    return tokenizer_a.get_vocab() == tokenizer_b.get_vocab()
