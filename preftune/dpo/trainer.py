"""DPO trainer: comparisons in, a tuned policy out, no reward model and no sampling.

The reference log-probabilities are computed once, before the first update, with the starting
weights: the run then needs no second copy of the model in memory (with or without LoRA), and
the reference can never drift.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from pydantic import Field

from preftune.config import TrainConfig
from preftune.data.chat import encode_pair
from preftune.data.jsonl import read_jsonl
from preftune.data.records import Comparison
from preftune.data.split import train_eval_split
from preftune.distributed import all_reduce_sum, barrier, check_same_config, device_for, init_distributed
from preftune.dpo.losses import dpo_loss, sequence_logprobs
from preftune.errors import DataError, PreftuneError
from preftune.models.loading import load_causal_lm, set_threads
from preftune.models.logits import ResponseLogits, response_token_mask
from preftune.progress import console, progress_bar
from preftune.sft.data import Example, collate, fit_length
from preftune.sft.trainer import epoch_order
from preftune.training import (
    MetricsLogger,
    apply_lora,
    clip_gradients,
    distribute,
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


class DPOConfig(TrainConfig):
    model: str = Field(..., description="Starting policy (usually the SFT model): a Hugging Face directory, "
                                        "a .gguf file, or smollm2-135m-instruct.")
    data: str = Field(..., description="Comparisons JSONL ({prompt, chosen, rejected} and the other "
                                       "comparison forms).")
    out: str = Field(..., description="Output directory (final model at its top level).")
    eval_data: str | None = Field(None, description="Held-out comparisons JSONL.")
    eval_split: float = Field(0.1, ge=0, lt=1, description="Share of --data held out when no --eval-data.")
    beta: float = Field(0.1, gt=0, description="Strength of the implicit KL leash to the starting model.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Assumed label-flip rate (conservative DPO).")
    lr: float = Field(5e-6, gt=0, description="Peak learning rate (LoRA typically wants 5e-5..2e-4).")
    resume: bool = Field(False, description="Continue from the newest checkpoint in OUT/checkpoints.")


def encode_comparisons(records: list[Comparison], tokenizer, cfg: DPOConfig) -> list[tuple[Example, Example]]:
    pairs = []
    for rec in records:
        encoded = []
        for text in (rec.chosen, rec.rejected):
            pair = encode_pair(tokenizer, rec.messages, text)
            fitted = fit_length(pair, cfg.max_length, cfg.truncate)
            if fitted is None:
                msg = f"record is {len(pair)} tokens, over --max-length {cfg.max_length} (use --truncate to cut it)"
                if cfg.skip_invalid:
                    break
                raise DataError(rec.source.path, rec.source.line, msg)
            encoded.append(Example(fitted.input_ids, fitted.labels))
        if len(encoded) == 2:
            pairs.append((encoded[0], encoded[1]))
    return pairs


def pair_logprobs(net, pairs: list[tuple[Example, Example]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probabilities of the chosen and rejected responses, in one forward pass."""
    batch = collate([c for c, _ in pairs] + [r for _, r in pairs], pad_id)
    labels = batch["labels"].to(device)
    select = response_token_mask(labels)
    logits = net(batch["input_ids"].to(device), batch["attention_mask"].to(device), select)
    targets = labels[:, 1:][select[:, :-1]]
    token_lp = torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    seq = sequence_logprobs(token_lp, select.sum(1))
    return seq[:len(pairs)], seq[len(pairs):]


@torch.no_grad()
def reference_logprobs(model, pairs, pad_id: int, batch_size: int, device) -> torch.Tensor:
    """[N, 2] reference log-probabilities (chosen, rejected) under the starting weights."""
    net = ResponseLogits(model).eval()
    out = []
    for i in range(0, len(pairs), batch_size):
        c, r = pair_logprobs(net, pairs[i:i + batch_size], pad_id, device)
        out.append(torch.stack([c, r], 1).cpu())
    return torch.cat(out) if out else torch.zeros(0, 2)


@torch.no_grad()
def evaluate(model, pairs, ref: torch.Tensor, pad_id: int, cfg: DPOConfig, device, net=None) -> dict:
    """Held-out DPO loss and preference accuracy. Under FSDP pass the sharded ``net``: every
    rank then scores all pairs, since each forward pass is a collective."""
    model.eval()
    net = net if net is not None else ResponseLogits(model)
    losses, accs = [], []
    for i in range(0, len(pairs), cfg.batch_size):
        c, r = pair_logprobs(net, pairs[i:i + cfg.batch_size], pad_id, device)
        loss, stats = dpo_loss(c.cpu(), r.cpu(), ref[i:i + len(c), 0], ref[i:i + len(c), 1], cfg.beta,
                               cfg.label_smoothing)
        losses.append(loss.item() * len(c))
        accs.append(stats["rewards/accuracies"] * len(c))
    model.train()
    return {"eval_loss": sum(losses) / len(pairs), "eval_accuracy": sum(accs) / len(pairs)}


