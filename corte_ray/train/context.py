"""Where a training loop runs, as the loop sees it: `TrainContext`, and what both engines share.

The loop in loop.py talks only to a `TrainContext` (rank, device, all-reduce, batches, checkpoints, report),
which keeps it identical across engines and keeps Ray out of it. `LocalContext` is one process; the Ray Train
rank is ray_engine.RayContext. Both keep one layout on the run's storage (a local path or an s3:// / gs:// URI):

    RUN/checkpoints/step_NNNNNNN/checkpoint.pt   the newest train.keep_checkpoints of them
    RUN/checkpoints/best/checkpoint.pt           the best by val mIoU so far (a copy; absent before an evaluation)
    RUN/metrics.jsonl                            one whole JSON line per report
    RUN/tensorboard/                             rank 0's event files
    RUN/progress.json                            step, rate, ETA, latest val mIoU

Rank 0 writes metrics.jsonl and TensorBoard in a local directory (`RunFiles`) and copies each file whole to the
run's storage at every report, so a reader never sees a torn line and nothing depends on a disk shared by nodes.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Iterator, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .. import storage
from ..io_utils import append_line, write_atomic
from ..storage import RemotePath, StoragePath

log = logging.getLogger(__name__)
CHECKPOINT_FILE = "checkpoint.pt"
BEST = "best"


def resolve_device(name: str, key: str = "train.device") -> torch.device:
    """"auto" is the GPU when there is one, else the CPU; a CUDA device that is not there is a ConfigError
    naming `key`. The one device rule of the package (the local black box uses it too)."""
    from ..errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{key}: {name} asked for, but no CUDA device is visible (use cpu or auto)")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"{key}: unknown device {name!r} ({err})") from None


# ------------------------------------------------------------------------------------------ the contract
@runtime_checkable
class TrainContext(Protocol):
    """What the loop gets from its engine."""

    rank: int
    world_size: int
    device: torch.device
    run_dir: StoragePath          # the run's storage (local path or RemotePath)
    tensorboard_dir: Path         # local: rank 0's SummaryWriter writes here, the engine syncs it at each report

    @property
    def is_main(self) -> bool: ...

    def all_reduce_(self, t: Tensor) -> Tensor:
        """Sum `t` over ranks in place (and return it)."""

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """The student as the step should call it (DDP under several ranks)."""

    def batches(self, data, cfg, start_step: int) -> Iterator[dict]:
        """This rank's batches from step `start_step` on, in `sample_order`."""

    def load_latest_checkpoint(self, device: torch.device) -> tuple[dict | None, StoragePath | None]:
        """(state, path) of the newest intact checkpoint; (None, None) for a fresh run."""

    def save_checkpoint(self, state: dict, step: int, is_best: bool) -> StoragePath:
        """Rank 0: write the step's checkpoint (and `best` when `is_best`); returns where it is (or will be)."""

    def report(self, metrics: dict, checkpoint: StoragePath | None = None) -> None:
        """Every rank, at every evaluation or checkpoint: one metrics.jsonl line, files synced to storage."""


class TrainHooks:
    """Where a test watches or breaks a run (fault injection, weight dumps: tests/engine_hooks.py). The loop
    calls these; the defaults do nothing, and nothing in the package passes other hooks."""

    def on_resumed(self, ctx: TrainContext, step: int, restored: dict) -> None:
        """A checkpoint was loaded; `restored`: what it put back (models, the method's state, the RNG)."""

    def on_step(self, ctx: TrainContext, step: int) -> None:
        """After every optimiser step."""

    def on_finished(self, ctx: TrainContext, result) -> None:
        """The loop ended; `result` is its TrainResult (with the models)."""


# ---------------------------------------------------------------------------- layout on the run's storage
class CheckpointDir:
    """RUN/checkpoints: step_NNNNNNN/checkpoint.pt (newest `keep` kept) and best/checkpoint.pt."""

    def __init__(self, run_dir, keep: int = 2) -> None:
        self.root = storage.as_path(run_dir) / "checkpoints"
        self.keep = keep

    @staticmethod
    def step_name(step: int) -> str:
        return f"step_{step:07d}"

    def step_file(self, step: int) -> StoragePath:
        return self.root / self.step_name(step) / CHECKPOINT_FILE

    @property
    def best_file(self) -> StoragePath:
        return self.root / BEST / CHECKPOINT_FILE

    def step_dirs(self) -> list[StoragePath]:
        """The step_* directories, oldest first."""
        if not self.root.exists():
            return []
        return sorted((p for p in self.root.iterdir() if p.name.startswith("step_") and p.name[5:].isdigit()),
                      key=lambda p: p.name)

    def latest_step(self) -> int:
        dirs = self.step_dirs()
        return int(dirs[-1].name[5:]) if dirs else 0

    def latest(self) -> StoragePath | None:
        files = [d / CHECKPOINT_FILE for d in self.step_dirs() if (d / CHECKPOINT_FILE).is_file()]
        return files[-1] if files else None

    def newest_first(self, before: str | None = None) -> list[StoragePath]:
        """Checkpoint files, newest first (only those of directories named before `before`, when given)."""
        files = [d / CHECKPOINT_FILE for d in reversed(self.step_dirs()) if before is None or d.name < before]
        return [f for f in files if f.is_file()]

    def write(self, state: dict, step: int, is_best: bool) -> StoragePath:
        """The local engine's writer: the step's file, `best` as a copy of it, then the retention rule."""
        path = self.step_file(step)
        write_atomic(path, lambda tmp: torch.save(state, tmp))
        if is_best:
            self.write_best(path)
        self.prune()
        return path

    def write_best(self, source: StoragePath) -> None:
        """`best` := a copy of the checkpoint file `source` (local, or already on the run's storage)."""
        if isinstance(source, RemotePath) and isinstance(self.best_file, RemotePath):
            source.fs.copy_file(source.fs_path, self.best_file.fs_path)   # server-side: one whole object
        elif isinstance(source, RemotePath):
            write_atomic(self.best_file, lambda tmp: storage.download(source, tmp))
        else:
            write_atomic(self.best_file, lambda tmp: shutil.copyfile(source, tmp))

    def prune(self) -> None:
        for old in self.step_dirs()[:-self.keep]:
            storage.remove_tree(old)


