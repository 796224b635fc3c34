"""``preftune reward``'s entry point: one reward model, or an ensemble of them (``--ensemble K``)."""

from __future__ import annotations

from preftune.reward.config import RewardConfig
from preftune.reward.ensemble import train_ensemble
from preftune.reward.trainer import train_reward


def fit_reward(cfg: RewardConfig, quiet: bool = False) -> dict:
    """Train what ``cfg`` asks for and return its summary (``train_reward``'s or ``train_ensemble``'s)."""
    return train_ensemble(cfg, quiet=quiet) if cfg.ensemble > 1 else train_reward(cfg, quiet=quiet)
