"""Resumable training state: weights, optimiser, scheduler and random-number states.

``OUT/checkpoints/step-000100/`` holds one ``NAME.safetensors`` per trained module (all its
parameters, or only the LoRA adapters) and ``state.pt`` (step, optimiser, scheduler, RNG and what
the trainer adds). Checkpoints are written atomically (a tmp folder renamed) and stored unsharded,
keyed by parameter name, so they resume with any world size, with or without FSDP.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from preftune.errors import PreftuneError
from preftune.models.saving import full_state_options

CHECKPOINTS = "checkpoints"


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


def checkpoint_dir(out: Path, step: int) -> Path:
    return Path(out) / CHECKPOINTS / f"step-{step:06d}"


def latest_checkpoint(out: Path) -> Path | None:
    root = Path(out) / CHECKPOINTS
    done = sorted(p for p in root.glob("step-*") if (p / "state.pt").exists()) if root.exists() else []
    return done[-1] if done else None


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) parameters that training changes: all of them, or only the LoRA
    adapters. A collective under FSDP: every rank calls it; rank 0 gets the tensors."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    names = {n for n, p in model.named_parameters() if p.requires_grad}
    full = get_model_state_dict(model, options=full_state_options())
    return {k: v.contiguous() for k, v in full.items() if k in names}


def _optimizer_owner(modules: dict[str, torch.nn.Module]) -> torch.nn.Module:
    """One module holding every trained module, so optimiser state is keyed by "name.param"."""
    return torch.nn.ModuleDict(modules)


def save_checkpoint(out: Path, step: int, modules: dict[str, torch.nn.Module], optimizer, scheduler,
                    extra: dict[str, Any], keep: int, is_main: bool = True) -> Path:
    """Write a checkpoint and keep only the ``keep`` newest. Every rank calls this; rank 0 writes."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    weights = {name: trainable_state(module) for name, module in modules.items()}
    optim_state = get_optimizer_state_dict(_optimizer_owner(modules), optimizer, options=full_state_options())
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
        set_model_state_dict(module, weights, options=full_state_options(strict=False))
    state = torch.load(path / "state.pt", weights_only=False)
    set_optimizer_state_dict(_optimizer_owner(modules), optimizer, state["optimizer"], options=full_state_options())
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state
