"""``preftune ppo``, ``rloo``, ``grpo`` and ``reinforce``: registered on the top-level command group by
``preftune.cli``. One command per method, each over its own config (``preftune.rl.config``) and the
same trainer."""

from __future__ import annotations

import click

from preftune.config import config_from_cli, config_options
from preftune.progress import is_main_process
from preftune.rl.config import ALGORITHMS, OnlineRLConfig

USAGE = """

        \b
        preftune {name} --policy SFT_DIR --reward SCORER --prompts P.jsonl --out DIR
        SCORER (docs/scoring.md): a reward-model directory, a built-in (sentiment,
        helpful, ...), module:function or file.py:function (prompts, responses) ->
        floats; weighted sums like '0.5*A + B'.

        Writes the final policy as a plain Hugging Face directory at the top of --out, per-step
        metrics to OUT/metrics.jsonl, sample completions to OUT/samples.jsonl and resumable
        checkpoints under OUT/checkpoints (--save-every)."""

SUMMARIES = {
    "ppo": "PPO against a reward with a KL leash to the SFT model (value head, GAE).",
    "rloo": "RLOO: K samples per prompt, each against the mean reward of the other K - 1 (no critic).",
    "grpo": "GRPO: K samples per prompt, rewards normalised within each prompt's group (no critic; Dr. GRPO and "
            "DAPO variants with --loss-type, --scale-rewards, --clip-ratio-high, --dynamic-sampling).",
    "reinforce": "REINFORCE++: per-token KL penalty in the reward, returns to go whitened over the batch (no critic).",
}


def _command(cli: click.Group, config_help: str, name: str, cls: type[OnlineRLConfig]) -> None:
    def command(**kwargs) -> None:
        from preftune.rl.trainer import train_rl

        cfg = config_from_cli(cls, kwargs, name)
        summary = train_rl(cfg)
        shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}
        if is_main_process():
            click.echo(f"{name} done: {shown} -> {cfg.out}")

    command.__doc__ = SUMMARIES[name] + USAGE.format(name=name)
    command = config_options(cls)(command)
    command = click.option("--config", type=click.Path(dir_okay=False), help=config_help)(command)
    cli.command(name)(command)


def register(cli: click.Group, config_help: str) -> None:
    for name, cls in ALGORITHMS.items():
        _command(cli, config_help, name, cls)
