"""Console output: progress bars (rich) with live metrics for every long-running command, and
which process prints under torchrun. Torch-free, so ``--help`` stays fast."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


class Bar:
    def __init__(self, progress: Progress, task) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: int = 1, **metrics) -> None:
        text = "  ".join(f"{k} {_fmt(v)}" for k, v in metrics.items())
        self._progress.update(self._task, advance=n, metrics=text)

    def set(self, completed: int) -> None:
        self._progress.update(self._task, completed=completed)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


@contextmanager
def progress_bar(total: int, description: str, disable: bool = False) -> Iterator[Bar]:
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TextColumn("<"), TimeRemainingColumn(),
                        TextColumn("{task.fields[metrics]}"), console=console, disable=disable,
                        transient=False)
    with progress:
        task = progress.add_task(description, total=total, metrics="")
        yield Bar(progress, task)


def is_main_process() -> bool:
    """Rank 0 under torchrun (or the only process): the one that prints."""
    return os.environ.get("RANK", "0") == "0"
