"""``preftune dpo``: registered on the top-level command group by ``preftune.cli``."""

from __future__ import annotations

import click

from preftune.config import config_from_cli, config_options
from preftune.dpo.config import DPOConfig
from preftune.progress import is_main_process


def register(cli: click.Group, config_help: str) -> None:
    @cli.command("dpo")
    @click.option("--config", type=click.Path(dir_okay=False), help=config_help)
    @config_options(DPOConfig)
    def dpo(**kwargs) -> None:
        """Direct preference optimisation (DPO): tune a policy on comparisons, no reward model.

        Loss -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) -
        log ref(rejected)))); the reference is the starting model, scored once before training.
        Writes the tuned model as a plain Hugging Face directory at the top of --out."""
        from preftune.dpo.trainer import train_dpo

        cfg = config_from_cli(DPOConfig, kwargs, "dpo")
        summary = train_dpo(cfg)
        if is_main_process():
            acc = summary["eval_accuracy"]
            click.echo(f"dpo done: eval_accuracy {acc if acc is None else round(acc, 3)} -> {cfg.out}")
