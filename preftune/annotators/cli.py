"""``preftune label``: registered on the top-level command group by ``preftune.cli``."""

from __future__ import annotations

import click

from preftune.annotators.config import LabelConfig
from preftune.config import config_from_cli, config_options


def register(cli: click.Group, config_help: str) -> None:
    @cli.command("label")
    @click.option("--config", type=click.Path(dir_okay=False), help=config_help)
    @config_options(LabelConfig)
    def label(**kwargs) -> None:
        """Simulated annotators: label candidates with a gold scorer's preference plus
        Bradley-Terry noise, as comparisons, rankings or ratings.

        Prints and writes (OUT with suffix .stats.json) the agreement between annotators and with
        the noiseless gold, next to the values the noise model predicts, and the noise ceiling
        (the best accuracy any reward model can reach on these labels). People agree on about 73%
        of comparisons: use --target-agreement 0.73 to match."""
        from preftune.annotators.label import describe_agreement, run_label

        cfg = config_from_cli(LabelConfig, kwargs, "label")
        stats = run_label(cfg)
        temps = sorted(set(round(t, 4) for t in stats["temperatures"].values()))
        click.echo(f"labeled: {describe_agreement(stats)}; T = {', '.join(map(str, temps))} -> {cfg.out} "
                   f"(statistics: {stats['stats_path']})")
