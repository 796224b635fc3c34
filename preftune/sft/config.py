"""Options of ``preftune sft`` (torch-free, so ``--help`` is fast)."""

from __future__ import annotations

from pydantic import Field

from preftune.config import TrainConfig


class SFTConfig(TrainConfig):
    model: str = Field(..., description="Base model: a Hugging Face directory, a .gguf file, or "
                                        "smollm2-135m-instruct.")
    data: str = Field(..., description="Demonstrations JSONL ({prompt, completion} or {messages}).")
    out: str = Field(..., description="Output directory (final model at its top level).")
    eval_data: str | None = Field(None, description="Held-out demonstrations JSONL.")
    eval_split: float = Field(0.05, ge=0, lt=1, description="Share of --data's prompts held out (each prompt's "
                                                            "records on one side) when no --eval-data is given; "
                                                            "records with a 'split' field decide themselves.")
    packing: bool = Field(False, description="Pack several examples into each row of --max-length tokens "
                                             "(block-diagonal attention, no cross-talk).")
    lr: float = Field(2e-5, gt=0, description="Peak learning rate (LoRA typically wants 1e-4..2e-4).")
    resume: bool = Field(False, description="Continue from the newest checkpoint in OUT/checkpoints.")
