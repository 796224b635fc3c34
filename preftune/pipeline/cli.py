"""``preftune run``: the whole loop, one command, with a report; ``preftune compare``: every method on one run."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import click

from preftune.config import config_from_cli, config_options
from preftune.pipeline.config import METHOD_TITLES, CompareConfig, RunConfig


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
                                                "on a config and data that ship with preftune (a --config "
                                                "replaces that config; the data stay the defaults).")
    @config_options(RunConfig)
    def run(quick: bool, **kwargs) -> None:
        """Run the whole RLHF loop and write a report.

        \b
        sft -> sample (base + SFT) -> label (simulated annotators, or people: --feedback app) -> reward
        -> ppo (or --algorithm rloo, grpo, reinforce, dpo) [-> --rounds N: again from the last policy]
        -> eval [-> people judge SFT vs tuned: --eval-judge human] -> probes
        Output in --out: report.html, metrics.json, stages.json, the models (sft/, rm/, ppo/...) and the
        data (data/); later rounds under round2/, ... Re-running reuses finished stages unless --force.
        Waiting for people's judgements ends with exit status 3 (or --wait); re-run to continue."""
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
                   + f"; {METHOD_TITLES[m]} beats SFT {_percent(metrics[f'winrate_{m}_vs_sft_gold'])} (gold); "
                   f"RM accuracy {_percent(metrics['rm_eval_accuracy'])}; {metrics['seconds_total'] / 60:.1f} min")
        if f"winrate_{m}_vs_sft_human" in metrics:
            click.echo(f"people prefer {METHOD_TITLES[m]} over SFT {_percent(metrics[f'winrate_{m}_vs_sft_human'])} "
                       f"({metrics['human_eval']['judgements']} judgements)")
        click.echo(f"report: {Path(cfg.out) / 'report.html'}")

    @cli.command("compare")
    @click.option("--config", type=click.Path(dir_okay=False),
                  help="TOML/YAML config: [compare] for the options below; [ppo], [rloo], [grpo], [reinforce], "
                       "[dpo] and [bon] for each method's options (default: the run's own config file).")
    @config_options(CompareConfig)
    def compare(**kwargs) -> None:
        """Compare alignment methods from one run's SFT model, reward model and prompts.

        \b
        preftune run --config examples/demo/demo.toml --out runs/demo
        preftune compare --run runs/demo
        Each method (--methods) tunes RUN/sft as preftune run --algorithm would (into RUN/<method>),
        best-of-n samples the SFT model; all are judged on the run's held-out prompts by its gold and
        reward model. Writes OUT/report.html (table, plot), OUT/compare.png and OUT/compare.json."""
        from preftune.pipeline.compare import run_compare

        file = kwargs.get("config")
        cfg = config_from_cli(CompareConfig, kwargs, "compare")
        result = run_compare(cfg, config_file=file)
        for row in result["methods"]:
            kl = row["kl"]["mean"] if row["kl"] else float("nan")
            click.echo(f"{row['method']:>9}: gold {row['gold']['mean']:.3f}, KL {kl:.2f} nats, "
                       f"{row['episodes']} responses sampled, {row['seconds']:.0f} s, {row['peak_rss_mb']:.0f} MB")
        click.echo(f"report: {Path(cfg.out or Path(cfg.run, 'compare')) / 'report.html'}")


def _percent(rate: float | None) -> str:
    """A rate as a percentage; "n/a" where there was nothing to measure it on (no held-out pairs)."""
    return "n/a" if rate is None else f"{100 * rate:.1f}%"
