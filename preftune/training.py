"""What every trainer shares: schedules, metrics files, checkpoints, LoRA set-up and the output layout.

Output layout of every training stage (``OUT``)::

    OUT/config.json, model.safetensors, tokenizer files   the final model, plain Hugging Face
    OUT/metrics.jsonl                                     one JSON object per logging step
    OUT/metrics.json                                      final summary
    OUT/run_config.json                                   the resolved preftune configuration
    OUT/checkpoints/step-000100/                          resumable training state
    OUT/tensorboard/                                      with --tensorboard
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from preftune.errors import PreftuneError

CHECKPOINTS = "checkpoints"


# ---------------------------------------------------------------- schedule


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimiser step ``step`` (0-based) of ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def plan_steps(n_examples: int, batch: int, epochs: float, max_steps: int) -> tuple[int, int]:
    """(steps per epoch, total optimiser steps) for ``epochs`` passes, capped by ``max_steps`` (0: none)."""
    per_epoch = math.ceil(n_examples / batch)
    total = math.ceil(epochs * per_epoch)
    return per_epoch, min(total, max_steps) if max_steps else total


def make_scheduler(optimizer: torch.optim.Optimizer, total: int, warmup_ratio: float, schedule: str):
    warmup = int(round(total * warmup_ratio))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, schedule))


def make_optimizer(params, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise PreftuneError("no trainable parameters")
    # The fused kernel is the fast path on CPU (about 6x the foreach kernels) and on CUDA.
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused, foreach=not fused)


# ---------------------------------------------------------------- reproducibility


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- metrics


class MetricsLogger:
    """Appends one JSON object per logging step to OUT/metrics.jsonl (and TensorBoard if asked)."""

    def __init__(self, out: Path, tensorboard: bool = False, resume_step: int | None = None):
        self.path = Path(out) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            # Drop lines written after the checkpoint we resume from, so the file has no duplicates.
            kept = [l for l in self.path.read_text().splitlines()
                    if l.strip() and json.loads(l).get("step", 0) <= resume_step]
            self.path.write_text("".join(l + "\n" for l in kept))
        elif resume_step is None:
            self.path.write_text("")
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise PreftuneError("--tensorboard needs the tensorboard package "
                                    "(pip install 'preftune[plots]')") from None
            self.writer = SummaryWriter(str(Path(out) / "tensorboard"))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_plain) + "\n")


# ---------------------------------------------------------------- checkpoints


def checkpoint_dir(out: Path, step: int) -> Path:
    return Path(out) / CHECKPOINTS / f"step-{step:06d}"


def latest_checkpoint(out: Path) -> Path | None:
    root = Path(out) / CHECKPOINTS
    done = sorted(p for p in root.glob("step-*") if (p / "state.pt").exists()) if root.exists() else []
    return done[-1] if done else None


def _full_options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, strict=strict)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) parameters that training changes: all of them, or only the LoRA
    adapters. A collective under FSDP: every rank calls it; rank 0 gets the tensors."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    names = {n for n, p in model.named_parameters() if p.requires_grad}
    full = get_model_state_dict(model, options=_full_options())
    return {k: v.contiguous() for k, v in full.items() if k in names}


def _optimizer_owner(modules: dict[str, torch.nn.Module]) -> torch.nn.Module:
    """One module holding every trained module, so optimiser state is keyed by "name.param"."""
    return torch.nn.ModuleDict(modules)


def save_checkpoint(out: Path, step: int, modules: dict[str, torch.nn.Module], optimizer, scheduler,
                    extra: dict[str, Any], keep: int, is_main: bool = True) -> Path:
    """Write a checkpoint atomically (tmp dir + rename) and keep only the ``keep`` newest.

    Weights and optimiser state are stored unsharded and keyed by parameter name, so a checkpoint
    resumes with any world size, with or without FSDP. Every rank calls this; rank 0 writes."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    weights = {name: trainable_state(module) for name, module in modules.items()}
    optim_state = get_optimizer_state_dict(_optimizer_owner(modules), optimizer, options=_full_options())
    final = checkpoint_dir(out, step)
    if not is_main:
        return final
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, state in weights.items():
        save_file(state, str(tmp / f"{name}.safetensors"))
    torch.save({"step": step, "optimizer": optim_state,
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "rng": rng_state(), **extra}, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    older = sorted((Path(out) / CHECKPOINTS).glob("step-*"))[:-keep]
    for path in older:
        shutil.rmtree(path, ignore_errors=True)
    return final


def load_checkpoint(path: Path, modules: dict[str, torch.nn.Module], optimizer, scheduler) -> dict[str, Any]:
    """Restore weights, optimiser, scheduler and RNG states written by ``save_checkpoint``."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    for name, module in modules.items():
        weights = load_file(str(path / f"{name}.safetensors"))
        missing = set(weights) - {n for n, _ in module.named_parameters()}
        if missing:
            raise PreftuneError(f"{path}: checkpoint does not match the model ({len(missing)} unknown tensors, "
                                f"e.g. {sorted(missing)[0]}); was it written with other options?")
        set_model_state_dict(module, weights, options=_full_options(strict=False))
    state = torch.load(path / "state.pt", weights_only=False)
    set_optimizer_state_dict(_optimizer_owner(modules), optimizer, state["optimizer"], options=_full_options())
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state


def distribute(net: torch.nn.Module, model: torch.nn.Module, info, fsdp: bool) -> torch.nn.Module:
    """Wrap the training module for data parallelism: DDP, or with ``fsdp`` FSDP2 (each transformer
    block of every model inside ``net`` sharded, then ``net`` as the root). A no-op in a single
    process. ``model`` is the main model (its device, and its name in errors)."""
    if not info.enabled:
        return net
    device = next(model.parameters()).device
    if not fsdp:
        return torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    layers = transformer_blocks(net)
    if not layers:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        raise PreftuneError(f"--fsdp: cannot find the decoder layers of {type(inner).__name__}")
    for layer in layers:
        fully_shard(layer)
    fully_shard(net)
    return net


def transformer_blocks(root: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks FSDP shards one by one: the classes Hugging Face models name in
    ``_no_split_modules`` (decoder layers), or for models that name none (BERT) the members of
    their layer lists."""
    names: set[str] = set()
    for m in root.modules():
        names |= set(getattr(m, "_no_split_modules", None) or [])
    blocks = [m for m in root.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in root.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 1
             and len({type(x) for x in m}) == 1 and any(p.numel() for p in m.parameters())]
    return [block for blocks_list in lists for block in blocks_list]


def clip_gradients(model: torch.nn.Module, max_norm: float) -> float | None:
    """Clip the global gradient norm (0: off); returns the norm before clipping."""
    if max_norm <= 0:
        return None
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_norm)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
        norm = norm.full_tensor()
    return norm.item()


