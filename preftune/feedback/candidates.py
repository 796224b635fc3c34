"""Candidate responses for people (or simulated annotators) to judge: ``preftune sample``.

One or more models answer the same prompts, ``n`` samples each, in batches with a KV cache
(``preftune.models.generation.generate``). The output has one line per prompt::

    {"id": "p1", "prompt": "...", "responses": ["...", "..."], "models": ["base", "sft"],
     "ended": [true, false], "num_tokens": [17, 64],
     "sampling": {"temperature": 0.7, "top_p": 1.0, "top_k": 0, "max_new_tokens": 64,
                  "stop": [], "seed": 0}}

``models[i]`` names the model that wrote ``responses[i]``; ``ended[i]`` says whether it stopped at
EOS or a stop string (false: cut off at ``max_new_tokens``). ``preftune label`` and the annotation
app read this file; ``read_candidates`` validates it with file:line errors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import Field

from preftune.config import StageConfig
from preftune.data.chat import encode_prompt
from preftune.data.jsonl import ReadResult, read_jsonl, write_jsonl
from preftune.data.records import (
    PARSERS,
    Messages,
    PromptRecord,
    RecordError,
    Source,
    parse_demonstration,
    parse_prompt,
    to_json,
)
from preftune.errors import DataError, PreftuneError
from preftune.models.generation import generate
from preftune.models.loading import load_causal_lm, set_threads
from preftune.progress import console, progress_bar


@dataclass
class CandidateSet:
    messages: Messages
    responses: list[str]
    models: list[str]
    ended: list[bool] | None = None
    id: str | None = None
    split: str | None = None
    source: Source = field(default_factory=Source, compare=False, repr=False)


def parse_candidates(obj: dict) -> CandidateSet:
    """One line of a candidates file (see module docstring); ``models`` and ``ended`` optional."""
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
    ident = obj.get("id")
    return CandidateSet(messages, list(responses), list(models), ended, None if ident is None else str(ident),
                        obj.get("split"))


def parse_prompt_source(obj: dict) -> PromptRecord:
    """A prompt, or the prompt of a demonstration (its completion is ignored)."""
    messages = obj.get("messages")
    if "completion" in obj or (isinstance(messages, list) and messages and isinstance(messages[-1], dict)
                               and messages[-1].get("role") == "assistant" and "prompt" not in obj):
        demo = parse_demonstration(obj)
        return PromptRecord(demo.messages, demo.id, demo.split)
    return parse_prompt(obj)


PARSERS.setdefault("candidates", parse_candidates)
PARSERS.setdefault("prompt_sources", parse_prompt_source)


def read_candidates(path: str | Path, skip_invalid: bool = False) -> ReadResult:
    return read_jsonl(path, "candidates", skip_invalid=skip_invalid)


# ---------------------------------------------------------------- sampling


class SampleConfig(StageConfig):
    model: list[str] = Field(..., description="Model(s) to sample from: Hugging Face directories, .gguf files "
                                              "or smollm2-135m-instruct; repeat --model (or separate with "
                                              "commas) to compare models side by side.")
    prompts: str = Field(..., description="Prompts JSONL ({prompt} or {messages}); a demonstrations file works "
                                          "too (its completions are ignored).")
    out: str = Field(..., description="Output candidates JSONL (one line per prompt).")
    n: int = Field(2, ge=1, description="Samples per prompt from each model.")
    max_new_tokens: int = Field(64, ge=1, description="Longest response in tokens.")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature (0: greedy).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: keep the smallest set of tokens "
                                                      "with this much probability.")
    top_k: int = Field(0, ge=0, description="Keep only the k most likely tokens (0: off).")
    stop: list[str] = Field(default_factory=list, description="Stop strings (besides EOS), comma-separated.")
    batch_size: int = Field(16, ge=1, description="Sequences generated together.")
    max_prompt_length: int = Field(512, ge=1, description="Longest prompt in tokens; longer prompts are an "
                                                          "error (or skipped with --skip-invalid).")


def model_labels(names: list[str]) -> list[str]:
    """Short, unique names for the models (directory names; repeated ones get #2, #3...)."""
    labels: list[str] = []
    for name in names:
        base = Path(name).name or name
        label, k = base, 2
        while label in labels:
            label, k = f"{base}#{k}", k + 1
        labels.append(label)
    return labels


def sample_candidates(cfg: SampleConfig, quiet: bool = False) -> dict:
    """Sample ``cfg.n`` responses per prompt from every model and write the candidates file."""
    set_threads(cfg.threads)
    read = read_jsonl(cfg.prompts, "prompt_sources", skip_invalid=cfg.skip_invalid)
    if read.skipped:
        console.print(f"[yellow]{read.summary()}")
    prompts: list[PromptRecord] = read.records
    labels = model_labels(cfg.model)
    rows = [{**to_json(p), "responses": [], "models": [], "ended": [], "num_tokens": []} for p in prompts]
    for i, row in enumerate(rows):
        row.setdefault("id", f"prompt-{i}")
    sampling = {"temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k,
                "max_new_tokens": cfg.max_new_tokens, "stop": cfg.stop, "seed": cfg.seed}
    t0, tokens_total = time.perf_counter(), 0
    too_long: list[str] = []
    with progress_bar(len(cfg.model) * len(prompts) * cfg.n, "sample", disable=quiet) as bar:
        for m, (name, label) in enumerate(zip(cfg.model, labels)):
            model, tokenizer = load_causal_lm(name, device=cfg.device, dtype=cfg.dtype)
            device = next(model.parameters()).device
            generator = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + m)
            encoded = {}
            for i, p in enumerate(prompts):
                ids = encode_prompt(tokenizer, p.messages)
                if len(ids) > cfg.max_prompt_length:
                    msg = f"prompt is {len(ids)} tokens, over --max-prompt-length {cfg.max_prompt_length}"
                    if not cfg.skip_invalid:
                        raise DataError(p.source.path, p.source.line, msg)
                    too_long.append(f"{p.source}: {msg}")
                    continue
                encoded[i] = ids
            jobs = [i for i in encoded for _ in range(cfg.n)]
            for start in range(0, len(jobs), cfg.batch_size):
                batch = jobs[start:start + cfg.batch_size]
                t_batch = time.perf_counter()
                gen = generate(model, tokenizer, [encoded[i] for i in batch], max_new_tokens=cfg.max_new_tokens,
                               temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, stop=cfg.stop,
                               generator=generator)
                lengths = gen.response_lengths.tolist()
                for i, text, ended, length in zip(batch, gen.texts, gen.ended.tolist(), lengths):
                    rows[i]["responses"].append(text)
                    rows[i]["models"].append(label)
                    rows[i]["ended"].append(bool(ended))
                    rows[i]["num_tokens"].append(int(length))
                tokens_total += sum(lengths)
                bar.advance(len(batch), tok_s=round(sum(lengths) / max(time.perf_counter() - t_batch, 1e-9)))
            del model
    if too_long:
        console.print(f"[yellow]skipped {len(too_long)} over-long prompts (once per model), first: {too_long[0]}")
    kept = [{**row, "sampling": sampling} for row in rows if row["responses"]]
    if not kept:
        raise PreftuneError(f"{cfg.prompts}: no prompt could be sampled")
    write_jsonl(cfg.out, kept)
    seconds = time.perf_counter() - t0
    return {"prompts": len(kept), "responses": sum(len(r["responses"]) for r in kept), "tokens": tokens_total,
            "seconds": seconds, "tokens_per_s": tokens_total / max(seconds, 1e-9),
            "ended_share": sum(sum(r["ended"]) for r in kept) / max(1, sum(len(r["ended"]) for r in kept))}
