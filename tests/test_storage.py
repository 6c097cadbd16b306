"""corte_ray.storage against a real S3-compatible server (moto on 127.0.0.1) and local paths: the same calls
behave the same on both; URIs are never mangled into local paths."""

from __future__ import annotations

import json
import os
import pickle
import uuid
from pathlib import Path

import pytest

from corte_ray import storage
from corte_ray.io_utils import append_line, write_atomic, write_json_atomic
from tests.s3_server import make_bucket, s3_env, start_server


@pytest.fixture(scope="module")
def s3_server():
    server, endpoint = start_server()
    saved = {k: os.environ.get(k) for k in s3_env(endpoint)}
    os.environ.update(s3_env(endpoint))
    yield endpoint
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return tmp_path / "root"
    request.getfixturevalue("s3_server")
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    make_bucket(bucket)
    return storage.as_path(f"s3://{bucket}/root")


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
