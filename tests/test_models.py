"""Model loading: pad tokens, paths, devices."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from preftune.errors import PreftuneError
from preftune.models.loading import ensure_pad_token, resolve_device, resolve_dtype, resolve_model_path
from preftune.models.tiny import build_tiny_model, build_tiny_tokenizer


def test_pad_token_made_distinct_from_eos():
    tok = build_tiny_tokenizer()
    tok.pad_token = tok.eos_token  # the common broken case: pad == eos
    ensure_pad_token(tok)
    assert tok.pad_token_id != tok.eos_token_id and tok.pad_token == "<|endoftext|>"


def test_pad_token_added_and_embeddings_resized_as_last_resort():
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok)
    n = len(tok)
    tok.pad_token = tok.unk_token = tok.bos_token = tok.eos_token
    ensure_pad_token(tok, model)
    # <|endoftext|> is still in the vocabulary, so it is preferred over a new token.
    assert tok.pad_token == "<|endoftext|>" and len(tok) == n
    vocab_free = AutoTokenizer.from_pretrained(_save(tok))
    vocab_free.pad_token = vocab_free.eos_token
    vocab_free.unk_token = vocab_free.bos_token = vocab_free.eos_token
    real_vocab = vocab_free.get_vocab
    vocab_free.get_vocab = lambda: {k: v for k, v in real_vocab().items() if k != "<|endoftext|>"}
    ensure_pad_token(vocab_free, model)
    assert vocab_free.pad_token == "<|pad|>" and model.get_input_embeddings().weight.shape[0] == len(vocab_free)
    assert model.config.pad_token_id == vocab_free.pad_token_id


def test_a_llama3_style_tokenizer_pads_with_its_own_pad_token_not_bos():
    """Found by a reading of the code: with no pad and no unk token BOS became the pad, and Llama 3's
    chat template writes BOS into every text, so a reward model refused every record."""
    tok = build_tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|finetune_right_pad_id|>"]})
    tok.pad_token = tok.unk_token = tok.eos_token
    real_vocab = tok.get_vocab
    tok.get_vocab = lambda: {k: v for k, v in real_vocab().items() if k != "<|endoftext|>"}
    ensure_pad_token(tok)
    assert tok.pad_token == "<|finetune_right_pad_id|>" and tok.pad_token_id not in (tok.bos_token_id,
                                                                                  tok.eos_token_id)


def _save(tok):
    import tempfile

    d = tempfile.mkdtemp()
    tok.save_pretrained(d)
    return d


def test_paths_and_devices(tmp_path):
    with pytest.raises(PreftuneError, match="no such model directory"):
        resolve_model_path(tmp_path / "nope")
    with pytest.raises(PreftuneError, match="no config.json"):
        resolve_model_path(tmp_path)
    assert resolve_device("cpu") == torch.device("cpu")
    from preftune.models.precision import cpu_has_bf16

    assert resolve_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if cpu_has_bf16() else torch.float32)
    assert resolve_dtype("fp32", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(PreftuneError, match="unknown dtype"):
        resolve_dtype("fp8", torch.device("cpu"))
