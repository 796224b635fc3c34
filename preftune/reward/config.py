"""Options of ``preftune reward`` (torch-free, so ``--help`` is fast)."""

from __future__ import annotations

from pydantic import Field

from preftune.config import TrainConfig


class RewardConfig(TrainConfig):
    model: str = Field(..., description="Backbone: a causal-LM or encoder (BERT-style) Hugging Face directory, "
                                        "a .gguf file, or smollm2-135m-instruct. Usually the SFT model.")
    data: str = Field(..., description="Preferences JSONL: comparisons, rankings and/or ratings, in any "
                                       "format of docs/data-formats.md (mixed files are fine).")
    out: str = Field(..., description="Output directory: the reward model (Hugging Face directory with "
                                      "reward_model.json), metrics and checkpoints.")
    eval_data: str | None = Field(None, description="Held-out preferences JSONL.")
    eval_split: float = Field(0.1, ge=0, lt=1, description="Share of --data's prompts held out (each prompt's "
                                                           "records on one side) when no --eval-data is given; "
                                                           "records with a 'split' field decide themselves.")
    lr: float = Field(3e-5, gt=0, description="Peak learning rate (LoRA typically wants 1e-4..5e-4).")
    margin_scale: float = Field(1.0, ge=0, description="Margin per unit of a comparison's 'strength': loss "
                                                       "-log sigmoid(r_w - r_l - margin_scale * strength).")
    center_coef: float = Field(0.0, ge=0, description="Reward-centring coefficient c: adds c * (r_w + r_l)^2 "
                                                      "per pair (TRL's center_rewards_coefficient; 0.01 is usual).")
    reference: str | None = Field(None, description="Reference responses for normalisation (JSONL of "
                                                    "demonstrations, candidates from `preftune sample`, or "
                                                    "preferences); default: the training responses.")
    normalize_gain: bool = Field(True, description="Normalise to standard deviation 1 as well as mean 0 on "
                                                   "the reference responses (else only shift the mean).")
    normalize_samples: int = Field(512, ge=2, description="Most reference responses scored for the "
                                                          "normalisation (a seeded random subset).")
    group_by_prompt: bool = Field(True, description="Merge the records of one prompt that share responses (e.g. "
                                                    "several annotators comparing the same candidates) into one "
                                                    "batch element: each distinct response is scored once per "
                                                    "step and the held-out split keeps them together. "
                                                    "--batch-size then counts merged groups.")
    head_only: bool = Field(False, description="Train only the score head on the frozen backbone (a linear "
                                               "probe: the cheapest member of an --ensemble, K heads on one "
                                               "trunk). Not with --lora.")
    length_head: bool = Field(False, description="Length-debiased reward model (ODIN): a second head trained to "
                                                 "carry the response length and the reward (the first head) "
                                                 "decorrelated from it; the preference loss is on their sum, "
                                                 "and only the first is used downstream.")
    length_coef: float = Field(1.0, ge=0, description="--length-head: weight of the correlation loss "
                                                      "|corr(quality, length)| - corr(length head, length), "
                                                      "computed over each batch's responses.")
    ensemble: int = Field(1, ge=1, description="Train K members (seeds --seed, --seed + 1, ...; each on a bootstrap "
                                               "resample of the training prompts) into OUT/member-K with one "
                                               "manifest, OUT/ensemble.json; score with rm:OUT (mean), wco(OUT) "
                                               "or uwo(OUT, COEF) (docs/scoring.md).")
    bootstrap: bool = Field(True, description="--ensemble: train each member on a bootstrap resample of the "
                                              "training prompts (else all members see the same prompts and "
                                              "differ only by seed).")
    resample_seed: int | None = Field(None, description="Train on a bootstrap resample of the training prompts "
                                                        "drawn with this seed (--ensemble sets one per member). "
                                                        "[default: all prompts once]")
    split_seed: int | None = Field(None, description="Seed of the held-out split of --data. [default: --seed; "
                                                     "--ensemble keeps the run's for every member, so all are "
                                                     "judged on the same pairs]")
    resume: bool = Field(False, description="Continue from the newest checkpoint in OUT/checkpoints.")
