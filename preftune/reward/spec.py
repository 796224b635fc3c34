"""Reward specifications: one string names where a scalar reward comes from.

``SPEC`` forms (several may be summed with weights: ``"0.5*labeler:sentiment + rm:DIR"``, or a
list of specs):

* a reward-model directory written by ``preftune reward`` (or ``rm:DIR``);
* ``labeler:NAME`` -- a simulated annotator's gold score (``preftune.feedback.simulated``);
* ``python:module:function`` or ``path/to/file.py:function`` -- a user function taking
  ``(prompts: list[str], responses: list[str])`` and returning one float per response.

Every reward function returned here is called as ``fn(prompts, responses) -> torch.Tensor``
(float32, shape [N], on the CPU), where ``prompts`` are the prompts' message lists or plain strings.
A function that returns NaN/inf or the wrong count raises a ``PreftuneError`` naming it.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

from preftune.data.records import Messages, prompt_text
from preftune.errors import PreftuneError

RewardFn = Callable[[Sequence[Messages | str], Sequence[str]], torch.Tensor]


def as_prompt_text(prompt: Messages | str) -> str:
    return prompt if isinstance(prompt, str) else prompt_text(prompt)


def _load_function(target: str) -> Callable:
    """``module:function`` or ``path/to/file.py:function``."""
    module_name, _, func_name = target.rpartition(":")
    if not module_name or not func_name:
        raise PreftuneError(f"reward function {target!r}: expected module:function or file.py:function")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.exists():
                raise PreftuneError(f"reward function {target!r}: no such file {path}")
            spec = importlib.util.spec_from_file_location(f"preftune_user_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as e:
        raise PreftuneError(f"reward function {target!r}: cannot import {module_name}: {e}") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise PreftuneError(f"reward function {target!r}: {module_name} has no function {func_name}")
    return func


def checked(name: str, func: Callable) -> RewardFn:
    """Wrap a (prompts, responses) -> floats function: plain prompt text in, checked tensor out."""

    def reward(prompts, responses) -> torch.Tensor:
        values = func([as_prompt_text(p) for p in prompts], list(responses))
        scores = torch.as_tensor(values if not isinstance(values, torch.Tensor) else values.detach().cpu(),
                                 dtype=torch.float32).flatten()
        if scores.numel() != len(responses):
            raise PreftuneError(f"reward {name} returned {scores.numel()} scores for {len(responses)} responses")
        bad = (~torch.isfinite(scores)).nonzero().flatten()
        if bad.numel():
            i = int(bad[0])
            raise PreftuneError(f"reward {name} returned {scores[i].item()} for response {i} "
                                f"({len(bad)} non-finite in the batch)")
        return scores

    reward.name = name  # type: ignore[attr-defined]
    return reward


def _single(spec: str, device: str | None) -> RewardFn:
    spec = spec.strip()
    if spec.startswith("labeler:"):
        from preftune.feedback.simulated import load_labeler

        return load_labeler(spec[len("labeler:"):], device=device)
    if spec.startswith("python:"):
        return checked(spec, _load_function(spec[len("python:"):]))
    if spec.startswith("rm:") or Path(spec).is_dir():
        from preftune.reward.model import RewardModel

        path = spec[3:] if spec.startswith("rm:") else spec
        return RewardModel.load(path, device=device).score
    if re.match(r"^[^:]+\.py:\w+$", spec):
        return checked(spec, _load_function(spec))
    raise PreftuneError(f"unknown reward {spec!r}: use a reward-model directory, labeler:NAME, "
                        f"python:module:function or file.py:function")


def load_reward(spec: str | Sequence[str], device: str | None = None) -> RewardFn:
    """A reward function for ``spec`` (see the module docstring); weighted sums allowed."""
    parts = list(spec) if not isinstance(spec, str) else [p for p in re.split(r"\s\+\s", spec) if p.strip()]
    terms: list[tuple[float, RewardFn]] = []
    for part in parts:
        m = re.match(r"^\s*([0-9.eE+-]+)\s*\*\s*(.+)$", part)
        weight, body = (float(m.group(1)), m.group(2)) if m else (1.0, part)
        if not math.isfinite(weight):
            raise PreftuneError(f"reward weight in {part!r} must be finite")
        terms.append((weight, _single(body, device)))
    if not terms:
        raise PreftuneError("empty reward specification")
    if len(terms) == 1 and terms[0][0] == 1.0:
        return terms[0][1]

    def combined(prompts, responses) -> torch.Tensor:
        return sum(w * fn(prompts, responses) for w, fn in terms)

    combined.name = " + ".join(f"{w}*{getattr(fn, 'name', 'reward')}" for w, fn in terms)  # type: ignore
    return combined
