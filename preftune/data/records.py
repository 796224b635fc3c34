"""Record types of the JSONL formats every stage reads and writes, and their validation.

Each ``parse_*`` function takes one decoded JSON object and returns a record, or raises
``RecordError`` with a message that names the offending field. Readers add file and line.

Prompts are always held as a list of chat messages (``{"role", "content"}``); a plain
``"prompt": str`` becomes one user message. ``to_json`` writes the plain form back when the
prompt is a single user turn, so files round-trip in the shape users wrote them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Messages = list[dict[str, str]]
RecordId = str | int  # a record's own "id", kept as the file gave it

RATING_FLAGS = ("hallucination", "harmful", "ignores_instruction", "unhelpful", "other")
"""The documented flag vocabulary of ratings (see docs/data-formats.md)."""

ROLES = ("system", "user", "assistant", "tool")
HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"


class RecordError(ValueError):
    """One record is invalid; the message says which field and why."""


@dataclass
class Source:
    """Where a record came from, for error messages."""

    path: str = "<memory>"
    line: int = 0

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass
class PromptRecord:
    messages: Messages
    id: RecordId | None = None
    split: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # other keys, kept
    source: Source = field(default_factory=Source, compare=False, repr=False)


@dataclass
class Demonstration:
    messages: Messages  # the conversation before the target turn
    completion: str
    id: RecordId | None = None
    split: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # other keys, kept
    source: Source = field(default_factory=Source, compare=False, repr=False)


@dataclass
class Comparison:
    messages: Messages
    chosen: str
    rejected: str
    strength: float | None = None
    annotator: str | None = None
    id: RecordId | None = None
    split: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # other keys, kept
    source: Source = field(default_factory=Source, compare=False, repr=False)


@dataclass
class Ranking:
    messages: Messages
    responses: list[str]
    ranking: list[list[int]]  # groups of tied indices, best group first
    annotator: str | None = None
    id: RecordId | None = None
    split: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # other keys, kept
    source: Source = field(default_factory=Source, compare=False, repr=False)


@dataclass
class Rating:
    messages: Messages
    response: str
    rating: int
    scale: int = 3
    flags: list[str] = field(default_factory=list)
    annotator: str | None = None
    id: RecordId | None = None
    split: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)  # other keys, kept
    source: Source = field(default_factory=Source, compare=False, repr=False)


@dataclass
class CandidateSet:
    """Responses to one prompt for people (or simulated annotators) to judge, as ``preftune
    sample`` writes them: ``models[i]`` wrote ``responses[i]``; ``ended[i]`` says whether it stopped
    at EOS or a stop string (false: cut off at the length limit)."""

    messages: Messages
    responses: list[str]
    models: list[str]
    ended: list[bool] | None = None
    id: RecordId | None = None
    split: str | None = None
    source: Source = field(default_factory=Source, compare=False, repr=False)


Record = PromptRecord | Demonstration | Comparison | Ranking | Rating


# ---------------------------------------------------------------- field checks


def _string(obj: dict, key: str, *, required: bool = True, nonempty: bool = False) -> str | None:
    if key not in obj or obj[key] is None:
        if required:
            raise RecordError(f'missing "{key}"')
        return None
    value = obj[key]
    if not isinstance(value, str):
        raise RecordError(f'"{key}" must be a string')
    if nonempty and not value.strip():
        raise RecordError(f'"{key}" must not be empty')
    return value


def _optional_id(obj: dict) -> RecordId | None:
    if obj.get("id") is None:
        return None
    value = obj["id"]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RecordError('"id" must be a string or an integer')
    return value  # as given: an integer id is written back as an integer


def _messages(value: Any, key: str) -> Messages:
    if not isinstance(value, list) or not value:
        raise RecordError(f'"{key}" must be a non-empty list of messages')
    out: Messages = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise RecordError(f'"{key}"[{i}] must be an object with "role" and "content"')
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise RecordError(f'"{key}"[{i}]["role"] must be one of {", ".join(ROLES)}')
        if not isinstance(content, str):
            raise RecordError(f'"{key}"[{i}]["content"] must be a string')
        out.append({"role": role, "content": content})
    return out


def _prompt_messages(obj: dict) -> Messages:
    """The prompt as messages, from ``"prompt": str``, ``"prompt": [messages]`` or ``"messages"``."""
    if "prompt" in obj:
        prompt = obj["prompt"]
        if isinstance(prompt, list):
            messages = _messages(prompt, "prompt")
        elif isinstance(prompt, str):
            if not prompt.strip():
                raise RecordError('"prompt" must not be empty')
            messages = [{"role": "user", "content": prompt}]
        else:
            raise RecordError('"prompt" must be a string or a list of messages')
    elif "messages" in obj:
        messages = _messages(obj["messages"], "messages")
    else:
        raise RecordError('missing "prompt" (or "messages")')
    if messages[-1]["role"] == "assistant":
        raise RecordError("the prompt must not end with an assistant turn")
    return messages


TRAIN_TAGS = ("train",)
HELD_OUT_TAGS = ("eval", "test", "validation", "held_out", "dev", "val", "valid")  # any case


def _common(obj: dict) -> dict:
    split = _string(obj, "split", required=False)
    if split is not None and split.lower() not in TRAIN_TAGS + HELD_OUT_TAGS:
        raise RecordError(f'unknown "split" {split!r}: "train", or one of {", ".join(HELD_OUT_TAGS)} for held out')
    return {"id": _optional_id(obj), "split": split}


# ---------------------------------------------------------------- parsers


def parse_prompt(obj: dict) -> PromptRecord:
    return PromptRecord(messages=_prompt_messages(obj), **_common(obj))


def parse_demonstration(obj: dict) -> Demonstration:
    if isinstance(obj.get("label"), bool):
        raise RecordError('a record with a true/false "label" is TRL\'s unpaired preference (KTO) format, not a '
                          'demonstration: give comparisons {"prompt", "chosen", "rejected"} to preftune reward or dpo')
    if "completion" in obj:
        messages = _prompt_messages(obj)
        if isinstance(obj["completion"], list):  # TRL's conversational prompt-completion
            completion = _one_reply(obj["completion"], "completion", messages)
        else:
            completion = _string(obj, "completion", nonempty=True)
        if not completion.strip():
            raise RecordError('"completion" must not be empty')
        return Demonstration(messages=messages, completion=completion, **_common(obj))
    if "messages" in obj and "prompt" not in obj:
        msgs = _messages(obj["messages"], "messages")
        if msgs[-1]["role"] != "assistant":
            raise RecordError('the last message of "messages" must be the assistant turn to learn')
        if len(msgs) < 2:
            raise RecordError('"messages" needs at least one turn before the assistant turn')
        if not msgs[-1]["content"].strip():
            raise RecordError("the assistant turn must not be empty")
        return Demonstration(messages=msgs[:-1], completion=msgs[-1]["content"], **_common(obj))
    if "prompt" in obj:
        raise RecordError('missing "completion"')
    if "text" in obj:
        raise RecordError('a "text" record has no prompt to leave out of the loss: give {"prompt", "completion"} '
                          'or {"messages": [...]}')
    raise RecordError('expected {"prompt", "completion"} or {"messages": [...]}')


def _split_hh(text: str, key: str) -> tuple[Messages, str]:
    """Split an Anthropic HH transcript into prompt messages and the final assistant reply."""
    cut = text.rfind(HH_ASSISTANT)
    if cut < 0:
        raise RecordError(f'"{key}" has no "\\n\\nAssistant:" turn')
    head, reply = text[:cut], text[cut + len(HH_ASSISTANT):].strip()
    if head.startswith(HH_HUMAN.lstrip()):  # "Human: ..." at the very start, without the blank line
        head = "\n\n" + head
    markers = {HH_HUMAN: "user", HH_ASSISTANT: "assistant"}
    first = min([head.find(m) for m in markers if head.find(m) >= 0], default=len(head))
    # Text before the first turn (an instruction to the assistant) is kept as a system message.
    messages: Messages = [{"role": "system", "content": head[:first].strip()}] if head[:first].strip() else []
    pos = first
    while pos < len(head):
        nexts = [(head.find(m, pos), m) for m in markers if head.find(m, pos) >= 0]
        if not nexts:
            break
        start, marker = min(nexts)
        following = [head.find(m, start + len(marker)) for m in markers]
        end = min([f for f in following if f >= 0], default=len(head))
        messages.append({"role": markers[marker], "content": head[start + len(marker):end].strip()})
        pos = end
    if not messages or messages[-1]["role"] != "user":
        raise RecordError(f'"{key}" must contain a "\\n\\nHuman:" turn before the last assistant turn')
    return messages, reply


def _one_reply(value: Any, key: str, prompt: Messages) -> str:
    """The assistant reply of a message list that is either ``[reply]`` or ``prompt + [reply]``
    (both TRL shapes); anything else is refused rather than cut."""
    msgs = _messages(value, key)
    if msgs[-1]["role"] != "assistant":
        raise RecordError(f'the last message of "{key}" must be an assistant turn')
    if len(msgs) > 1 and msgs[:-1] != prompt:
        raise RecordError(f'"{key}" must be one assistant turn (or the prompt\'s turns and then one): '
                          f"it has {len(msgs)} messages")
    return msgs[-1]["content"]


def _shared_prefix_split(chosen: str, rejected: str) -> tuple[str, str, str]:
    """TRL's implicit prompt (``trl.data_utils.extract_prompt``): the common start of the two
    texts, without the space before the first difference; (prompt, chosen, rejected). Where one
    text is the start of the other there is no such difference, and the record is refused."""
    idx = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), None)
    if idx is None:
        raise RecordError('one of "chosen" and "rejected" is the start of the other: no prompt can be told apart')
    if idx and chosen[idx - 1] == " ":
        idx -= 1
    return chosen[:idx], chosen[idx:], rejected[idx:]


def _strength(obj: dict) -> float | None:
    """``strength``, or TRL's ``margin`` (the same number: the margin of the loss)."""
    given = {k: obj[k] for k in ("strength", "margin") if obj.get(k) is not None}
    if len(given) == 2 and given["strength"] != given["margin"]:
        raise RecordError('"strength" and "margin" differ (they are the same field: give one)')
    if not given:
        return None
    key, value = next(iter(given.items()))
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
        raise RecordError(f'"{key}" must be a number >= 0')
    return float(value)


