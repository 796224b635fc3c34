"""Configuration of the main job (``preftune run``): the whole loop on one model.

The same TOML file configures every stage: the ``[run]`` table holds the fields below, and the
``[sft]``, ``[sample]``, ``[label]``, ``[reward]``, ``[ppo]`` (or ``[rloo]``, ``[grpo]``, ``[reinforce]``,
``[dpo]``: the table of ``algorithm``), ``[eval]`` and ``[probes]`` tables
(``[probes.hallucination]``, ``[probes.adversarial]`` for what one probe alone takes) hold any
option of that stage's own command (see ``preftune sft --help`` etc.). Paths between stages are set
by the run; where the run also chooses a value (``max_new_tokens``, ``batch_size``, the probes'
``samples``), the stage's table overrides it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from preftune.annotators.config import Selection
from preftune.config import EngineName, StageConfig, engine_field

Method = Literal["ppo", "rloo", "grpo", "reinforce", "dpo"]
METHOD_TITLES = {"ppo": "PPO", "rloo": "RLOO", "grpo": "GRPO", "reinforce": "REINFORCE++", "dpo": "DPO"}


class RunConfig(StageConfig):
    model: str = Field("smollm2-135m-instruct", description="Base model: a Hugging Face directory, a .gguf "
                                                           "file, smollm2-135m-instruct, or 'tiny' (a small "
                                                           "random model built on the fly, for --quick).")
    out: str = Field("runs/demo", description="Run directory (report.html, metrics.json, models, data).")
    prompts: str = Field("examples/demo/prompts.jsonl", description="Prompts JSONL with split train/eval.")
    demos: str = Field("examples/demo/demos.jsonl", description="Demonstrations JSONL for SFT.")
    gold: str = Field("helpful", description="The simulated annotators' gold preference, a scorer "
                                             "(docs/scoring.md); also PPO's and the evaluation's gold.")
    algorithm: Method = Field("ppo", description="How stage 4 tunes the SFT model: ppo, rloo, grpo, reinforce "
                                                 "(REINFORCE++) against the reward model, or dpo on the run's "
                                                 "comparisons; its options come from the [ppo], [rloo], [grpo], "
                                                 "[reinforce] or [dpo] table, its output goes to OUT/<algorithm>.")
    reward_backbone: str = Field("minilm", description="Reward-model backbone: minilm (all-MiniLM-L6-v2), "
                                                       "sft (the SFT model), base, or a model directory.")
    comparison_prompts: int = Field(128, ge=2, description="Training prompts answered by the base and SFT "
                                                           "models for people to compare.")
    samples_per_model: int = Field(2, ge=1, description="Responses per comparison prompt from each model.")
    reward_ratings: bool = Field(True, description="Also train the reward model on the pairs implied by the "
                                                   "annotators' 1-3 ratings (ties skipped); its held-out "
                                                   "accuracy is measured on comparisons only.")
    annotators: int = Field(2, ge=1, description="Simulated annotators; each labels every pair.")
    target_agreement: float = Field(0.73, gt=0.5, lt=1, description="Noise calibrated so two annotators agree "
                                                                    "this often (people: about 0.73).")
    noise: float | None = Field(None, ge=0, description="Fixed Bradley-Terry temperature of the annotators "
                                                        "instead of calibrating to --target-agreement.")
    max_new_tokens: int = Field(48, ge=1, description="Longest response when sampling candidates and "
                                                      "evaluating.")
    eval_prompts: int = Field(100, ge=2, description="Held-out prompts for the final evaluation.")
    monitor_prompts: int = Field(24, ge=0, description="Held-out prompts PPO samples every eval_every steps "
                                                       "(proxy and gold against KL).")
    probes: bool = Field(True, description="Run the hallucination and adversarial probes on the base and PPO "
                                           "models.")
    probe_questions: int = Field(60, ge=0, description="Questions of the hallucination probe to ask.")
    probe_attacks: int = Field(40, ge=0, description="Adversarial prompts of the safety probe to try.")
    feedback: Literal["simulated", "app"] = Field("simulated", description="Who labels: simulated annotators "
                                                  "(--gold with noise), or people in the feedback app (--db): the "
                                                  "run creates the projects, imports the candidates and waits for "
                                                  "the judgements (--wait) or stops until they are in (exit status "
                                                  "3; re-run to continue).")
    db: str | None = Field(None, description="The feedback app's database for --feedback app / --eval-judge human: "
                                             "a PostgreSQL URL or a SQLite path (default: $PREFTUNE_DB, else "
                                             "preftune-feedback.db here, as preftune annotate uses).")
    project: str | None = Field(None, description="Name prefix of the run's projects (PREFIX-ratings, PREFIX-pairs, "
                                                  "-r2 ... added in later rounds, and PREFIX-eval-METHOD-DIGEST; "
                                                  "default: the name of --out).")
    wait: bool = Field(False, description="Wait (polling the database, with a progress bar) until people have "
                                          "judged every task instead of stopping.")
    poll_seconds: float = Field(10.0, gt=0, description="How often --wait looks at the database.")
    eval_judge: Literal["gold", "human"] = Field("gold", description="Final evaluation: the gold and the reward "
                                                 "model only, or also people (human: SFT-vs-tuned pairs of the "
                                                 "held-out prompts go to the PREFIX-eval-METHOD-DIGEST project; "
                                                 "the report gives their win rate with its Wilson interval and "
                                                 "agreement).")
    rounds: int = Field(1, ge=1, le=20, description="Iterated RLHF: each round after the first samples new "
                                                    "candidates from the last round's policy and the SFT model, "
                                                    "labels them, retrains the reward model on everything judged so "
                                                    "far and continues tuning from the last policy (KL to SFT).")
    select: Selection = Field("random", description="Which comparisons people judge first (and, with "
                                                    "--labels-per-round, at all): random, or uncertainty (the pairs "
                                                    "the last round's reward model, or ensemble, is least sure of; "
                                                    "the first round has no reward model yet and is random).")
    labels_per_round: int | None = Field(None, ge=1, description="Comparisons (pairs) judged per round (default: "
                                                                 "every pair of the candidates; ratings are "
                                                                 "always of every response).")
    engine: EngineName = engine_field()
    force: bool = Field(False, description="Re-run every stage, even the ones a previous run finished.")
    batch_size: int = Field(32, ge=1, description="Prompts per generation batch when sampling and evaluating.")


class CompareConfig(StageConfig):
    """Options of ``preftune compare`` (the ``[compare]`` table of a config file)."""

    run: str = Field(..., description="A main job's run directory (preftune run --out): its SFT model, reward "
                                      "model, prompts and gold are what every method starts from and is judged by.")
    methods: list[str] = Field(default_factory=lambda: ["ppo", "rloo", "grpo", "reinforce", "dpo", "bon"],
                               description="Methods to compare: ppo, rloo, grpo, reinforce, dpo, bon "
                                           "(best-of-n of the SFT model against the reward model).")
    bon_n: list[int] = Field(default_factory=lambda: [1, 2, 4, 8], description="Best-of-n's n values (its KL "
                             "is the analytic log n - (n-1)/n).")
    kl_budget: float = Field(6.0, gt=0, description="The KL (nats) within which the best gold reward is reported.")
    engine: EngineName = engine_field()
    force: bool = Field(False, description="Re-train methods compare already trained.")
    out: str | None = Field(None, description="Where the comparison goes (default RUN/compare); each method's "
                                              "model goes to RUN/<method>, as preftune run --algorithm puts it.")
