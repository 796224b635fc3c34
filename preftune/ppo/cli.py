"""``preftune ppo``: registered on the top-level command group by ``preftune.cli``."""

from __future__ import annotations

import click

from preftune.config import config_from_cli, config_options
from preftune.ppo.config import PPOConfig
from preftune.progress import is_main_process


def register(cli: click.Group, config_help: str) -> None:
    @cli.command("ppo")
    @click.option("--config", type=click.Path(dir_okay=False), help=config_help)
    @config_options(PPOConfig)
    def ppo(**kwargs) -> None:
        """PPO against a reward with a KL leash to the SFT model.

        \b
        preftune ppo --policy SFT_DIR --reward SCORER --prompts P.jsonl --out DIR
        SCORER (docs/scoring.md): a reward-model directory, a built-in (sentiment,
        helpful, ...), module:function or file.py:function (prompts, responses) ->
        floats; weighted sums like '0.5*A + B'.

        Writes the final policy as a plain Hugging Face directory at the top of --out, per-step
        metrics to OUT/metrics.jsonl, sample completions to OUT/samples.jsonl and resumable
        checkpoints under OUT/checkpoints (--save-every)."""
        from preftune.ppo.trainer import train_ppo

        cfg = config_from_cli(PPOConfig, kwargs, "ppo")
        summary = train_ppo(cfg)
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}
        if is_main_process():
            click.echo(f"ppo done: {shown} -> {cfg.out}")
