"""An ensemble of reward models, and the ways to turn its members' scores into one reward.

A directory written by ``preftune reward --ensemble K`` holds one plain reward-model directory per
member (``member-0`` ... each loads as ``AutoModelForSequenceClassification`` and as
``RewardModel``) and ``ensemble.json``, the manifest. Members are trained on bootstrap resamples of
the training prompts with different seeds, and each is normalised on the same reference responses,
so their scores share a scale and their spread measures the ensemble's uncertainty.

Aggregations (Coste et al., ICLR 2024), on member scores ``r_1 .. r_K`` of one response:

* ``mean``: the average;
* ``wco`` (worst-case optimisation): the minimum;
* ``uwo`` (uncertainty-weighted optimisation): ``mean - coef * var``, the variance over members
  (population, divided by K); with ``coef = 0`` it is the mean.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from preftune.data.records import Messages
from preftune.errors import PreftuneError
from preftune.models.reward_model import RewardModel

MANIFEST = "ensemble.json"
AGGREGATIONS = ("mean", "wco", "uwo")


# ---------------------------------------------------------------- the maths


def ensemble_mean(scores: torch.Tensor) -> torch.Tensor:
    """Mean over members: [K, N] -> [N]."""
    return scores.mean(dim=0)


def member_variance(scores: torch.Tensor) -> torch.Tensor:
    """Variance over members (population: divided by K): [K, N] -> [N]."""
    return scores.var(dim=0, unbiased=False)


def member_std(scores: torch.Tensor) -> torch.Tensor:
    """The members' disagreement on each response: standard deviation over members, [K, N] -> [N]."""
    return member_variance(scores).sqrt()


def worst_case(scores: torch.Tensor) -> torch.Tensor:
    """WCO: the lowest member score, [K, N] -> [N]."""
    return scores.min(dim=0).values


def uncertainty_weighted(scores: torch.Tensor, coef: float) -> torch.Tensor:
    """UWO: mean - coef * variance over members, [K, N] -> [N]."""
    return ensemble_mean(scores) - coef * member_variance(scores)


def aggregate(scores: torch.Tensor, how: str = "mean", coef: float = 0.0) -> torch.Tensor:
    """One reward per response from member scores [K, N] (``how``: mean | wco | uwo)."""
    if how == "mean":
        return ensemble_mean(scores)
    if how == "wco":
        return worst_case(scores)
    if how == "uwo":
        return uncertainty_weighted(scores, coef)
    raise PreftuneError(f"unknown ensemble aggregation {how!r} (one of {', '.join(AGGREGATIONS)})")


# ---------------------------------------------------------------- the ensemble


@dataclass
class EnsembleManifest:
    """``ensemble.json``: the members (directories relative to the ensemble's) and how they were made."""

    members: list[str]
    bootstrap: bool = True
    seeds: list[int] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)
    format: str = "preftune-reward-ensemble/1"


def is_ensemble(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: str | Path) -> EnsembleManifest:
    path = Path(path) / MANIFEST
    try:
        manifest = EnsembleManifest(**json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise PreftuneError(f"{path}: invalid ensemble manifest: {e}") from None
    if not manifest.members:
        raise PreftuneError(f"{path}: the ensemble has no members")
    return manifest


def write_manifest(path: str | Path, manifest: EnsembleManifest) -> None:
    (Path(path) / MANIFEST).write_text(json.dumps(asdict(manifest), indent=2) + "\n")


class RewardEnsemble:
    """The members of an ensemble directory, scoring text together."""

    def __init__(self, members: list[RewardModel], manifest: EnsembleManifest | None = None):
        self.members, self.manifest = members, manifest

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None,
             dtype: str | torch.dtype | None = None) -> "RewardEnsemble":
        manifest = read_manifest(path)
        return cls([RewardModel.load(Path(path) / m, device=device, dtype=dtype) for m in manifest.members], manifest)

    def member_scores(self, prompts: Sequence[Messages | str], responses: Sequence[str]) -> torch.Tensor:
        """Normalised scores of every member, [K, N] (float32, CPU)."""
        return torch.stack([m.score(prompts, responses) for m in self.members])

    def score(self, prompts: Sequence[Messages | str], responses: Sequence[str], how: str = "mean",
              coef: float = 0.0) -> torch.Tensor:
        return aggregate(self.member_scores(prompts, responses), how, coef)
