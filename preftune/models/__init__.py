"""Models: loading (directories, GGUF, the default model), tiny test models, sampling, logits."""

from preftune.models.generation import Generation, generate, left_pad
from preftune.models.loading import (
    DEFAULT_MODEL,
    disable_dropout,
    ensure_pad_token,
    load_causal_lm,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    resolve_model_path,
    set_threads,
)
from preftune.models.logits import response_token_mask, selected_logits

__all__ = [
    "DEFAULT_MODEL", "Generation", "disable_dropout", "ensure_pad_token", "generate", "left_pad",
    "load_causal_lm", "load_tokenizer", "resolve_device", "resolve_dtype", "resolve_model_path",
    "response_token_mask", "selected_logits", "set_threads",
]
