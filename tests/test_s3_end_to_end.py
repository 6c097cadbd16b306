"""Label and adapt with the dataset, the label store, the box's model file and the run directory all on s3://
URIs of a real S3-compatible server (moto, on 127.0.0.1, started here), through the real `corte-ray` CLI on the
Ray engine. Then a run interrupted on the bucket is resumed from it with `corte-ray adapt --resume`.

Nothing is on a shared disk: the CLI's processes (driver, Ray Data tasks, labelling actors, Train workers) read
and write the bucket; the test reads back only what is in the bucket."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from corte_ray import storage
from tests.s3_server import make_bucket, restore_env, s3_env, start_server

pytestmark = [pytest.mark.slow, pytest.mark.ray]
BUCKET = "corte-e2e"
ROOT = Path(__file__).resolve().parents[1]


def _corte_ray() -> list[str]:
    exe = shutil.which("corte-ray") or str(Path(sys.executable).parent / "corte-ray")
    return [exe]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """The server, this process's environment pointed at it, and a bucket holding a tiny benchmark and a box."""
    from corte_ray.data.synth import render_benchmark
    from corte_ray.export import export_model
    from corte_ray.models import build_source_model

    server, endpoint = start_server()
    env = s3_env(endpoint)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        make_bucket(BUCKET)
        work = tmp_path_factory.mktemp("s3src")
        render_benchmark(work / "bench", seed=0, n_source=4, n_target=8, n_val=2, size=(64, 96))
        torch.manual_seed(0)
        export_model(build_source_model("deeplabv3_resnet18").eval(), work / "box.pt", example_size=(64, 96))
        storage.upload(work / "bench", f"s3://{BUCKET}/bench")
        storage.upload(work / "box.pt", f"s3://{BUCKET}/models/box.pt")
        shutil.rmtree(work)   # from here on the data is in the bucket only
        yield {**os.environ, **env, "PYTHONPATH": str(ROOT), "CORTE_NO_PROGRESS": "1"}
    finally:
        restore_env(saved)
        server.stop()


