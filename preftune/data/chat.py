"""Turning prompt messages and responses into text and token ids, the same way in every stage.

With a chat template (``tokenizer.chat_template``), the prompt is the template applied to the
messages with the generation prompt, and a response is the text the template adds for one more
assistant turn (so it ends with the template's end-of-turn marker, e.g. ``<|im_end|>``).

Without a chat template the documented plain-text fallback is used::

    System: {system}\\n\\n          (if any)
    User: {user}\\n\\n
    Assistant: {assistant}\\n\\n     (earlier assistant turns)
    Assistant:                      (the generation prompt)

and a response is ``" " + text + eos_token``.
"""

from __future__ import annotations

from dataclasses import dataclass

from preftune.data.records import Messages

PLAIN_ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer, messages: Messages) -> str:
    """The prompt text the model is asked to continue."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    parts = [f"{PLAIN_ROLE_NAMES[m['role']]}: {m['content']}\n\n" for m in messages]
    return "".join(parts) + "Assistant:"


def render_response(tokenizer, messages: Messages, response: str) -> str:
    """The text that follows ``render_prompt(messages)`` when the assistant answers ``response``."""
    if has_chat_template(tokenizer):
        prompt = render_prompt(tokenizer, messages)
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                             tokenize=False)
        if full.startswith(prompt):
            return full[len(prompt):]
        # Templates that rewrite earlier turns (rare): fall back to response + EOS.
    eos = tokenizer.eos_token or ""
    lead = "" if has_chat_template(tokenizer) else " "
    return lead + response + eos


def _adds_bos(tokenizer, prompt: str) -> bool:
    bos = tokenizer.bos_token
    return bool(bos) and not prompt.startswith(bos) and not has_chat_template(tokenizer)


def encode_prompt(tokenizer, messages: Messages) -> list[int]:
    """Token ids of the rendered prompt (with BOS for plain-text prompts when the tokenizer has one)."""
    prompt = render_prompt(tokenizer, messages)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if _adds_bos(tokenizer, prompt):
        ids = [tokenizer.bos_token_id] + ids
    return ids


@dataclass
class EncodedPair:
    """A prompt and its response as token ids; ``labels`` is -100 on prompt tokens."""

    prompt_ids: list[int]
    response_ids: list[int]

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    @property
    def labels(self) -> list[int]:
        return [-100] * len(self.prompt_ids) + list(self.response_ids)

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def encode_pair(tokenizer, messages: Messages, response: str) -> EncodedPair:
    """Tokenise prompt and response separately so the boundary is exact (no merge across it)."""
    prompt_ids = encode_prompt(tokenizer, messages)
    response_ids = tokenizer(render_response(tokenizer, messages, response), add_special_tokens=False)["input_ids"]
    return EncodedPair(prompt_ids, response_ids)
