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

import json
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import Field

from preftune.config import TrainConfig
from preftune.data.jsonl import read_jsonl
from preftune.data.records import Messages, RecordError
from preftune.data.split import train_eval_split
from preftune.distributed import (
    DistInfo,
    all_gather_lists,
    all_reduce_sum,
    barrier,
    check_same_config,
    device_for,
    gather_checksums,
    init_distributed,
    micro_batches,
)
from preftune.errors import DataError, PreftuneError
from preftune.models.loading import set_threads
from preftune.progress import console, progress_bar
from preftune.reward.losses import expected_calibration_error, grouped_preference_loss, pair_accuracy
from preftune.reward.model import RewardModel, right_pad, sequence_scores
from preftune.reward.pairs import PreferenceGroup, expand_preferences, group_by_prompt
from preftune.sft.trainer import epoch_order
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
    seed_everything,
    write_json,
)


class RewardConfig(TrainConfig):
    model: str = Field(..., description="Backbone: a causal-LM or encoder (BERT-style) Hugging Face directory, "
                                        "a .gguf file, or smollm2-135m-instruct. Usually the SFT model.")
    data: str = Field(..., description="Preferences JSONL: comparisons, rankings and/or ratings, in any "
                                       "format of docs/data-formats.md (mixed files are fine).")
    out: str = Field(..., description="Output directory: the reward model (Hugging Face directory with "
                                      "reward_model.json), metrics and checkpoints.")
    eval_data: str | None = Field(None, description="Held-out preferences JSONL.")
    eval_split: float = Field(0.1, ge=0, lt=1, description="Share of --data held out when no --eval-data is "
                                                          "given (records with a 'split' field decide "
                                                          "themselves).")
    lr: float = Field(3e-5, gt=0, description="Peak learning rate (LoRA typically wants 1e-4..5e-4).")
    margin_scale: float = Field(1.0, ge=0, description="Margin per unit of a comparison's 'strength': loss "
                                                       "-log sigmoid(r_w - r_l - margin_scale * strength).")
    center_coef: float = Field(0.0, ge=0, description="Reward-centring coefficient c: adds c * (r_w + r_l)^2 "
                                                      "per pair (TRL's center_rewards_coefficient; 0.01 is usual).")
    reference: str | None = Field(None, description="Reference responses for normalisation (JSONL of "
                                                    "demonstrations, candidates from `preftune sample`, or "
                                                    "preferences); default: the training responses.")
    normalize_gain: bool = Field(True, description="Normalise to standard deviation 1 as well as mean 0 on "
                                                   "the reference responses (else only shift the mean).")
    normalize_samples: int = Field(512, ge=2, description="Most reference responses scored for the "
                                                          "normalisation (a seeded random subset).")
    group_by_prompt: bool = Field(True, description="Merge the records of one prompt that share responses (e.g. "
                                                    "several annotators comparing the same candidates) into one "
                                                    "batch element: each distinct response is scored once per "
                                                    "step and the held-out split keeps them together. "
                                                    "--batch-size then counts merged groups.")
    resume: bool = Field(False, description="Continue from the newest checkpoint in OUT/checkpoints.")


# ---------------------------------------------------------------- data


@dataclass
class EncodedGroup:
    ids: list[list[int]]  # one token-id list per response
    winners: list[int]
    losers: list[int]
    margins: list[float]
    annotators: list[str | None]  # per pair

    @property
    def tokens(self) -> int:
        return sum(map(len, self.ids))


def encode_groups(groups: list[PreferenceGroup], rm: RewardModel, max_length: int, truncate: bool,
                  skip_invalid: bool) -> tuple[list[EncodedGroup], list[str]]:
    """Tokenise every response of every group; over-long groups are a file:line error or skipped."""
    encoded, skipped = [], []
    for g in groups:
        try:
            ids = [rm.encode(g.messages, r, truncate=truncate) for r in g.responses]
        except RecordError as e:
            if not skip_invalid:
                raise DataError(g.source.path, g.source.line, str(e)) from None
            skipped.append(f"{g.source}: {e}")
            continue
        encoded.append(EncodedGroup(ids, [p.winner for p in g.pairs], [p.loser for p in g.pairs],
                                    [p.margin for p in g.pairs], [p.annotator for p in g.pairs]))
    return encoded, skipped


