"""Logging set-up and progress bars shared by every command.

Progress bars go to stderr through tqdm and switch themselves off when `-q` is given or stderr
is not a terminal under CI, so logs stay readable in `ray job logs`.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
_QUIET = False


def setup_logging(verbosity: int = 0) -> None:
    """verbosity: -1 quiet (warnings only, no progress bars), 0 info, 1+ debug."""
    global _QUIET
    _QUIET = verbosity < 0
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )


def progress(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """A tqdm bar over `iterable`, disabled in quiet mode or when CORTE_NO_PROGRESS is set."""
    disable = _QUIET or bool(os.environ.get("CORTE_NO_PROGRESS"))
    yield from tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, dynamic_ncols=True, leave=False)
