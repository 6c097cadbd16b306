"""Logging set-up and progress bars shared by every command.

Progress bars go to stderr through tqdm and switch themselves off when `-q` is given or stderr
is not a terminal under CI, so logs stay readable in `ray job logs`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
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


def progress(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it",
             every_s: float = 30.0) -> Iterator[T]:
    """Progress over `iterable`: a tqdm bar on a terminal; elsewhere (job logs, CI) one log line every
    `every_s` seconds with done/total and rate, so logs stay readable. Silent in quiet mode or when
    CORTE_NO_PROGRESS is set."""
    if _QUIET or os.environ.get("CORTE_NO_PROGRESS"):
        yield from iterable
        return
    if sys.stderr.isatty():
        yield from tqdm(iterable, desc=desc, total=total, unit=unit, dynamic_ncols=True, leave=False)
        return
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    logger = logging.getLogger("corte_ray.progress")
    start = last = time.monotonic()
    done = 0
    for item in iterable:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every_s:
            last = now
            rate = done / (now - start)
            logger.info("%s: %d/%s %s (%.1f %s/s)", desc, done, total if total is not None else "?", unit, rate, unit)
    if done and time.monotonic() - start >= every_s:
        logger.info("%s: done, %d %s in %.0f s", desc, done, unit, time.monotonic() - start)
