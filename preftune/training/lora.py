"""LoRA adapters (peft) for any trainer: only the adapters (and a score head) train."""

from __future__ import annotations


def apply_lora(model, r: int, alpha: int, dropout: float, targets: list[str], task_type: str = "CAUSAL_LM"):
    """Wrap ``model`` with LoRA adapters on ``targets`` (``["all-linear"]``: every linear layer)."""
    from peft import LoraConfig, get_peft_model

    target = "all-linear" if targets == ["all-linear"] else targets
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target, task_type=task_type)
    return get_peft_model(model, config)
