"""Prompts in, episodes out: sampling, scoring, reference log-probabilities and values.

An episode is one prompt (left-padded ids) and one sampled response (right-padded ids). The
sequence the models see is ``[prompt | response]``; the logits at column ``P - 1 + t`` predict
response token ``t``, so every forward pass selects exactly those columns (``response_columns``)
and never projects prompt or padding positions onto the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from preftune.data.batching import epoch_order
from preftune.data.chat import encode_prompt
from preftune.data.jsonl import read_jsonl
from preftune.data.records import Messages
from preftune.errors import DataError, PreftuneError
from preftune.models.logits import head_logits, selected_hidden, token_logprobs
from preftune.rl.core import entropy_from_logits


@dataclass
class Prompt:
    messages: Messages
    ids: list[int]
    where: str  # "file:line", for messages about this prompt


def load_prompts(path: str, tokenizer, max_prompt_tokens: int, truncate: bool, skip_invalid: bool,
                 notes: list[str]) -> list[Prompt]:
    """Read and tokenise a prompts JSONL file. An over-long prompt is an error naming its line,
    or is cut from the left (``truncate``) or skipped and reported (``skip_invalid``)."""
    read = read_jsonl(path, "prompts", skip_invalid=skip_invalid)
    if read.skipped:
        notes.append(read.summary())
    prompts, too_long = [], []
    for record in read.records:
        ids = encode_prompt(tokenizer, record.messages)
        if len(ids) > max_prompt_tokens:
            if truncate:
                ids = ids[-max_prompt_tokens:]
            elif skip_invalid:
                too_long.append(str(record.source))
                continue
            else:
                raise DataError(record.source.path, record.source.line,
                                f"prompt is {len(ids)} tokens, over the {max_prompt_tokens} left by --max-length "
                                f"minus --response-length (use --truncate to keep its end)")
        prompts.append(Prompt(record.messages, ids, str(record.source)))
    if too_long:
        notes.append(f"{path}: skipped {len(too_long)} over-long prompts, first at {too_long[0]}")
    if not prompts:
        raise PreftuneError(f"{path}: no prompts left")
    return prompts


def prompt_indices(step: int, batch_size: int, n: int, seed: int, rank: int = 0, world: int = 1) -> list[int]:
    """Which prompts (indices into the list) rank ``rank`` of ``world`` uses at rollout ``step``.

    The prompts form one endless stream of reshuffled epochs (the order of epoch e is fixed by
    (seed, e)), so the data position is just the step number, a resumed run continues exactly where
    the interrupted one stopped, and ranks take disjoint consecutive slices of each step's prompts."""
    first = (step * world + rank) * batch_size
    orders: dict[int, list[int]] = {}
    picked = []
    for k in range(first, first + batch_size):
        epoch, pos = divmod(k, n)
        if epoch not in orders:
            orders[epoch] = epoch_order(n, seed, epoch)
        picked.append(orders[epoch][pos])
    return picked


@dataclass
class Rollout:
    """A batch of episodes; [B, ...] tensors on the training device."""

    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor  # [B, P]
    response_ids: torch.Tensor  # [B, T] right-padded
    response_mask: torch.Tensor  # [B, T] float, 1 on response tokens (EOS included)
    logprobs: torch.Tensor  # [B, T] log pi_old(token) under logits / temperature
    values: torch.Tensor | None = None  # [B, T] V_old(state before token t)
    ref_logprobs: torch.Tensor | None = None  # [B, T]
    advantages: torch.Tensor | None = None  # [B, T]
    returns: torch.Tensor | None = None  # [B, T]
    sampler_logprobs: torch.Tensor | None = None  # [B, T] what the sampler reported for ``logprobs``

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    def subset(self, index: torch.Tensor) -> "Rollout":
        """Rows ``index``, with columns that are padding in every chosen row trimmed away."""
        picked = {f.name: getattr(self, f.name)[index] if getattr(self, f.name) is not None else None
                  for f in fields(self)}
        start = int((picked["prompt_mask"].sum(0) == 0).long().cumprod(0).sum())  # leading pad columns
        end = max(1, int(picked["response_mask"].sum(1).max()))
        for name, value in picked.items():
            if value is None:
                continue
            picked[name] = value[:, start:] if name.startswith("prompt") else value[:, :end]
        return Rollout(**picked)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask and position_ids of ``[prompt | response]`` (positions count
        real tokens only, as during generation) and ``select``: the columns predicting response tokens."""
        input_ids = torch.cat([self.prompt_ids, self.response_ids], 1)
        attention_mask = torch.cat([self.prompt_mask, self.response_mask.to(self.prompt_mask.dtype)], 1)
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                "select": response_columns(self.prompt_ids.shape[1], self.response_mask)}


def response_columns(prompt_width: int, response_mask: torch.Tensor) -> torch.Tensor:
    """[B, P + T] bool: the columns whose logits predict a real response token."""
    B, T = response_mask.shape
    select = torch.zeros(B, prompt_width + T, dtype=torch.bool, device=response_mask.device)
    select[:, prompt_width - 1:prompt_width - 1 + T] = response_mask.bool()
    return select


def unflatten(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Put values of the masked positions (row-major, as boolean indexing yields them) back in [B, T]."""
    out = torch.zeros(mask.shape, dtype=flat.dtype, device=flat.device)
    out[mask.bool()] = flat
    return out


@dataclass
class PolicyOutputs:
    logprobs: torch.Tensor  # [B, T]
    entropy: torch.Tensor  # [B, T]
    values: torch.Tensor | None  # [B, T], from a value head on the same trunk


def policy_forward(policy, episodes: Rollout, temperature: float, value_head=None,
                   with_entropy: bool = True) -> PolicyOutputs:
    """One trunk pass over the episodes; the LM head (and the value head) only at response columns."""
    inputs = episodes.model_inputs()
    select = inputs.pop("select")
    hidden = selected_hidden(policy, inputs["input_ids"], inputs["attention_mask"], select, inputs["position_ids"])
    logits = head_logits(policy, hidden, temperature)  # [N, V], already divided by the temperature
    tokens = episodes.response_ids[episodes.response_mask.bool()]
    mask = episodes.response_mask
    logprobs = unflatten(token_logprobs(logits, tokens), mask)
    entropy = unflatten(entropy_from_logits(logits.detach()), mask) if with_entropy else None
    values = unflatten(value_head(hidden), mask) if value_head is not None else None
    return PolicyOutputs(logprobs, entropy, values)


def value_forward(value_model, episodes: Rollout) -> torch.Tensor:
    """[B, T] values from a separate value model."""
    inputs = episodes.model_inputs()
    return unflatten(value_model(**inputs), episodes.response_mask)
