"""Turning prompt messages and responses into text and token ids, the same way in every stage.

With a chat template (``tokenizer.chat_template``), the prompt is the template applied to the
messages with the generation prompt, and a response is the text the template adds for one more
assistant turn (so it ends with the template's end-of-turn marker, e.g. ``<|im_end|>``).

Without a chat template the documented plain-text fallback is used::

    System: {system}\\n\\n          (if any)
    User: {user}\\n\\n
    Assistant: {assistant}\\n\\n     (earlier assistant turns)
    Assistant:                      (the generation prompt)

and a response is ``" " + text + eos_token`` (no added space when the text already starts with
whitespace, as TRL's standard format's completions do: ``" blue."``). The plain text starts with the
tokenizer's BOS token when it has one; a chat template writes its own.

Training a policy tokenises prompt and response separately (``encode_pair``), so the boundary is
exact and the loss covers the response tokens only. Scoring text tokenises the whole conversation
at once (``render_conversation``), as every other tool does (TRL, vLLM's reward serving, plain
transformers on the rendered text).
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
    lead = "" if has_chat_template(tokenizer) or response[:1].isspace() else " "
    return lead + response + eos


def render_conversation(tokenizer, messages: Messages, response: str) -> str:
    """The whole conversation ending with the assistant's ``response``, as one text: the chat
    template applied to every turn, or BOS + the plain prompt + the plain response. Tokenised at
    once with ``add_special_tokens=False`` it gives the tokens a reward model reads."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}],
                                             tokenize=False)
    prompt = render_prompt(tokenizer, messages)
    bos = tokenizer.bos_token if _adds_bos(tokenizer, prompt) else ""
    return bos + prompt + render_response(tokenizer, messages, response)


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
