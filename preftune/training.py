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


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that training changes (all of them, or only the LoRA adapters)."""
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(out: Path, step: int, modules: dict[str, torch.nn.Module], optimizer, scheduler,
                    extra: dict[str, Any], keep: int) -> Path:
    """Write a checkpoint atomically (tmp dir + rename) and keep only the ``keep`` newest."""
    final = checkpoint_dir(out, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, module in modules.items():
        save_file(trainable_state(module), str(tmp / f"{name}.safetensors"))
    torch.save({"step": step, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "rng": rng_state(), **extra}, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    older = sorted((Path(out) / CHECKPOINTS).glob("step-*"))[:-keep]
    for path in older:
        shutil.rmtree(path, ignore_errors=True)
    return final


def load_checkpoint(path: Path, modules: dict[str, torch.nn.Module], optimizer, scheduler) -> dict[str, Any]:
    for name, module in modules.items():
        weights = load_file(str(path / f"{name}.safetensors"))
        missing = set(weights) - {n for n, _ in module.named_parameters()}
        if missing:
            raise PreftuneError(f"{path}: checkpoint does not match the model ({len(missing)} unknown tensors, "
                                f"e.g. {sorted(missing)[0]}); was it written with other options?")
        module.load_state_dict(weights, strict=False)
    state = torch.load(path / "state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state


# ---------------------------------------------------------------- LoRA and the final model


def apply_lora(model, r: int, alpha: int, dropout: float, targets: list[str], task_type: str = "CAUSAL_LM"):
    """Wrap ``model`` with LoRA adapters (peft); only the adapters (and a score head) train."""
    from peft import LoraConfig, get_peft_model

    target = "all-linear" if targets == ["all-linear"] else targets
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target, task_type=task_type)
    return get_peft_model(model, config)


def save_final_model(model, tokenizer, out: Path, keep_adapter: bool = False) -> None:
    """Write the final model at the top level of ``out`` as a plain Hugging Face directory.

    LoRA adapters are merged unless ``keep_adapter``; either way
    ``AutoModelFor...from_pretrained(out)`` loads it without preftune."""
    out = Path(out)
    is_peft = hasattr(model, "peft_config")
    if is_peft and not keep_adapter:
        model = model.merge_and_unload()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


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
