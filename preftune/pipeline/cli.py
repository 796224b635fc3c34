"""``preftune run``: the whole loop, one command, with a report."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import click

from preftune.config import config_from_cli, config_options
from preftune.pipeline.config import METHOD_TITLES, RunConfig


def quick_files() -> dict[str, str]:
    """The ``--quick`` run's config file and data, shipped inside the package."""
    folder = Path(str(resources.files("preftune.resources").joinpath("quick")))
    return {"config": str(folder / "quick.toml"), "prompts": str(folder / "prompts.jsonl"),
            "demos": str(folder / "demos.jsonl")}


def register(cli: click.Group, config_help: str) -> None:
    @cli.command("run")
    @click.option("--config", type=click.Path(dir_okay=False),
                  help="TOML/YAML config: [run] for the options below; [sft], [sample], [label], [reward], "
                       "[ppo] (or the table of --algorithm), [eval] and [probes] (or [probes.hallucination], "
                       "[probes.adversarial]) for any "
                       "option of those stages' commands (see examples/demo/demo.toml).")
    @click.option("--quick", is_flag=True, help="Tiny models and small counts: the whole loop in under 2 minutes, "
                                                "on a config and data that ship with preftune.")
    @config_options(RunConfig)
    def run(quick: bool, **kwargs) -> None:
        """Run the whole RLHF loop and write a report.

        \b
        sft -> sample (base + SFT) -> label (simulated annotators) -> reward -> ppo (or --algorithm
        rloo, grpo, reinforce, dpo) -> eval -> probes
        Output in --out: report.html, metrics.json, stages.json, the models (sft/, rm/, ppo/...) and the
        data (data/). Re-running reuses finished stages unless --force."""
        from preftune.pipeline.run import run_loop

        defaults = {}
        if quick:
            files = quick_files()
            kwargs["config"] = kwargs.get("config") or files["config"]
            defaults = {"prompts": files["prompts"], "demos": files["demos"]}
        file = kwargs.get("config")
        cfg = config_from_cli(RunConfig, kwargs, "run", defaults=defaults)
        metrics = run_loop(cfg, config_file=file)
        gold, m = metrics["gold_reward"], cfg.algorithm
        click.echo("gold reward: " + ", ".join(f"{k} {gold[k]['mean']:.3f}" for k in ("base", "sft", m))
                   + f"; {METHOD_TITLES[m]} beats SFT {100 * metrics[f'winrate_{m}_vs_sft_gold']:.0f}% (gold); "
                   f"RM accuracy {metrics['rm_eval_accuracy']:.3f}; {metrics['seconds_total'] / 60:.1f} min")
        click.echo(f"report: {Path(cfg.out) / 'report.html'}")
