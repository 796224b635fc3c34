"""What both probes share: their config, the question/prompt files, replies from a model, tables."""

from __future__ import annotations

import random
from importlib import resources
from pathlib import Path
from typing import Callable

import torch

from preftune.data.jsonl import read_numbered_dicts
from preftune.data.records import Messages
from preftune.errors import DataError
from preftune.evaluation import report as R
from preftune.evaluation.config import ProbeConfig
from preftune.models.engines import open_engine
from preftune.models.generation import SamplingOptions, sample_responses


def bundled(name: str) -> Path:
    return Path(str(resources.files("preftune.resources").joinpath("probes", name)))


def read_items(path: str | Path, parse: Callable[[dict], dict]) -> list[dict]:
    """JSONL items checked by ``parse`` (which raises ValueError with a message); errors name
    file and line; duplicate ids are an error."""
    items, seen = [], {}
    for lineno, obj in read_numbered_dicts(path):
        try:
            item = parse(obj)
        except ValueError as e:
            raise DataError(str(path), lineno, str(e)) from None
        item.setdefault("id", str(lineno))
        item["id"] = str(item["id"])
        if item["id"] in seen:
            raise DataError(str(path), lineno, f'duplicate id "{item["id"]}" (first on line {seen[item["id"]]})')
        seen[item["id"]] = lineno
        items.append(item)
    if not items:
        raise DataError(str(path), None, "file is empty (no items)")
    return items


def required_string(obj: dict, key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f'"{key}" must be a non-empty string')
    return value


def subset(items: list[dict], n: int, seed: int) -> list[dict]:
    if not n or n >= len(items):
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


def replies(model_path: str, prompts: list[Messages], cfg: ProbeConfig, description: str,
            quiet: bool = False) -> list[str]:
    """One reply per prompt from ``model_path`` (the model is freed afterwards)."""
    options = SamplingOptions(cfg.max_new_tokens, cfg.temperature, 1.0, cfg.batch_size)
    with open_engine(cfg.engine, model_path, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed, quiet=quiet) as sampler:
        return sample_responses(sampler, prompts, options, generator=torch.Generator().manual_seed(cfg.seed),
                                description=description, quiet=quiet).texts


def before_after_table(after: dict, before: dict | None, keys: list[str]) -> str:
    """Rates of the probed model next to the baseline's (``{"rate", "ci"}`` entries)."""
    headers = ["rate", "after (model)"] + (["before (baseline)"] if before else [])
    rows = [[R.esc(k), R.fmt_rate(after["rates"].get(k))] + ([R.fmt_rate(before["rates"].get(k))] if before else [])
            for k in keys]
    return R.table(headers, rows, raw=True)