def _run(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    res = subprocess.run(_corte_ray() + args, capture_output=True, text=True, env=env, cwd=cwd, timeout=900)
    assert res.returncode == 0, f"corte-ray {' '.join(args)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}"
    return res


ADAPT_FLAGS = ["--method", "corte", "--dataset", "synth", "--root", f"s3://{BUCKET}/bench", "--label-store",
               f"s3://{BUCKET}/labels", "--student", "mobilenetv3_small_lraspp", "--device", "cpu",
               "data.batch_size=2", "data.crop_size=[48,64]", "data.val_max_images=2", "train.cpu_threads=1",
               "train.lr_warmup=1", "corte.warmup=0.25", "corte.refine_start=0.5", "ema.momentum=0.9",
               "scaling.num_workers=1", "scaling.cpus_per_worker=0.5", "train.eval_every=2",
               "train.checkpoint_every=2"]


def _metrics_steps(run: str) -> list[int]:
    return [json.loads(l)["step"] for l in storage.as_path(f"{run}/metrics.jsonl").read_text().splitlines()]


def test_label_and_adapt_on_s3_then_resume_from_the_bucket(s3, tmp_path):
    from corte_ray.blackbox.store import LabelStore
    from corte_ray.config import load_config
    from corte_ray.pipeline import adapt
    from corte_ray.errors import CorteError
    from tests.engine_hooks import TestHooks

    # ---- label: the Ray Data job reads images from the bucket; its actor loads the box from the bucket and
    # writes its Parquet parts there; the driver finalises the thresholds from the bucket.
    _run(["label", "--dataset", "synth", "--root", f"s3://{BUCKET}/bench", "--blackbox",
          f"file:s3://{BUCKET}/models/box.pt", "--out", f"s3://{BUCKET}/labels", "--device", "cpu",
          "--resize", "64x96"], s3, tmp_path)
    labels = storage.as_path(f"s3://{BUCKET}/labels")
    assert len(LabelStore(labels)) == 8 and (labels / "thresholds.json").is_file()
    assert list(labels.glob("parts/*.parquet")) and list(labels.glob("parts/*.parquet.json"))
    assert not list(tmp_path.iterdir()), "the CLI wrote into its working directory"

    # ---- adapt on the Ray engine: checkpoints (newest 2 + best), metrics.jsonl, TensorBoard in the bucket.
    run = f"s3://{BUCKET}/runs/corte"
    out = _run(["adapt", "--out", run, *ADAPT_FLAGS, "train.iterations=6"], s3, tmp_path)
    assert json.loads(out.stdout)["step"] == 6
    ckpts = storage.as_path(run) / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000004", "step_0000006"]
    best = storage.load_torch(ckpts / "best" / "checkpoint.pt")
    assert 0 <= best["best_miou"] <= 100 and best["step"] in (2, 4, 6)
    assert _metrics_steps(run) == [2, 4, 6]
    events = list((storage.as_path(run) / "tensorboard").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    assert (storage.as_path(run) / "config.yaml").is_file() and (storage.as_path(run) / "progress.json").is_file()
    assert not list(tmp_path.iterdir()), "the CLI wrote into its working directory"
    # the README's commands on the best checkpoint work on the bucket's `best`
    _run(["export", f"{run}/checkpoints/best", "--format", "torchscript", "--out", str(tmp_path / "s.pt")], s3,
         tmp_path)

    # ---- a run that dies after its step-2 checkpoint (in this process: a test hook kills the Train worker)...
    run2 = f"s3://{BUCKET}/runs/interrupted"
    # the CLI's resolved config, 4 steps this time, no automatic restart (the failure ends the command)
    cfg = load_config(None, ["train.iterations=4", "scaling.max_failures=0"],
                      base=load_config(storage.as_path(run) / "config.yaml").to_dict())
    import ray

    try:
        with pytest.raises(CorteError, match="--resume"):
            adapt(cfg, run2, hooks=TestHooks(kill={"rank": 0, "step": 3, "marker": str(tmp_path / "killed"),
                                                   "delay_s": 5.0}))
    finally:
        ray.shutdown()
    assert (tmp_path / "killed").exists() and _metrics_steps(run2) == [2]
    # ... resumed from the bucket by the CLI: it continues after step 2. A resume that ignored the checkpoint
    # would train from step 0 and report step 2 again.
    res = _run(["adapt", "--out", run2, "--resume"], s3, tmp_path)
    assert f"resumed from {run2}/checkpoints/step_0000002/checkpoint.pt at step 2" in res.stderr
    assert _metrics_steps(run2) == [2, 4] and json.loads(res.stdout)["step"] == 4
    assert storage.load_torch(storage.as_path(run2) / "checkpoints" / "step_0000004" / "checkpoint.pt")["step"] == 4


def test_sweep_directory_on_s3(s3, tmp_path):
    """`corte-ray tune --out s3://...`: the sweep labels once into the bucket, Tune keeps its state there, every
    trial's run directory is there, and the leaderboard and best.yaml are written there."""
    import csv
    import io

    from tests.tune_helpers import write_tiny_config

    inputs, cwd = tmp_path / "inputs", tmp_path / "cwd"
    inputs.mkdir()
    cwd.mkdir()
    cfg = write_tiny_config(inputs / "cfg.yaml", f"s3://{BUCKET}/bench", f"file:s3://{BUCKET}/models/box.pt",
                            iterations=4, eval_every=2)
    space = inputs / "space.yaml"
    space.write_text("method: corte\nknobs:\n  train.lr: {grid: [1.0e-2, 1.0e-4]}\n")
    sweep = f"s3://{BUCKET}/sweeps/tiny"
    _run(["tune", "--config", str(cfg), "--space", str(space), "--samples", "1", "--scheduler", "none",
          "--out", sweep], s3, cwd)
    root = storage.as_path(sweep)
    rows = list(csv.DictReader(io.StringIO((root / "leaderboard.csv").read_text())))
    assert len(rows) == 2 and all(r["status"] == "done" and int(r["steps"]) == 4 for r in rows), rows
    assert (root / "best.yaml").is_file() and (root / "labels" / "thresholds.json").is_file()
    assert list(root.glob("tune/*")), "Tune's experiment state is not in the bucket"
    for r in rows:
        run = f"{sweep}/trials/{r['trial_id']}"
        assert _metrics_steps(run) == [2, 4]
        assert list(storage.as_path(run).glob("tensorboard/events.out.tfevents.*"))
        assert (storage.as_path(run) / "checkpoints" / "step_0000004" / "checkpoint.pt").is_file()
    assert not list(cwd.iterdir()), "the CLI wrote into its working directory"
