"""Supervised fine-tuning on demonstrations: loss on response tokens only."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import Field

from preftune.config import TrainConfig
from preftune.data.jsonl import read_jsonl
from preftune.data.records import Demonstration
from preftune.data.split import train_eval_split
from preftune.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    check_same_config,
    device_for,
    gather_checksums,
    init_distributed,
    micro_batches,
)
from preftune.errors import PreftuneError
from preftune.models.loading import load_causal_lm, set_threads
from preftune.models.logits import ResponseLogits, response_token_mask
from preftune.progress import console, progress_bar
from preftune.sft.data import Example, collate, encode_demonstrations, pack_examples
from preftune.training import (
    MetricsLogger,
    Throughput,
    apply_lora,
    clip_gradients,
    distribute,
    gradient_sync,
    latest_checkpoint,
    load_checkpoint,
    make_optimizer,
    make_scheduler,
    plan_steps,
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


def lm_loss_sum(net, batch: dict, device) -> tuple[torch.Tensor, int]:
    """Summed response-token loss of one micro-batch and its number of target tokens."""
    labels = batch["labels"].to(device)
    select = response_token_mask(labels)
    targets = labels[:, 1:][select[:, :-1]]
    mask, positions = batch["attention_mask"], batch.get("position_ids")
    logits = net(batch["input_ids"].to(device), None if mask is None else mask.to(device), select,
                 None if positions is None else positions.to(device))
    return response_loss_sum(logits, targets), int(targets.numel())


def count_targets(examples: list[Example]) -> int:
    return sum(sum(1 for t in e.labels[1:] if t != -100) for e in examples)


@torch.no_grad()
def evaluate_loss(model, examples: list[Example], pad_id: int, batch_size: int, device,
                  info: DistInfo = DistInfo(), net=None) -> float:
    """Mean cross-entropy per response token over ``examples``.

    With replicated weights each rank scores its share and the sums are all-reduced. Under FSDP
    (``net`` given) every forward pass is a collective, so every rank scores all examples."""
    was_training = model.training
    model.eval()
    sharded = net is not None
    mine = examples if sharded else examples[info.rank::info.world]
    net = net if sharded else ResponseLogits(model)
    total = torch.zeros(2, dtype=torch.float64)
    for i in range(0, len(mine), batch_size):
        loss, n = lm_loss_sum(net, collate(mine[i:i + batch_size], pad_id), device)
        total += torch.tensor([loss.item(), n], dtype=torch.float64)
    if not sharded:
        total = all_reduce_sum(total, info)
    model.train(was_training)
    return (total[0] / total[1].clamp(min=1)).item()


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
    """Run SFT (one process, or one rank under torchrun); returns the final metrics.
    ``stop_after`` ends the run early after that step, as an interruption would (resume tests)."""
    info = init_distributed(cfg.device)
    check_same_config(cfg.model_dump(), info)
    quiet = quiet or not info.is_main
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    train_demos, eval_demos, notes = read_demonstrations(cfg)
    model, tokenizer = load_causal_lm(cfg.model, device=device_for(info, cfg.device), dtype=cfg.dtype)
    device = next(model.parameters()).device
    train, held, more_notes = encode_splits(cfg, tokenizer, train_demos, eval_demos)
    for note in notes + more_notes:
        if info.is_main:
            console.print(f"[yellow]{note}")
    if cfg.packing:
        train = pack_examples(train, cfg.max_length)
    if cfg.lora:
        model = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    model.train()
    net = distribute(ResponseLogits(model), model, info, cfg.fsdp)

    global_batch = cfg.batch_size * info.world
    steps_per_epoch, total_steps = plan_steps(len(train), global_batch, cfg.epochs, cfg.max_steps)
    optimizer = make_optimizer(model.parameters(), cfg.lr, cfg.weight_decay)
    scheduler = make_scheduler(optimizer, total_steps, cfg.warmup_ratio, cfg.schedule)

    start = 0
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and ckpt is None and info.is_main:
        console.print(f"[yellow]--resume: no checkpoint in {out / 'checkpoints'}, starting from step 0")
    if ckpt is not None:
        state = load_checkpoint(ckpt, {"model": model}, optimizer, scheduler)
        start = state["step"]
        if state.get("global_batch", global_batch) != global_batch and info.is_main:
            console.print(f"[yellow]resuming with global batch {global_batch} (world {info.world} x "
                          f"{cfg.batch_size}); the checkpoint was written with {state['global_batch']}")
        if info.is_main:
            console.print(f"resuming from {ckpt} (step {start})")
    logger = None
    if info.is_main:
        write_json(out / "run_config.json", {"stage": "sft", "world_size": info.world, **cfg.model_dump()})
        logger = MetricsLogger(out, cfg.tensorboard, resume_step=start if ckpt is not None else None)

    pad_id = tokenizer.pad_token_id
    speed = Throughput()
    t_start = time.perf_counter()
    evaluate = lambda: evaluate_loss(model, held, pad_id, cfg.batch_size, device, info,  # noqa: E731
                                     net if info.enabled and cfg.fsdp else None)
    initial_eval = evaluate() if held and start == 0 else None
    eval_loss, last = None, {}
    with progress_bar(total_steps, "sft", disable=quiet) as bar:
        bar.set(start)
        for step in range(start, total_steps):
            epoch, pos = divmod(step, steps_per_epoch)
            order = epoch_order(len(train), cfg.seed, epoch)
            global_examples = [train[i] for i in order[pos * global_batch:(pos + 1) * global_batch]]
            mine = info.my_slice(global_examples)
            # Normalise by the global number of target tokens: accumulation and data parallelism then
            # give the gradient of one big batch (DDP averages over ranks, hence the world factor).
            n_targets = max(count_targets(global_examples), 1)
            # The same number of passes on every rank (FSDP's passes are collectives); a rank left
            # without examples at the end of an epoch runs a pass weighted 0.
            chunks = micro_batches(mine, info.per_rank(len(global_examples)), cfg.grad_accum)
            step_loss, step_tokens = torch.zeros(1, dtype=torch.float64), 0
            for k, chunk in enumerate(chunks):
                with gradient_sync(net, enabled=k == len(chunks) - 1):
                    loss_sum, _ = lm_loss_sum(net, collate(chunk or global_examples[:1], pad_id), device)
                    (loss_sum * (info.world / n_targets if chunk else 0.0)).backward()
                if chunk:
                    step_loss += loss_sum.item()
                    step_tokens += sum(len(e.input_ids) for e in chunk)
            grad_norm = clip_gradients(model, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            step_loss = all_reduce_sum(step_loss, info).item()
            tokens = int(all_reduce_sum(torch.tensor([step_tokens]), info).item())
            last = {"loss": step_loss / n_targets, "lr": scheduler.get_last_lr()[0],
                    "tokens_per_s": speed.update(tokens), "grad_norm": grad_norm,
                    "epoch": done / steps_per_epoch, "eval_loss": None}
            if held and (done == total_steps or (cfg.eval_every and done % cfg.eval_every == 0)):
                last["eval_loss"] = eval_loss = evaluate()
            if logger and (done % cfg.log_every == 0 or done == total_steps):
                logger.log(done, last)
            bar.advance(1, loss=last["loss"], tok_s=round(last["tokens_per_s"]))
            if cfg.save_every and done % cfg.save_every == 0 and done != total_steps:
                save_checkpoint(out, done, {"model": model}, optimizer, scheduler, {"global_batch": global_batch},
                                cfg.keep_checkpoints, is_main=info.is_main)
            if stop_after is not None and done >= stop_after:
                barrier(info)
                if logger:
                    logger.close()
                return {"stopped_at": done}
    summary = {"steps": total_steps, "train_examples": len(train), "eval_examples": len(held),
               "final_loss": last.get("loss"), "eval_loss": eval_loss, "initial_eval_loss": initial_eval,
               "world_size": info.world, "seconds": time.perf_counter() - t_start}
    if info.enabled and not cfg.fsdp:  # evidence that DDP kept every rank's weights identical
        summary["rank_param_checksums"] = gather_checksums(model, info)
    save_final_model(model, tokenizer, out, keep_adapter=cfg.keep_adapter, sharded=info.enabled and cfg.fsdp,
                     is_main=info.is_main)
    if info.is_main:
        logger.close()
        write_json(out / "metrics.json", summary)
    barrier(info)
    return summary
