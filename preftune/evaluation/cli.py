"""CLI commands of the evaluation stage: ``preftune eval``, ``preftune bon``, ``preftune probe ...``."""

from __future__ import annotations

import click

from preftune.config import config_from_cli, config_options
from preftune.evaluation.config import AdversarialConfig, BonConfig, EvalConfig, HallucinationConfig


def register(cli: click.Group, config_help: str) -> None:
    """Add ``eval``, ``bon`` and ``probe`` to the ``preftune`` command group."""

    @cli.command("eval")
    @click.option("--config", type=click.Path(dir_okay=False), help=config_help)
    @click.option("--judge", "judge", multiple=True, metavar="SCORER",
                  help=EvalConfig.model_fields["judge"].description)
    @config_options(EvalConfig, skip=("judge",))
    def eval_command(judge, **kwargs) -> None:
        """Compare model A with baseline B under one or more judges.

        Per judge: mean scores with bootstrap 95 % intervals, win rate of A over B (ties as half)
        with a Wilson interval, length-controlled win rate, sampled KL(A || B) with its standard
        error, and response lengths. Writes OUT/eval.json, OUT/samples.jsonl, OUT/report.html."""
        from preftune.evaluation.evaluate import run_eval

        if judge:
            kwargs["judge"] = list(judge)
        cfg = config_from_cli(EvalConfig, kwargs, "eval")
        result = run_eval(cfg)
        for j in result["judges"]:
            low, high = j.get("winrate_ci") or (None, None)
            wr = "-" if j.get("winrate") is None else f"{j['winrate']:.3f} [{low:.3f}, {high:.3f}]"
            mean = "-" if j.get("mean_a") is None else f"{j['mean_a']:.4g}"
            click.echo(f"{j['judge']}: mean A {mean}  win rate {wr}")
        click.echo(f"report: {cfg.out}/report.html")

    @cli.command("bon")
    @click.option("--config", type=click.Path(dir_okay=False), help=config_help)
    @config_options(BonConfig)
    def bon_command(**kwargs) -> None:
        """Best-of-n against a proxy scorer: gold and proxy reward against the analytic KL.

        Samples max(n) responses per prompt once and scores every n from them. Writes
        OUT/bon.json, OUT/samples.jsonl and OUT/report.html (with --ppo-metrics, PPO on the same plot)."""
        from preftune.evaluation.bon import run_bon

        cfg = config_from_cli(BonConfig, kwargs, "bon")
        result = run_bon(cfg)
        for r in result["results"]:
            gold = "-" if r["gold"] is None else f"{r['gold']:.4g}"
            click.echo(f"n={r['n']:<4} KL {r['kl']:.3f}  proxy {r['proxy']:.4g}  gold {gold}")
        click.echo(f"report: {cfg.out}/report.html")

    @cli.group("probe")
    def probe() -> None:
        """Probes of how tuning goes wrong: hallucination and adversarial prompts."""

    @probe.command("hallucination")
    @click.option("--config", type=click.Path(dir_okay=False), help=config_help)
    @config_options(HallucinationConfig)
    def hallucination_command(**kwargs) -> None:
        """Closed-book questions with known answers: correct / wrong (hallucinated) / abstained rates.

        Writes OUT/probe.json, OUT/answers.jsonl and OUT/report.html; --baseline adds the model
        before tuning for a before/after table."""
        from preftune.evaluation.probes.hallucination import run_hallucination_probe

        cfg = config_from_cli(HallucinationConfig, kwargs, "probes.hallucination")
        result = run_hallucination_probe(cfg)
        click.echo(_rates_line(result))
        click.echo(f"report: {cfg.out}/report.html")

    @probe.command("adversarial")
    @click.option("--config", type=click.Path(dir_okay=False), help=config_help)
    @config_options(AdversarialConfig)
    def adversarial_command(**kwargs) -> None:
        """Adversarial prompts: unsafe-reply rate per category, refusals, over-refusal on benign
        controls, and optional automated red teaming (--red-team N).

        Writes OUT/probe.json, OUT/answers.jsonl and OUT/report.html."""
        from preftune.evaluation.probes.adversarial import run_adversarial_probe

        cfg = config_from_cli(AdversarialConfig, kwargs, "probes.adversarial")
        result = run_adversarial_probe(cfg)
        click.echo(_rates_line(result))
        if result.get("red_team"):
            rt = result["red_team"]
            click.echo(f"red team: {rt['successes']}/{rt['attempts']} new attacks elicited unsafe replies")
        click.echo(f"report: {cfg.out}/report.html")


def _rates_line(result: dict) -> str:
    return "  ".join(f"{k} {100 * v['rate']:.1f}% [{100 * v['ci'][0]:.1f}, {100 * v['ci'][1]:.1f}]"
                     for k, v in result["rates"].items() if v["n"]) + f"  (n={result['n']})"
