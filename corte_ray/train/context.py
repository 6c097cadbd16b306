"""Where a training loop runs: one local process, or one rank of a Ray Train worker group.

The loop in loop.py talks only to this interface (rank, device, all-reduce, report, checkpoints), which keeps
it identical across engines and keeps Ray out of it. The Ray implementation lives in ray_engine.py.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from torch import Tensor, nn

from ..io_utils import append_line, write_atomic

log = logging.getLogger(__name__)


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


def load_newest_intact(candidates: list[Path], device: torch.device) -> tuple[dict | None, Path | None]:
    """(state, path) of the newest checkpoint file among `candidates` (newest first) that loads; a damaged one
    (truncated, overwritten) is skipped with a warning naming it. (None, None) when there is none at all;
    an InputError naming them when every one is damaged."""
    from ..errors import InputError

    skipped = []
    for path in candidates:
        try:
            state = torch.load(path, map_location=device, weights_only=True)
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


class LocalContext:
    """A single process: checkpoints in RUN/checkpoints/step_NNNNNNN/checkpoint.pt, metrics in RUN/metrics.jsonl."""

    rank = 0
    world_size = 1

    def __init__(self, run_dir: str | Path, device: torch.device, keep_checkpoints: int = 2) -> None:
        self.run_dir = Path(run_dir)
        self.device = device
        self.keep = keep_checkpoints
        self.ckpt_root = self.run_dir / "checkpoints"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_(self, t: Tensor) -> Tensor:
        return t

    def wrap_model(self, model: nn.Module) -> nn.Module:
        return model

    def on_step(self, step: int) -> None:
        """Called after every optimiser step (the Ray engine's fault-injection hook)."""

    def on_resumed(self, step: int, restored: dict) -> None:
        """Called once a checkpoint is loaded, with what it restored (the Ray engine's test hook)."""

    def batches(self, data, cfg, start_step: int):
        from .loop import local_batches

        return local_batches(data, cfg, self.rank, start_step)

    def latest_checkpoint(self) -> Path | None:
        ckpts = sorted(self.ckpt_root.glob("step_*/checkpoint.pt"))
        return ckpts[-1] if ckpts else None

    def load_latest_checkpoint(self, device: torch.device) -> tuple[dict | None, Path | None]:
        """(state, path) of the newest intact checkpoint, loaded with weights_only=True (damaged newer ones are
        skipped, each named in a warning); (None, None) for a fresh run."""
        return load_newest_intact(sorted(self.ckpt_root.glob("step_*/checkpoint.pt"), reverse=True), device)

    def save_checkpoint(self, state: dict, step: int, is_best: bool) -> Path:
        path = self.ckpt_root / f"step_{step:07d}" / "checkpoint.pt"
        write_atomic(path, lambda tmp: torch.save(state, tmp))
        if is_best:
            write_atomic(self.ckpt_root / "best" / "checkpoint.pt", lambda tmp: shutil.copyfile(path, tmp))
        for old in sorted(self.ckpt_root.glob("step_*"))[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    def report(self, metrics: dict, checkpoint: Path | None = None) -> None:
        append_line(self.run_dir / "metrics.jsonl",
                    json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}))
