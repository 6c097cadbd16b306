"""The Ray Train engine: the loop of loop.py on N workers (DDP student), fed by a Ray Data stream.

Driver (`fit_ray`): checks the cluster can run the job, builds a Ray Data stream of target images joined with
the label store (decoded in parallel by Ray Data tasks, in the order `sample_order` gives), and runs a
`TorchTrainer` with `FailureConfig` (a lost worker restarts the group from the last checkpoint).

Worker (`train_loop_per_worker`): `RayContext` gives the loop its rank, device, an all-reduce, its dataset
shard and Ray Train's checkpoints. Only the student is wrapped in DDP; the EMA teacher and the metric head are
updated on every rank from identical (all-reduced) weights, so they stay identical without communication.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

import ray
import ray.train
from ray.train.torch import TorchTrainer

from .. import storage
from ..config import Config, from_dict
from ..errors import ConfigError
from .context import CHECKPOINT_FILE, CheckpointDir, RunFiles, TrainHooks, load_newest_intact

log = logging.getLogger(__name__)


class RayContext:
    """One rank of a Ray Train worker group (a context.TrainContext).

    Checkpoints: rank 0 writes the step's file into a local temporary directory and `report` hands it to Ray
    Train, which persists it to RUN/checkpoints/step_NNNNNNN on the run's storage (a local path or a cloud URI)
    and keeps the newest k; rank 0 itself copies it to RUN/checkpoints/best when it is the best so far. The
    same layout and retention rule as the local engine (context.CheckpointDir)."""

    def __init__(self, run_dir, keep_checkpoints: int = 2) -> None:
        tctx = ray.train.get_context()
        self.rank = tctx.get_world_rank()
        self.world_size = tctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.run_dir = storage.as_path(run_dir)
        self.checkpoints = CheckpointDir(self.run_dir, keep_checkpoints)
        self.files = RunFiles(self.run_dir) if self.rank == 0 else None
        self._tmp: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def tensorboard_dir(self) -> Path:
        return self.files.tensorboard_dir

    def all_reduce_(self, t: Tensor) -> Tensor:
        if self.world_size > 1:
            dist.all_reduce(t)
        return t

    def wrap_model(self, model: nn.Module) -> nn.Module:
        if self.world_size == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def batches(self, data, cfg: Config, start_step: int):
        shard = ray.train.get_dataset_shard("train")
        while True:  # the stream covers the remaining steps; after a restart it starts over, which is fine
            for batch in shard.iter_torch_batches(batch_size=cfg.data.batch_size, drop_last=True):
                yield batch

    def load_latest_checkpoint(self, device: torch.device):
        """Load inside `as_directory()`: local storage is read in place, remote storage is downloaded to a
        directory of this process. (`to_directory()` copies into one temporary directory per checkpoint, shared
        by the ranks of a node: one rank could read while another was still writing it.)"""
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None, None
        name = Path(ckpt.path).name
        with ckpt.as_directory() as d:
            state = _load_or_none(Path(d) / CHECKPOINT_FILE, device)
        if state is not None:
            return state, self.checkpoints.root / name / CHECKPOINT_FILE
        # The latest is damaged: fall back to the older ones Ray kept beside it, newest first.
        log.warning("%s: damaged checkpoint skipped; trying the older ones", self.checkpoints.root / name)
        state, path = load_newest_intact(self.checkpoints.newest_first(before=name), device)
        if state is None:
            from ..errors import InputError

            raise InputError(self.checkpoints.root / name / CHECKPOINT_FILE,
                             "damaged checkpoint and no older one to resume from")
        return state, path

    def save_checkpoint(self, state: dict, step: int, is_best: bool):
        self._tmp = tempfile.mkdtemp(prefix="corte-ckpt-")
        path = Path(self._tmp) / CHECKPOINT_FILE
        torch.save(state, path)
        if is_best:
            self.checkpoints.write_best(path)
        return self.checkpoints.step_file(step)

    def report(self, metrics: dict, checkpoint=None) -> None:
        clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        ckpt = ray.train.Checkpoint.from_directory(self._tmp) if checkpoint is not None and self._tmp else None
        name = CheckpointDir.step_name(int(metrics["step"])) if ckpt else None
        ray.train.report(clean, checkpoint=ckpt, checkpoint_dir_name=name)
        if self.is_main:
            self.files.append_metrics(clean)
            self.files.sync()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def _load_or_none(path: Path, device: torch.device) -> dict | None:
    """The checkpoint at `path`, or None when it does not load (damaged: the caller falls back)."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        return state if isinstance(state, dict) and "step" in state else None
    except Exception:  # noqa: BLE001 - torch raises many types for a damaged file
        return None


def train_loop_per_worker(config: dict[str, Any]) -> None:
    from ..blackbox.store import LabelStore
    from .loop import train

    cfg = from_dict(config["cfg"])
    if cfg.train.cpu_threads:
        torch.set_num_threads(cfg.train.cpu_threads)
    store = LabelStore(config["store"]) if config["store"] else None
    ctx = RayContext(config["run_dir"], cfg.train.keep_checkpoints)
    train(cfg, ctx, store, hooks=config.get("hooks"))


class LoadBatch:
    """Ray Data callable: image indices -> decoded images + the box's stored answer (or ground truth)."""

    def __init__(self, data) -> None:
        self.data = data  # a loop.TargetTrainSet; the label store is opened lazily per process

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [self.data[int(i)] for i in batch["index"]]
        return {k: np.stack([it[k] for it in items]) for k in items[0]}


