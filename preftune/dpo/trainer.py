"""DPO trainer: comparisons in, a tuned policy out, no reward model and no sampling.

The reference log-probabilities are computed once, before the first update, with the starting
weights: the run then needs no second copy of the model in memory (with or without LoRA), and
the reference can never drift.

One step: the step's slice of the global batch of pairs, this rank's share cut into
``--grad-accum`` micro-batches; each micro-batch's mean loss is weighted by its share of the global
batch, so accumulation and data parallelism give the gradient of the whole batch.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from preftune.data.batching import Example, collate, fit_length, step_indices
from preftune.data.chat import encode_pair
from preftune.data.records import Comparison
from preftune.data.split import read_train_eval
from preftune.dpo.config import DPOConfig
from preftune.dpo.losses import DPO_STATS, dpo_loss, sequence_logprobs
from preftune.errors import DataError, PreftuneError
from preftune.models.loading import load_causal_lm
from preftune.models.logits import ResponseLogits, response_token_mask, token_logprobs
from preftune.models.saving import save_final_model
from preftune.training.distributed import all_reduce_sum, distribute, gradient_sync, micro_batches
from preftune.training.optim import clip_gradients
from preftune.training.scaffold import TrainingRun

Pair = tuple[Example, Example]


def encode_comparisons(records: list[Comparison], tokenizer, cfg: DPOConfig) -> tuple[list[Pair], list[str]]:
    """(chosen, rejected) examples; an over-long comparison is a file:line error, or with
    ``--skip-invalid`` skipped and reported."""
    pairs, skipped = [], []
    for rec in records:
        encoded = []
        for text in (rec.chosen, rec.rejected):
            pair = encode_pair(tokenizer, rec.messages, text)
            fitted = fit_length(pair, cfg.max_length, cfg.truncate)
            if fitted is None:
                msg = f"record is {len(pair)} tokens, over --max-length {cfg.max_length} (use --truncate to cut it)"
                if not cfg.skip_invalid:
                    raise DataError(rec.source.path, rec.source.line, msg)
                skipped.append(f"{rec.source}: {msg}")
                break
            encoded.append(Example(fitted.input_ids, fitted.labels))
        if len(encoded) == 2:
            pairs.append((encoded[0], encoded[1]))
    return pairs, skipped


def pair_logprobs(net, pairs: list[Pair], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probabilities of the chosen and rejected responses, in one forward pass."""
    batch = collate([c for c, _ in pairs] + [r for _, r in pairs], pad_id)
    labels = batch["labels"].to(device)
    select = response_token_mask(labels)
    logits = net(batch["input_ids"].to(device), batch["attention_mask"].to(device), select)
    targets = labels[:, 1:][select[:, :-1]]
    seq = sequence_logprobs(token_logprobs(logits, targets), select.sum(1))
    return seq[:len(pairs)], seq[len(pairs):]


@torch.no_grad()
def reference_logprobs(model, pairs: list[Pair], pad_id: int, batch_size: int, device) -> torch.Tensor:
    """[N, 2] reference log-probabilities (chosen, rejected) under the starting weights."""
    net = ResponseLogits(model).eval()
    out = []
    for i in range(0, len(pairs), batch_size):
        c, r = pair_logprobs(net, pairs[i:i + batch_size], pad_id, device)
        out.append(torch.stack([c, r], 1).cpu())
    return torch.cat(out) if out else torch.zeros(0, 2)


@torch.no_grad()
def evaluate(model, pairs: list[Pair], ref: torch.Tensor, pad_id: int, cfg: DPOConfig, device, net=None,
             autocast=nullcontext) -> dict:
    """Held-out DPO loss and preference accuracy. Under FSDP pass the sharded ``net``: every
    rank then scores all pairs, since each forward pass is a collective."""
    model.eval()
    net = net if net is not None else ResponseLogits(model)
    losses, accs = [], []
    for i in range(0, len(pairs), cfg.batch_size):
        with autocast():
            c, r = pair_logprobs(net, pairs[i:i + cfg.batch_size], pad_id, device)
        loss, stats = dpo_loss(c.cpu(), r.cpu(), ref[i:i + len(c), 0], ref[i:i + len(c), 1], cfg.beta,
                               cfg.label_smoothing)
        losses.append(loss.item() * len(c))
        accs.append(stats["rewards/accuracies"] * len(c))
    model.train()
    return {"eval_loss": sum(losses) / len(pairs), "eval_accuracy": sum(accs) / len(pairs)}


