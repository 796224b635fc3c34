"""The models PPO holds: the policy, its frozen reference, and the value function.

* **Reference**: with LoRA it is the policy itself with its adapters disabled (one copy of the
  weights in memory); with full fine-tuning it is a second, frozen copy of the SFT model.
* **Value function** (``value_model``):
  ``head``   -- a scalar head on the policy's own trunk, initialised at zero (lm-human-preferences).
                It reads the hidden states the policy computes anyway, so values cost nothing at
                rollout (captured during generation) and share the update's forward pass;
  ``policy`` -- a separate trunk initialised from the SFT model, with a zero head;
  ``reward`` -- a separate trunk and head initialised from the reward-model directory (InstructGPT);
  a path   -- a separate trunk (and head, if it is a sequence-classification model) from that directory.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from preftune.errors import PreftuneError
from preftune.models.loading import disable_dropout, resolve_model_path
from preftune.models.precision import fit_attention


class ValueHead(nn.Module):
    """A scalar read-out of final hidden states: a given linear layer (a reward model's score
    head), or a new one initialised at zero so the first values are 0."""

    def __init__(self, hidden_size: int, linear: nn.Linear | None = None) -> None:
        super().__init__()
        if linear is None:
            linear = nn.Linear(hidden_size, 1)
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
        self.linear = linear

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):  # fp32 values (and value targets), always
            return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1).float()


class ValueModel(nn.Module):
    """A separate value network: a transformer trunk and a ``ValueHead``."""

    def __init__(self, trunk: nn.Module, head: ValueHead) -> None:
        super().__init__()
        self.trunk, self.head = trunk, head

    def forward(self, input_ids, attention_mask, position_ids, select) -> torch.Tensor:
        hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False).last_hidden_state
        return self.head(hidden[select])


def load_value_model(path: str | Path, device, dtype, compute: str = "fp32") -> ValueModel:
    """A value model from a directory: a sequence-classification model (a reward model) keeps its
    trunk and score head; a causal LM keeps its trunk and gets a zero-initialised head. Its weights
    train, so ``dtype`` is fp32 under mixed precision; ``compute`` is the precision of its passes."""
    from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

    directory = resolve_model_path(path)
    config = AutoConfig.from_pretrained(directory)
    try:
        if any(a.endswith("ForSequenceClassification") for a in (config.architectures or [])):
            classifier = AutoModelForSequenceClassification.from_pretrained(directory, dtype=dtype, num_labels=1)
            score = getattr(classifier, "score", None)
            if not isinstance(score, nn.Linear):
                raise PreftuneError(f"{directory}: {type(classifier).__name__} has no linear score head to "
                                    f"start a value model from")
            model = ValueModel(classifier.base_model, ValueHead(config.hidden_size, score))
        else:
            trunk = AutoModel.from_pretrained(directory, dtype=dtype)
            model = ValueModel(trunk, ValueHead(config.hidden_size).to(dtype))
    except (OSError, ValueError) as e:
        raise PreftuneError(f"{directory}: could not load a value model: {str(e).splitlines()[0]}") from None
    disable_dropout(model.trunk)
    fit_attention(model.trunk, torch.device(device) if isinstance(device, str) else device, compute)
    return model.to(device).eval()


@contextmanager
def reference_mode(policy, reference):
    """Run the block as the reference policy: the separate frozen copy when there is one, else
    the LoRA policy with its adapters disabled."""
    if reference is not None:
        yield reference
    else:
        with policy.disable_adapter():
            yield policy
