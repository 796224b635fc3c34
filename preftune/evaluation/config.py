"""Options of the evaluation commands: ``preftune eval``, ``bon`` and ``probe`` (torch-free, so
``--help`` is fast)."""

from __future__ import annotations

from pydantic import Field, field_validator

from preftune.config import EngineName, StageConfig, engine_field


class EvalConfig(StageConfig):
    model: str | None = Field(None, description="Model A to evaluate: a Hugging Face directory, a .gguf file "
                                                "or smollm2-135m-instruct (not needed with --collect).")
    baseline: str | None = Field(None, description="Model B to compare A with (win rates and KL(A || B) "
                                                   "need it).")
    prompts: str | None = Field(None, description="Prompts JSONL ({prompt} or {messages}); not needed "
                                                  "with --collect.")
    judge: list[str] = Field(default_factory=list, description="A judge (repeatable): a scorer "
                                                               "(docs/scoring.md: a reward-model directory, "
                                                               "a built-in such as helpful, file.py:function, "
                                                               "sums) or human:PROJECT (people, in the "
                                                               "feedback app).")
    out: str = Field(..., description="Output directory (eval.json, samples.jsonl, report.html).")
    samples: int = Field(0, ge=0, description="Evaluate this many prompts, drawn with --seed (0: all).")
    max_new_tokens: int = Field(64, ge=1, description="Longest response in tokens.")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature (KL is measured between the "
                                                      "temperature-scaled distributions).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling (keep 1.0 for an unbiased KL).")
    batch_size: int = Field(16, ge=1, description="Prompts per generation batch.")
    engine: EngineName = engine_field()
    tie_margin: float = Field(0.0, ge=0, description="Score differences up to this count as ties.")
    bootstrap: int = Field(2000, ge=100, description="Bootstrap resamples for the score intervals.")
    feedback_url: str | None = Field(None, description="Feedback app address for human:PROJECT judges "
                                                       "(token from PREFTUNE_FEEDBACK_TOKEN).")
    collect: bool = Field(False, description="Pull the human judgements of an earlier run in --out and "
                                             "update eval.json and report.html (no sampling).")


class BonConfig(StageConfig):
    model: str = Field(..., description="Policy to sample from (HF directory, .gguf or smollm2-135m-instruct).")
    reward: str = Field(..., description="Proxy that picks the best of n: a scorer (docs/scoring.md), e.g. a "
                                         "reward-model directory.")
    gold: str | None = Field(None, description="Gold scorer of the picked responses (docs/scoring.md).")
    prompts: str = Field(..., description="Prompts JSONL ({prompt} or {messages}).")
    out: str = Field(..., description="Output directory (bon.json, samples.jsonl, report.html).")
    n: list[int] = Field(default_factory=lambda: [1, 2, 4, 8, 16], description="Values of n, comma-separated.")
    samples: int = Field(0, ge=0, description="Use this many prompts, drawn with --seed (0: all).")
    ppo_metrics: str | None = Field(None, description="A PPO run's metrics.jsonl (eval/gold, eval/proxy, "
                                                      "eval/kl) to plot next to best-of-n.")
    max_new_tokens: int = Field(64, ge=1, description="Longest response in tokens.")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling.")
    batch_size: int = Field(16, ge=1, description="Sequences per generation batch.")
    engine: EngineName = engine_field()
    bootstrap: int = Field(2000, ge=100, description="Bootstrap resamples (over prompts) for the intervals.")

    @field_validator("n")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or min(v) < 1:
            raise ValueError("every n must be >= 1")
        return sorted(set(v))


class ProbeConfig(StageConfig):
    model: str = Field(..., description="Model to probe (HF directory, .gguf or smollm2-135m-instruct).")
    baseline: str | None = Field(None, description="The model before tuning, probed the same way for a "
                                                   "before/after table.")
    out: str = Field(..., description="Output directory (probe.json, answers.jsonl, report.html).")
    samples: int = Field(0, ge=0, description="Probe this many items, drawn with --seed (0: all).")
    max_new_tokens: int = Field(48, ge=1, description="Longest reply in tokens.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature (0: greedy, reproducible).")
    batch_size: int = Field(16, ge=1, description="Prompts per generation batch.")
    engine: EngineName = engine_field()


DEFAULT_INSTRUCTION = ("Answer the question in a few words. If you do not know the answer, say "
                       "\"I don't know\".\n\nQuestion: {question}")


class HallucinationConfig(ProbeConfig):
    questions: str | None = Field(None, description="Question JSONL ({id, question, answers, category?, "
                                                    "case_sensitive?}); default: the bundled 258 questions.")
    instruction: str = Field(DEFAULT_INSTRUCTION, description="User message template; {question} is "
                                                              "replaced by the question.")


class AdversarialConfig(ProbeConfig):
    prompts: str | None = Field(None, description="Prompt JSONL ({id, prompt, category, canary?}; category "
                                                  "'benign' for controls); default: the bundled set.")
    max_new_tokens: int = Field(64, ge=1, description="Longest reply in tokens.")
    red_team: int = Field(0, ge=0, description="Automated red teaming: generate this many new attack prompts "
                                               "from few-shot examples of successful attacks (0: off).")
    red_team_model: str | None = Field(None, description="Model that writes the attacks (default: --model).")
    shots: int = Field(4, ge=1, description="Few-shot examples per red-team generation.")
