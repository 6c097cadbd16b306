"""Run several independent adaptation runs side by side, one CPU thread each: the rows of `corte-ray demo` and
of `benchmarks/quality.py`.

Each row is one `adapt` on the local engine inside its own process: a Ray task (`engine="ray"`, one CPU each,
so Ray places as many at once as the machine has cores) or a process of a local pool (`engine="local"`, no
Ray). Rows share nothing but the files they read (benchmark, label store, source checkpoint), so running them
concurrently changes no result; one thread per row keeps them from fighting over the cores (OpenMP threads
spin). The driver polls each row's RUN/progress.json and prints one line every few seconds, and a finished row
is never rerun: its RUN/done.json holds the result.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import multiprocessing
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)


@dataclass
class Row:
    """One run: `name` (table row), `run_dir`, and the config (`config` file/name + `overrides`)."""

    name: str
    run_dir: str
    overrides: list[str] = field(default_factory=list)
    config: str | None = "demo"
    export_to: str | None = None       # a source model: export the final model as a black-box file here


def run_row(row: dict) -> dict:
    """Adapt one row to the end (resuming a stopped run) and return its result; runs in a worker process."""
    import torch

    from .config import load_config
    from .io_utils import write_json_atomic
    from .pipeline import adapt, train_source

    torch.set_num_threads(1)
    spec = Row(**row)
    run = Path(spec.run_dir)
    done = run / "done.json"
    if done.exists():
        return json.loads(done.read_text())
    resume = (run / "config.yaml").exists()
    cfg = None if resume else load_config(spec.config, spec.overrides)
    t0 = time.perf_counter()
    if spec.export_to:
        train_source(cfg, run, spec.export_to, resume=resume)
    else:
        adapt(cfg, run, resume=resume)
    result = {"name": spec.name, "seconds": round(time.perf_counter() - t0, 1), **summarise_run(run)}
    write_json_atomic(done, result)
    return result


def _exit_with_parent(parent: int, every_s: float = 1.0) -> None:
    """A pool worker's initializer: exit when the driver is gone. A killed driver (Ctrl-C twice, SIGTERM, SIGKILL)
    would otherwise leave its rows training on, orphaned, taking the cores the rerun needs."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def run_task(fn: Callable, kwargs: dict) -> dict:
    """Any other independent piece of work of a comparison (the box's evaluation), on one thread like a row."""
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    result = fn(**kwargs)
    return {**result, "seconds": round(time.perf_counter() - t0, 1)}


def summarise_run(run: Path) -> dict:
    """Final val mIoU (the last evaluation), per-class IoU, the curve and the last checkpoint of a finished run."""
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines() if s.strip()]
    evals = [m for m in lines if "val_miou" in m]
    last = evals[-1] if evals else (lines[-1] if lines else {})
    ckpts = sorted(run.glob("checkpoints/step_*/checkpoint.pt"))
    return {"miou": last.get("val_miou"), "step": last.get("step"),
            "per_class": {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("val_iou/")},
            "curve": [[m["step"], m["val_miou"]] for m in evals],
            "checkpoint": str(ckpts[-1]) if ckpts else None}


