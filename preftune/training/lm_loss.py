"""The language-modelling loss on response tokens only: SFT's objective and PPO-ptx's extra term."""

from __future__ import annotations

import torch

from preftune.models.logits import response_token_mask, token_logprobs


def response_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy (fp32) of the selected response positions (normalised by the caller
    over the whole optimiser step, so gradient accumulation gives the same gradient as one big
    batch)."""
    return -token_logprobs(logits, targets).sum()


def lm_loss_sum(net, batch: dict, device) -> tuple[torch.Tensor, int]:
    """Summed response-token loss of one collated batch (``preftune.data.batching.collate``) through
    ``net`` (a ``ResponseLogits`` or its DDP/FSDP wrapper), and its number of target tokens."""
    labels = batch["labels"].to(device)
    select = response_token_mask(labels)
    targets = labels[:, 1:][select[:, :-1]]
    mask, positions = batch["attention_mask"], batch.get("position_ids")
    logits = net(batch["input_ids"].to(device), None if mask is None else mask.to(device), select,
                 None if positions is None else positions.to(device))
    return response_loss_sum(logits, targets), int(targets.numel())
