"""Logits only where they are needed, and the one log-probability function.

The vocabulary projection is the largest matrix product of a small LM (SmolLM2: 576 x 49152 per
token). Training losses need logits at response positions only, so ``selected_logits`` runs the
decoder trunk over the whole sequence and the LM head over the selected positions alone.

``token_logprobs`` is how every stage turns logits into log pi(token): sampling (the rollout's old
log-probabilities), the PPO update, the reference pass, DPO and the evaluation's KL. One function,
so the PPO ratio compares like with like, and always in fp32 (under bf16 autocast too).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(token) under ``softmax(logits / temperature)`` in float32 (``temperature`` 0 or 1:
    the logits as they are). Cross-entropy's fused kernel gives the values of log-softmax and
    gather exactly, and its backward pass is one sweep over the vocabulary instead of three."""
    with torch.autocast(logits.device.type, enabled=False):  # fp32 even inside a bf16 forward
        scaled = logits.float() if temperature in (0, 1) else logits.float() / temperature
        return -F.cross_entropy(scaled, tokens, reduction="none")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """[B] index of the rightmost 1 of each row of a 0/1 mask (left or right padding; 0 for an
    empty row): the last real token, where a causal LM's reward is read and PPO adds the score."""
    positions = torch.arange(mask.shape[-1], device=mask.device)
    return (positions * (mask != 0).long()).argmax(-1)


def unwrap(model):
    """The transformers model inside a peft wrapper (LoRA layers stay active inside it)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def selected_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    select: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The decoder trunk's final hidden states [N, H] at the positions where ``select`` is true
    (what the LM head, or a value head on the same trunk, reads)."""
    inner = unwrap(model)
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    if decoder is None:
        raise TypeError(f"{type(inner).__name__} exposes no decoder trunk (get_decoder)")
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=False).last_hidden_state
    return hidden[select]


def head_logits(model, hidden: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The LM head applied to final hidden states, with the model's logit scaling if any, divided
    by ``temperature``. A bias-free linear head commutes with the division, so it is applied to the
    [N, H] hidden states rather than to the [N, V] logits (and to their gradient)."""
    inner = unwrap(model)
    head = inner.get_output_embeddings()
    soft_cap = getattr(inner.config, "final_logit_softcapping", None)  # e.g. Gemma 2
    early = temperature != 1.0 and not soft_cap and getattr(head, "bias", None) is None
    logits = head(hidden / temperature if early else hidden)
    scale = getattr(inner.config, "logit_scale", None)  # e.g. Cohere; None for Llama
    if isinstance(scale, (int, float)):
        logits = logits * scale
    if soft_cap:
        logits = torch.tanh(logits / soft_cap) * soft_cap
    return logits if early or temperature == 1.0 else logits / temperature


def selected_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    select: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [N, V] at the positions where ``select`` [B, T] is true (in row-major order).

    The logits at position t predict token t + 1, so to score response tokens pass the response
    mask shifted left by one."""
    inner = unwrap(model)
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    if decoder is None or inner.get_output_embeddings() is None:
        # unknown architecture: full forward, then select
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return out.logits[select]
    return head_logits(model, selected_hidden(model, input_ids, attention_mask, select, position_ids))


def response_token_mask(labels: torch.Tensor) -> torch.Tensor:
    """For labels [B, T] with -100 on ignored tokens: the positions whose logits predict a label."""
    select = torch.zeros_like(labels, dtype=torch.bool)
    select[:, :-1] = labels[:, 1:] != -100
    return select


class ResponseLogits(torch.nn.Module):
    """``selected_logits`` as a module, so DistributedDataParallel can wrap it (DDP's gradient
    synchronisation is set up in the wrapped module's ``forward``)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, select, position_ids=None) -> torch.Tensor:
        return selected_logits(self.model, input_ids, attention_mask, select, position_ids)
