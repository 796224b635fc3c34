"""Supervised fine-tuning on demonstrations: loss on response tokens only."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field

from preftune.config import TrainConfig
from preftune.data.jsonl import read_jsonl
from preftune.data.records import Demonstration
from preftune.data.split import train_eval_split
from preftune.errors import PreftuneError
from preftune.models.loading import load_causal_lm, set_threads
from preftune.models.logits import response_token_mask, selected_logits
from preftune.progress import console, progress_bar
from preftune.sft.data import Example, collate, encode_demonstrations, pack_examples
from preftune.training import (
    MetricsLogger,
    Throughput,
    apply_lora,
    latest_checkpoint,
    load_checkpoint,
    make_optimizer,
    make_scheduler,
    save_checkpoint,
    save_final_model,
    seed_everything,
    write_json,
)


class SFTConfig(TrainConfig):
    model: str = Field(..., description="Base model: a Hugging Face directory, a .gguf file, or "
                                        "smollm2-135m-instruct.")
    data: str = Field(..., description="Demonstrations JSONL ({prompt, completion} or {messages}).")
    out: str = Field(..., description="Output directory (final model at its top level).")
    eval_data: str | None = Field(None, description="Held-out demonstrations JSONL.")
    eval_split: float = Field(0.05, ge=0, lt=1, description="Share of --data held out when no --eval-data "
                                                           "is given (records with a 'split' field decide "
                                                           "themselves).")
    packing: bool = Field(False, description="Pack several examples into each row of --max-length tokens "
                                             "(block-diagonal attention, no cross-talk).")
    lr: float = Field(2e-5, gt=0, description="Peak learning rate (LoRA typically wants 1e-4..2e-4).")
    resume: bool = Field(False, description="Continue from the newest checkpoint in OUT/checkpoints.")


def response_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the selected response positions (normalised by the caller over the
    whole optimiser step, so gradient accumulation gives the same gradient as one big batch)."""
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def _batch_loss(model, batch: dict, device) -> tuple[torch.Tensor, int]:
    labels = batch["labels"].to(device)
    select = response_token_mask(labels)
    targets = labels[:, 1:][select[:, :-1]]
    mask = batch["attention_mask"]
    logits = selected_logits(model, batch["input_ids"].to(device), None if mask is None else mask.to(device),
                             select, None if batch.get("position_ids") is None else batch["position_ids"].to(device))
    return response_loss_sum(logits, targets), int(targets.numel())