def flatten(groups: list[EncodedGroup]):
    """All sequences of a batch of groups and the pairs as indices into them:
    (sequences, winner [P], loser [P], group [P], margin [P])."""
    sequences, winners, losers, group_ids, margins = [], [], [], [], []
    for gi, g in enumerate(groups):
        offset = len(sequences)
        sequences.extend(g.ids)
        winners += [offset + w for w in g.winners]
        losers += [offset + l for l in g.losers]
        group_ids += [gi] * len(g.winners)
        margins += g.margins
    return (sequences, torch.tensor(winners), torch.tensor(losers), torch.tensor(group_ids),
            torch.tensor(margins, dtype=torch.float32))


class ScoreNet(torch.nn.Module):
    """``sequence_scores`` as a module, so DDP and FSDP can wrap it (they act in its forward)."""

    def __init__(self, model, pad_id: int, sep_id: int | None = None) -> None:
        super().__init__()
        self.model, self.pad_id, self.sep_id = model, pad_id, sep_id

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return sequence_scores(self.model, input_ids, attention_mask, sep_id=self.sep_id)

    def score(self, net, sequences) -> torch.Tensor:
        """Raw scores [N] of token-id lists through ``net`` (this module or its wrapper)."""
        ids, mask = right_pad(sequences, self.pad_id)
        device = next(self.model.parameters()).device
        return net(ids.to(device), mask.to(device))


def batch_loss(score, groups: list[EncodedGroup], center_coef: float):
    """Per-group losses [G] and the raw scores of every sequence, in one forward pass
    (``score``: token-id lists -> scores)."""
    sequences, w, l, gid, margin = flatten(groups)
    scores = score(sequences)
    dev = scores.device
    losses = grouped_preference_loss(scores[w.to(dev)], scores[l.to(dev)], gid.to(dev), len(groups),
                                     margin.to(dev), center_coef)
    return losses, scores


@torch.no_grad()
def score_sequences(score, sequences: list[list[int]], batch_size: int, info: DistInfo = DistInfo(),
                    everyone: bool = False) -> torch.Tensor:
    """Raw scores [N] (float32, CPU) of token-id lists, the same on every rank: each rank scores its
    share and the shares are gathered, or with ``everyone`` (FSDP, where a forward pass is a
    collective) every rank scores all. Batches are formed by length (less padding)."""
    positions = list(range(len(sequences)))
    mine = positions if everyone or not info.enabled else info.my_slice(positions)
    mine.sort(key=lambda i: len(sequences[i]))
    found: list[tuple[int, float]] = []
    for k in range(0, len(mine), batch_size):
        chunk = mine[k:k + batch_size]
        found += zip(chunk, score([sequences[i] for i in chunk]).float().cpu().tolist())
    if info.enabled and not everyone:
        found = all_gather_lists(found, info)
    scores = torch.zeros(len(sequences), dtype=torch.float32)
    for i, value in found:
        scores[i] = value
    return scores


@torch.no_grad()
def evaluate(score, groups: list[EncodedGroup], batch_size: int, info: DistInfo = DistInfo(),
             everyone: bool = False) -> dict:
    """Held-out pair accuracy, loss, calibration (ECE), accuracy per annotator, reward mean/std
    (``score``: token-id lists -> raw scores; see ``score_sequences`` for ``info``/``everyone``)."""
    sequences, w, l, gid, margin = flatten(groups)
    s = score_sequences(score, sequences, batch_size, info, everyone)
    r_c, r_r = s[w], s[l]
    annotators = [a for g in groups for a in g.annotators]
    losses = grouped_preference_loss(r_c, r_r, gid, len(groups), margin)
    metrics = {"eval_loss": losses.mean().item(), "eval_accuracy": pair_accuracy(r_c, r_r).item(),
               "eval_ece": expected_calibration_error(r_c, r_r).item(), "eval_pairs": len(r_c),
               "eval_reward_mean": s.mean().item(), "eval_reward_std": s.std().item() if len(s) > 1 else 0.0}
    by_annotator: dict[str, list[int]] = defaultdict(list)
    for k, a in enumerate(annotators):
        if a is not None:
            by_annotator[a].append(k)
    if by_annotator:
        metrics["eval_accuracy_by_annotator"] = {a: pair_accuracy(r_c[idx], r_r[idx]).item()
                                                 for a, idx in sorted(by_annotator.items())}
    return metrics


