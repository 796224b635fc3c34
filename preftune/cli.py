"""The ``preftune`` command line: one sub-command per stage of the loop.

Every training command takes ``--config FILE`` (TOML/YAML; a ``[stage]`` table or top-level keys)
and one flag per config field; flags override the file. Bad input ends with one line naming the
file and line, and exit status 2, never a traceback.
"""

from __future__ import annotations

import sys

import click

from preftune.config import config_from_cli, config_options
from preftune.errors import PreftuneError

CONFIG_HELP = "TOML/YAML config file; its [stage] table (or top-level keys) set any option below."


class PreftuneGroup(click.Group):
    """A click group that turns preftune errors into one line and exit status 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except PreftuneError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=PreftuneGroup, context_settings={"help_option_names": ["-h", "--help"],
                                                 "max_content_width": 100})
@click.version_option(package_name="preftune")
def cli() -> None:
    """preftune: tune language models to human preferences.

    \b
    The loop:  sft -> sample -> label/annotate -> reward -> ppo -> eval
    Run `preftune COMMAND --help` for the options of each stage."""


def _sft_command():
    from preftune.sft.trainer import SFTConfig

    @cli.command("sft")
    @click.option("--config", type=click.Path(dir_okay=False), help=CONFIG_HELP)
    @config_options(SFTConfig)
    def sft(**kwargs) -> None:
        """Supervised fine-tuning on demonstrations (loss on response tokens only).

        Writes the final model as a plain Hugging Face directory at the top of --out, plus
        metrics.jsonl, metrics.json and resumable checkpoints under OUT/checkpoints."""
        from preftune.sft.trainer import train_sft

        cfg = config_from_cli(SFTConfig, kwargs, "sft")
        summary = train_sft(cfg)
        click.echo(f"sft done: eval_loss {summary['eval_loss']} -> {cfg.out}")

    return sft


_sft_command()

from preftune.feedback.cli import annotate  # noqa: E402  (light: the app loads on first use)

cli.add_command(annotate)


def main() -> None:
    cli(prog_name="preftune")


if __name__ == "__main__":
    sys.exit(main())
