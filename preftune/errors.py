"""Errors that the CLI reports as one line (exit status 2), never as a traceback."""

from __future__ import annotations


class PreftuneError(Exception):
    """A user-facing error: bad input, bad configuration, missing file."""

    exit_code = 2


class DataError(PreftuneError):
    """A problem with one record (or the whole file) of an input file."""

    def __init__(self, path: str, line: int | None, message: str):
        self.path = str(path)
        self.line = line
        self.message = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


class ConfigError(PreftuneError):
    """An invalid configuration value or config file."""


class WaitingForPeople(PreftuneError):
    """People's judgements are still missing: the run stops cleanly (exit status 3) and continues
    where it stopped when re-run."""

    exit_code = 3
