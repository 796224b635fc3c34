"""``preftune reward --ensemble K``: K reward models for ensemble scoring (mean, WCO, UWO).

Recipe: the held-out split is the run's; member k trains with seed ``--seed + k`` on a bootstrap
resample of the training prompts (``--bootstrap``, on by default) into ``OUT/member-k``, a
plain reward-model directory; then every member scores the held-out pairs, and the ensemble's
metrics (accuracy of each aggregation, calibration of the mean, the members' disagreement) go to
``OUT/metrics.json`` and the manifest ``OUT/ensemble.json``. With ``--resume``, finished members
are kept and an interrupted one continues from its checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from preftune.data.jsonl import write_json
from preftune.models.reward_ensemble import EnsembleManifest, aggregate, member_std, write_manifest
from preftune.models.reward_model import META_FILE, RewardModel
from preftune.progress import console, is_main_process
from preftune.reward.config import RewardConfig
from preftune.reward.data import encode_groups, flat_lengths, flatten, read_preferences
from preftune.reward.losses import expected_calibration_error, pair_accuracy, pearson_correlation
from preftune.reward.trainer import score_sequences, train_reward


def member_configs(cfg: RewardConfig) -> list[RewardConfig]:
    """One config per member: its own seed, bootstrap resample (``--bootstrap``) and folder, the
    run's held-out split."""
    split = cfg.seed if cfg.split_seed is None else cfg.split_seed
    return [cfg.model_copy(update={"ensemble": 1, "seed": cfg.seed + k, "split_seed": split,
                                   "resample_seed": cfg.seed + k if cfg.bootstrap else None,
                                   "out": str(Path(cfg.out) / f"member-{k}")})
            for k in range(cfg.ensemble)]


def finished(out: str | Path) -> bool:
    return (Path(out) / "metrics.json").is_file() and (Path(out) / META_FILE).is_file()


def held_out_member_scores(cfg: RewardConfig, members: list[RewardModel]) -> tuple[torch.Tensor, tuple]:
    """Normalised scores [K, N] of every held-out response by every member, and the pairs
    (``flatten``'s layout) they form. The members share a backbone, so one encoding serves all."""
    _, eval_groups, _ = read_preferences(cfg)
    held, _ = encode_groups(eval_groups, members[0], cfg.max_length, cfg.truncate, cfg.skip_invalid)
    sequences, w, l, gid, margin = flatten(held)
    scores = torch.stack([m.meta.gain * score_sequences(m.forward_ids, sequences, cfg.batch_size * 4) + m.meta.bias
                          for m in members])
    return scores, (w, l, gid, len(held), flat_lengths(held))


def ensemble_metrics(scores: torch.Tensor, pairs: tuple, uwo_coef: float = 0.5) -> dict:
    """Held-out accuracy of each member and of each aggregation, ECE of the mean, disagreement,
    and the mean's correlation with response length."""
    w, l, _, n_groups, lengths = pairs
    mean = aggregate(scores, "mean")
    out = {"eval_groups": n_groups, "eval_pairs": len(w),
           "member_eval_accuracy": [pair_accuracy(s[w], s[l]).item() for s in scores],
           "eval_accuracy": pair_accuracy(mean[w], mean[l]).item(),
           "eval_accuracy_wco": pair_accuracy(*(aggregate(scores, "wco")[i] for i in (w, l))).item(),
           f"eval_accuracy_uwo_{uwo_coef:g}": pair_accuracy(*(aggregate(scores, "uwo", uwo_coef)[i]
                                                              for i in (w, l))).item(),
           "eval_ece": expected_calibration_error(mean[w], mean[l]).item(),
           "eval_disagreement": member_std(scores).mean().item(),
           "eval_length_correlation": pearson_correlation(mean, lengths).item()}
    out["member_eval_accuracy_mean"] = sum(out["member_eval_accuracy"]) / len(scores)
    return out


def train_ensemble(cfg: RewardConfig, quiet: bool = False) -> dict:
    """Train (or, with ``--resume``, finish) the K members, then measure and describe the ensemble."""
    t0 = time.perf_counter()
    configs = member_configs(cfg)
    seconds = []
    for k, member in enumerate(configs):
        if cfg.resume and finished(member.out):
            console.print(f"member {k}: finished in {member.out}, kept")
            seconds.append(None)
            continue
        if not quiet:
            console.print(f"[bold]member {k + 1} of {len(configs)}[/] (seed {member.seed}) -> {member.out}")
        t = time.perf_counter()
        train_reward(member.model_copy(update={"resume": cfg.resume}), quiet=quiet)
        seconds.append(time.perf_counter() - t)
    members = [RewardModel.load(c.out, device=cfg.device, dtype=cfg.dtype) for c in configs]
    scores, pairs = held_out_member_scores(cfg, members)
    metrics = ensemble_metrics(scores, pairs) if pairs[3] else {}
    summary = {"members": len(configs), "bootstrap": cfg.bootstrap, "seeds": [c.seed for c in configs],
               **metrics, "member_train_seconds": seconds, "seconds": time.perf_counter() - t0}
    if is_main_process():
        write_manifest(cfg.out, EnsembleManifest(members=[Path(c.out).name for c in configs],
                                                 bootstrap=cfg.bootstrap,
                                                 seeds=[c.seed for c in configs], metrics=metrics))
        write_json(Path(cfg.out) / "metrics.json", summary)
    return summary
