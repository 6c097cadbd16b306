"""Test-only black-box backend "counting:MODEL#LOG[#SLEEP_S[#DIE_MARKER]]": a local model file that appends the
hash of every image it is asked about to LOG (one line per image) and can sleep SLEEP_S seconds per query. With
DIE_MARKER, the process dies hard (os._exit) in the middle of its second query, once (the marker file
remembers): a labelling actor killed mid-batch.

It lets a test count queries made inside Ray actors, and slow a job down enough to kill it midway. Ray
workers register it through `ray.init(runtime_env={"worker_process_setup_hook": "tests.counting_box.register"})`.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np

from corte_ray.blackbox.local import LocalBlackBox
from corte_ray.blackbox.protocol import BACKENDS, BoxAnswer


def image_hash(image: np.ndarray) -> str:
    """Identity of one HxWx3 uint8 image as the box saw it."""
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


def read_hashes(log_path: str | Path) -> list[str]:
    path = Path(log_path)
    return path.read_text().split() if path.exists() else []


class CountingBlackBox(LocalBlackBox):
    def __init__(self, path: str | Path, log_path: str | Path, sleep_s: float = 0.0, die_marker: str | None = None,
                 **options) -> None:
        super().__init__(path, **options)
        self.log_path = Path(log_path)
        self.sleep_s = sleep_s
        self.die_marker = Path(die_marker) if die_marker else None
        self.queries = 0

    @classmethod
    def from_spec(cls, spec: str, **options) -> CountingBlackBox:
        model, log_path, *rest = spec.split(":", 1)[1].split("#")
        return cls(model, log_path, float(rest[0]) if rest else 0.0, rest[1] if len(rest) > 1 else None, **options)

    def query(self, images: np.ndarray) -> BoxAnswer:
        if self.sleep_s:
            time.sleep(self.sleep_s)
        self.queries += 1
        if self.die_marker is not None and self.queries == 2 and not self.die_marker.exists():
            self.die_marker.touch()
            os._exit(1)   # mid-batch: the batch is neither answered nor written
        answer = super().query(images)
        # One append per batch: concurrent actors never interleave inside a line.
        with open(self.log_path, "a") as log:
            log.write("".join(image_hash(img) + "\n" for img in images))
        return answer


def register() -> None:
    """Register the "counting" scheme once (the worker set-up hook, and the import in the test module)."""
    if "counting" not in BACKENDS:
        BACKENDS.register("counting")(CountingBlackBox)


register()