def parse_comparison(obj: dict) -> Comparison:
    """Every comparison shape, TRL's preference formats included (docs/data-formats.md): an explicit
    prompt with string or message-list answers; whole conversations (the prompt is the turns
    before the last); Anthropic HH transcripts (the prompt ends at the last "\n\nAssistant:"); and
    other text pairs, whose prompt is their common start (TRL's implicit-prompt rule)."""
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise RecordError(f'missing "{key}"')
    chosen_raw, rejected_raw = obj["chosen"], obj["rejected"]
    if "prompt" in obj or "messages" in obj:
        messages = _prompt_messages(obj)
        answers = []
        for key, value in (("chosen", chosen_raw), ("rejected", rejected_raw)):
            if not isinstance(value, (str, list)):
                raise RecordError(f'"{key}" must be a string or a list of messages')
            answers.append(value if isinstance(value, str) else _one_reply(value, key, messages))
        chosen, rejected = answers
    elif isinstance(chosen_raw, str) and isinstance(rejected_raw, str):
        if HH_ASSISTANT in chosen_raw or HH_ASSISTANT in rejected_raw:
            messages, chosen = _split_hh(chosen_raw, "chosen")
            rejected_messages, rejected = _split_hh(rejected_raw, "rejected")
            if rejected_messages != messages:
                raise RecordError('"chosen" and "rejected" transcripts differ before the last assistant turn')
        else:
            prompt, chosen, rejected = _shared_prefix_split(chosen_raw, rejected_raw)
            if not prompt.strip():
                raise RecordError('"chosen" and "rejected" share no prompt (give "prompt", or texts that '
                                  'start with the same prompt)')
            messages = [{"role": "user", "content": prompt}]
    elif isinstance(chosen_raw, list) and isinstance(rejected_raw, list):
        # Conversational: full conversations; the prompt is everything before the last turn.
        full_c, full_r = _messages(chosen_raw, "chosen"), _messages(rejected_raw, "rejected")
        if full_c[-1]["role"] != "assistant" or full_r[-1]["role"] != "assistant":
            raise RecordError('"chosen" and "rejected" must end with an assistant turn')
        if full_c[:-1] != full_r[:-1]:
            raise RecordError('"chosen" and "rejected" conversations differ before the last turn')
        if len(full_c) < 2:
            raise RecordError('"chosen" needs a user turn before the assistant turn')
        messages, chosen, rejected = full_c[:-1], full_c[-1]["content"], full_r[-1]["content"]
    else:
        raise RecordError('"chosen" and "rejected" must both be strings or both be message lists')
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise RecordError(f'"{key}" must not be empty')
    if chosen == rejected:
        raise RecordError('"chosen" and "rejected" are identical')
    return Comparison(messages=messages, chosen=chosen, rejected=rejected, strength=_strength(obj),
                      annotator=_annotator(obj), **_common(obj))


