"""Multi-process training under ``torchrun`` (torch.distributed), kept to what the trainers need.

``torchrun --nproc_per_node N -m preftune sft ...`` sets RANK / WORLD_SIZE / LOCAL_RANK; without
them everything here is a no-op and the code runs as one process. Backend: NCCL on GPUs, gloo on
CPU. Collective operations time out after ``PREFTUNE_DIST_TIMEOUT`` seconds (default 600), so a rank
that crashed or disagrees ends the run with an error instead of a hang.

Batches: ``--batch-size`` is per process. The global batch (world size x batch size) is drawn from
the same seeded order whatever the world size, and each rank takes its contiguous slice of it, so
2 processes x batch B see exactly the examples of 1 process x batch 2B.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist

from preftune.errors import PreftuneError

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def my_slice(self, global_batch: Sequence[T]) -> list[T]:
        """This rank's contiguous share of a global batch."""
        per_rank = -(-len(global_batch) // self.world)
        return list(global_batch[self.rank * per_rank:(self.rank + 1) * per_rank])


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group when launched by torchrun; returns this process's place in it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device not in ("cpu",)
    if not dist.is_initialized():
        timeout = timedelta(seconds=float(os.environ.get("PREFTUNE_DIST_TIMEOUT", "600")))
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
    if use_cuda:
        torch.cuda.set_device(local_rank)
    return DistInfo(rank, world, local_rank)


def device_for(info: DistInfo, device: str | None) -> str | None:
    """Under torchrun each rank uses its own GPU."""
    if info.enabled and torch.cuda.is_available() and device in (None, "", "auto", "cuda"):
        return f"cuda:{info.local_rank}"
    return device


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def check_same_config(config: dict[str, Any], info: DistInfo) -> None:
    """Fail clearly (on every rank) when ranks were started with different options."""
    if not info.enabled:
        return
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    digests: list[str | None] = [None] * info.world
    dist.all_gather_object(digests, digest)
    if len(set(digests)) > 1:
        odd = [r for r, d in enumerate(digests) if d != digests[0]]
        raise PreftuneError(f"ranks were started with different options (ranks {odd} differ from rank 0)")


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def gather_checksums(model: torch.nn.Module, info: DistInfo) -> list[float]:
    """Every rank's sum of |trainable parameters| (equal when the ranks are in sync)."""
    mine = float(sum(p.detach().double().abs().sum() for p in model.parameters() if p.requires_grad))
    sums: list[float | None] = [None] * info.world
    dist.all_gather_object(sums, mine)
    return sums  # type: ignore[return-value]


def require_single_process(stage: str) -> None:
    """Stages without data-parallel support refuse torchrun instead of running N copies that
    overwrite each other's outputs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise PreftuneError(f"preftune {stage} runs in one process; it was started by torchrun with "
                            f"{world} processes (run it without torchrun)")


def is_main_process() -> bool:
    """Rank 0 under torchrun (or the only process): the one that prints."""
    return os.environ.get("RANK", "0") == "0"
