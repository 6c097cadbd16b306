"""Test-only hooks into the training loop (train.context.TrainHooks): fault injection and weight dumps. The
package's engines never carry such code; a test passes one of these to `train`, `fit_ray` or `pipeline.adapt`,
and Ray pickles it to the workers (this module is importable there: the tests run from the repository root)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from corte_ray.train.context import TrainHooks

log = logging.getLogger(__name__)


class Killed(Exception):
    """Stands for the process dying (in-process runs)."""


class TestHooks(TrainHooks):
    """kill: {"rank", "step", "marker", "delay_s"}: that rank dies hard (os._exit) at that step, once (the marker
    file remembers), after waiting delay_s: Ray Train registers a reported checkpoint asynchronously, and a crash
    within a fraction of a second of a report (which real crashes are not) could otherwise beat the registration.
    raise_at: raise Killed after that step (in-process runs). steps: a list every step is appended to (in-process).
    dump_resumed / dump_final: a directory where every rank saves what the checkpoint restored / what it ends with."""

    __test__ = False   # not a pytest test class

    def __init__(self, kill: dict | None = None, raise_at: int | None = None, steps: list | None = None,
                 dump_resumed: str | Path | None = None, dump_final: str | Path | None = None) -> None:
        self.kill, self.raise_at, self.steps = kill, raise_at, steps
        self.dump_resumed = None if dump_resumed is None else str(dump_resumed)
        self.dump_final = None if dump_final is None else str(dump_final)

    def on_resumed(self, ctx, step: int, restored: dict) -> None:
        if self.dump_resumed:
            torch.save({"step": step, **restored}, Path(self.dump_resumed) / f"resumed_rank{ctx.rank}.pt")

    def on_step(self, ctx, step: int) -> None:
        if self.steps is not None:
            self.steps.append(step)
        if self.raise_at is not None and step == self.raise_at:
            raise Killed
        f = self.kill
        if f and ctx.rank == f["rank"] and step == f["step"] and not Path(f["marker"]).exists():
            time.sleep(f.get("delay_s", 0.0))
            Path(f["marker"]).touch()
            log.warning("fault injection: rank %d exits at step %d", ctx.rank, step)
            os._exit(1)

    def on_finished(self, ctx, result) -> None:
        if not self.dump_final:
            return
        m = result.models
        state = {"student": m.student.state_dict()}
        if m.teacher is not None:
            state["teacher"] = m.teacher.state_dict()
        if m.metric_head is not None:
            state["metric_head"] = m.metric_head.state_dict()
            state["proxies"] = m.proxies.state_dict()
        torch.save(state, Path(self.dump_final) / f"final_rank{ctx.rank}.pt")