def read_preferences(cfg: RewardConfig) -> tuple[list[PreferenceGroup], list[PreferenceGroup], list[str]]:
    """(train groups, eval groups, notes): records read, validated and expanded to pairs."""
    notes: list[str] = []

    def read(path: str) -> list[PreferenceGroup]:
        result = read_jsonl(path, "preferences", skip_invalid=cfg.skip_invalid)
        if result.skipped:
            notes.append(result.summary())
        expansion = expand_preferences(result.records, cfg.margin_scale)
        notes.append(f"{path}: {expansion.summary()}")
        if not cfg.group_by_prompt:
            return expansion.groups
        groups = group_by_prompt(expansion.groups)
        if len(groups) < len(expansion.groups):
            notes.append(f"{path}: {len(expansion.groups)} groups merged into {len(groups)} prompts")
        return groups

    groups = read(cfg.data)
    if cfg.eval_data:
        train_groups, eval_groups = groups, read(cfg.eval_data)
    else:
        train_groups, eval_groups = train_eval_split(groups, cfg.eval_split, cfg.seed)
    if not train_groups:
        raise PreftuneError(f"{cfg.data}: no training pairs (all preferences were ties, single ratings or invalid)")
    return train_groups, eval_groups, notes


# ---------------------------------------------------------------- normalisation


def read_reference(path: str, skip_invalid: bool) -> list[tuple[Messages, str]]:
    """(prompt, response) pairs of a demonstrations, candidates or preferences file."""
    from preftune.feedback.candidates import read_candidates

    p = Path(path)
    if not p.exists():
        raise DataError(path, None, "no such file")
    try:  # the first record's keys tell the kind; a bad line is reported by the reader below
        first = next((json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()), {})
    except ValueError:
        first = {}
    if not isinstance(first, dict):
        first = {}
    if "completion" in first or ("messages" in first and "prompt" not in first and "chosen" not in first):
        return [(d.messages, d.completion) for d in read_jsonl(path, "demonstrations", skip_invalid=skip_invalid).records]
    if "responses" in first and "ranking" not in first:
        return [(c.messages, r) for c in read_candidates(path, skip_invalid).records for r in c.responses if r.strip()]
    groups = expand_preferences(read_jsonl(path, "preferences", skip_invalid=skip_invalid).records).groups
    return unique_responses(groups)


def unique_responses(groups: list[PreferenceGroup]) -> list[tuple[Messages, str]]:
    seen, out = set(), []
    for g in groups:
        for r in g.responses:
            key = (json.dumps(g.messages, sort_keys=True), r)
            if key not in seen:
                seen.add(key)
                out.append((g.messages, r))
    return out


def normalisation(raw: torch.Tensor, with_gain: bool) -> tuple[float, float]:
    """(gain, bias) with ``gain * raw + bias`` of mean 0 (and std 1 when ``with_gain``) on ``raw``."""
    mean = raw.float().mean().item()
    std = raw.float().std().item() if raw.numel() > 1 else 0.0
    gain = 1.0 / std if with_gain and std > 1e-8 else 1.0
    return gain, -mean * gain