def check_cluster(cfg: Config) -> None:
    """Fail at once where Ray itself would wait forever for resources that will never come."""
    res = ray.cluster_resources()
    s = cfg.scaling
    if s.use_gpu and res.get("GPU", 0) < 1 and not s.wait_for_gpus:
        raise ConfigError(f"scaling.use_gpu: the Ray cluster has no GPUs (resources: CPU={res.get('CPU', 0):g}, "
                          f"GPU=0); use scaling.use_gpu=false, or scaling.wait_for_gpus=true on an autoscaling "
                          f"cluster whose GPU nodes start on demand")
    need = s.cpus_per_worker * s.num_workers
    if not s.use_gpu and res.get("CPU", 0) < need and not s.wait_for_gpus:
        raise ConfigError(f"scaling.num_workers: {s.num_workers} workers x {s.cpus_per_worker:g} CPUs need {need:g} "
                          f"CPUs, the cluster has {res.get('CPU', 0):g}; lower scaling.cpus_per_worker (fractions "
                          f"are fine) or scaling.num_workers")


def _latest_step(run_dir) -> int:
    return CheckpointDir(run_dir).latest_step()


def fit_ray(cfg: Config, run_dir, store_path: str | None, hooks: TrainHooks | None = None,
            callbacks: list | None = None):
    """Run (or resume: same run_dir) one adaptation on Ray Train; returns the loop's last metrics.

    `run_dir`: a local path or an s3:// / gs:// URI; every worker reads and writes it directly.
    `hooks`: a context.TrainHooks the workers call (tests only; it is pickled to them).
    `callbacks`: Ray Train UserCallbacks (a Tune trial passes TuneReportCallback: each report -> one iteration)."""
    from .loop import TargetTrainSet, TrainResult, sample_order
    from ..data.datasets import open_dataset
    from ..methods.steps import METHODS
    from ..blackbox.store import LabelStore

    run_dir = storage.as_path(run_dir)
    if not storage.is_remote(run_dir):
        run_dir = run_dir.resolve()   # Ray Train wants an absolute local path (never for a URI: s3:/...)
    if not (run_dir / "checkpoints").exists() and any(run_dir.glob("step_*")):
        from ..errors import InputError

        raise InputError(run_dir, "holds checkpoints in the Ray engine's old layout (RUN/step_N, before "
                                  "RUN/checkpoints/step_N for both engines); it cannot be resumed by this version: "
                                  "start the run again in another --out")
    if not ray.is_initialized():
        ray.init(**({} if os.environ.get("RAY_ADDRESS") else {"num_cpus": os.cpu_count()}))
    check_cluster(cfg)

    method_cls = METHODS.get(cfg.method)
    train_set = open_dataset(cfg.data.dataset, cfg.data.root, split=cfg.data.train_split, city=cfg.data.city,
                             labels_dir=cfg.data.labels_dir, label_space=cfg.data.label_space)
    # The same columns as the worker's own TargetTrainSet (loop.train): labels also for the diagnostics.
    diagnose = cfg.train.label_diagnostics and all(s.label is not None for s in train_set.samples)
    data = TargetTrainSet(train_set, LabelStore(store_path) if method_cls.needs_box_labels else None,
                          cfg.data.resize, with_labels=method_cls.needs_ground_truth or diagnose)
    start = _latest_step(run_dir)
    world, b = cfg.scaling.num_workers, cfg.data.batch_size
    remaining = max(0, cfg.train.iterations - start) * b * world
    # One global order; with one worker it is exactly the local engine's order (rank 0), so the two engines
    # can be compared step for step.
    order = list(itertools.islice(iter(sample_order(len(data), b, cfg.train.seed, 0, start * world)), remaining))
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ds = ray.data.from_items([{"index": i} for i in order] or [{"index": 0}])
    ds = ds.map_batches(LoadBatch, fn_constructor_args=(data,), batch_size=b,
                        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=cfg.scaling.data_cpus)

    s = cfg.scaling
    storage_fs, storage_path = storage.resolve(run_dir)
    if not storage.is_remote(run_dir):
        storage_fs = None   # Ray's own local filesystem handling (a plain path)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "run_dir": str(run_dir), "store": store_path, "hooks": hooks},
        scaling_config=ray.train.ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                               resources_per_worker={"CPU": s.cpus_per_worker}),
        # Ray Train's run is RUN/checkpoints: its step_NNNNNNN directories are the checkpoint layout of both
        # engines, kept newest k (no score attribute: by report order, as the local engine prunes).
        run_config=ray.train.RunConfig(
            name="checkpoints", storage_path=storage_path, storage_filesystem=storage_fs,
            callbacks=list(callbacks or []),
            failure_config=ray.train.FailureConfig(max_failures=s.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints)),
        datasets={"train": ds},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        from ..errors import CorteError

        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CorteError(f"training failed on the Ray workers ({first}); the last checkpoint is in {run_dir}: "
                         f"continue with `corte-ray adapt --out {run_dir} --resume` (or raise "
                         f"scaling.max_failures to restart automatically)") from exc
    ckpt = CheckpointDir(run_dir).root / Path(result.checkpoint.path).name / CHECKPOINT_FILE \
        if result.checkpoint else None
    return TrainResult(step=int(result.metrics.get("step", start)) if result.metrics else start,
                       metrics=dict(result.metrics or {}), checkpoint=ckpt)
