"""``preftune sft``: registered on the top-level command group by ``preftune.cli``."""

from __future__ import annotations

import click

from preftune.config import config_from_cli, config_options
from preftune.progress import is_main_process
from preftune.sft.config import SFTConfig


def register(cli: click.Group, config_help: str) -> None:
    @cli.command("sft")
    @click.option("--config", type=click.Path(dir_okay=False), help=config_help)
    @config_options(SFTConfig)
    def sft(**kwargs) -> None:
        """Supervised fine-tuning on demonstrations (loss on response tokens only).

        Writes the final model as a plain Hugging Face directory at the top of --out, plus
        metrics.jsonl, metrics.json and resumable checkpoints under OUT/checkpoints."""
        from preftune.sft.trainer import train_sft

        cfg = config_from_cli(SFTConfig, kwargs, "sft")
        summary = train_sft(cfg)
        if is_main_process():
            click.echo(f"sft done: eval_loss {summary['eval_loss']} -> {cfg.out}")
