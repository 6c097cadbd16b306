"""A run's progress: a log line every few seconds and RUN/progress.json (on the run's storage) for drivers that
watch several runs."""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


class ProgressReporter:
    """One log line every `every_s` seconds (step/total, images/s, ETA, latest val mIoU) and the same numbers in
    RUN/progress.json, which a driver running several runs side by side (`corte-ray demo`) polls: worker logs of
    Ray tasks and Train workers do not reach the driver's console."""

    def __init__(self, run_dir, name: str, total: int, start_step: int, every_s: float) -> None:
        self.path, self.name, self.total, self.every_s = run_dir / "progress.json", name, total, every_s
        self.t0 = self.t_last = time.perf_counter()
        self.start_step, self.images = start_step, 0

    def update(self, step: int, images: int, val_miou: float | None) -> None:
        self.images += images
        now = time.perf_counter()
        if self.every_s <= 0 or now - self.t_last < self.every_s:
            return
        self.t_last = now
        self._write(step, val_miou, done=False)

    def finish(self, step: int, val_miou: float | None) -> None:
        self._write(step, val_miou, done=True)

    def _write(self, step: int, val_miou: float | None, done: bool) -> None:
        from ..io_utils import write_json_atomic

        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        rate = (step - self.start_step) / elapsed
        eta = (self.total - step) / rate if rate > 0 else None
        state = {"name": self.name, "step": step, "total": self.total, "images_per_s": round(self.images / elapsed, 1),
                 "eta_s": None if eta is None else round(eta, 1), "val_miou": val_miou, "done": done,
                 "elapsed_s": round(elapsed, 1)}
        write_json_atomic(self.path, state)
        if not done:
            log.info("%s", format_progress(state))


def format_progress(state: dict) -> str:
    """`corte 120/400 45 img/s ETA 1m20s val 35.21` from a progress.json state."""
    eta = state.get("eta_s")
    eta_txt = "-" if eta is None else (f"{int(eta) // 60}m{int(eta) % 60:02d}s" if eta >= 60 else f"{int(eta)}s")
    val = state.get("val_miou")
    return (f"{state['name']} {state['step']}/{state['total']} {state['images_per_s']:.0f} img/s ETA {eta_txt}"
            + (f" val {val:.2f}" if val is not None else ""))
