"""Batched sampling with a KV cache, left padding and early stop.

One loop (``generate``), used by ``preftune sample``, PPO rollouts, best-of-n, evaluation and the
probes (those sample many prompts through ``sample_responses``, which drives it in batches):

* prompts are left-padded so every sequence's next token sits in the last column;
* the first forward pass runs over the prompts and keeps only the last position's logits
  (``logits_to_keep=1``: no vocabulary projection for prompt tokens), later passes feed one token
  each against the cache;
* a sequence ends at an EOS token or when its text contains a stop string; the loop stops as soon
  as every sequence has ended, and the result is trimmed to the longest response;
* optionally the log-probability of each sampled token under ``logits / temperature`` (what the
  sampler believed; PPO recomputes its old log-probabilities with the trainer's own forward and
  reports the gap).

Random numbers: by default one ``torch.Generator`` serves the whole batch, so a row's sample
depends on the rows sampled with it. With ``row_seeds`` each row draws from its own stream instead
(one uniform number per new token, turned into a token by the inverse of the cumulative
distribution), so a prompt gets the same response whichever batch, or process, it is sampled in:
what PPO under data parallelism needs to match a single process.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from preftune.data.chat import encode_prompt
from preftune.data.records import Messages
from preftune.models.logits import selected_logits, token_logprobs
from preftune.progress import progress_bar


@dataclass
class Generation:
    prompt_ids: torch.Tensor  # [B, P] left-padded with pad_token_id
    prompt_mask: torch.Tensor  # [B, P] 1 on real prompt tokens
    response_ids: torch.Tensor  # [B, T] right-padded with pad_token_id
    response_mask: torch.Tensor  # [B, T] 1 on generated tokens (EOS included)
    ended: torch.Tensor  # [B] bool: reached EOS or a stop string within the limit
    texts: list[str]  # decoded responses, special tokens removed, cut before a stop string
    logprobs: torch.Tensor | None = None  # [B, T] log pi(token) under logits / temperature, 0 on padding

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(1)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into (ids, mask)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if len(seq):
            ids[i, width - len(seq):] = torch.tensor(list(seq), dtype=torch.long)
            mask[i, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


def row_seed(*parts: int | str) -> int:
    """A 63-bit seed mixed from the given parts (e.g. run seed, step, prompt position): nearby tuples
    give unrelated streams."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def row_uniforms(seeds: Sequence[int], n: int) -> torch.Tensor:
    """[B, n] float64 uniform numbers in [0, 1): row i from a CPU generator seeded with ``seeds[i]``
    (the same numbers on any device, in any batch)."""
    return torch.stack([torch.rand(n, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64)
                        for s in seeds])


def inverse_cdf_sample(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs`` [B, V] (non-negative, not necessarily normalised): the first
    index whose cumulative mass exceeds ``u * total`` for the row's ``u`` in [0, 1). A token of
    probability 0 is never chosen."""
    cdf = probs.double().cumsum(-1)
    target = uniforms.to(cdf.device, torch.float64) * cdf[:, -1]
    token = torch.searchsorted(cdf, target[:, None], right=True).squeeze(-1)
    return token.clamp(max=probs.shape[-1] - 1)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
                generator: torch.Generator | None, uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """Sample one token per row from ``logits`` [B, V] (greedy when temperature == 0) by inverting
    the cumulative distribution at one uniform number per row: ``uniforms`` [B], or drawn from
    ``generator`` (shared by the rows). Cheaper than ``torch.multinomial``, which draws a random
    number per vocabulary entry (12 % of SmolLM2's sampling time at batch 32)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits.float(), dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    if uniforms is None:  # one uniform per row; torch.multinomial draws one exponential per logit
        device = generator.device if generator is not None else probs.device  # a CPU stream may drive CUDA sampling
        uniforms = torch.rand(probs.shape[0], generator=generator, device=device, dtype=torch.float64).to(probs.device)
    return inverse_cdf_sample(probs, uniforms)


def _cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stop if s and s in text]
    if not cuts:
        return text, False
    return text[:min(cuts)], True


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, stop: Sequence[str] = (),
             min_new_tokens: int = 0, generator: torch.Generator | None = None,
             row_seeds: Sequence[int] | None = None, all_done: Callable[[bool], bool] | None = None,
             return_logprobs: bool = False) -> Generation:
    """Sample a response for each tokenised prompt (see module docstring).

    ``row_seeds`` (one per prompt) replaces ``generator``: each row samples from its own stream.
    ``all_done`` turns "every row of this batch has ended" into the decision to stop; under FSDP,
    where every forward pass is a collective, it waits for the other ranks' batches too."""
    device = next(model.parameters()).device
    if row_seeds is not None and len(row_seeds) != len(prompts):
        raise ValueError(f"{len(row_seeds)} row seeds for {len(prompts)} prompts")
    uniforms = row_uniforms(row_seeds, max_new_tokens).to(device) if row_seeds is not None else None
    pad_id = tokenizer.pad_token_id
    eos_ids = torch.tensor(stop_token_ids(model, tokenizer), device=device)
    prompt_ids, prompt_mask = left_pad(prompts, pad_id, device)
    batch = prompt_ids.shape[0]
    attention = prompt_mask.clone()
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    cache_kw = _cache_keyword(model)
    out = model(input_ids=prompt_ids, attention_mask=attention, position_ids=positions,
                use_cache=True, logits_to_keep=1)
    cache, logits = _returned_cache(out), out.logits[:, -1, :]
    next_pos = positions[:, -1:] + 1

    tokens, logps = [], []
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    ended = torch.zeros(batch, dtype=torch.bool, device=device)
    alive_mask = []
    for step in range(max_new_tokens):
        logits = logits.float()
        if step < min_new_tokens:
            logits[:, eos_ids] = float("-inf")
        token = sample_next(logits, temperature, top_p, top_k, generator,
                            uniforms[:, step] if uniforms is not None else None)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        if return_logprobs:
            logps.append(token_logprobs(logits, token, temperature).masked_fill(done, 0.0))
        alive_mask.append((~done).long())
        tokens.append(token)
        hit_eos = torch.isin(token, eos_ids) & ~done
        ended |= hit_eos
        done |= hit_eos
        if stop:
            for i in (~done).nonzero().flatten().tolist():
                text = tokenizer.decode(torch.stack(tokens, 1)[i], skip_special_tokens=True)
                if _cut_at_stop(text, stop)[1]:
                    done[i] = True
                    ended[i] = True
        finished = bool(done.all())
        if step == max_new_tokens - 1 or (all_done(finished) if all_done is not None else finished):
            break
        # Finished rows keep feeding pad tokens; their outputs are discarded, so attending is harmless.
        attention = torch.cat([attention, attention.new_ones(batch, 1)], dim=1)
        out = model(input_ids=token[:, None], attention_mask=attention, position_ids=next_pos,
                    use_cache=True, **{cache_kw: cache})
        cache, logits = _returned_cache(out), out.logits[:, -1, :]
        next_pos = next_pos + 1

    response_mask = torch.stack(alive_mask, 1)
    # Columns past the longest response exist only when other ranks' rows went on (all_done).
    width = max(1, int(response_mask.sum(1).max()))
    response_mask, tokens, logps = response_mask[:, :width], tokens[:width], logps[:width]
    response_ids = torch.stack(tokens, 1)
    texts = []
    for i in range(batch):
        text = tokenizer.decode(response_ids[i][response_mask[i].bool()], skip_special_tokens=True)
        texts.append(_cut_at_stop(text, stop)[0].strip() if stop else text.strip())
    return Generation(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
                      response_mask=response_mask, ended=ended.cpu(), texts=texts,
                      logprobs=torch.stack(logps, 1) if return_logprobs else None)


