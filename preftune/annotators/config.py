"""Options of ``preftune label`` (torch-free, so ``--help`` is fast)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from preftune.config import StageConfig

Selection = Literal["random", "uncertainty"]
"""Which pairs annotators judge first: shuffled, or those the reward model is least sure of."""


class LabelConfig(StageConfig):
    candidates: str = Field(..., description="Candidates JSONL from `preftune sample` (one line per prompt "
                                             "with its responses).")
    out: str = Field(..., description="Output JSONL of comparisons, rankings or ratings; agreement "
                                      "statistics go to OUT with the suffix .stats.json.")
    labeler: str = Field("helpful", description="The annotators' gold preference, a scorer (docs/scoring.md): "
                                                "a built-in (helpful, sentiment, similarity, length, keyword(a|b), "
                                                "ends, nonrepetitive), a weighted sum like "
                                                "'0.5*sentiment + 0.5*similarity', rm:DIR, module:function or "
                                                "file.py:function.")
    kind: Literal["comparisons", "rankings", "ratings"] = Field("comparisons", description="What the "
                                                                "annotators produce.")
    format: Literal["preftune", "trl"] = Field("preftune", description="How comparisons are written: preftune's "
                                               "format, or trl (conversational prompt/chosen/rejected with "
                                               "margin, which TRL's trainers read with our meaning; "
                                               "comparisons only).")
    annotators: int = Field(1, ge=1, description="Number of simulated annotators; each labels every item.")
    noise: list[float] = Field(default_factory=lambda: [0.0], description="Bradley-Terry temperature T: P(A>B) "
                               "= sigmoid((gold_A - gold_B) / T); one value for all annotators or one per "
                               "annotator, comma-separated (0: noiseless gold).")
    target_agreement: float | None = Field(None, gt=0.5, lt=1, description="Choose T so that two annotators "
                                           "are expected to agree on this share of pairs (people: about "
                                           "0.73); overrides --noise.")
    scale: int = Field(3, ge=2, description="Rating scale 1..S (--kind ratings).")
    pairs_per_prompt: int = Field(0, ge=0, description="Comparisons per prompt and annotator, drawn at random "
                                                       "from all pairs of its responses (0: all pairs).")

    @model_validator(mode="after")
    def _trl_has_comparisons_only(self) -> "LabelConfig":
        if self.format == "trl" and self.kind != "comparisons":
            raise ValueError(f"--format trl: TRL has no format for {self.kind} (use --kind comparisons)")
        return self