def normalise(rm: RewardModel, cfg: RewardConfig, train_groups: list[PreferenceGroup], score=None,
              info: DistInfo = DistInfo(), everyone: bool = False) -> dict:
    """Set ``rm``'s gain and bias from raw scores of the reference responses (``score`` as in
    ``score_sequences``; default: ``rm.forward_ids``)."""
    pairs = read_reference(cfg.reference, cfg.skip_invalid) if cfg.reference else unique_responses(train_groups)
    if len(pairs) > cfg.normalize_samples:
        pairs = random.Random(cfg.seed).sample(pairs, cfg.normalize_samples)
    was_training = rm.model.training
    rm.model.eval()
    encoded = [rm.encode(p, r) for p, r in pairs]
    raw = score_sequences(score or rm.forward_ids, encoded, cfg.batch_size * 2, info, everyone)
    rm.model.train(was_training)
    gain, bias = normalisation(raw, cfg.normalize_gain)
    rm.meta.gain, rm.meta.bias = gain, bias
    rm.meta.normalisation = {"reference": cfg.reference or "training responses", "count": len(pairs),
                             "raw_mean": raw.mean().item(), "raw_std": raw.std().item() if len(raw) > 1 else 0.0}
    return rm.meta.normalisation


# ---------------------------------------------------------------- training