def _annotator(obj: dict) -> str | None:
    value = obj.get("annotator")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RecordError('"annotator" must be a string')
    return str(value)


def _responses(obj: dict) -> list[str]:
    responses = obj.get("responses")
    if not isinstance(responses, list) or len(responses) < 2:
        raise RecordError('"responses" must be a list of at least 2 strings')
    for i, r in enumerate(responses):
        if not isinstance(r, str):
            raise RecordError(f'"responses"[{i}] must be a string')
        if not r.strip():
            raise RecordError(f'"responses"[{i}] must not be empty')
    return responses


def parse_ranking(obj: dict) -> Ranking:
    responses = _responses(obj)
    raw = obj.get("ranking")
    if not isinstance(raw, list) or not raw:
        raise RecordError('"ranking" must be a list of response indices, best first')
    groups: list[list[int]] = []
    for item in raw:
        group = item if isinstance(item, list) else [item]
        for idx in group:
            if isinstance(idx, bool) or not isinstance(idx, int):
                raise RecordError('"ranking" entries must be integers or lists of integers (ties)')
            if not 0 <= idx < len(responses):
                raise RecordError(f'"ranking" index {idx} is out of range for {len(responses)} responses')
        if not group:
            raise RecordError('"ranking" has an empty tie group')
        groups.append(list(group))
    flat = [i for g in groups for i in g]
    if len(flat) != len(set(flat)):
        raise RecordError('"ranking" lists an index more than once')
    if len(flat) < 2:
        raise RecordError('"ranking" must rank at least 2 responses')
    return Ranking(messages=_prompt_messages(obj), responses=responses, ranking=groups,
                   annotator=_annotator(obj), **_common(obj))


