"""Tiny models and tokenizers built on the fly, for tests and the ``--quick`` runs.

``build_tiny_tokenizer`` trains a byte-level BPE tokenizer (a few hundred tokens) on the given
texts in well under a second and gives it a ChatML chat template, so the chat-template code path
is exercised exactly as with real instruct models. ``build_tiny_model`` makes a randomly
initialised Llama (or BERT) of a few layers. Nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

DEFAULT_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "I love this movie, it was great and wonderful.",
    "This is a terrible, boring and bad film.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "Please answer the question briefly and politely.",
    "user assistant system hello thanks yes no maybe good bad happy sad",
    "0 1 2 3 4 5 6 7 8 9 a b c d e f g h i j k l m n o p q r s t u v w x y z",
]


def build_tiny_tokenizer(texts: Iterable[str] = (), vocab_size: int = 512, chat_template: bool = True):
    """A byte-level BPE tokenizer with pad ``<|endoftext|>`` (id 0) and EOS ``<|im_end|>`` (id 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts) + DEFAULT_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", bos_token="<|im_start|>")
    if chat_template:
        fast.chat_template = CHATML_TEMPLATE
    return fast


def build_tiny_model(tokenizer, *, hidden_size: int = 64, layers: int = 2, heads: int = 4,
                     seed: int = 0, kind: str = "llama"):
    """A randomly initialised causal LM (``llama``) or encoder (``bert``) sized for tests."""
    from transformers import AutoModelForCausalLM, BertConfig, BertForSequenceClassification, LlamaConfig

    torch.manual_seed(seed)
    if kind == "bert":
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=layers,
                            num_attention_heads=heads, intermediate_size=hidden_size * 2,
                            max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id, num_labels=1,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return BertForSequenceClassification(config)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def save_tiny(directory: str | Path, texts: Iterable[str] = (), **model_kwargs) -> Path:
    """Build and save a tiny causal LM with its tokenizer; returns the directory."""
    directory = Path(directory)
    tokenizer = build_tiny_tokenizer(texts)
    model = build_tiny_model(tokenizer, **model_kwargs)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
