"""The Ray Train engine: the loop of loop.py on N workers (DDP student), fed by a Ray Data stream.

Driver (`fit_ray`): checks the cluster can run the job and that the label store covers the split, and runs a
`TorchTrainer` with `FailureConfig` (a lost worker restarts the group from the last checkpoint).

Worker (`train_loop_per_worker`): `RayContext` gives the loop its rank, device, an all-reduce, its own stream
of batches (feed.py: target images joined with the label store, decoded by an autoscaling Ray Data actor pool
per rank, in the order `sample_order` gives) and Ray Train's checkpoints. Only the student is wrapped in DDP; the EMA teacher and the metric head are
updated on every rank from identical (all-reduced) weights, so they stay identical without communication.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

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
        """This rank's batches from `start_step` on, in `sample_order`: a Ray Data stream the worker starts
        itself (feed.py), so a restarted group reads exactly what the lost one would have read next."""
        from .feed import ordered_batches, rank_stream

        ds = rank_stream(data, cfg, self.rank, start_step)
        return ordered_batches(ds.iter_batches(batch_size=None, batch_format="numpy"), cfg.data.batch_size,
                               start_step, cfg.train.iterations)

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


def job_needs(cfg: Config) -> dict[str, float]:
    """Every resource the training job places at once: the Train workers (CPUs, a GPU each with use_gpu, their
    custom resources) plus each worker's first decode actor (scaling.data_cpus; feed.py), which must find room
    besides the workers or the input stream never starts; the pool's further actors start only where there is room. Train V2's controller and helper actors reserve nothing."""
    s = cfg.scaling
    need = {"CPU": s.num_workers * (s.cpus_per_worker + s.data_cpus)}
    if s.use_gpu:
        need["GPU"] = float(s.num_workers)
    for name, amount in s.resources_per_worker.items():
        need[name] = s.num_workers * amount
    return need


def check_cluster(cfg: Config, resources: dict[str, float] | None = None) -> None:
    """Fail at once where Ray itself would wait forever for resources that will never come.

    `resources`: the cluster's (default: `ray.cluster_resources()`). With scaling.wait_for_gpus (an autoscaling
    cluster whose nodes start on demand) what is missing now is only logged: the autoscaler may add it."""
    res = ray.cluster_resources() if resources is None else resources
    s = cfg.scaling
    need = job_needs(cfg)
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    problems = []
    if s.use_gpu and gpus < need["GPU"]:
        problems.append(f"scaling.use_gpu: the Ray cluster has {'no' if gpus == 0 else f'{gpus:g}'} GPUs, "
                        f"scaling.num_workers={s.num_workers} workers need one each (resources: CPU={cpus:g}, "
                        f"GPU={gpus:g}); use scaling.use_gpu=false "
                        f"or fewer scaling.num_workers, or scaling.wait_for_gpus=true on an autoscaling cluster "
                        f"whose GPU nodes start on demand")
    if cpus < need["CPU"] - 1e-9:
        problems.append(f"scaling.num_workers: {s.num_workers} workers x ({s.cpus_per_worker:g} CPUs "
                        f"(scaling.cpus_per_worker) + {s.data_cpus:g} for its decode actor (scaling.data_cpus)) "
                        f"need {need['CPU']:g} CPUs, the cluster has {cpus:g}; without room for scaling.data_cpus "
                        f"beside the Train workers the input stream never starts and training hangs: lower scaling.cpus_per_worker (fractions are fine), scaling.num_workers "
                        f"or scaling.data_cpus")
    for name, amount in s.resources_per_worker.items():
        if res.get(name, 0.0) < need[name] - 1e-9:
            problems.append(f"scaling.resources_per_worker.{name}: {s.num_workers} workers x {amount:g} need "
                            f"{need[name]:g}, the cluster has {res.get(name, 0.0):g}; start nodes that offer "
                            f"{name!r}, or set scaling.wait_for_gpus=true on an autoscaling cluster that adds them")
    if not problems:
        return
    if s.wait_for_gpus:
        log.warning("waiting for the autoscaler (scaling.wait_for_gpus): %s", "; ".join(p.split(";")[0]
                                                                                     for p in problems))
        return
    raise ConfigError(problems[0] if len(problems) == 1 else " | ".join(problems))


def fit_ray(cfg: Config, run_dir, store_path: str | None, hooks: TrainHooks | None = None,
            callbacks: list | None = None):
    """Run (or resume: same run_dir) one adaptation on Ray Train; returns the loop's last metrics.

    `run_dir`: a local path or an s3:// / gs:// URI; every worker reads and writes it directly.
    `hooks`: a context.TrainHooks the workers call (tests only; it is pickled to them).
    `callbacks`: Ray Train UserCallbacks (a Tune trial passes TuneReportCallback: each report -> one iteration)."""
    from .loop import TargetTrainSet, TrainResult
    from ..data.datasets import open_split
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
    from ..ray_cluster import connect

    # A local instance gets this machine's cores, no more: check_cluster then refuses a job that cannot fit.
    connect(os.cpu_count() or 1)
    check_cluster(cfg)

    # Each worker streams its own batches (feed.py); the driver only checks that the store covers the split,
    # so a store that does not fails here, naming it, instead of on every worker.
    method_cls = METHODS.get(cfg.method)
    if method_cls.needs_box_labels and store_path:
        train_set = open_split(cfg.data, cfg.data.train_split)
        TargetTrainSet(train_set, LabelStore(store_path))
    start = CheckpointDir(run_dir).latest_step()

    s = cfg.scaling
    storage_fs, storage_path = storage.resolve(run_dir)
    if not storage.is_remote(run_dir):
        storage_fs = None   # Ray's own local filesystem handling (a plain path)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.to_dict(), "run_dir": str(run_dir), "store": store_path, "hooks": hooks},
        scaling_config=ray.train.ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                               resources_per_worker={"CPU": s.cpus_per_worker,
                                                                     **s.resources_per_worker}),
        # Ray Train's run is RUN/checkpoints: its step_NNNNNNN directories are the checkpoint layout of both
        # engines, kept newest k (no score attribute: by report order, as the local engine prunes).
        run_config=ray.train.RunConfig(
            name="checkpoints", storage_path=storage_path, storage_filesystem=storage_fs,
            callbacks=list(callbacks or []),
            failure_config=ray.train.FailureConfig(max_failures=s.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints)),
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