def parse_rating(obj: dict) -> Rating:
    response = _string(obj, "response", nonempty=True)
    scale = obj.get("scale", 3)
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 2:
        raise RecordError('"scale" must be an integer >= 2')
    rating = obj.get("rating")
    if isinstance(rating, bool) or not isinstance(rating, int):
        raise RecordError('"rating" must be an integer')
    if not 1 <= rating <= scale:
        raise RecordError(f'"rating" {rating} is outside the scale 1..{scale}')
    flags = obj.get("flags", [])
    if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
        raise RecordError('"flags" must be a list of strings')
    unknown = [f for f in flags if f not in RATING_FLAGS]
    if unknown:
        raise RecordError(f'unknown flag "{unknown[0]}" (allowed: {", ".join(RATING_FLAGS)})')
    return Rating(messages=_prompt_messages(obj), response=response, rating=rating, scale=scale,
                  flags=list(flags), annotator=_annotator(obj), **_common(obj))


def parse_preference(obj: dict) -> Comparison | Ranking | Rating:
    """Any preference record: a comparison, a ranking or a rating, told apart by its keys."""
    if "chosen" in obj or "rejected" in obj:
        return parse_comparison(obj)
    if "ranking" in obj or "responses" in obj:
        return parse_ranking(obj)
    if "rating" in obj:
        return parse_rating(obj)
    raise RecordError('not a preference record: expected "chosen"/"rejected", "responses"/"ranking" or "rating"')


def parse_candidates(obj: dict) -> CandidateSet:
    """One line of a candidates file (``CandidateSet``); ``models`` and ``ended`` are optional."""
    messages = parse_prompt(obj).messages
    responses = obj.get("responses")
    if not isinstance(responses, list) or not responses or not all(isinstance(r, str) for r in responses):
        raise RecordError('"responses" must be a non-empty list of strings')
    models = obj.get("models", ["unknown"] * len(responses))
    if not isinstance(models, list) or len(models) != len(responses) or not all(isinstance(m, str) for m in models):
        raise RecordError('"models" must be a list of strings, one per response')
    ended = obj.get("ended")
    if ended is not None and (not isinstance(ended, list) or len(ended) != len(responses)):
        raise RecordError('"ended" must be a list of booleans, one per response')
    return CandidateSet(messages, list(responses), list(models), ended, **_common(obj))


def parse_prompt_source(obj: dict) -> PromptRecord:
    """A prompt, or the prompt of a demonstration (its completion is ignored)."""
    messages = obj.get("messages")
    if "completion" in obj or (isinstance(messages, list) and messages and isinstance(messages[-1], dict)
                               and messages[-1].get("role") == "assistant" and "prompt" not in obj):
        demo = parse_demonstration({k: v for k, v in obj.items() if k != "label"})  # (a KTO record's prompt)
        return PromptRecord(demo.messages, demo.id, demo.split)
    return parse_prompt(obj)


