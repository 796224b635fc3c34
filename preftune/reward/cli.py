"""``preftune reward``: registered on the top-level command group by ``preftune.cli``."""

from __future__ import annotations

import click

from preftune.config import config_from_cli, config_options
from preftune.progress import is_main_process
from preftune.reward.config import RewardConfig


def register(cli: click.Group, config_help: str) -> None:
    @cli.command("reward")
    @click.option("--config", type=click.Path(dir_okay=False), help=config_help)
    @config_options(RewardConfig)
    def reward(**kwargs) -> None:
        """Train a scalar reward model on human (or simulated) preferences.

        \b
        Comparisons: Bradley-Terry loss -log sigmoid(r_chosen - r_rejected - margin).
        Rankings of K: all C(K,2) pairs in one batch element, averaged (InstructGPT).
        Ratings: pairs of responses to the same prompt with different ratings (ties skipped).

        Writes OUT as a Hugging Face directory that AutoModelForSequenceClassification loads
        (num_labels=1), plus reward_model.json (normalisation: reference responses score mean 0,
        std 1), metrics.jsonl, metrics.json (eval_accuracy, eval_loss, eval_ece, ...) and
        checkpoints. Use it as a scorer (--reward OUT, --judge OUT) or from Python with
        preftune.models.reward_model.RewardModel.load(OUT).score.

        --ensemble K trains K such models into OUT/member-k (bootstrap resamples, seeds --seed + k)
        with the manifest OUT/ensemble.json: score with rm:OUT (the mean), wco(OUT) or uwo(OUT, COEF).
        --length-head adds a head that takes the response length out of the reward (ODIN)."""
        from preftune.reward.fit import fit_reward

        cfg = config_from_cli(RewardConfig, kwargs, "reward")
        summary = fit_reward(cfg)
        acc = summary.get("eval_accuracy")
        if acc is None:
            shown = "no eval data"
        elif cfg.ensemble > 1:
            shown = (f"ensemble of {cfg.ensemble}: eval_accuracy {acc:.3f} (members "
                     f"{summary['member_eval_accuracy_mean']:.3f} on average), disagreement "
                     f"{summary['eval_disagreement']:.3f}")
        else:
            shown = f"eval_accuracy {acc:.3f}, eval_loss {summary['eval_loss']:.4f}"
        if is_main_process():
            click.echo(f"reward done: {shown} -> {cfg.out}")
