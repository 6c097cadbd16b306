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

from ..io_utils import write_atomic

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        from ..errors import ConfigError

        raise ConfigError(f"train.device: {name} asked for, but no CUDA device is visible (use cpu or auto)")
    return torch.device(name)


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

    def batches(self, data, cfg, start_step: int):
        from .loop import local_batches

        return local_batches(data, cfg, self.rank, start_step)

    def latest_checkpoint(self) -> Path | None:
        ckpts = sorted(self.ckpt_root.glob("step_*/checkpoint.pt"))
        return ckpts[-1] if ckpts else None

    def load_latest_checkpoint(self, device: torch.device) -> tuple[dict | None, Path | None]:
        """(state, path) of the newest checkpoint, loaded with weights_only=True; (None, None) for a fresh run."""
        path = self.latest_checkpoint()
        if path is None:
            return None, None
        return torch.load(path, map_location=device, weights_only=True), path

    def save_checkpoint(self, state: dict, step: int, is_best: bool) -> Path:
        path = self.ckpt_root / f"step_{step:07d}" / "checkpoint.pt"
        write_atomic(path, lambda tmp: torch.save(state, tmp))
        if is_best:
            write_atomic(self.ckpt_root / "best" / "checkpoint.pt", lambda tmp: shutil.copyfile(path, tmp))
        for old in sorted(self.ckpt_root.glob("step_*"))[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return path

    def report(self, metrics: dict, checkpoint: Path | None = None) -> None:
        line = json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float, str))})
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(line + "\n")