KNOWN_KEYS: dict[type, frozenset[str]] = {
    PromptRecord: frozenset({"prompt", "messages", "id", "split"}),
    Demonstration: frozenset({"prompt", "messages", "completion", "id", "split"}),
    Comparison: frozenset({"prompt", "messages", "chosen", "rejected", "strength", "margin", "annotator", "id",
                           "split"}),
    Ranking: frozenset({"prompt", "messages", "responses", "ranking", "annotator", "id", "split"}),
    Rating: frozenset({"prompt", "messages", "response", "rating", "scale", "flags", "annotator", "id", "split"}),
}
"""The keys each record's parser reads; ``read_jsonl`` keeps the others in ``record.extra``, and the
writers write them back (e.g. TRL's ``score_chosen``, a dataset's ``source``)."""


def other_keys(obj: dict, record: Any) -> dict[str, Any]:
    """The keys of ``obj`` that ``record``'s parser did not read."""
    known = KNOWN_KEYS.get(type(record))
    return {} if known is None else {k: v for k, v in obj.items() if k not in known}


PARSERS = {
    "prompts": parse_prompt,
    "demonstrations": parse_demonstration,
    "comparisons": parse_comparison,
    "rankings": parse_ranking,
    "ratings": parse_rating,
    "preferences": parse_preference,
    "candidates": parse_candidates,
    "prompt_sources": parse_prompt_source,
}
"""Every kind of record a JSONL file may hold, by the name ``read_jsonl`` takes."""


# ---------------------------------------------------------------- writers


def _prompt_json(messages: Messages) -> dict:
    if len(messages) == 1 and messages[0]["role"] == "user":
        return {"prompt": messages[0]["content"]}
    return {"prompt": messages}


def _extras(rec: Any, *names: str) -> dict:
    return {n: getattr(rec, n) for n in names if getattr(rec, n) not in (None, [])}


def to_json(rec: Record) -> dict:
    """The JSON object of a record, in the same format the readers accept."""
    if isinstance(rec, PromptRecord):
        body = _prompt_json(rec.messages)
    elif isinstance(rec, Demonstration):
        body = {**_prompt_json(rec.messages), "completion": rec.completion}
    elif isinstance(rec, Comparison):
        body = {**_prompt_json(rec.messages), "chosen": rec.chosen, "rejected": rec.rejected,
                **_extras(rec, "strength", "annotator")}
    elif isinstance(rec, Ranking):
        ranking = [g[0] if len(g) == 1 else g for g in rec.ranking]
        body = {**_prompt_json(rec.messages), "responses": rec.responses, "ranking": ranking,
                **_extras(rec, "annotator")}
    elif isinstance(rec, Rating):
        body = {**_prompt_json(rec.messages), "response": rec.response, "rating": rec.rating,
                "scale": rec.scale, "flags": rec.flags, **_extras(rec, "annotator")}
    else:
        raise TypeError(f"not a record: {type(rec).__name__}")
    return _with_extra(rec, {**_extras(rec, "id"), **body, **_extras(rec, "split")})


def _with_extra(rec: Any, body: dict) -> dict:
    """``body`` and, after it, the record's other keys as they were read (never replacing a field)."""
    return {**body, **{k: v for k, v in getattr(rec, "extra", {}).items() if k not in body}}


def to_trl_json(rec: Record) -> dict:
    """The record in TRL's conversational format, which TRL's trainers read with our meaning:
    ``prompt`` as messages, answers as one assistant message, ``margin`` (TRL's name of
    ``strength``; 0 when none was given, which is what none means) on every comparison."""
    reply = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    if isinstance(rec, PromptRecord):
        body = {"prompt": rec.messages}
    elif isinstance(rec, Demonstration):
        body = {"prompt": rec.messages, "completion": reply(rec.completion)}
    elif isinstance(rec, Comparison):
        body = {"prompt": rec.messages, "chosen": reply(rec.chosen), "rejected": reply(rec.rejected),
                "margin": rec.strength or 0.0, **_extras(rec, "annotator")}
    else:
        raise RecordError(f"TRL has no format for {type(rec).__name__.lower()}s: convert comparisons, "
                          f"demonstrations or prompts (`preftune reward` reads rankings and ratings as they are)")
    return _with_extra(rec, {**_extras(rec, "id"), **body, **_extras(rec, "split")})


WRITERS = {"preftune": to_json, "trl": to_trl_json}
"""The formats records are written in (``--format``): preftune's own, or TRL's conversational one."""


def prompt_text(messages: Messages) -> str:
    """The last user turn: what a labeler or a person reads as "the prompt"."""
    for msg in reversed(messages):
        if msg["role"] == "user":
            return msg["content"]
    return messages[-1]["content"]