def train_dpo(cfg: DPOConfig, *, stop_after: int | None = None, quiet: bool = False) -> dict:
    """Run DPO (one process, or one rank under torchrun); returns the final metrics.
    ``stop_after`` ends the run early after that step, as an interruption would (resume tests)."""
    run = TrainingRun(cfg, "dpo", quiet=quiet, stop_after=stop_after)
    info = run.info
    train_recs, eval_recs, notes = read_train_eval(cfg.data, cfg.eval_data, "comparisons", eval_split=cfg.eval_split,
                                                   seed=cfg.seed, skip_invalid=cfg.skip_invalid)
    model, tokenizer = load_causal_lm(cfg.model, device=run.device, dtype=run.weights_dtype(trained=not cfg.lora),
                                      compute=run.precision)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    train, skipped = encode_comparisons(train_recs, tokenizer, cfg)
    held, skipped_eval = encode_comparisons(eval_recs, tokenizer, cfg)
    if skipped or skipped_eval:
        notes.append(f"skipped {len(skipped) + len(skipped_eval)} over-long records, first: "
                     f"{(skipped + skipped_eval)[0]}")
    for note in notes:
        run.warn(note)
    if not train:
        raise PreftuneError(f"{cfg.data}: no training pairs left")
    with run.autocast():
        ref_train = reference_logprobs(model, train, pad_id, cfg.batch_size, device)
        ref_held = reference_logprobs(model, held, pad_id, cfg.batch_size, device)
    model = run.with_lora(model)
    net = distribute(ResponseLogits(model), model, info, cfg.fsdp)
    steps_per_epoch, total_steps = run.plan(len(train))
    optimizer, scheduler, _ = run.optimiser({"model": model}, total_steps)

    eval_net = net if run.sharded else None
    initial = (evaluate(model, held, ref_held, pad_id, cfg, device, eval_net, run.autocast)
               if held and run.start_step == 0 else {})
    last: dict = {}
    with run.progress(total_steps) as bar:
        for step in range(run.start_step, total_steps):
            idx = step_indices(len(train), step, steps_per_epoch, run.global_batch, cfg.seed)
            chunks = micro_batches(info.my_slice(idx), info.per_rank(len(idx)), cfg.grad_accum)
            # loss sum, then the sums of the DPO statistics (weighted by pairs): summed over ranks below
            local = torch.zeros(1 + len(DPO_STATS), dtype=torch.float64)
            for k, chunk in enumerate(chunks):
                with gradient_sync(net, enabled=k == len(chunks) - 1):
                    # A rank left without pairs at the end of an epoch still joins the gradient
                    # all-reduce (and FSDP's collectives) with a pass weighted 0.
                    rows = chunk or idx[:1]
                    with run.autocast():
                        c, r = pair_logprobs(net, [train[i] for i in rows], pad_id, device)
                    ref = ref_train[rows].to(device)
                    loss, stats = dpo_loss(c, r, ref[:, 0], ref[:, 1], cfg.beta, cfg.label_smoothing)
                    # Mean over the global batch: DDP averages gradients over ranks.
                    (loss * len(chunk) * info.world / len(idx)).backward()
                if chunk:
                    local += torch.tensor([loss.item(), *(stats[key] for key in DPO_STATS)],
                                          dtype=torch.float64) * len(chunk)
            grad_norm = clip_gradients(model, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            sums = (all_reduce_sum(local, info) / len(idx)).tolist()
            last = {"loss": sums[0], "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                    **dict(zip(DPO_STATS, sums[1:]))}
            if held and run.eval_due(done):
                last.update(evaluate(model, held, ref_held, pad_id, cfg, device, eval_net, run.autocast))
            run.log(done, last)
            bar.advance(1, loss=last["loss"], acc=last["rewards/accuracies"])
            run.save_if_due(done)
            if run.stopping(done):
                return run.stop(done)
    summary = {"steps": total_steps, "train_pairs": len(train), "eval_pairs": len(held),
               "initial_eval_loss": initial.get("eval_loss"), "eval_loss": last.get("eval_loss"),
               "eval_accuracy": last.get("eval_accuracy"), "world_size": info.world}
    return run.finish(summary, model, save=lambda: save_final_model(
        model, tokenizer, run.out, keep_adapter=cfg.keep_adapter, sharded=run.sharded, is_main=run.is_main))
