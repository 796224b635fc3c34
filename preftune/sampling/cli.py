"""``preftune sample``: registered on the top-level command group by ``preftune.cli``."""

from __future__ import annotations

import click

from preftune.config import config_from_cli, config_options
from preftune.sampling.config import SampleConfig


def register(cli: click.Group, config_help: str) -> None:
    @cli.command("sample")
    @click.option("--config", type=click.Path(dir_okay=False), help=config_help)
    @click.option("--model", "model", multiple=True, help=SampleConfig.model_fields["model"].description
                  + " [required]")
    @config_options(SampleConfig, skip=("model",))
    def sample(**kwargs) -> None:
        """Sample candidate responses to the same prompts from one or more models.

        Writes one JSON line per prompt with its responses, the model that wrote each one,
        whether it ended (EOS or stop string) and the sampling settings with the seed."""
        from preftune.sampling.sample import sample_candidates

        models = [m.strip() for given in kwargs.pop("model") for m in given.split(",") if m.strip()]
        kwargs["model"] = models or None
        cfg = config_from_cli(SampleConfig, kwargs, "sample")
        summary = sample_candidates(cfg)
        click.echo(f"sampled {summary['responses']} responses to {summary['prompts']} prompts "
                   f"({summary['tokens_per_s']:.0f} tokens/s, {100 * summary['ended_share']:.0f}% ended) -> {cfg.out}")
