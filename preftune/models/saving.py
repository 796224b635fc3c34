"""Writing models out as plain Hugging Face directories (safetensors), whatever trained them:
LoRA adapters merged (or kept), FSDP shards gathered."""

from __future__ import annotations

import copy
from pathlib import Path

import torch


def full_state_options(strict: bool = True):
    """Options for torch.distributed.checkpoint: whole (unsharded) tensors, gathered to rank 0's CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, strict=strict)


def save_final_model(model, tokenizer, out: Path, keep_adapter: bool = False, sharded: bool = False,
                     is_main: bool = True) -> None:
    """Write the final model at the top level of ``out`` as a plain Hugging Face directory.

    LoRA adapters are merged (in fp32, and saved so) unless ``keep_adapter``; either way
    ``AutoModelFor...from_pretrained(out)`` loads it without preftune. With ``sharded`` (FSDP)
    every rank must call this: the full weights are gathered to rank 0, which writes them."""
    out = Path(out)
    if sharded:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        full = get_model_state_dict(model, options=full_state_options())
        if not is_main:
            return
        model = _unsharded_copy(model, full)
    elif not is_main:
        return
    is_peft = hasattr(model, "peft_config")
    if is_peft and not keep_adapter:
        # Merged in fp32: a LoRA update is small next to its weights, and adding it to bf16 weights
        # would round much of it away.
        model = model.to(torch.float32).merge_and_unload()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def save_model_copy(model, tokenizer, out: Path, keep_adapter: bool = False, sharded: bool = False,
                    is_main: bool = True) -> None:
    """``save_final_model`` that leaves ``model`` as it is (merging LoRA changes the model it is
    called on), for snapshots taken during training."""
    if sharded:  # gathered into a plain copy already
        save_final_model(model, tokenizer, out, keep_adapter, sharded=True, is_main=is_main)
    elif is_main:
        save_final_model(copy.deepcopy(model), tokenizer, out, keep_adapter)


def _unsharded_copy(model, full_state: dict[str, torch.Tensor]):
    """A plain CPU copy of an FSDP-sharded model (built from its config), holding ``full_state``."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    auto = AutoModelForSequenceClassification if "SequenceClassification" in type(inner).__name__ else AutoModelForCausalLM
    with torch.device("cpu"):
        plain = auto.from_config(copy.deepcopy(inner.config), dtype=next(iter(full_state.values())).dtype)
    if hasattr(model, "peft_config"):
        from peft import get_peft_model

        plain = get_peft_model(plain, model.peft_config["default"])
    plain.load_state_dict(full_state, strict=False)
    return plain