def _cache_keyword(model) -> str:
    """transformers 5.x renamed ``past_key_values`` to ``cache``; accept both."""
    forward = getattr(model, "get_base_model", lambda: model)().forward
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _returned_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def stop_token_ids(model, tokenizer) -> list[int]:
    """The ids a response ends at: the tokenizer's EOS and those the model's generation config
    declares (some models list several, e.g. Llama 3's <|eot_id|>), but never the pad id."""
    config = getattr(model, "generation_config", None)
    ids = getattr(config, "eos_token_id", None) if config is not None else None
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return sorted({tokenizer.eos_token_id} | {i for i in ids if i != tokenizer.pad_token_id})


# ---------------------------------------------------------------- many prompts


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


def sample_responses(engine, prompts: Sequence[Messages], options: SamplingOptions, *,
                     generator: torch.Generator | None = None, description: str = "sampling",
                     quiet: bool = False, logprobs: bool = False) -> Samples:
    """One response per prompt from ``engine`` (``models.engines``), in batches of
    ``options.batch_size`` (a progress bar)."""
    encoded = [encode_prompt(engine.tokenizer, m) for m in prompts]
    texts, lengths, ended, batches = [], [], [], []
    with progress_bar(len(encoded), description, disable=quiet) as bar:
        for i in range(0, len(encoded), options.batch_size):
            chunk = encoded[i:i + options.batch_size]
            gen = engine.generate(chunk, max_new_tokens=options.max_new_tokens, temperature=options.temperature,
                                  top_p=options.top_p, generator=generator, return_logprobs=logprobs)
            texts += gen.texts
            lengths += gen.response_lengths.tolist()
            ended += gen.ended.tolist()
            batches.append(gen)
            bar.advance(len(chunk))
    return Samples(texts, lengths, ended, batches)


@torch.no_grad()
def response_logprobs(model, gen: Generation, temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities [B, T] of ``gen``'s response tokens under ``model`` (logits / temperature,
    as at sampling time), 0 on padding. ``model`` must share the sampling model's vocabulary."""
    device = next(model.parameters()).device
    ids = torch.cat([gen.prompt_ids, gen.response_ids.to(gen.prompt_ids.device)], 1).to(device)
    mask = torch.cat([gen.prompt_mask, gen.response_mask.to(gen.prompt_mask.device)], 1).to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    P = gen.prompt_ids.shape[1]
    response_mask = gen.response_mask.to(device).bool()
    # Logits at column P - 1 + t predict response token t.
    select = torch.zeros_like(mask, dtype=torch.bool)
    select[:, P - 1:P - 1 + response_mask.shape[1]] = response_mask
    logits = selected_logits(model, ids, mask, select, positions)
    targets = gen.response_ids.to(device)[response_mask]
    out = torch.zeros(response_mask.shape, dtype=torch.float32, device=device)
    out[response_mask] = token_logprobs(logits, targets, temperature)
    return out.cpu()
