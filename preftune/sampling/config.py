"""Options of ``preftune sample`` (torch-free, so ``--help`` is fast)."""

from __future__ import annotations

from pydantic import Field

from preftune.config import EngineName, StageConfig, engine_field


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
    engine: EngineName = engine_field()