def gradient_sync(net: torch.nn.Module, enabled: bool):
    """Skip the gradient all-reduce on accumulation micro-batches that are not the last."""
    from contextlib import nullcontext

    if enabled:
        return nullcontext()
    if hasattr(net, "no_sync"):  # DDP
        return net.no_sync()
    if hasattr(net, "set_requires_gradient_sync"):  # FSDP2
        net.set_requires_gradient_sync(False)
        return _ReenableSync(net)
    return nullcontext()


class _ReenableSync:
    def __init__(self, net) -> None:
        self.net = net

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.net.set_requires_gradient_sync(True)


# ---------------------------------------------------------------- LoRA and the final model


def apply_lora(model, r: int, alpha: int, dropout: float, targets: list[str], task_type: str = "CAUSAL_LM"):
    """Wrap ``model`` with LoRA adapters (peft); only the adapters (and a score head) train."""
    from peft import LoraConfig, get_peft_model

    target = "all-linear" if targets == ["all-linear"] else targets
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target, task_type=task_type)
    return get_peft_model(model, config)


def save_final_model(model, tokenizer, out: Path, keep_adapter: bool = False, sharded: bool = False,
                     is_main: bool = True) -> None:
    """Write the final model at the top level of ``out`` as a plain Hugging Face directory.

    LoRA adapters are merged unless ``keep_adapter``; either way
    ``AutoModelFor...from_pretrained(out)`` loads it without preftune. With ``sharded`` (FSDP)
    every rank must call this: the full weights are gathered to rank 0, which writes them."""
    out = Path(out)
    if sharded:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        full = get_model_state_dict(model, options=_full_options())
        if not is_main:
            return
        model = _unsharded_copy(model, full)
    elif not is_main:
        return
    is_peft = hasattr(model, "peft_config")
    if is_peft and not keep_adapter:
        model = model.merge_and_unload()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _unsharded_copy(model, full_state: dict[str, torch.Tensor]):
    """A plain CPU copy of an FSDP-sharded model (built from its config), holding ``full_state``."""
    import copy

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


class Throughput:
    """Tokens per second over a sliding window of steps."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.tokens = 0

    def update(self, tokens: int) -> float:
        self.tokens += tokens
        now = time.perf_counter()
        rate = self.tokens / max(now - self.t0, 1e-9)
        self.t0, self.tokens = now, 0
        return rate
