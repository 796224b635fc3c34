"""Reward-model training: ``preftune reward``.

A thin loop around the pure pieces: records -> groups of pairs (``pairs.py``), one forward over
every response of a batch of groups (``sequence_scores``), the grouped Bradley-Terry loss
(``losses.py``). After training the scores are normalised on reference responses and the model is
saved as a Hugging Face directory with ``reward_model.json``.

Under torchrun each rank takes its slice of the global batch of groups (world size x
``--batch-size``) and the loss is the sum of group losses over the global number of groups, so the
gradient is that of the big batch. Held-out scores and the normalisation's reference scores are
computed in shares and gathered (under FSDP every rank scores everything: each forward pass is a
collective), so every rank gets the numbers a single process gets.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict

import torch

from preftune.data.batching import step_indices
from preftune.errors import PreftuneError
from preftune.models.reward_model import RewardModel, right_pad, sequence_scores
from preftune.reward.config import RewardConfig
from preftune.reward.data import (
    EncodedGroup,
    bootstrap_resample,
    encode_groups,
    flat_lengths,
    flatten,
    read_preferences,
    read_reference,
    unique_responses,
)
from preftune.reward.losses import (
    expected_calibration_error,
    grouped_preference_loss,
    length_correlation_loss,
    pair_accuracy,
    pearson_correlation,
)
from preftune.reward.pairs import PreferenceGroup
from preftune.training.distributed import (
    DistInfo,
    all_gather_lists,
    all_reduce_sum,
    distribute,
    gradient_sync,
    micro_batches,
)
from preftune.training.optim import clip_gradients
from preftune.training.scaffold import Throughput, TrainingRun


class ScoreNet(torch.nn.Module):
    """``sequence_scores`` as a module, so DDP and FSDP can wrap it (they act in its forward);
    ``all_heads``: [N, 2] scores of a length-debiased model (quality, length) instead of [N]."""

    def __init__(self, model, pad_id: int, sep_id: int | None = None, all_heads: bool = False) -> None:
        super().__init__()
        self.model, self.pad_id, self.sep_id, self.all_heads = model, pad_id, sep_id, all_heads

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return sequence_scores(self.model, input_ids, attention_mask, sep_id=self.sep_id, all_heads=self.all_heads)

    def score(self, net, sequences) -> torch.Tensor:
        """Raw scores [N] of token-id lists through ``net`` (this module or its wrapper)."""
        ids, mask = right_pad(sequences, self.pad_id)
        device = next(self.model.parameters()).device
        return net(ids.to(device), mask.to(device))


def batch_loss(score, groups: list[EncodedGroup], center_coef: float, length_coef: float = 0.0):
    """Per-group losses [G], the batch's length-correlation loss (0 without a length head) and the
    raw rewards of every sequence, in one forward pass (``score``: token-id lists -> scores [N], or
    [N, 2] quality and length heads, whose sum the preference loss is on)."""
    sequences, w, l, gid, margin = flatten(groups)
    scores = score(sequences)
    dev = scores.device
    total, extra = scores, scores.new_zeros(())
    if scores.dim() == 2:
        total = scores.sum(-1)
        extra = length_coef * length_correlation_loss(scores[:, 0], scores[:, 1], flat_lengths(groups).to(dev))
        scores = scores[:, 0]
    losses = grouped_preference_loss(total[w.to(dev)], total[l.to(dev)], gid.to(dev), len(groups),
                                     margin.to(dev), center_coef)
    return losses, extra, scores


@torch.no_grad()
def score_sequences(score, sequences: list[list[int]], batch_size: int, info: DistInfo = DistInfo(),
                    everyone: bool = False) -> torch.Tensor:
    """Raw scores [N] (float32, CPU) of token-id lists, the same on every rank: each rank scores its
    share and the shares are gathered, or with ``everyone`` (FSDP, where a forward pass is a
    collective) every rank scores all. Batches are formed by length (less padding)."""
    positions = list(range(len(sequences)))
    mine = positions if everyone or not info.enabled else info.my_slice(positions)
    mine.sort(key=lambda i: len(sequences[i]))
    found: list[tuple[int, float | list[float]]] = []
    for k in range(0, len(mine), batch_size):
        chunk = mine[k:k + batch_size]
        found += zip(chunk, score([sequences[i] for i in chunk]).float().cpu().tolist())
    if info.enabled and not everyone:
        found = all_gather_lists(found, info)
    return torch.tensor([value for _, value in sorted(found)], dtype=torch.float32)


@torch.no_grad()
def evaluate(score, groups: list[EncodedGroup], batch_size: int, info: DistInfo = DistInfo(),
             everyone: bool = False) -> dict:
    """Held-out pair accuracy, loss, calibration (ECE), accuracy per annotator, reward mean/std
    and the correlation of the reward with response length (``score``: token-id lists -> raw scores,
    or quality and length heads; see ``score_sequences`` for ``info``/``everyone``)."""
    sequences, w, l, gid, margin = flatten(groups)
    s = score_sequences(score, sequences, batch_size, info, everyone)
    heads = s if s.dim() == 2 else None
    s = s[:, 0] if heads is not None else s
    r_c, r_r = s[w], s[l]
    annotators = [a for g in groups for a in g.annotators]
    losses = grouped_preference_loss(r_c, r_r, gid, len(groups), margin)
    metrics = {"eval_loss": losses.mean().item(), "eval_accuracy": pair_accuracy(r_c, r_r).item(),
               "eval_ece": expected_calibration_error(r_c, r_r).item(), "eval_pairs": len(r_c),
               "eval_reward_mean": s.mean().item(), "eval_reward_std": s.std().item() if len(s) > 1 else 0.0,
               "eval_length_correlation": pearson_correlation(s, flat_lengths(groups)).item()}
    if heads is not None:  # a length head: how much of the labels it explains, with the reward
        metrics["eval_length_head_correlation"] = pearson_correlation(heads[:, 1], flat_lengths(groups)).item()
        both = heads.sum(-1)
        metrics["eval_accuracy_with_length_head"] = pair_accuracy(both[w], both[l]).item()
    by_annotator: dict[str, list[int]] = defaultdict(list)
    for k, a in enumerate(annotators):
        if a is not None:
            by_annotator[a].append(k)
    if by_annotator:
        metrics["eval_accuracy_by_annotator"] = {a: pair_accuracy(r_c[idx], r_r[idx]).item()
                                                 for a, idx in sorted(by_annotator.items())}
    return metrics


def normalisation(raw: torch.Tensor, with_gain: bool) -> tuple[float, float]:
    """(gain, bias) with ``gain * raw + bias`` of mean 0 (and std 1 when ``with_gain``) on ``raw``."""
    mean = raw.float().mean().item()
    std = raw.float().std().item() if raw.numel() > 1 else 0.0
    gain = 1.0 / std if with_gain and std > 1e-8 else 1.0
    return gain, -mean * gain


def normalise(rm: RewardModel, cfg: RewardConfig, train_groups: list[PreferenceGroup], score=None,
              info: DistInfo = DistInfo(), everyone: bool = False) -> dict:
    """Set ``rm``'s gain and bias from raw scores of the reference responses: ``--reference``, else
    ``train_groups``' responses (the whole training split, not a member's resample of it; ``score``
    as in ``score_sequences``, default ``rm.forward_ids``)."""
    pairs = read_reference(cfg.reference, cfg.skip_invalid) if cfg.reference else unique_responses(train_groups)
    if len(pairs) > cfg.normalize_samples:  # drawn with the split's seed: the same for every ensemble member
        pairs = random.Random(cfg.seed if cfg.split_seed is None else cfg.split_seed).sample(pairs, cfg.normalize_samples)
    was_training = rm.model.training
    rm.model.eval()
    encoded = [rm.encode(p, r) for p, r in pairs]
    raw = score_sequences(score or rm.forward_ids, encoded, cfg.batch_size * 2, info, everyone)
    raw = raw[:, 0] if raw.dim() == 2 else raw  # the reward head only
    rm.model.train(was_training)
    gain, bias = normalisation(raw, cfg.normalize_gain)
    rm.meta.gain, rm.meta.bias = gain, bias
    rm.meta.normalisation = {"reference": cfg.reference or "training responses", "count": len(pairs),
                             "raw_mean": raw.mean().item(), "raw_std": raw.std().item() if len(raw) > 1 else 0.0}
    return rm.meta.normalisation


def freeze_all_but_head(model) -> int:
    """Only the sequence-classification head trains (``score`` of causal LMs, ``classifier`` of
    encoders); returns its parameter count."""
    head = getattr(model, "score", None) or getattr(model, "classifier", None)
    if not isinstance(head, torch.nn.Module):
        raise PreftuneError(f"--head-only: {type(model).__name__} has no score or classifier head")
    model.requires_grad_(False)
    head.requires_grad_(True)
    return sum(p.numel() for p in head.parameters())


# ---------------------------------------------------------------- training


def train_reward(cfg: RewardConfig, *, stop_after: int | None = None, quiet: bool = False) -> dict:
    """Train a reward model (one process, or one rank under torchrun); returns the final metrics.
    ``stop_after`` ends the run after that step (as an interruption would; used by the resume tests).
    One model whatever ``--ensemble`` says: ``preftune.reward.fit.fit_reward`` trains ensembles."""
    run = TrainingRun(cfg, "reward", quiet=quiet, stop_after=stop_after)
    info = run.info
    train_groups, eval_groups, notes = read_preferences(cfg)  # bad input fails before the model loads
    reference_groups = train_groups  # normalised on the whole split: an ensemble's members share one scale
    if cfg.resample_seed is not None:
        train_groups = bootstrap_resample(train_groups, cfg.resample_seed)
        notes.append(f"bootstrap resample: {len({id(g) for g in train_groups})} distinct of {len(train_groups)} "
                     f"training prompts (seed {cfg.resample_seed})")
    if cfg.head_only and cfg.lora:
        raise PreftuneError("--head-only trains the score head alone; --lora would train adapters too: choose one")
    trunk_trained = not (cfg.lora or cfg.head_only)
    rm = RewardModel.from_backbone(cfg.model, device=run.device, dtype=run.weights_dtype(trained=trunk_trained),
                                   max_length=cfg.max_length, compute=run.precision, length_head=cfg.length_head)
    train, skipped = encode_groups(train_groups, rm, cfg.max_length, cfg.truncate, cfg.skip_invalid)
    held, skipped_eval = encode_groups(eval_groups, rm, cfg.max_length, cfg.truncate, cfg.skip_invalid)
    if skipped or skipped_eval:
        notes.append(f"skipped {len(skipped) + len(skipped_eval)} over-long records, first: "
                     f"{(skipped + skipped_eval)[0]}")
    if not train:
        raise PreftuneError(f"{cfg.data}: no training pairs left after skipping over-long records")
    for note in notes:
        run.say(note if "skipped" not in note else f"[yellow]{note}")
    rm.model = run.with_lora(rm.model, task_type="SEQ_CLS")
    if cfg.head_only:
        freeze_all_but_head(rm.model)
    scorer = ScoreNet(rm.model, rm.tokenizer.pad_token_id, rm.sep_id, all_heads=cfg.length_head)
    net = distribute(scorer, rm.model, info, cfg.fsdp)

    def train_score(sequences):
        with run.autocast():
            return scorer.score(net, sequences)

    def eval_score(sequences):
        # No-grad scoring: under FSDP through the sharded root (every rank scores everything), else
        # the plain module (each rank scores a share).
        with run.autocast():
            return scorer.score(net if run.sharded else scorer, sequences)


    steps_per_epoch, total_steps = run.plan(len(train))
    optimizer, scheduler, _ = run.optimiser({"model": rm.model}, total_steps)

    def run_eval() -> dict:
        was_training = rm.model.training
        rm.model.eval()
        metrics = evaluate(eval_score, held, cfg.batch_size * 4, info, everyone=run.sharded)
        rm.model.train(was_training)
        return metrics

    speed = Throughput()
    initial = run_eval() if held and run.start_step == 0 else {}
    evals: dict = {}
    last: dict = {}
    t_loop, eval_seconds = time.perf_counter(), 0.0
    with run.progress(total_steps) as bar:
        for step in range(run.start_step, total_steps):
            batch = [train[i] for i in step_indices(len(train), step, steps_per_epoch, run.global_batch, cfg.seed)]
            chunks = micro_batches(info.my_slice(batch), info.per_rank(len(batch)), cfg.grad_accum)
            # loss sum, score sum, score sum of squares, score count: summed over ranks below
            local = torch.zeros(4, dtype=torch.float64)
            for k, chunk in enumerate(chunks):
                with gradient_sync(net, enabled=k == len(chunks) - 1):
                    # A rank left without groups (the end of an epoch) still takes part in the
                    # gradient all-reduce, with a pass that adds nothing.
                    losses, extra, s = batch_loss(train_score, chunk or batch[:1], cfg.center_coef, cfg.length_coef)
                    # Mean over the global batch's groups; DDP and FSDP average over ranks. The
                    # length term is each micro-batch's own correlation, averaged.
                    weight = info.world / len(batch) if chunk else 0.0
                    (losses.sum() * weight + extra * (1.0 / len(chunks) if chunk else 0.0)).backward()
                if chunk:
                    s = s.detach().double().cpu()
                    local += torch.stack([losses.detach().sum().double().cpu(), s.sum(), (s ** 2).sum(),
                                          torch.tensor(float(len(s)), dtype=torch.float64)])
            grad_norm = clip_gradients(rm.model, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            loss_sum, s_sum, s_squares, n = all_reduce_sum(local, info).tolist()
            variance = (s_squares - s_sum ** 2 / n) / (n - 1) if n > 1 else 0.0
            last = {"loss": loss_sum / len(batch), "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                    "reward_mean": s_sum / n, "reward_std": max(variance, 0.0) ** 0.5,
                    "tokens_per_s": speed.update(sum(g.tokens for g in batch)), "epoch": done / steps_per_epoch}
            if held and run.eval_due(done):
                t_eval = time.perf_counter()
                evals = run_eval()
                eval_seconds += time.perf_counter() - t_eval
                last.update(evals)
            run.log(done, last)
            bar.advance(1, loss=last["loss"], acc=last.get("eval_accuracy", ""),
                        tok_s=round(last["tokens_per_s"]))
            run.save_if_due(done)
            if run.stopping(done):
                return run.stop(done)
    train_seconds = time.perf_counter() - t_loop - eval_seconds
    norm = normalise(rm, cfg, reference_groups, eval_score, info, everyone=run.sharded)
    summary = {"steps": total_steps, "train_groups": len(train), "train_pairs": sum(len(g.winners) for g in train),
               "eval_groups": len(held), "final_loss": last.get("loss"), **evals,
               **{f"initial_{k}": v for k, v in initial.items() if k in ("eval_accuracy", "eval_loss")},
               "normalisation": norm, "gain": rm.meta.gain, "bias": rm.meta.bias, "world_size": info.world,
               "train_seconds": train_seconds, "seconds_per_step": train_seconds / max(1, total_steps - run.start_step)}
    return run.finish(summary, rm.model, save=lambda: rm.save(run.out, sharded=run.sharded, is_main=run.is_main))