class RowPool:
    """Rows run `lanes` at a time, as Ray tasks or processes; `submit` returns at once, `wait_all` polls progress."""

    def __init__(self, lanes: int, engine: str = "ray", progress_every_s: float = 10.0,
                 printer: Callable[[str], None] | None = None) -> None:
        self.lanes, self.engine, self.every = max(1, lanes), engine, progress_every_s
        self.print = printer or (lambda s: print(s, file=sys.stderr, flush=True))
        self.pending: dict[str, object] = {}
        self.rows: dict[str, Row] = {}
        self.results: dict[str, dict] = {}
        self._last_print = time.monotonic()
        if engine == "ray":
            import ray

            from .ray_cluster import connect

            # One CPU more than the lanes: a Ray Data job (the labelling) must find a CPU beside running rows.
            # Rows hold a "corte_lane" each, so no more than `lanes` train at once (a local instance; on a
            # cluster joined through RAY_ADDRESS the rows spread over its CPUs).
            connect(self.lanes + 1, 200 * 1024**2, resources={"corte_lane": self.lanes}, log_to_driver=False)
            import ray.data

            # Ray Data's multi-line progress bars (cursor codes in a log file) stay out of the driver's output.
            ray.data.DataContext.get_current().enable_progress_bars = False
            lane = {"corte_lane": 1} if ray.cluster_resources().get("corte_lane") else {}
            self._remote = ray.remote(num_cpus=1, resources=lane, max_retries=0)(run_row)
            self._remote_task = ray.remote(num_cpus=1, resources=lane, max_retries=0)(run_task)
        else:
            # spawn, not fork: torch and OpenMP state do not survive a fork cleanly.
            self._executor = cf.ProcessPoolExecutor(self.lanes, mp_context=multiprocessing.get_context("spawn"),
                                                    initializer=_exit_with_parent, initargs=(os.getpid(),))

    def submit(self, row: Row) -> None:
        self.rows[row.name] = row
        if self.engine == "ray":
            self.pending[row.name] = self._remote.remote(asdict(row))
        else:
            self.pending[row.name] = self._executor.submit(run_row, asdict(row))

    def submit_task(self, name: str, fn: Callable, **kwargs) -> None:
        """`fn(**kwargs)` (a module-level function returning a dict) in the next free lane, after the rows
        submitted before it; its result is returned by `wait` under `name`."""
        if self.engine == "ray":
            self.pending[name] = self._remote_task.remote(fn, kwargs)
        else:
            self.pending[name] = self._executor.submit(run_task, fn, kwargs)

    def wait(self, names: list[str] | None = None) -> dict[str, dict]:
        """Block until the named rows (default: every row submitted) finish; print progress while waiting."""
        want = set(names) if names is not None else set(self.pending) | set(self.results)
        while want & set(self.pending):
            self.wait_any()
        return {n: self.results[n] for n in want}

    def wait_any(self) -> dict[str, dict]:
        """Block until at least one pending row finishes (printing progress meanwhile); return those that did."""
        if not self.pending:
            return {}
        while True:
            finished = self._collect(timeout=1.0)
            for name, result in finished.items():
                self.results[name] = result
                miou = result.get("miou")
                self.print(f"  done {name}: val mIoU {miou:.2f} in {result.get('seconds', 0):.0f} s"
                           if miou is not None else f"  done {name} in {result.get('seconds', 0):.0f} s")
            if finished:
                return finished
            now = time.monotonic()
            if now - self._last_print >= self.every:
                self._last_print = now
                line = self.progress_line()
                if line:
                    self.print(line)

    def _collect(self, timeout: float) -> dict[str, dict]:
        done: dict[str, dict] = {}
        if self.engine == "ray":
            import ray

            refs = {ref: name for name, ref in self.pending.items()}
            ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
            for ref in ready:
                done[refs[ref]] = ray.get(ref)   # a failed row raises here, with the worker's traceback
        else:
            futs = {fut: name for name, fut in self.pending.items()}
            finished, _ = cf.wait(list(futs), timeout=timeout, return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                done[futs[fut]] = fut.result()
        for name in done:
            self.pending.pop(name)
        return done

    def progress_line(self) -> str:
        from .train.loop import format_progress

        parts, queued = [], 0
        tasks = [name for name in self.pending if name not in self.rows]   # no progress file: named, not timed
        for name in self.pending:
            if name in tasks:
                continue
            path = Path(self.rows[name].run_dir) / "progress.json"
            try:
                state = json.loads(path.read_text())
            except (OSError, ValueError):   # not started yet (or no line written yet)
                queued += 1
                continue
            if state.get("done"):            # finished earlier (a rerun): waits for a lane to report its result
                queued += 1
                continue
            state["name"] = name
            parts.append(format_progress(state))
        if queued:
            parts.append(f"{queued} queued")
        if tasks:
            parts.append(f"pending: {', '.join(tasks)}")
        return "  " + " | ".join(parts) if parts else ""

    def close(self) -> None:
        if self.engine != "ray":
            self._executor.shutdown(cancel_futures=True)