def train_reward(cfg: RewardConfig, *, stop_after: int | None = None, quiet: bool = False) -> dict:
    """Train a reward model (one process, or one rank under torchrun); returns the final metrics.
    ``stop_after`` ends the run after that step (as an interruption would; used by the resume tests)."""
    info = init_distributed(cfg.device)
    check_same_config(cfg.model_dump(), info)
    quiet = quiet or not info.is_main
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    set_threads(cfg.threads)
    seed_everything(cfg.seed)
    train_groups, eval_groups, notes = read_preferences(cfg)  # bad input fails before the model loads
    rm = RewardModel.from_backbone(cfg.model, device=device_for(info, cfg.device), dtype=cfg.dtype,
                                   max_length=cfg.max_length)
    train, skipped = encode_groups(train_groups, rm, cfg.max_length, cfg.truncate, cfg.skip_invalid)
    held, skipped_eval = encode_groups(eval_groups, rm, cfg.max_length, cfg.truncate, cfg.skip_invalid)
    if skipped or skipped_eval:
        notes.append(f"skipped {len(skipped) + len(skipped_eval)} over-long records, first: "
                     f"{(skipped + skipped_eval)[0]}")
    if not train:
        raise PreftuneError(f"{cfg.data}: no training pairs left after skipping over-long records")
    for note in notes if info.is_main else []:
        console.print(note if "skipped" not in note else f"[yellow]{note}")
    if cfg.lora:
        rm.model = apply_lora(rm.model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets,
                              task_type="SEQ_CLS")
    rm.model.train()
    scorer = ScoreNet(rm.model, rm.tokenizer.pad_token_id, rm.sep_id)
    net = distribute(scorer, rm.model, info, cfg.fsdp)
    sharded = info.enabled and cfg.fsdp
    train_score = lambda sequences: scorer.score(net, sequences)  # noqa: E731
    # No-grad scoring: under FSDP through the sharded root (every rank scores everything), else the
    # plain module (each rank scores a share).
    eval_score = lambda sequences: scorer.score(net if sharded else scorer, sequences)  # noqa: E731

    global_batch = cfg.batch_size * info.world
    steps_per_epoch, total_steps = plan_steps(len(train), global_batch, cfg.epochs, cfg.max_steps)
    optimizer = make_optimizer(rm.model.parameters(), cfg.lr, cfg.weight_decay)
    scheduler = make_scheduler(optimizer, total_steps, cfg.warmup_ratio, cfg.schedule)

    start = 0
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and ckpt is None and info.is_main:
        console.print(f"[yellow]--resume: no checkpoint in {out / 'checkpoints'}, starting from step 0")
    if ckpt is not None:
        state = load_checkpoint(ckpt, {"model": rm.model}, optimizer, scheduler)
        start = state["step"]
        if info.is_main:
            if state.get("global_batch", global_batch) != global_batch:
                console.print(f"[yellow]resuming with global batch {global_batch} (world {info.world} x "
                              f"{cfg.batch_size}); the checkpoint was written with {state['global_batch']}")
            console.print(f"resuming from {ckpt} (step {start})")
    logger = None
    if info.is_main:
        write_json(out / "run_config.json", {"stage": "reward", "world_size": info.world, **cfg.model_dump()})
        logger = MetricsLogger(out, cfg.tensorboard, resume_step=start if ckpt is not None else None)

    def run_eval() -> dict:
        was_training = rm.model.training
        rm.model.eval()
        metrics = evaluate(eval_score, held, cfg.batch_size * 4, info, everyone=sharded)
        rm.model.train(was_training)
        return metrics

    speed = Throughput()
    t_start = time.perf_counter()
    initial = run_eval() if held and start == 0 else {}
    evals: dict = {}
    last: dict = {}
    t_loop, eval_seconds = time.perf_counter(), 0.0
    with progress_bar(total_steps, "reward", disable=quiet) as bar:
        bar.set(start)
        for step in range(start, total_steps):
            epoch, pos = divmod(step, steps_per_epoch)
            order = epoch_order(len(train), cfg.seed, epoch)
            batch = [train[i] for i in order[pos * global_batch:(pos + 1) * global_batch]]
            chunks = micro_batches(info.my_slice(batch), info.per_rank(len(batch)), cfg.grad_accum)
            # loss sum, score sum, score sum of squares, score count: summed over ranks below
            local = torch.zeros(4, dtype=torch.float64)
            for k, chunk in enumerate(chunks):
                with gradient_sync(net, enabled=k == len(chunks) - 1):
                    # A rank left without groups (the end of an epoch) still takes part in the
                    # gradient all-reduce, with a pass that adds nothing.
                    losses, s = batch_loss(train_score, chunk or batch[:1], cfg.center_coef)
                    # Mean over the global batch's groups; DDP and FSDP average over ranks.
                    weight = info.world / len(batch) if chunk else 0.0
                    (losses.sum() * weight).backward()
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
            if held and ((cfg.eval_every and done % cfg.eval_every == 0) or done == total_steps):
                t_eval = time.perf_counter()
                evals = run_eval()
                eval_seconds += time.perf_counter() - t_eval
                last.update(evals)
            if logger and (done % cfg.log_every == 0 or done == total_steps):
                logger.log(done, last)
            bar.advance(1, loss=last["loss"], acc=last.get("eval_accuracy", ""),
                        tok_s=round(last["tokens_per_s"]))
            if cfg.save_every and done % cfg.save_every == 0 and done != total_steps:
                save_checkpoint(out, done, {"model": rm.model}, optimizer, scheduler, {"global_batch": global_batch},
                                cfg.keep_checkpoints, is_main=info.is_main)
            if stop_after is not None and done >= stop_after:
                barrier(info)
                if logger:
                    logger.close()
                return {"stopped_at": done}
    if logger:
        logger.close()
    train_seconds = time.perf_counter() - t_loop - eval_seconds
    norm = normalise(rm, cfg, train_groups, eval_score, info, everyone=sharded)
    summary = {"steps": total_steps, "train_groups": len(train), "train_pairs": sum(len(g.winners) for g in train),
               "eval_groups": len(held), "final_loss": last.get("loss"), **evals,
               **{f"initial_{k}": v for k, v in initial.items() if k in ("eval_accuracy", "eval_loss")},
               "normalisation": norm, "gain": rm.meta.gain, "bias": rm.meta.bias, "world_size": info.world,
               "train_seconds": train_seconds, "seconds_per_step": train_seconds / max(1, total_steps - start),
               "seconds": time.perf_counter() - t_start}
    if info.enabled and not cfg.fsdp:  # evidence that DDP kept every rank's weights identical
        summary["rank_param_checksums"] = gather_checksums(rm.model, info)
    rm.save(out, sharded=sharded, is_main=info.is_main)
    if cfg.device in ("auto", "cuda") and torch.cuda.is_available():
        summary["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    if info.is_main:
        write_json(out / "metrics.json", summary)
    barrier(info)
    return summary