@torch.no_grad()
def evaluate_loss(model, examples: list[Example], pad_id: int, batch_size: int, device) -> float:
    """Mean cross-entropy per response token over ``examples``."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for i in range(0, len(examples), batch_size):
        loss, n = _batch_loss(model, collate(examples[i:i + batch_size], pad_id), device)
        total, tokens = total + loss.item(), tokens + n
    model.train(was_training)
    return total / max(tokens, 1)


def read_demonstrations(cfg: SFTConfig) -> tuple[list[Demonstration], list[Demonstration], list[str]]:
    """Validate the input files before any model is loaded, so bad input fails fast."""
    notes: list[str] = []
    train_read = read_jsonl(cfg.data, "demonstrations", skip_invalid=cfg.skip_invalid)
    if train_read.skipped:
        notes.append(train_read.summary())
    if not cfg.eval_data:
        train, held = train_eval_split(train_read.records, cfg.eval_split, cfg.seed)
        return train, held, notes
    eval_read = read_jsonl(cfg.eval_data, "demonstrations", skip_invalid=cfg.skip_invalid)
    if eval_read.skipped:
        notes.append(eval_read.summary())
    return train_read.records, eval_read.records, notes


def encode_splits(cfg: SFTConfig, tokenizer, train_demos, eval_demos) -> tuple[list[Example], list[Example], list[str]]:
    train, skipped = encode_demonstrations(train_demos, tokenizer, cfg.max_length, cfg.truncate, cfg.skip_invalid)
    held, skipped_eval = encode_demonstrations(eval_demos, tokenizer, cfg.max_length, cfg.truncate,
                                               cfg.skip_invalid)
    notes = []
    if skipped or skipped_eval:
        notes.append(f"skipped {len(skipped) + len(skipped_eval)} over-long records, first: "
                     f"{(skipped + skipped_eval)[0]}")
    if not train:
        raise PreftuneError(f"{cfg.data}: no training examples left")
    return train, held, notes


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation fixed by (seed, epoch), so a resumed run
    sees exactly the batches an uninterrupted run would."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def train_sft(cfg: SFTConfig, *, stop_after: int | None = None, quiet: bool = False) -> dict:
    """Run SFT; returns the final metrics. ``stop_after`` ends the run early after that step's
    checkpoint, as an interruption would (used by the resume tests)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    train_demos, eval_demos, notes = read_demonstrations(cfg)
    model, tokenizer = load_causal_lm(cfg.model, device=cfg.device, dtype=cfg.dtype)
    device = next(model.parameters()).device
    train, held, more_notes = encode_splits(cfg, tokenizer, train_demos, eval_demos)
    for note in notes + more_notes:
        console.print(f"[yellow]{note}")
    if cfg.packing:
        train = pack_examples(train, cfg.max_length)
    if cfg.lora:
        model = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    model.train()

    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total_steps = math.ceil(cfg.epochs * steps_per_epoch)
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    optimizer = make_optimizer(model.parameters(), cfg.lr, cfg.weight_decay)
    scheduler = make_scheduler(optimizer, total_steps, cfg.warmup_ratio, cfg.schedule)

    start = 0
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and ckpt is None:
        console.print(f"[yellow]--resume: no checkpoint in {out / 'checkpoints'}, starting from step 0")
    if ckpt is not None:
        start = load_checkpoint(ckpt, {"model": model}, optimizer, scheduler)["step"]
        console.print(f"resuming from {ckpt} (step {start})")
    write_json(out / "run_config.json", {"stage": "sft", **cfg.model_dump()})
    logger = MetricsLogger(out, cfg.tensorboard, resume_step=start if ckpt is not None else None)

    pad_id = tokenizer.pad_token_id
    micro = max(1, cfg.batch_size // cfg.grad_accum)
    speed = Throughput()
    t_start = time.perf_counter()
    eval_loss = None
    initial_eval = evaluate_loss(model, held, pad_id, cfg.batch_size, device) if held and start == 0 else None
    last = {}
    with progress_bar(total_steps, "sft", disable=quiet) as bar:
        bar.set(start)
        for step in range(start, total_steps):
            epoch, pos = divmod(step, steps_per_epoch)
            order = epoch_order(len(train), cfg.seed, epoch)
            batch_examples = [train[i] for i in order[pos * cfg.batch_size:(pos + 1) * cfg.batch_size]]
            n_targets = sum(sum(1 for t in e.labels[1:] if t != -100) for e in batch_examples)
            step_loss, step_tokens = 0.0, 0
            for j in range(0, len(batch_examples), micro):
                loss_sum, n = _batch_loss(model, collate(batch_examples[j:j + micro], pad_id), device)
                (loss_sum / max(n_targets, 1)).backward()
                step_loss += loss_sum.item()
                step_tokens += sum(len(e.input_ids) for e in batch_examples[j:j + micro])
            grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm).item()
                         if cfg.max_grad_norm > 0 else None)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            last = {"loss": step_loss / max(n_targets, 1), "lr": scheduler.get_last_lr()[0],
                    "tokens_per_s": speed.update(step_tokens), "grad_norm": grad_norm, "epoch": done / steps_per_epoch,
                    "eval_loss": None}
            if held and cfg.eval_every and done % cfg.eval_every == 0 and done != total_steps:
                last["eval_loss"] = eval_loss = evaluate_loss(model, held, pad_id, cfg.batch_size, device)
            if done == total_steps and held:
                last["eval_loss"] = eval_loss = evaluate_loss(model, held, pad_id, cfg.batch_size, device)
            if done % cfg.log_every == 0 or done == total_steps:
                logger.log(done, last)
            bar.advance(1, loss=last["loss"], tok_s=round(last["tokens_per_s"]))
            if cfg.save_every and done % cfg.save_every == 0 and done != total_steps:
                save_checkpoint(out, done, {"model": model}, optimizer, scheduler, {}, cfg.keep_checkpoints)
            if stop_after is not None and done >= stop_after:
                logger.close()
                return {"stopped_at": done}
    logger.close()
    save_final_model(model, tokenizer, out, keep_adapter=cfg.keep_adapter)
    summary = {"steps": total_steps, "train_examples": len(train), "eval_examples": len(held),
               "final_loss": last.get("loss"), "eval_loss": eval_loss, "initial_eval_loss": initial_eval,
               "seconds": time.perf_counter() - t_start}
    write_json(out / "metrics.json", summary)
    return summary
