"""What every trainer runs on: set-up, resume, metrics, checkpoints, the early stop and the end.

A trainer is a thin loop between these calls (each trainer's module shows its recipe)::

    run = TrainingRun(cfg, "sft", quiet=quiet, stop_after=stop_after)  # processes, threads, seed, OUT
    ...read the data (bad input fails before any model loads), load the model...
    model = run.with_lora(model)                                        # --lora, training mode
    net = distribute(ResponseLogits(model), model, run.info, cfg.fsdp)  # DDP / FSDP under torchrun
    steps_per_epoch, total_steps = run.plan(len(examples))
    optimizer, scheduler, state = run.optimiser({"model": model}, total_steps)  # resumed; {} if fresh
    with run.progress(total_steps) as bar:
        for step in range(run.start_step, total_steps):
            ...one optimiser step...
            run.log(done, metrics)
            bar.advance(1, loss=...)
            run.save_if_due(done)
            if run.stopping(done):
                return run.stop(done)
    return run.finish(summary, model, save=lambda: save_final_model(...))

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
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from preftune.config import TrainConfig
from preftune.data.jsonl import plain, write_json
from preftune.errors import ConfigError, PreftuneError
from preftune.models.loading import resolve_device, set_threads
from preftune.models.precision import DTYPES, autocast, describe, resolve_precision
from preftune.progress import Bar, console, progress_bar
from preftune.training.checkpoints import (
    CHECKPOINTS,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
)
from preftune.training.distributed import barrier, check_same_config, device_for, gather_checksums, init_distributed
from preftune.training.lora import apply_lora
from preftune.training.optim import make_optimizer, make_scheduler, plan_steps


class TrainingRun:
    """One training stage's run, in one process or as one rank under torchrun."""

    def __init__(self, cfg: TrainConfig, stage: str, *, quiet: bool = False, stop_after: int | None = None):
        self.cfg, self.stage, self.stop_after = cfg, stage, stop_after
        self.info = init_distributed(cfg.device)
        check_same_config(cfg.model_dump(), self.info)
        self.quiet = quiet or not self.info.is_main
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        set_threads(cfg.threads)
        seed_everything(cfg.seed)
        self.device = device_for(self.info, cfg.device)  # this rank's device, as a name for the loaders
        self.torch_device = resolve_device(self.device)
        self.precision = resolve_precision(cfg.dtype, self.torch_device)
        if self.precision == "fp16":
            raise ConfigError("--dtype fp16: training in fp16 needs loss scaling, which preftune does not do; "
                              "use bf16 (mixed precision) or fp32")
        self.start_step, self.total_steps = 0, 0
        self.logger: MetricsLogger | None = None
        self.t_start = time.perf_counter()
        self._checkpointed: tuple = ()

    @property
    def is_main(self) -> bool:
        return self.info.is_main

    @property
    def sharded(self) -> bool:
        """FSDP under torchrun: every forward pass is a collective, weights live in shards."""
        return self.info.enabled and self.cfg.fsdp

    def say(self, text: str) -> None:
        if self.is_main:
            console.print(text)

    def warn(self, text: str) -> None:
        self.say(f"[yellow]{text}")

    # ------------------------------------------------------------ precision

    def weights_dtype(self, trained: bool) -> torch.dtype:
        """How to store a model's weights: fp32 when they train (the master weights of mixed
        precision), the compute dtype when they are frozen (a LoRA base, a reference)."""
        return torch.float32 if trained or self.precision == "fp32" else DTYPES[self.precision]

    def autocast(self):
        """The context of every forward pass: bf16 autocast under mixed precision, else nothing."""
        return autocast(self.torch_device, self.precision)

    # ------------------------------------------------------------ start

    @property
    def global_batch(self) -> int:
        """Examples (or episodes) per optimiser step over all ranks."""
        return self.cfg.batch_size * self.info.world

    def with_lora(self, model, task_type: str = "CAUSAL_LM"):
        """The model with LoRA adapters when ``--lora`` (as it is otherwise), in training mode."""
        cfg = self.cfg
        if cfg.lora:
            model = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets, task_type)
        model.train()
        return train_in_fp32(model)

    def plan(self, n_examples: int) -> tuple[int, int]:
        """(steps per epoch, total optimiser steps) for ``n_examples`` in global batches."""
        return plan_steps(n_examples, self.global_batch, self.cfg.epochs, self.cfg.max_steps)

    def optimiser(self, modules: dict[str, torch.nn.Module], total_steps: int):
        """(AdamW over the modules' trainable parameters, its schedule over ``total_steps``, the
        resumed state): see ``resume``."""
        params = [p for module in modules.values() for p in module.parameters()]
        optimizer = make_optimizer(params, self.cfg.lr, self.cfg.weight_decay)
        scheduler = make_scheduler(optimizer, total_steps, self.cfg.warmup_ratio, self.cfg.schedule)
        return optimizer, scheduler, self.resume(modules, optimizer, scheduler, self.global_batch)

    def resume(self, modules: dict[str, torch.nn.Module], optimizer, scheduler, global_batch: int) -> dict:
        """With ``--resume``, restore the newest checkpoint (warning when there is none); then open
        the metrics file (truncated to the checkpoint's step) and write ``run_config.json``.
        Returns the checkpoint's state (the trainer's own entries included), ``{}`` when fresh."""
        self._checkpointed = (modules, optimizer, scheduler, global_batch)
        state: dict = {}
        ckpt = latest_checkpoint(self.out) if self.cfg.resume else None
        if self.cfg.resume and ckpt is None:
            self.warn(f"--resume: no checkpoint in {self.out / CHECKPOINTS}, starting from step 0")
        if ckpt is not None:
            state = load_checkpoint(ckpt, modules, optimizer, scheduler)
            self.start_step = state["step"]
            if state.get("global_batch", global_batch) != global_batch:
                self.warn(f"resuming with global batch {global_batch} (world {self.info.world} x "
                          f"{self.cfg.batch_size}); the checkpoint was written with {state['global_batch']}")
            self.say(f"resuming from {ckpt} (step {self.start_step})")
        if self.is_main:
            self.say(describe(self.precision, training=True))
            write_json(self.out / "run_config.json", {"stage": self.stage, "world_size": self.info.world,
                                                      "precision": self.precision, **self.cfg.model_dump()})
            self.logger = MetricsLogger(self.out, self.cfg.tensorboard,
                                        resume_step=self.start_step if ckpt is not None else None)
        return state

    @contextmanager
    def progress(self, total_steps: int) -> Iterator[Bar]:
        """The progress bar of the loop (rank 0, unless quiet), starting at ``start_step``."""
        self.total_steps = total_steps
        with progress_bar(total_steps, self.stage, disable=self.quiet) as bar:
            bar.set(self.start_step)
            yield bar

    # ------------------------------------------------------------ each step

    def eval_due(self, done: int) -> bool:
        """After the last step, and every ``--eval-every`` steps."""
        return done == self.total_steps or bool(self.cfg.eval_every and done % self.cfg.eval_every == 0)

    def log(self, done: int, metrics: dict[str, Any], force: bool = False) -> None:
        """Write a metrics row every ``--log-every`` steps, at the last step, or when ``force``."""
        if self.logger and (force or done % self.cfg.log_every == 0 or done == self.total_steps):
            self.logger.log(done, metrics)

    def save_if_due(self, done: int, extra: dict[str, Any] | None = None) -> None:
        """A checkpoint every ``--save-every`` steps (the last step saves the final model instead);
        ``extra``: the trainer's own state, returned by ``resume``."""
        if self.cfg.save_every and done % self.cfg.save_every == 0 and done != self.total_steps:
            modules, optimizer, scheduler, global_batch = self._checkpointed
            save_checkpoint(self.out, done, modules, optimizer, scheduler,
                            {"global_batch": global_batch, **(extra or {})}, self.cfg.keep_checkpoints,
                            is_main=self.is_main)

    def stopping(self, done: int) -> bool:
        """Whether the run ends here as an interruption would (``stop_after``, for resume tests)."""
        return self.stop_after is not None and done >= self.stop_after

    def stop(self, done: int) -> dict:
        barrier(self.info)
        if self.logger:
            self.logger.close()
        return {"stopped_at": done}

    # ------------------------------------------------------------ end

    def finish(self, summary: dict, model: torch.nn.Module, save: Callable[[], None]) -> dict:
        """Close the metrics, save the final model (``save``: every rank calls it, a collective
        under FSDP), write ``metrics.json`` and wait for every rank. Under DDP the summary gets
        each rank's parameter checksum: evidence that the replicas stayed identical."""
        if self.logger:
            self.logger.close()
        if self.info.enabled and not self.cfg.fsdp:
            summary["rank_param_checksums"] = gather_checksums(model, self.info)
        save()
        if resolve_device(self.device).type == "cuda":
            summary["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        summary["precision"] = self.precision
        summary["seconds"] = time.perf_counter() - self.t_start
        if self.is_main:
            write_json(self.out / "metrics.json", summary)
        barrier(self.info)
        return summary


def train_in_fp32(model: torch.nn.Module) -> torch.nn.Module:
    """Every trainable parameter in fp32 (e.g. a LoRA score head copied from a bf16 base): mixed
    precision keeps the master weights, and so the optimiser state, in fp32."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return model


# ---------------------------------------------------------------- metrics


def keep_rows_up_to(path: Path, step: int | None) -> None:
    """Start a per-step JSONL file afresh (``step`` None), or on resume keep only its rows up to
    ``step`` (those written after the checkpoint would be repeated)."""
    if step is None or not path.exists():
        path.write_text("")
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))


class MetricsLogger:
    """Appends one JSON object per logging step to OUT/metrics.jsonl (and TensorBoard if asked)."""

    def __init__(self, out: Path, tensorboard: bool = False, resume_step: int | None = None):
        self.path = Path(out) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keep_rows_up_to(self.path, resume_step)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise PreftuneError("--tensorboard needs the tensorboard package "
                                    "(pip install 'preftune[plots]')") from None
            self.writer = SummaryWriter(str(Path(out) / "tensorboard"))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **{k: plain(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Throughput:
    """Tokens per second since the previous update."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.tokens = 0

    def update(self, tokens: int) -> float:
        self.tokens += tokens
        now = time.perf_counter()
        rate = self.tokens / max(now - self.t0, 1e-9)
        self.t0, self.tokens = now, 0
        return rate


@contextmanager
def timed(times: dict[str, float], phase: str):
    """Add the block's wall time to ``times["time/PHASE"]``."""
    t = time.perf_counter()
    yield
    times[f"time/{phase}"] = times.get(f"time/{phase}", 0.0) + time.perf_counter() - t
