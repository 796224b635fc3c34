"""Candidate responses for people (or simulated annotators) to judge: ``preftune sample``.

One or more models answer the same prompts, ``n`` samples each, in batches with a KV cache
(``preftune.models.generation.generate``). The output has one line per prompt::

    {"id": "p1", "prompt": "...", "responses": ["...", "..."], "models": ["base", "sft"],
     "ended": [true, false], "num_tokens": [17, 64],
     "sampling": {"temperature": 0.7, "top_p": 1.0, "top_k": 0, "max_new_tokens": 64,
                  "stop": [], "seed": 0}}

``models[i]`` names the model that wrote ``responses[i]``; ``ended[i]`` says whether it stopped at
EOS or a stop string (false: cut off at ``max_new_tokens``). ``preftune label`` and the annotation
app read this file (``read_jsonl(path, "candidates")`` gives ``CandidateSet`` records, with
file:line errors).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from preftune.data.chat import encode_prompt
from preftune.data.jsonl import read_jsonl, write_jsonl
from preftune.data.records import PromptRecord, to_json
from preftune.errors import DataError, PreftuneError
from preftune.models.engines import choose_engine, open_engine
from preftune.models.loading import inference_precision, resolve_device, set_threads
from preftune.models.precision import describe
from preftune.progress import console, progress_bar
from preftune.sampling.config import SampleConfig


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
    precision = inference_precision(cfg.dtype, cfg.device)
    engine_name = choose_engine(cfg.engine, precision, resolve_device(cfg.device))  # a missing vLLM fails here
    if not quiet:
        console.print(describe(precision, training=False))
    sampling = {"precision": precision, "engine": engine_name,
                "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k,
                "max_new_tokens": cfg.max_new_tokens, "stop": cfg.stop, "seed": cfg.seed}
    t0, tokens_total = time.perf_counter(), 0
    too_long: list[str] = []
    with progress_bar(len(cfg.model) * len(prompts) * cfg.n, "sample", disable=quiet) as bar:
        for m, (name, label) in enumerate(zip(cfg.model, labels)):
            engine = open_engine(cfg.engine, name, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed * 1000 + m,
                                 max_model_len=cfg.max_prompt_length + cfg.max_new_tokens, quiet=quiet)
            tokenizer = engine.tokenizer
            generator = torch.Generator().manual_seed(cfg.seed * 1000 + m)
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
                gen = engine.generate([encoded[i] for i in batch], max_new_tokens=cfg.max_new_tokens,
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
            engine.close()
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
