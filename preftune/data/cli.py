"""``preftune convert``: registered on the top-level command group by ``preftune.cli``."""

from __future__ import annotations

import click


def register(cli: click.Group, config_help: str) -> None:
    @cli.command("convert")
    @click.argument("src", metavar="IN", type=click.Path(dir_okay=False))
    @click.option("--to", "to", type=click.Choice(["trl", "preftune"]), required=True,
                  help="trl: TRL's conversational format (prompt/completion or prompt/chosen/rejected as "
                       "message lists, margin), which TRL reads with preftune's meaning; preftune: our own shapes.")
    @click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output JSONL.")
    @click.option("--kind", type=click.Choice(["comparisons", "demonstrations", "prompts", "rankings", "ratings"]),
                  default=None, help="What IN holds. [default: told from its first valid record]")
    @click.option("--skip-invalid", is_flag=True, help="Skip invalid records (counted and reported) "
                                                       "instead of stopping at the first.")
    def convert(src: str, to: str, out: str, kind: str | None, skip_invalid: bool) -> None:
        """Rewrite comparisons, demonstrations or prompts in TRL's format or preftune's, with
        the same prompts and answers (every shape of docs/data-formats.md is read)."""
        from preftune.data.convert import convert_file

        kind, read, written = convert_file(src, out, to, kind, skip_invalid)
        note = f" ({read.summary()})" if read.skipped else ""
        click.echo(f"converted {written} {kind} -> {out} ({to} format){note}")
