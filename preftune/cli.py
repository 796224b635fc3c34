"""The ``preftune`` command line: one sub-command per stage of the loop.

Every training command takes ``--config FILE`` (TOML/YAML; a ``[stage]`` table or top-level keys)
and one flag per config field; flags override the file. Bad input ends with one line naming the
file and line, and exit status 2, never a traceback. ``preftune run`` waiting for people's
judgements stops with exit status 3 and a line saying what is missing.
"""

from __future__ import annotations

import sys

import click

from preftune.errors import PreftuneError, WaitingForPeople

CONFIG_HELP = "TOML/YAML config file; its [stage] table (or top-level keys) set any option below."


class PreftuneGroup(click.Group):
    """A click group that turns preftune errors into one line and exit status 2 (or the error's own
    ``exit_code``: 3 for a run that stopped to wait for people)."""

    def invoke(self, ctx):
        try:
            result = super().invoke(ctx)
        except PreftuneError as e:
            click.echo(f"{'waiting' if isinstance(e, WaitingForPeople) else 'error'}: {e}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        if "torch.distributed" in sys.modules:  # under torchrun: leave the process group and exit
            from preftune.training.distributed import finish_and_exit

            finish_and_exit()
        return result


@click.group(cls=PreftuneGroup, context_settings={"help_option_names": ["-h", "--help"],
                                                 "max_content_width": 100})
@click.version_option(package_name="preftune")
def cli() -> None:
    """preftune: tune language models to human preferences.

    \b
    The loop:  sft -> sample -> label/annotate -> reward -> ppo, rloo, grpo, reinforce (or dpo, bon) -> eval, probe
    `preftune run` runs the whole loop from one config file and writes a report.
    Run `preftune COMMAND --help` for the options of each stage."""


# Each stage registers its own commands, in the order of the loop. Only configs and click are
# imported here (no torch), so `preftune --help` and every `preftune STAGE --help` are fast.
from preftune.annotators.cli import register as _register_label  # noqa: E402
from preftune.data.cli import register as _register_convert  # noqa: E402
from preftune.dpo.cli import register as _register_dpo  # noqa: E402
from preftune.evaluation.cli import register as _register_evaluation  # noqa: E402
from preftune.feedback.cli import annotate  # noqa: E402  (light: the app loads on first use)
from preftune.pipeline.cli import register as _register_run  # noqa: E402
from preftune.reward.cli import register as _register_reward  # noqa: E402
from preftune.rl.cli import register as _register_rl  # noqa: E402
from preftune.sampling.cli import register as _register_sample  # noqa: E402
from preftune.sft.cli import register as _register_sft  # noqa: E402

for _register in (_register_sft, _register_sample, _register_label, _register_reward, _register_rl,
                  _register_dpo, _register_evaluation, _register_run, _register_convert):
    _register(cli, CONFIG_HELP)
cli.add_command(annotate)


def main() -> None:
    cli(prog_name="preftune")


if __name__ == "__main__":
    sys.exit(main())
