"""Errors a user can act on. The CLI prints them as one line and exits non-zero, without a traceback."""

from __future__ import annotations

from pathlib import Path


class CorteError(Exception):
    """Base class: an error caused by the user's input or environment, not by a bug."""


class ConfigError(CorteError):
    """A config file or `key=value` override is wrong; the message names the key."""


class InputError(CorteError):
    """A data file is missing, unreadable or inconsistent; the message names the file."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # rebuilt from its two fields when it crosses a process boundary (Ray workers)
        return (InputError, (self.path, self.problem))
