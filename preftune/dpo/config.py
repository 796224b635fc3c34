"""Options of ``preftune dpo`` (torch-free, so ``--help`` is fast)."""

from __future__ import annotations

from pydantic import Field

from preftune.config import TrainConfig


class DPOConfig(TrainConfig):
    model: str = Field(..., description="Starting policy (usually the SFT model): a Hugging Face directory, "
                                        "a .gguf file, or smollm2-135m-instruct.")
    data: str = Field(..., description="Comparisons JSONL ({prompt, chosen, rejected} and the other "
                                       "comparison forms).")
    out: str = Field(..., description="Output directory (final model at its top level).")
    eval_data: str | None = Field(None, description="Held-out comparisons JSONL.")
    eval_split: float = Field(0.1, ge=0, lt=1, description="Share of --data's prompts held out (each prompt's "
                                                           "records on one side) when no --eval-data is given; "
                                                           "records with a 'split' field decide themselves.")
    beta: float = Field(0.1, gt=0, description="Strength of the implicit KL leash to the starting model.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Assumed label-flip rate (conservative DPO).")
    lr: float = Field(5e-6, gt=0, description="Peak learning rate (LoRA typically wants 5e-5..2e-4).")
    resume: bool = Field(False, description="Continue from the newest checkpoint in OUT/checkpoints.")