def train_dpo(cfg: DPOConfig, *, quiet: bool = False) -> dict:
    info = init_distributed(cfg.device)
    check_same_config(cfg.model_dump(), info)
    quiet = quiet or not info.is_main
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    read = read_jsonl(cfg.data, "comparisons", skip_invalid=cfg.skip_invalid)
    if read.skipped and info.is_main:
        console.print(f"[yellow]{read.summary()}")
    if cfg.eval_data:
        train_recs, eval_recs = read.records, read_jsonl(cfg.eval_data, "comparisons").records
    else:
        train_recs, eval_recs = train_eval_split(read.records, cfg.eval_split, cfg.seed)
    model, tokenizer = load_causal_lm(cfg.model, device=device_for(info, cfg.device), dtype=cfg.dtype)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    train, held = encode_comparisons(train_recs, tokenizer, cfg), encode_comparisons(eval_recs, tokenizer, cfg)
    if not train:
        raise PreftuneError(f"{cfg.data}: no training pairs left")
    ref_train = reference_logprobs(model, train, pad_id, cfg.batch_size, device)
    ref_held = reference_logprobs(model, held, pad_id, cfg.batch_size, device)
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
    if ckpt is not None:
        start = load_checkpoint(ckpt, {"model": model}, optimizer, scheduler)["step"]
    logger = MetricsLogger(out, cfg.tensorboard, resume_step=start if ckpt else None) if info.is_main else None
    if info.is_main:
        write_json(out / "run_config.json", {"stage": "dpo", "world_size": info.world, **cfg.model_dump()})
    t_start, last = time.perf_counter(), {}
    eval_net = net if info.enabled and cfg.fsdp else None
    initial = evaluate(model, held, ref_held, pad_id, cfg, device, eval_net) if held and start == 0 else {}
    with progress_bar(total_steps, "dpo", disable=quiet) as bar:
        bar.set(start)
        for step in range(start, total_steps):
            epoch, pos = divmod(step, steps_per_epoch)
            idx = epoch_order(len(train), cfg.seed, epoch)[pos * global_batch:(pos + 1) * global_batch]
            mine = info.my_slice(idx)
            # A rank left without pairs at the end of an epoch still joins the gradient all-reduce
            # (and FSDP's collectives) with a pass weighted 0.
            rows = mine or idx[:1]
            c, r = pair_logprobs(net, [train[i] for i in rows], pad_id, device)
            ref = ref_train[rows].to(device)
            loss, stats = dpo_loss(c, r, ref[:, 0], ref[:, 1], cfg.beta, cfg.label_smoothing)
            # Mean over the global batch: DDP averages gradients over ranks.
            (loss * len(mine) * info.world / len(idx)).backward()
            grad_norm = clip_gradients(model, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            global_loss = all_reduce_sum(torch.tensor([loss.item() * len(mine)]), info).item() / len(idx)
            last = {"loss": global_loss, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm, **stats}
            if held and (done == total_steps or (cfg.eval_every and done % cfg.eval_every == 0)):
                last.update(evaluate(model, held, ref_held, pad_id, cfg, device, eval_net))
            if logger and (done % cfg.log_every == 0 or done == total_steps):
                logger.log(done, last)
            bar.advance(1, loss=last["loss"], acc=stats["rewards/accuracies"])
            if cfg.save_every and done % cfg.save_every == 0 and done != total_steps:
                save_checkpoint(out, done, {"model": model}, optimizer, scheduler, {}, cfg.keep_checkpoints,
                                is_main=info.is_main)
    summary = {"steps": total_steps, "train_pairs": len(train), "eval_pairs": len(held),
               "initial_eval_loss": initial.get("eval_loss"), "eval_loss": last.get("eval_loss"),
               "eval_accuracy": last.get("eval_accuracy"), "seconds": time.perf_counter() - t_start}
    save_final_model(model, tokenizer, out, keep_adapter=cfg.keep_adapter, sharded=info.enabled and cfg.fsdp,
                     is_main=info.is_main)
    if logger:
        logger.close()
        write_json(out / "metrics.json", summary)
    barrier(info)
    return summary
