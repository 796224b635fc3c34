"""``preftune sample`` (candidates to judge) and ``preftune label`` (simulated annotators)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import click
import numpy as np
from pydantic import Field

from preftune.config import StageConfig, config_from_cli, config_options
from preftune.errors import ConfigError
from preftune.progress import console, progress_bar


class LabelConfig(StageConfig):
    candidates: str = Field(..., description="Candidates JSONL from `preftune sample` (one line per prompt "
                                             "with its responses).")
    out: str = Field(..., description="Output JSONL of comparisons, rankings or ratings; agreement "
                                      "statistics go to OUT with the suffix .stats.json.")
    labeler: str = Field("helpful", description="Gold preference: a labeler (helpful, sentiment, similarity, "
                                                "length, keyword(a|b), ends, nonrepetitive, or a weighted "
                                                "combination like 0.5*sentiment+0.5*similarity), "
                                                "module:function, file.py:function, or a reward-model "
                                                "directory (see docs/reward.md).")
    kind: Literal["comparisons", "rankings", "ratings"] = Field("comparisons", description="What the "
                                                                "annotators produce.")
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


def resolve_gold(spec: str, device: str | None):
    """A labeler name, or any reward specification (reward-model directory, python:..., sums)."""
    from preftune.feedback.simulated import load_labeler
    from preftune.reward.spec import load_reward

    if spec.startswith(("rm:", "python:")) or " + " in spec or Path(spec).is_dir():
        return load_reward(spec, device=device)
    return load_labeler(spec, device=device)


def score_candidates(fn, items, chunk: int = 256, quiet: bool = False) -> list[np.ndarray]:
    """Gold scores of every response of every candidate set (empty responses score 0, unused)."""
    flat = [(n, item.messages, r) for n, item in enumerate(items) for r in item.responses]
    scores = np.zeros(len(flat))
    with progress_bar(len(flat), "gold scores", disable=quiet) as bar:
        for i in range(0, len(flat), chunk):
            part = [(m, r) for _, m, r in flat[i:i + chunk] if r.strip()]
            idx = [i + k for k, (_, _, r) in enumerate(flat[i:i + chunk]) if r.strip()]
            if part:
                scores[idx] = fn([m for m, _ in part], [r for _, r in part]).double().numpy()
            bar.advance(len(flat[i:i + chunk]))
    out, pos = [], 0
    for item in items:
        out.append(scores[pos:pos + len(item.responses)])
        pos += len(item.responses)
    return out


def run_label(cfg: LabelConfig, quiet: bool = False) -> dict:
    from preftune.data.jsonl import write_jsonl
    from preftune.feedback.candidates import read_candidates
    from preftune.feedback.simulated import calibrate_temperature, simulate_labels

    read = read_candidates(cfg.candidates, cfg.skip_invalid)
    if read.skipped:
        console.print(f"[yellow]{read.summary()}")
    fn = resolve_gold(cfg.labeler, cfg.device)
    gold = score_candidates(fn, read.records, quiet=quiet)
    if cfg.target_agreement is not None:
        diffs = [g[i] - g[j] for item, g in zip(read.records, gold)
                 for i in range(len(g)) for j in range(i + 1, len(g))
                 if item.responses[i].strip() and item.responses[j].strip()
                 and item.responses[i] != item.responses[j]]
        temperatures = [calibrate_temperature(np.array(diffs), cfg.target_agreement)] * cfg.annotators
    elif len(cfg.noise) == 1:
        temperatures = cfg.noise * cfg.annotators
    elif len(cfg.noise) == cfg.annotators:
        temperatures = list(cfg.noise)
    else:
        raise ConfigError(f"--noise has {len(cfg.noise)} values for {cfg.annotators} annotators "
                          f"(give one, or one per annotator)")
    if any(t < 0 for t in temperatures):
        raise ConfigError("--noise: temperatures must be >= 0")
    rows, stats = simulate_labels(read.records, gold, cfg.kind, temperatures, scale=cfg.scale,
                                  pairs_per_prompt=cfg.pairs_per_prompt, seed=cfg.seed)
    write_jsonl(cfg.out, rows)
    all_gold = np.concatenate(gold)
    stats = {"labeler": cfg.labeler, "records": len(rows), **stats,
             "gold_mean": float(all_gold.mean()), "gold_std": float(all_gold.std())}
    stats_path = Path(cfg.out).with_suffix(".stats.json")
    stats_path.write_text(json.dumps(stats, indent=2) + "\n")
    stats["stats_path"] = str(stats_path)
    return stats


def describe_agreement(stats: dict) -> str:
    parts = [f"{stats['records']} {stats['kind']} from {stats['annotators']} annotator(s)"]
    fmt = lambda key: f"{100 * stats[key]:.1f}%"  # noqa: E731
    if "inter_annotator_agreement" in stats:
        expected = (f" (expected {fmt('expected_inter_annotator_agreement')})"
                    if "expected_inter_annotator_agreement" in stats else "")
        parts.append(f"inter-annotator agreement {fmt('inter_annotator_agreement')}{expected}")
    expected = f" (expected {fmt('expected_gold_agreement')})" if "expected_gold_agreement" in stats else ""
    parts.append(f"agreement with gold {fmt('gold_agreement')}{expected}")
    if "noise_ceiling" in stats:
        parts.append(f"noise ceiling {fmt('noise_ceiling')}")
    return "; ".join(parts)


def register(cli: click.Group, config_help: str) -> None:
    from preftune.feedback.candidates import SampleConfig

    @cli.command("sample")
    @click.option("--config", type=click.Path(dir_okay=False), help=config_help)
    @click.option("--model", "model", multiple=True, help=SampleConfig.model_fields["model"].description
                  + " [required]")
    @config_options(SampleConfig, skip=("model",))
    def sample(**kwargs) -> None:
        """Sample candidate responses to the same prompts from one or more models.

        Writes one JSON line per prompt with its responses, the model that wrote each one,
        whether it ended (EOS or stop string) and the sampling settings with the seed."""
        from preftune.feedback.candidates import sample_candidates

        models = [m.strip() for given in kwargs.pop("model") for m in given.split(",") if m.strip()]
        kwargs["model"] = models or None
        cfg = config_from_cli(SampleConfig, kwargs, "sample")
        summary = sample_candidates(cfg)
        click.echo(f"sampled {summary['responses']} responses to {summary['prompts']} prompts "
                   f"({summary['tokens_per_s']:.0f} tokens/s, {100 * summary['ended_share']:.0f}% ended) -> {cfg.out}")

    @cli.command("label")
    @click.option("--config", type=click.Path(dir_okay=False), help=config_help)
    @config_options(LabelConfig)
    def label(**kwargs) -> None:
        """Simulated annotators: label candidates with a programmatic gold preference plus
        Bradley-Terry noise, as comparisons, rankings or ratings.

        Prints and writes (OUT with suffix .stats.json) the agreement between annotators and with
        the noiseless gold, next to the values the noise model predicts, and the noise ceiling
        (the best accuracy any reward model can reach on these labels). People agree on about 73%
        of comparisons: use --target-agreement 0.73 to match."""
        cfg = config_from_cli(LabelConfig, kwargs, "label")
        stats = run_label(cfg)
        temps = sorted(set(round(t, 4) for t in stats["temperatures"].values()))
        click.echo(f"labeled: {describe_agreement(stats)}; T = {', '.join(map(str, temps))} -> {cfg.out} "
                   f"(statistics: {stats['stats_path']})")
