"""Multi-process training under ``torchrun`` (torch.distributed), kept to what the trainers need.

``torchrun --nproc_per_node N -m preftune sft ...`` sets RANK / WORLD_SIZE / LOCAL_RANK; without
them everything here is a no-op and the code runs as one process. Backend: NCCL on GPUs, gloo on
CPU. Collective operations time out after ``PREFTUNE_DIST_TIMEOUT`` seconds (default 600), so a rank
that crashed or disagrees ends the run with an error instead of a hang.

Batches: ``--batch-size`` is per process. The global batch (world size x batch size) is drawn from
the same seeded order whatever the world size, and each rank takes its contiguous slice of it, so
2 processes x batch B see exactly the examples of 1 process x batch 2B.

Collectives on CPU tensors (metrics, counts) also work under NCCL: the helpers here move them to
the rank's GPU and back.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Sequence, TypeVar

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

    def per_rank(self, n: int) -> int:
        """Size of the largest share when ``n`` items are split by ``my_slice``."""
        return -(-n // self.world)

    def my_slice(self, global_batch: Sequence[T]) -> list[T]:
        """This rank's contiguous share of a global batch."""
        per_rank = self.per_rank(len(global_batch))
        return list(global_batch[self.rank * per_rank:(self.rank + 1) * per_rank])


def init_distributed(device: str | None = None) -> DistInfo:
    """Join the process group when launched by torchrun; returns this process's place in it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device not in ("cpu",)
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        timeout = timedelta(seconds=float(os.environ.get("PREFTUNE_DIST_TIMEOUT", "600")))
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timeout)
    return DistInfo(rank, world, local_rank)


def device_for(info: DistInfo, device: str | None) -> str | None:
    """Under torchrun each rank uses its own GPU."""
    if info.enabled and torch.cuda.is_available() and device in (None, "", "auto", "cuda"):
        return f"cuda:{info.local_rank}"
    return device


def _comm_device() -> torch.device:
    """Where collective tensors must live: the rank's GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The sum of ``value`` over all ranks (a new tensor on ``value``'s device; ``value`` itself
    in one process)."""
    if info.enabled:
        work = value.to(_comm_device(), copy=True)
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        value = work.to(value.device)
    return value


def summing(info: DistInfo) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``all_reduce_sum`` as the ``reduce`` argument of the RL core's statistics (None in one
    process)."""
    return (lambda t: all_reduce_sum(t, info)) if info.enabled else None


def all_gather_tensor(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Every rank's ``value`` (the same shape on all ranks) concatenated along dim 0 in rank order."""
    if not info.enabled:
        return value
    work = value.to(_comm_device()).contiguous()
    parts = [torch.empty_like(work) for _ in range(info.world)]
    dist.all_gather(parts, work)
    return torch.cat(parts).to(value.device)


def all_gather_lists(items: list, info: DistInfo) -> list:
    """Every rank's list of picklable items, concatenated in rank order (the same on every rank).
    With ``my_slice`` shares this restores the global order."""
    if not info.enabled:
        return list(items)
    gathered: list[list | None] = [None] * info.world
    dist.all_gather_object(gathered, list(items))
    return [x for part in gathered for x in part]  # type: ignore[union-attr]


def all_ranks_done(info: DistInfo) -> Callable[[bool], bool] | None:
    """For loops whose length depends on the data (sampling until every response ended) when each
    pass is a collective (FSDP): go on until every rank is done. None in one process."""
    if not info.enabled:
        return None
    return lambda done: bool(all_reduce_sum(torch.tensor([0.0 if done else 1.0]), info).item() == 0)


def micro_batches(mine: Sequence[T], per_rank: int, parts: int) -> list[list[T]]:
    """This rank's share cut into micro-batches (for gradient accumulation), the same number on
    every rank whatever its share's size: trailing ones may be empty. Every rank then runs as many
    forward and backward passes, which FSDP needs (each is a collective) and DDP's gradient
    synchronisation on the last one relies on."""
    count = max(1, min(parts, per_rank))
    size = max(1, -(-per_rank // count))
    return [list(mine[k * size:(k + 1) * size]) for k in range(count)]


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


def finish_and_exit() -> None:
    """End a command that ran under torchrun: wait for every rank, leave the process group, exit 0.

    The barrier keeps a rank from closing its connections while a peer still writes its outputs.
    The exit skips the interpreter's teardown: gloo's worker threads, still alive then, can abort a
    finished run there ("terminate called without an active exception", SIGABRT), which torchrun
    reports as a failure. Every output is written and closed before this is called."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def gather_checksums(model: torch.nn.Module, info: DistInfo) -> list[float]:
    """Every rank's sum of |trainable parameters| (equal when the ranks are in sync)."""
    mine = float(sum(p.detach().double().abs().sum() for p in model.parameters() if p.requires_grad))
    sums: list[float | None] = [None] * info.world
    dist.all_gather_object(sums, mine)
    return sums  # type: ignore[return-value]


# ---------------------------------------------------------------- wrapping the trained module


def distribute(net: torch.nn.Module, model: torch.nn.Module, info: DistInfo, fsdp: bool) -> torch.nn.Module:
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


def gradient_sync(net: torch.nn.Module, enabled: bool):
    """Skip the gradient all-reduce on accumulation micro-batches that are not the last."""
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