def load_newest_intact(candidates: list[StoragePath], device: torch.device) -> tuple[dict | None, StoragePath | None]:
    """(state, path) of the newest checkpoint file among `candidates` (newest first) that loads; a damaged one
    (truncated, overwritten) is skipped with a warning naming it. (None, None) when there is none at all;
    an InputError naming them when every one is damaged."""
    from ..errors import InputError

    skipped = []
    for path in candidates:
        try:
            state = storage.load_torch(path, map_location=device)
            if not isinstance(state, dict) or "step" not in state:
                raise ValueError("not a corte-ray training checkpoint")
        except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged file
            skipped.append(path)
            log.warning("%s: damaged checkpoint skipped (%s); trying the one before it", path,
                        f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}")
            continue
        if skipped:
            log.warning("resuming from %s (skipped the damaged %s)", path, ", ".join(str(p) for p in skipped))
        return state, path
    if skipped:
        raise InputError(skipped[0], f"damaged checkpoint, and so are the {len(skipped) - 1} older ones; "
                                     "start the run again in another --out")
    return None, None


class RunFiles:
    """Rank 0's growing files of a run (metrics.jsonl, tensorboard/), written in a local directory and, when the
    run lives on object storage, copied whole to it by `sync` (each file one object: never a torn line)."""

    def __init__(self, run_dir) -> None:
        self.run_dir = storage.as_path(run_dir)
        self.remote = isinstance(self.run_dir, RemotePath)
        if not self.remote:
            self.local = self.run_dir
            return
        self.local = Path(tempfile.mkdtemp(prefix="corte-run-"))
        weakref.finalize(self, shutil.rmtree, self.local, True)   # the staging copy goes with this object
        self._synced: dict[str, tuple[int, int]] = {}
        try:   # a resumed run (or a restarted worker) goes on appending to the lines already there
            (self.local / "metrics.jsonl").write_bytes((self.run_dir / "metrics.jsonl").read_bytes())
        except FileNotFoundError:
            pass

    @property
    def tensorboard_dir(self) -> Path:
        return self.local / "tensorboard"

    def append_metrics(self, metrics: dict) -> None:
        append_line(self.local / "metrics.jsonl",
                    json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}))

    def sync(self) -> None:
        """Copy every local file that changed since the last sync to the run's storage."""
        if not self.remote:
            return
        for f in sorted(p for p in self.local.rglob("*") if p.is_file()):
            rel = f.relative_to(self.local).as_posix()
            st = f.stat()
            if self._synced.get(rel) != (st.st_size, st.st_mtime_ns):
                storage.upload(f, self.run_dir / rel)
                self._synced[rel] = (st.st_size, st.st_mtime_ns)


# ----------------------------------------------------------------------------------------- one process
class LocalContext:
    """A single process (the local engine, and the reference the tests compare the Ray engine with)."""

    rank = 0
    world_size = 1

    def __init__(self, run_dir, device: torch.device, keep_checkpoints: int = 2) -> None:
        self.run_dir = storage.as_path(run_dir)
        self.device = device
        self.checkpoints = CheckpointDir(self.run_dir, keep_checkpoints)
        self.files = RunFiles(self.run_dir)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def tensorboard_dir(self) -> Path:
        return self.files.tensorboard_dir

    def all_reduce_(self, t: Tensor) -> Tensor:
        return t

    def wrap_model(self, model: nn.Module) -> nn.Module:
        return model

    def batches(self, data, cfg, start_step: int):
        from .data import local_batches

        return local_batches(data, cfg, self.rank, start_step)

    def latest_checkpoint(self) -> StoragePath | None:
        return self.checkpoints.latest()

    def load_latest_checkpoint(self, device: torch.device) -> tuple[dict | None, StoragePath | None]:
        """(state, path) of the newest intact checkpoint, loaded with weights_only=True (damaged newer ones are
        skipped, each named in a warning); (None, None) for a fresh run."""
        return load_newest_intact(self.checkpoints.newest_first(), device)

    def save_checkpoint(self, state: dict, step: int, is_best: bool) -> StoragePath:
        return self.checkpoints.write(state, step, is_best)

    def report(self, metrics: dict, checkpoint: StoragePath | None = None) -> None:
        if self.is_main:
            self.files.append_metrics(metrics)
            self.files.sync()
