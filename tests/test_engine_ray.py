"""The Ray Train engine on 2 CPU workers (gloo): it trains and writes metrics, checkpoints and TensorBoard;
replicas stay identical; a killed worker is replaced from the last checkpoint; one Ray worker follows the
local engine's loss curve."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from corte_ray.config import load_config
from corte_ray.models import build_source_model
from corte_ray.export import export_model
from tests.engine_hooks import TestHooks

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=2, object_store_memory=200 * 1024**2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def store(tiny_bench, tmp_path_factory):
    from corte_ray.blackbox import open_blackbox
    from corte_ray.blackbox.store import label_dataset_local
    from corte_ray.data.datasets import open_dataset

    work = tmp_path_factory.mktemp("rbox")
    torch.manual_seed(0)
    box = work / "box.pt"
    export_model(build_source_model("deeplabv3_resnet18").eval(), box, example_size=(64, 96))
    out = work / "labels"
    label_dataset_local(open_dataset("synth", tiny_bench, split="train"), open_blackbox(f"file:{box}", device="cpu"), out)
    return out


def _cfg(bench, store, *extra):
    return load_config(None, ["data.dataset=synth", f"data.root={bench}", f"blackbox.label_store={store}",
                              "model.student=mobilenetv3_small_lraspp", "data.batch_size=2", "data.crop_size=[48,64]",
                              "train.cpu_threads=1", "scaling.engine=ray", "scaling.cpus_per_worker=0.5",
                              "data.val_max_images=2", "corte.warmup=0.25", "corte.refine_start=0.5",
                              "ema.momentum=0.9", "train.lr_warmup=1", *extra])


def test_two_workers_train_and_stay_identical(ray_cluster, tiny_bench, store, tmp_path):
    from corte_ray.train.ray_engine import fit_ray

    run = tmp_path / "run"
    run.mkdir()
    cfg = _cfg(tiny_bench, store, "method=corte_metric", "scaling.num_workers=2", "train.iterations=4",
               "train.eval_every=2", "train.checkpoint_every=2", "stvm.metric_pixels=64")
    result = fit_ray(cfg, run, str(store), hooks=TestHooks(dump_final=run))
    assert result.step == 4 and 0 <= result.metrics["val_miou"] <= 100
    # the one layout of both engines: RUN/checkpoints/step_NNNNNNN (newest 2 kept) and RUN/checkpoints/best
    assert result.checkpoint == run / "checkpoints" / "step_0000004" / "checkpoint.pt" and result.checkpoint.exists()
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_0000002", "step_0000004"]
    best = torch.load(run / "checkpoints" / "best" / "checkpoint.pt", weights_only=True)
    assert best["best_miou"] == max(json.loads(l)["val_miou"] for l in (run / "metrics.jsonl").read_text().splitlines())
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [2, 4] and all("loss_metric" in l for l in lines[1:])
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    a, b = (torch.load(run / f"final_rank{r}.pt", weights_only=True) for r in (0, 1))
    for part in ("student", "teacher", "metric_head", "proxies"):
        for k, v in a[part].items():
            k_other = k if k in b[part] else k.replace("module.", "", 1)
            assert torch.equal(v, b[part][k_other]), f"{part}.{k} differs between workers"
    state = torch.load(result.checkpoint, weights_only=True)
    assert state["step"] == 4 and {"student", "teacher", "metric_head", "optimizer"} <= set(state)


def test_killed_worker_restarts_from_checkpoint(ray_cluster, tiny_bench, store, tmp_path):
    from corte_ray.train.ray_engine import fit_ray

    run = tmp_path / "run"
    run.mkdir()
    marker = tmp_path / "fault_fired"
    cfg = _cfg(tiny_bench, store, "method=distill", "scaling.num_workers=2", "train.iterations=6",
               "train.eval_every=0", "train.checkpoint_every=2", "scaling.max_failures=1")
    result = fit_ray(cfg, run, str(store), hooks=TestHooks(kill={"rank": 1, "step": 3, "marker": str(marker),
                                                                  "delay_s": 5.0}))
    assert marker.exists()                         # the worker really died at step 3
    assert result.step == 6
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    # step 2 checkpointed, the worker died at 3, the group restarted from step 2 and went on to 6.
    assert steps == [2, 4, 6]
    assert torch.load(result.checkpoint, weights_only=True)["step"] == 6


@pytest.mark.slow   # ~90 s: two 2-worker runs; in .ci/run
def test_a_restarted_group_ends_with_the_weights_of_an_uninterrupted_run(ray_cluster, tiny_bench, store, tmp_path):
    """Rank 1 dies at step 3 and the group restarts from the step-2 checkpoint: each worker's stream starts again
    at step 2 (not at the run's first step), so the run ends with exactly the uninterrupted run's weights."""
    from corte_ray.train.ray_engine import fit_ray

    extra = ("method=distill", "scaling.num_workers=2", "train.iterations=5", "train.eval_every=0",
             "train.checkpoint_every=2", "scaling.max_failures=1")
    runs = {}
    for name, kill in (("straight", None),
                       ("restarted", {"rank": 1, "step": 3, "marker": str(tmp_path / "died"), "delay_s": 5.0})):
        runs[name] = tmp_path / name
        runs[name].mkdir()
        hooks = TestHooks(kill=kill, dump_final=runs[name])
        assert fit_ray(_cfg(tiny_bench, store, *extra), runs[name], str(store), hooks=hooks).step == 5
    assert (tmp_path / "died").exists()
    a, b = (torch.load(runs[n] / "final_rank0.pt", weights_only=True)["student"] for n in ("straight", "restarted"))
    for k, v in a.items():
        assert torch.equal(v, b[k]), f"student {k} differs from the uninterrupted run"


def test_gpu_request_without_gpus_fails_at_once(ray_cluster, tiny_bench, store, tmp_path):
    from corte_ray.errors import ConfigError
    from corte_ray.train.ray_engine import fit_ray

    cfg = _cfg(tiny_bench, store, "method=distill", "scaling.use_gpu=true")
    with pytest.raises(ConfigError, match="scaling.use_gpu: the Ray cluster has no GPUs"):
        fit_ray(cfg, tmp_path / "run", str(store))


def _scalars(run: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)]


def test_one_ray_worker_matches_the_local_engine(ray_cluster, tiny_bench, store, tmp_path):
    from corte_ray.train.context import LocalContext
    from corte_ray.train.loop import train
    from corte_ray.train.ray_engine import fit_ray
    from corte_ray.blackbox.store import LabelStore

    extra = ("method=corte", "train.iterations=6", "train.log_every=1", "train.eval_every=0",
             "train.checkpoint_every=6", "scaling.num_workers=1")
    local = tmp_path / "local"
    local.mkdir()
    train(_cfg(tiny_bench, store, *extra), LocalContext(local, torch.device("cpu")), LabelStore(store))
    remote = tmp_path / "remote"
    remote.mkdir()
    fit_ray(_cfg(tiny_bench, store, *extra), remote, str(store))
    a, b = _scalars(local, "train/loss"), _scalars(remote, "train/loss")
    assert len(a) == len(b) == 6
    # Same seed, same data order, same steps: equal up to float reordering between processes.
    assert a == pytest.approx(b, rel=1e-4, abs=1e-5)


def test_failed_run_resumes_from_the_cli(ray_cluster, tiny_bench, store, tmp_path, capsys):
    from corte_ray.cli import main
    from corte_ray.config import save_config
    from corte_ray.errors import CorteError
    from corte_ray.train.ray_engine import fit_ray

    run = tmp_path / "run"
    run.mkdir()
    cfg = _cfg(tiny_bench, store, "method=distill", "scaling.num_workers=1", "train.iterations=4",
               "train.eval_every=0", "train.checkpoint_every=2", "scaling.max_failures=0")
    save_config(cfg, run / "config.yaml")   # what `corte-ray adapt` writes before it starts
    with pytest.raises(CorteError, match="--resume"):
        fit_ray(cfg, run, str(store), hooks=TestHooks(kill={"rank": 0, "step": 3, "marker": str(tmp_path / "m"),
                                                             "delay_s": 5.0}))
    assert main(["-q", "adapt", "--out", str(run), "--resume"]) == 0
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]                  # resumed after step 2, no step repeated


def test_rounds_under_the_ray_engine(ray_cluster, tiny_bench, store, tmp_path):
    # `train.rounds` with scaling.engine=ray: every round is a Ray Train run and the relabelling a Ray Data job
    # with the round's exported student behind the black-box interface.
    from corte_ray.blackbox.store import LabelStore
    from corte_ray.pipeline import adapt

    run = tmp_path / "run"
    cfg = _cfg(tiny_bench, store, "method=distill", "scaling.num_workers=1", "train.iterations=2",
               "train.eval_every=0", "train.checkpoint_every=2", "train.rounds=2")
    result = adapt(cfg, run)
    assert result.step == 2 and (run / "rounds" / "1" / "checkpoints" / "step_0000002").is_dir()
    relabelled = LabelStore(run / "rounds" / "labels_2")
    assert sorted(relabelled.keys()) == sorted(LabelStore(store).keys())
    final = torch.load(run / "checkpoints" / "step_0000002" / "checkpoint.pt", weights_only=True)
    assert final["config"]["blackbox"]["label_store"] == str(run / "rounds" / "labels_2")


def test_more_cpus_than_the_cluster_has_fails_at_once(ray_cluster, tiny_bench, store):
    from corte_ray.errors import ConfigError
    from corte_ray.train.ray_engine import check_cluster

    cfg = _cfg(tiny_bench, store, "method=distill", "scaling.num_workers=4", "scaling.cpus_per_worker=1.0")
    with pytest.raises(ConfigError, match=r"scaling.num_workers: 4 workers x \(1 CPUs \(scaling.cpus_per_worker\) \+ "
                                         r"0.5 for its decode actor \(scaling.data_cpus\)\) need 6 CPUs, the "
                                         r"cluster has 2"):
        check_cluster(cfg)
    check_cluster(_cfg(tiny_bench, store, "method=distill", "scaling.num_workers=2"))   # 2 x (0.5 + 0.5) fits


@pytest.mark.slow
def test_killed_corte_worker_restores_teacher_thresholds_and_generators(ray_cluster, tiny_bench, store, tmp_path):
    """A rank of a 2-worker corte run dies at step 3; the group restarts from the step-2 checkpoint. Every rank
    must restore the teacher, the method's running teacher thresholds and its own generators (torch's and the
    method's) exactly as checkpointed, not only the step count."""
    from corte_ray.train.ray_engine import fit_ray

    run = tmp_path / "run"
    run.mkdir()
    cfg = _cfg(tiny_bench, store, "method=corte", "scaling.num_workers=2", "train.iterations=5",
               "train.eval_every=0", "train.checkpoint_every=2", "train.keep_checkpoints=5", "scaling.max_failures=1",
               "corte.warmup=0.0",
               "corte.refine_start=0.0")
    result = fit_ray(cfg, run, str(store), hooks=TestHooks(kill={"rank": 1, "step": 3, "marker": str(tmp_path / "died"),
                                                                 "delay_s": 5.0}, dump_resumed=run))
    assert (tmp_path / "died").exists() and result.step == 5
    ckpt = torch.load(run / "checkpoints" / "step_0000002" / "checkpoint.pt", weights_only=True)
    initial = ckpt["method"]
    for rank in (0, 1):
        got = torch.load(run / f"resumed_rank{rank}.pt", weights_only=True)
        assert got["step"] == 2
        for k, v in ckpt["teacher"].items():
            assert torch.equal(got["teacher"][k], v), f"rank {rank}: teacher {k} not restored"
        thresholds = ckpt["method"]["teacher_thresholds"]
        for k, v in thresholds.items():
            assert torch.equal(torch.as_tensor(got["method"]["teacher_thresholds"][k]), torch.as_tensor(v)), k
        mine = ckpt["rng_ranks"][rank]
        assert torch.equal(got["method"]["generator"], mine["generator"]), f"rank {rank}: generator"
        assert torch.equal(got["torch_rng"], mine["torch"]), f"rank {rank}: torch RNG"
    # the two ranks' generators differ (each restored its own, not rank 0's)
    assert not torch.equal(ckpt["rng_ranks"][0]["generator"], ckpt["rng_ranks"][1]["generator"])
    # the thresholds had moved from their start by step 2: restoring them is not restoring the defaults
    from corte_ray.methods.refine import TeacherThresholds

    fresh = TeacherThresholds(cfg.model.num_classes, cfg.ema.threshold_momentum).state_dict()
    assert any(not torch.equal(torch.as_tensor(initial["teacher_thresholds"][k]), torch.as_tensor(v))
               for k, v in fresh.items())


def _ddp_reference_rank(rank: int, world: int, port: int, cfg_dict: dict, run: str, store_path: str) -> None:
    """One rank of the 2-process local reference: the same loop on torch.distributed (gloo), no Ray."""
    import torch.distributed as dist

    from corte_ray.blackbox.store import LabelStore
    from corte_ray.config import from_dict
    from corte_ray.train.context import LocalContext
    from corte_ray.train.loop import train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)

    class DistContext(LocalContext):
        def all_reduce_(self, t):
            dist.all_reduce(t)
            return t

        def wrap_model(self, model):
            return torch.nn.parallel.DistributedDataParallel(model)

    ctx = DistContext(Path(run), torch.device("cpu"))
    ctx.rank, ctx.world_size = rank, world
    try:
        train(from_dict(cfg_dict), ctx, LabelStore(store_path))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ray_workers_follow_a_two_process_ddp_reference(ray_cluster, tiny_bench, store, tmp_path):
    """Ray Train with 2 workers (DDP) against the same loop in 2 local processes on torch.distributed: same
    seeds, and each Ray worker's stream is its rank's `sample_order` (feed.py), the reference's per-rank
    batches: the loss curves are equal up to float reordering between processes."""
    import socket

    import torch.multiprocessing as mp

    from corte_ray.train.ray_engine import fit_ray

    extra = ("method=distill", "train.iterations=8", "train.log_every=1", "train.eval_every=0",
             "train.checkpoint_every=8", "scaling.num_workers=2", "train.lr=5e-3")
    ray_run, ref_run = tmp_path / "ray", tmp_path / "reference"
    ray_run.mkdir()
    ref_run.mkdir()
    fit_ray(_cfg(tiny_bench, store, *extra), ray_run, str(store))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_reference_rank, args=(2, port, _cfg(tiny_bench, store, *extra).to_dict(), str(ref_run), str(store)),
             nprocs=2, join=True)
    a, b = _scalars(ray_run, "train/loss"), _scalars(ref_run, "train/loss")
    assert len(a) == len(b) == 8
    assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    assert a[-1] < a[0]                            # and it learns


def test_a_run_in_the_old_ray_layout_is_refused_by_name(tiny_bench, store, tmp_path):
    from corte_ray.errors import InputError
    from corte_ray.train.ray_engine import fit_ray

    run = tmp_path / "old"
    (run / "step_0000002").mkdir(parents=True)   # what the Ray engine wrote before RUN/checkpoints/step_N
    with pytest.raises(InputError, match="old layout"):
        fit_ray(_cfg(tiny_bench, store, "method=distill"), run, str(store))
