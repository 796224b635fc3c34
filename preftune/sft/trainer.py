"""Supervised fine-tuning on demonstrations: loss on response tokens only.

One step: take the step's slice of the global batch (``step_indices``), cut this rank's share into
``--grad-accum`` micro-batches, sum the response-token cross-entropy and divide it by the global
number of target tokens (so accumulation and data parallelism give the gradient of one big
batch), clip, step. Held-out loss every ``--eval-every`` steps and at the end.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from preftune.data.batching import Example, collate, count_targets, encode_demonstrations, pack_examples, step_indices
from preftune.data.split import read_train_eval
from preftune.errors import PreftuneError
from preftune.models.loading import load_causal_lm
from preftune.models.logits import ResponseLogits
from preftune.models.saving import save_final_model
from preftune.sft.config import SFTConfig
from preftune.training.distributed import DistInfo, all_reduce_sum, distribute, gradient_sync, micro_batches
from preftune.training.lm_loss import lm_loss_sum
from preftune.training.optim import clip_gradients
from preftune.training.scaffold import Throughput, TrainingRun


@torch.no_grad()
def evaluate_loss(model, examples: list[Example], pad_id: int, batch_size: int, device,
                  info: DistInfo = DistInfo(), net=None, autocast=nullcontext) -> float:
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
        with autocast():
            loss, n = lm_loss_sum(net, collate(mine[i:i + batch_size], pad_id), device)
        total += torch.tensor([loss.item(), n], dtype=torch.float64)
    if not sharded:
        total = all_reduce_sum(total, info)
    model.train(was_training)
    return (total[0] / total[1].clamp(min=1)).item()


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


def train_sft(cfg: SFTConfig, *, stop_after: int | None = None, quiet: bool = False) -> dict:
    """Run SFT (one process, or one rank under torchrun); returns the final metrics.
    ``stop_after`` ends the run early after that step, as an interruption would (resume tests)."""
    run = TrainingRun(cfg, "sft", quiet=quiet, stop_after=stop_after)
    info = run.info
    train_demos, eval_demos, notes = read_train_eval(cfg.data, cfg.eval_data, "demonstrations",
                                                     eval_split=cfg.eval_split, seed=cfg.seed,
                                                     skip_invalid=cfg.skip_invalid)
    model, tokenizer = load_causal_lm(cfg.model, device=run.device, dtype=run.weights_dtype(trained=not cfg.lora),
                                      compute=run.precision)
    device = next(model.parameters()).device
    train, held, more_notes = encode_splits(cfg, tokenizer, train_demos, eval_demos)
    for note in notes + more_notes:
        run.warn(note)
    if cfg.packing:
        train = pack_examples(train, cfg.max_length)
    model = run.with_lora(model)
    net = distribute(ResponseLogits(model), model, info, cfg.fsdp)
    steps_per_epoch, total_steps = run.plan(len(train))
    optimizer, scheduler, _ = run.optimiser({"model": model}, total_steps)

    pad_id = tokenizer.pad_token_id
    speed = Throughput()
    evaluate = lambda: evaluate_loss(model, held, pad_id, cfg.batch_size, device, info,  # noqa: E731
                                     net if run.sharded else None, run.autocast)
    initial_eval = evaluate() if held and run.start_step == 0 else None
    eval_loss, last = None, {}
    with run.progress(total_steps) as bar:
        for step in range(run.start_step, total_steps):
            global_examples = [train[i] for i in step_indices(len(train), step, steps_per_epoch, run.global_batch,
                                                              cfg.seed)]
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
                    with run.autocast():
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
            if held and run.eval_due(done):
                last["eval_loss"] = eval_loss = evaluate()
            run.log(done, last)
            bar.advance(1, loss=last["loss"], tok_s=round(last["tokens_per_s"]))
            run.save_if_due(done)
            if run.stopping(done):
                return run.stop(done)
    summary = {"steps": total_steps, "train_examples": len(train), "eval_examples": len(held),
               "final_loss": last.get("loss"), "eval_loss": eval_loss, "initial_eval_loss": initial_eval,
               "world_size": info.world}
    return run.finish(summary, model, save=lambda: save_final_model(
        model, tokenizer, run.out, keep_adapter=cfg.keep_adapter, sharded=run.sharded, is_main=run.is_main))
