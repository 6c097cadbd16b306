"""corte_ray.storage against a real S3-compatible server (moto on 127.0.0.1) and local paths: the same calls
behave the same on both; URIs are never mangled into local paths."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest

from corte_ray import storage
from corte_ray.io_utils import append_line, write_atomic, write_json_atomic
from tests.s3_server import bucket, s3_server  # noqa: F401 - fixtures


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return tmp_path / "root"
    return storage.as_path(f"s3://{request.getfixturevalue('bucket')}/root")


def test_uris_are_not_local_paths():
    p = storage.as_path("s3://bucket/run//a/")
    assert isinstance(p, storage.RemotePath) and str(p) == "s3://bucket/run/a"
    assert str(p / "checkpoints" / "best") == "s3://bucket/run/a/checkpoints/best"
    assert p.name == "a" and str(p.parent) == "s3://bucket/run" and p.resolve() == p
    assert storage.as_path("gs://b/x").scheme == "gs"
    assert isinstance(storage.as_path("runs/x"), Path) and storage.as_path("file:///tmp/x") == Path("/tmp/x")
    # it pickles as its URI (Ray ships it to workers; no filesystem, no credentials inside)
    blob = pickle.dumps(p)
    assert pickle.loads(blob) == p and b"testing" not in blob
    with pytest.raises(TypeError, match="not a local file path"):
        open(p)   # a URI handed to open() fails loudly instead of writing ./s3:/...
    with pytest.raises(ValueError, match="needs a bucket"):
        storage.RemotePath("s3://")


def test_write_read_list_and_delete(root):
    write_json_atomic(root / "meta.json", {"a": 1})
    write_atomic(root / "parts" / "p1.bin", lambda tmp: tmp.write_bytes(b"x" * 10))
    (root / "parts" / "p2.bin").write_bytes(b"yy") if storage.is_remote(root) else \
        storage.write_bytes(root / "parts" / "p2.bin", b"yy")
    assert json.loads((root / "meta.json").read_text()) == {"a": 1}
    assert root.exists() and root.is_dir() and (root / "meta.json").is_file()
    assert not (root / "nothing").exists() and not (root / "parts").is_file()
    assert [p.name for p in storage.listdir(root / "parts")] == ["p1.bin", "p2.bin"]
    assert sorted(p.name for p in root.glob("parts/*.bin")) == ["p1.bin", "p2.bin"]
    assert (root / "parts" / "p1.bin").stat().st_size == 10
    with storage.open_input(root / "parts" / "p1.bin") as f:
        f.seek(8)
        assert f.read() == b"xx"
    with pytest.raises(FileNotFoundError):
        (root / "missing.json").read_bytes()
    storage.move(root / "parts" / "p2.bin", root / "damaged" / "p2.bin")
    assert not (root / "parts" / "p2.bin").exists() and (root / "damaged" / "p2.bin").read_bytes() == b"yy"
    (root / "meta.json").unlink()
    (root / "meta.json").unlink(missing_ok=True)
    assert not (root / "meta.json").exists()
    storage.remove_tree(root / "parts")
    assert not list(root.glob("parts/*"))


def test_append_line_keeps_whole_lines(root):
    for step in (1, 2, 3):
        append_line(root / "metrics.jsonl", json.dumps({"step": step}))
    assert [json.loads(l)["step"] for l in (root / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_upload_download_and_local_copy(root, tmp_path):
    src = tmp_path / "src"
    (src / "tb").mkdir(parents=True)
    (src / "tb" / "events.1").write_bytes(b"e1")
    (src / "metrics.jsonl").write_text('{"step": 1}\n')
    storage.upload(src, root / "run")
    assert sorted(str(p).rsplit("/run/", 1)[1] for p in root.glob("run/*")) == ["metrics.jsonl", "tb"]
    assert (root / "run" / "tb" / "events.1").read_bytes() == b"e1"
    back = storage.download(root / "run", tmp_path / "back")
    assert (back / "tb" / "events.1").read_bytes() == b"e1" and (back / "metrics.jsonl").read_text() == '{"step": 1}\n'
    local = storage.local_copy(root / "run" / "metrics.jsonl")
    assert local.read_text() == '{"step": 1}\n' and local.is_file()


def test_resolve_gives_what_ray_train_takes(root):
    fs, path = storage.resolve(root / "run")
    if storage.is_remote(root):
        assert fs.type_name == "s3" and path == f"{root.bucket}/root/run"
    else:
        assert fs.type_name == "local" and path == str((root / "run").resolve())


def test_missing_bucket_is_an_input_error(s3_server):
    from corte_ray.errors import InputError

    with pytest.raises(InputError, match="s3://no-such-bucket-xyz/a.json"):
        write_json_atomic(storage.as_path("s3://no-such-bucket-xyz/a.json"), {})


# ------------------------------------------------------------------ what the package keeps on storage
def test_synth_dataset_on_s3_lists_and_reads_like_the_local_copy(tiny_bench, bucket):
    from corte_ray.data.datasets import open_dataset

    storage.upload(tiny_bench, f"s3://{bucket}/bench")
    for split in ("train", "val", "source"):
        local = open_dataset("synth", tiny_bench, split=split)
        remote = open_dataset("synth", f"s3://{bucket}/bench", split=split)
        assert [s.key for s in remote] == [s.key for s in local] and len(local) > 0
        assert str(remote.samples[0].image).startswith(f"s3://{bucket}/bench/")
        a, b = local.samples[0], remote.samples[0]
        assert (local.read_image(a) == remote.read_image(b)).all()
        assert (local.read_label(a) == remote.read_label(b)).all()


def test_dataset_formats_without_uri_support_say_so(bucket):
    from corte_ray.data.datasets import open_dataset
    from corte_ray.errors import ConfigError, InputError

    with pytest.raises(ConfigError, match=r"--root s3://.*'folder' reads local folders only"):
        open_dataset("folder", f"s3://{bucket}/imgs", split="train")
    with pytest.raises(InputError, match=f"s3://{bucket}/nothing: dataset root not found"):
        open_dataset("synth", f"s3://{bucket}/nothing", split="train")


def test_label_store_on_s3_equals_the_local_one_and_catches_damage(tiny_bench, bucket, tmp_path):
    import numpy as np

    import torch

    from corte_ray.blackbox import open_blackbox
    from corte_ray.blackbox.store import LabelStore, LabelStoreWriter, label_dataset_local
    from corte_ray.data.datasets import open_dataset
    from corte_ray.errors import InputError
    from corte_ray.export import export_model
    from tests.tiny_net import TinySegNet

    torch.manual_seed(0)
    export_model(TinySegNet(num_classes=19).eval(), tmp_path / "box.pt", example_size=(64, 96))
    storage.upload(tmp_path / "box.pt", f"s3://{bucket}/box.pt")
    dataset = open_dataset("synth", tiny_bench, split="train")
    uri = f"s3://{bucket}/labels"
    with open_blackbox(f"file:{tmp_path / 'box.pt'}", device="cpu") as box:
        label_dataset_local(dataset, box, tmp_path / "labels", batch_size=4)
    with open_blackbox(f"file:s3://{bucket}/box.pt", device="cpu") as box:   # the model file from the bucket
        assert box.name == f"file:s3://{bucket}/box.pt"
        label_dataset_local(dataset, box, uri, batch_size=4)
    local, remote = LabelStore(tmp_path / "labels"), LabelStore(uri)
    assert remote.keys() == local.keys() and len(remote) == len(dataset)
    for key in local.keys()[:3]:
        a, b = local.get(key), remote.get(key)
        assert (a.top1 == b.top1).all() and np.allclose(a.p1, b.p1)
    assert json.loads(storage.as_path(f"{uri}/thresholds.json").read_text())["num_images"] == len(dataset)
    # a part whose bytes changed in the bucket is refused by name, and the next labelling moves it aside
    part = sorted(storage.as_path(uri).glob("parts/*.parquet"))[0]
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(InputError, match=part.name):
        LabelStore(uri)
    writer = LabelStoreWriter(uri, json.loads(storage.as_path(f"{uri}/meta.json").read_text()))
    assert len(writer.done_keys()) < len(dataset) and not part.exists()
    assert (storage.as_path(uri) / "damaged" / part.name).is_file()


def test_checkpoint_layout_and_retention_on_s3(bucket):
    import torch

    from corte_ray.train.context import LocalContext

    run = f"s3://{bucket}/run"
    ctx = LocalContext(run, torch.device("cpu"), keep_checkpoints=2)
    for step, best in ((1, True), (2, False), (3, False)):
        ctx.save_checkpoint({"step": step, "w": torch.full((2,), float(step))}, step, best)
    ckpts = storage.as_path(run) / "checkpoints"
    assert [p.name for p in ckpts.iterdir()] == ["best", "step_0000002", "step_0000003"]
    assert storage.load_torch(ckpts / "best" / "checkpoint.pt")["step"] == 1
    # the newest one torn (a half-uploaded file from another tool): resume takes the one before it
    (ckpts / "step_0000003" / "checkpoint.pt").write_bytes(b"torn")
    state, path = ctx.load_latest_checkpoint(torch.device("cpu"))
    assert state["step"] == 2 and str(path) == f"{run}/checkpoints/step_0000002/checkpoint.pt"
    ctx.report({"step": 3, "loss": 0.5})
    ctx.report({"step": 4, "loss": 0.25})
    # a new context (a restarted process) appends to what the bucket holds, whole lines only
    LocalContext(run, torch.device("cpu")).report({"step": 5, "loss": 0.1})
    lines = (storage.as_path(run) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [3, 4, 5]


def test_local_engine_trains_into_an_s3_run_dir(tiny_bench, bucket, tmp_path):
    """The local engine with its run directory in the bucket: checkpoints, best, metrics.jsonl, TensorBoard
    and progress.json land there (TensorBoard written locally, synced at every report)."""
    import torch

    from corte_ray.blackbox.store import LabelStore
    from corte_ray.config import load_config
    from corte_ray.train.context import LocalContext
    from corte_ray.train.loop import train
    from tests.tune_helpers import label_tiny_store

    store = label_tiny_store(tmp_path, tiny_bench)
    cfg = load_config(None, ["method=corte", "data.dataset=synth", f"data.root={tiny_bench}",
                             "model.student=mobilenetv3_small_lraspp", "data.batch_size=2", "data.crop_size=[48,64]",
                             "data.val_max_images=2", "train.iterations=4", "train.eval_every=2",
                             "train.checkpoint_every=2", "train.lr_warmup=1", "train.device=cpu"])
    run = storage.as_path(f"s3://{bucket}/run")
    result = train(cfg, LocalContext(run, torch.device("cpu")), LabelStore(store))
    assert result.step == 4 and str(result.checkpoint) == f"{run}/checkpoints/step_0000004/checkpoint.pt"
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["best", "step_0000002", "step_0000004"]
    assert [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()] == [2, 4]
    events = list(run.glob("tensorboard/events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    assert json.loads((run / "progress.json").read_text())["done"] is True


def test_both_engines_implement_the_train_context(tmp_path):
    import torch

    from corte_ray.train.context import LocalContext, TrainContext
    from corte_ray.train.ray_engine import RayContext

    assert isinstance(LocalContext(tmp_path, torch.device("cpu")), TrainContext)
    for name in ("is_main", "tensorboard_dir", "all_reduce_", "wrap_model", "batches", "load_latest_checkpoint",
                 "save_checkpoint", "report"):
        assert callable(getattr(RayContext, name, None)) or isinstance(getattr(RayContext, name, None), property), name
