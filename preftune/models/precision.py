"""Numeric precision: what ``--dtype`` means, and where bf16 is fast.

``--dtype auto`` is bf16 where the hardware computes in bf16 (GPUs that support it, CPUs with
avx512_bf16 or AMX, read from the CPU's flags), fp32 elsewhere. What bf16 means depends on the stage:

* **training** (SFT, reward, DPO, PPO) is mixed precision: trained weights and the optimiser state
  stay fp32, forward passes run under ``torch.autocast`` in bf16, and weights that never train (the
  base model under LoRA, a frozen reference) are stored in bf16;
* **inference** (sampling, evaluation, probes, scoring with a reward model) stores the weights in
  bf16.

Either way the quantities RLHF is fragile about stay fp32: log-probabilities
(``models.logits.token_logprobs``, so the PPO ratio and the KL), losses, the reward model's and the
value function's scalar heads, and everything computed from them (advantages, returns,
normalisation). fp16 has no loss scaling here, so it is for inference only.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from preftune.errors import PreftuneError

NAMES = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU computes in bf16 in hardware: an ``avx512_bf16`` or ``amx_bf16`` flag in
    ``cpuinfo`` (default: ``/proc/cpuinfo``; none where that file does not exist)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text(errors="replace") if path.exists() else ""
    flags = {flag for line in cpuinfo.splitlines() if line.startswith("flags") for flag in line.split()}
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def resolve_precision(dtype: str | torch.dtype | None, device: torch.device) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for a ``--dtype`` value on ``device`` (see the module docstring)."""
    if isinstance(dtype, torch.dtype):
        return {v: k for k, v in DTYPES.items()}[dtype]
    if dtype in (None, "", "auto"):
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if device.type == "cpu" and cpu_has_bf16() else "fp32"
    if dtype not in NAMES:
        raise PreftuneError(f"unknown dtype {dtype!r} (use auto, fp32, bf16 or fp16)")
    return NAMES[dtype]


def autocast(device: torch.device, precision: str):
    """The mixed-precision context of a training stage's forward passes (a no-op in fp32)."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def full_precision(device: torch.device):
    """A block that runs in fp32 even inside ``autocast`` (its inputs must be fp32)."""
    return torch.autocast(device.type, enabled=False)


def fit_attention(model, device: torch.device, precision: str) -> None:
    """Attention as plain matrix products ("eager": bf16 matmuls, fp32 softmax) where a CPU computes
    in bf16. Measured on SmolLM2-135M with LoRA, 8 x 90 tokens: torch's bf16 flash-attention
    backward took 2.7x fp32's time, and eager attention made the bf16 training step 16 % faster
    than SDPA (the sequences preftune trains on are short); sampling is as fast either way. GPUs
    and fp32 keep the model's default (SDPA)."""
    if device.type == "cpu" and precision != "fp32" and hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation("eager")
        except (ValueError, AttributeError, NotImplementedError):  # an architecture without the choice
            pass


def describe(precision: str, training: bool) -> str:
    """One line for the log: what runs in which precision."""
    if precision == "fp32":
        return "precision: fp32"
    if training:
        return f"precision: {precision} mixed (fp32 weights and optimiser state, {precision} compute)"
    return f"precision: {precision} (weights and compute)"
