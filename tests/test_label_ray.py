"""The Ray Data labelling job: the store it writes holds what the box answers, equals the in-process loop's,
survives a kill (a rerun queries only the missing images, no key twice) and handles a hard-label box.

One Ray instance for the module; its workers register the test-only "counting:" backend (tests/counting_box.py)
so queries made inside the actors can be counted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from corte_ray.blackbox import LocalBlackBox
from corte_ray.blackbox.ray_label import label_dataset_ray
from corte_ray.blackbox.store import LabelStore, label_dataset_local
from corte_ray.data.datasets import open_dataset
from corte_ray.data.transforms import resize_image
from corte_ray.errors import CorteError, InputError
from corte_ray.export import export_model
from tests.tiny_net import TinySegNet

from .counting_box import image_hash, read_hashes

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]
REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 6
RESIZE = (40, 56)
# Workers import the "counting:" backend at start-up; the hook runs before Ray adds the driver's directory to
# their sys.path, hence PYTHONPATH.
WORKER_ENV = {"worker_process_setup_hook": "tests.counting_box.register", "env_vars": {"PYTHONPATH": str(REPO)}}


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    saved = os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=2, object_store_memory=200 * 1024**2, include_dashboard=False, runtime_env=WORKER_ENV)
    yield ray
    ray.shutdown()
    if saved is not None:
        os.environ["RAY_ADDRESS"] = saved


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    from corte_ray.data.synth import render_benchmark

    root = tmp_path_factory.mktemp("label_bench")
    render_benchmark(root, n_source=2, n_target=16, n_val=2, size=(64, 64))
    return root


@pytest.fixture(scope="module")
def dataset(bench):
    return open_dataset("synth", bench, split="train")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("box") / "box.pt"
    return export_model(TinySegNet().eval(), path, example_size=(40, 56), meta={"arch": "tiny"})


def images_of(dataset, resize=None) -> dict[str, np.ndarray]:
    """key -> the image as the job queries it (writable: torch.from_numpy warns on PIL's read-only arrays)."""
    out = {}
    for s in dataset.samples:
        img = dataset.read_image(s)
        out[s.key] = np.array(resize_image(img, resize) if resize else img)
    return out


def assert_same_top1(got: np.ndarray, want: np.ndarray, gap: np.ndarray, tie: float = 1e-4) -> None:
    """Equal classes wherever the reference's top-2 gap exceeds `tie` (float noise); a flip only at a near-tie."""
    differ = got != want
    assert not np.any(differ & (np.asarray(gap) > tie)), "classes differ at a pixel with a clear winner"
    assert differ.mean() <= 0.005


def part_keys(store_dir: Path) -> list[str]:
    """Every key of every part, duplicates kept."""
    keys: list[str] = []
    for part in sorted((store_dir / "parts").glob("*.parquet")):
        keys += pq.read_table(part, columns=["key"]).column("key").to_pylist()
    return keys


def test_store_holds_the_box_answer_and_equals_the_local_loop(ray_cluster, dataset, model_file, tmp_path):
    store_dir = tmp_path / "ray"
    doc = label_dataset_ray(dataset, f"file:{model_file}", store_dir, resize=RESIZE, batch_size=4)
    run = doc["run"]
    keys = sorted(s.key for s in dataset.samples)
    assert run["labelled"] == 16 and run["skipped"] == 0 and run["remaining"] == 0
    assert sorted(part_keys(store_dir)) == keys                 # every image once
    parts = list((store_dir / "parts").glob("*.parquet"))
    assert len(parts) == 4                                      # one part per batch of 4
    assert run["store_bytes_per_image"] == pytest.approx(sum(p.stat().st_size for p in parts) / 16)

    # Reference: the same model file queried in this process, on the same (resized) images, one at a time.
    # Batching and threads change the logits in the last float bits, so a pixel whose top two probabilities
    # (nearly) tie may flip; everywhere else the classes must agree exactly.
    box = LocalBlackBox(model_file, answer="probs", device="cpu")
    images = images_of(dataset, RESIZE)
    store = LabelStore(store_dir)
    for key in keys:
        probs = box.query(images[key][None]).probs[0]           # (C,H,W)
        top2 = torch.topk(probs, 2, dim=0).values
        labels = store.get(key)
        assert labels.top1.shape == RESIZE
        assert_same_top1(labels.top1, probs.argmax(0).numpy(), (top2[0] - top2[1]).numpy())
        # p quantised to 1/255 (a value on a rounding boundary may round either way)
        np.testing.assert_allclose(labels.p1, top2[0].numpy(), atol=0.5 / 255 + 1e-6)

    # thresholds.json = a direct computation over the store's own quantised top-2, decoded here independently.
    sums, counts = np.zeros(NUM_CLASSES), np.zeros(NUM_CLASSES, dtype=np.int64)
    for part in (store_dir / "parts").glob("*.parquet"):
        for row in pq.read_table(part).to_pylist():
            ids = np.frombuffer(row["topk_ids"], np.uint8).reshape(2, *RESIZE)
            q = np.frombuffer(row["topk_probs"], np.uint8).reshape(2, *RESIZE).astype(np.float64) / 255
            for c in range(NUM_CLASSES):
                sums[c] += (q[0] - q[1])[ids[0] == c].sum()
                counts[c] += int((ids[0] == c).sum())
    thresholds = json.loads((store_dir / "thresholds.json").read_text())
    assert thresholds["num_images"] == 16 and thresholds["class_pixels"] == counts.tolist()
    assert counts.sum() == 16 * RESIZE[0] * RESIZE[1] and (counts > 0).sum() >= 2
    for got, n, total in zip(thresholds["class_mean_rc"], counts, sums):
        # rc is computed in float32 by the store: equal to ~1e-7
        assert got is None if n == 0 else got == pytest.approx(total / n, abs=1e-6)
    assert thresholds["tau"] == [1.0 if m is None else m for m in thresholds["class_mean_rc"]]

    # The in-process loop on the same box and images writes the same store.
    local_dir = tmp_path / "local"
    local_doc = label_dataset_local(dataset, box, local_dir, resize=RESIZE, batch_size=4, k=2)
    local = LabelStore(local_dir)
    assert local.keys() == store.keys()
    for key in keys:
        a, b = local.get(key), store.get(key)
        assert_same_top1(a.top1, b.top1, a.rc)
        np.testing.assert_allclose(a.p1, b.p1, atol=1 / 255 + 1e-6)
    assert local_doc["num_images"] == 16
    assert np.abs(np.subtract(local_doc["class_pixels"], thresholds["class_pixels"])).sum() <= 16
    np.testing.assert_allclose(np.array(local_doc["class_mean_rc"], dtype=float),
                               np.array(thresholds["class_mean_rc"], dtype=float), atol=1e-3)
    assert json.loads((local_dir / "meta.json").read_text()) == json.loads((store_dir / "meta.json").read_text())


def test_http_box_with_faults_answers_every_image_once(ray_cluster, dataset, model_file, tmp_path):
    from corte_ray.blackbox.faults import FaultInjectingServer
    # A quarter of the requests fail (503, 500, a connection closed after 0.3 s, a dropped connection);
    # seed 1 puts four faults among the first 16 requests.
    with FaultInjectingServer(model_file, device="cpu", error_rate=0.25, seed=1, fault_sleep=0.3) as srv:
        doc = label_dataset_ray(dataset, srv.url, tmp_path / "store", batch_size=4)
        stats = srv.stats
    images = images_of(dataset)
    assert stats["answered_images"] == {image_hash(img): 1 for img in images.values()}  # every image once
    assert stats["injected_total"] > 0
    # Every injected fault cost the actor's client one retry, and the job saw them all.
    assert doc["run"]["retries"] == stats["injected_total"] and doc["run"]["failures"] == 0
    store = LabelStore(tmp_path / "store")
    assert len(store) == 16 and len(part_keys(tmp_path / "store")) == 16
    box = LocalBlackBox(model_file, answer="probs", device="cpu")
    for key, img in images.items():
        probs = box.query(img[None]).probs[0]
        top2 = torch.topk(probs, 2, dim=0).values
        # the wire carries float16 probabilities (~5e-4 apart near 0.5): closer pairs may flip
        assert_same_top1(store.get(key).top1, probs.argmax(0).numpy(), (top2[0] - top2[1]).numpy(), tie=1e-3)


def test_killed_job_resumes_without_querying_twice(ray_cluster, bench, dataset, model_file, tmp_path):
    store_dir = tmp_path / "store"
    slow_log, rerun_log = tmp_path / "killed.log", tmp_path / "rerun.log"
    # The killed run is another driver on the same cluster, slowed to 0.5 s per batch of 2 so it is still
    # running when its first part appears.
    script = (
        "import ray\n"
        "ray.init(address=%r, runtime_env=%r)\n"
        "import tests.counting_box\n"
        "from corte_ray.data.datasets import open_dataset\n"
        "from corte_ray.blackbox.ray_label import label_dataset_ray\n"
        "label_dataset_ray(open_dataset('synth', %r, split='train'), %r, %r, batch_size=2)\n"
    ) % (ray_cluster.get_runtime_context().gcs_address, WORKER_ENV, str(bench),
         f"counting:{model_file}#{slow_log}#0.5", str(store_dir))
    env = {**os.environ, "CORTE_NO_PROGRESS": "1"}
    env.pop("RAY_ADDRESS", None)
    job_log = tmp_path / "job.log"  # a file, not a pipe: a pipe nobody reads would block the job when full
    with open(job_log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    parts_dir = store_dir / "parts"
    deadline = time.monotonic() + 120
    try:
        while not list(parts_dir.glob("*.parquet")):
            if proc.poll() is not None:
                pytest.fail(f"the job to kill ended first (rc {proc.returncode}):\n{job_log.read_text()}")
            assert time.monotonic() < deadline, "no part written within 120 s"
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
    # Ray ends the dead driver's actor; wait until no part is being added any more.
    count = -1
    while count != len(list(parts_dir.glob("*.parquet"))):
        count = len(list(parts_dir.glob("*.parquet")))
        time.sleep(1.5)
    before = set(part_keys(store_dir))
    assert 0 < len(before) < 16, "the kill should leave a partial store"
    assert not (store_dir / "thresholds.json").exists()

    doc = label_dataset_ray(dataset, f"counting:{model_file}#{rerun_log}", store_dir, batch_size=4)
    images = images_of(dataset)
    missing = {image_hash(images[k]) for k in images if k not in before}
    queried = read_hashes(rerun_log)
    assert sorted(queried) == sorted(missing)                   # only the missing images, each once
    assert doc["run"]["labelled"] == len(missing) and doc["run"]["skipped"] == len(before)
    keys = part_keys(store_dir)
    assert len(keys) == len(set(keys)) == 16                    # complete, no key in two parts
    assert doc["num_images"] == 16

    # A rerun of a complete store queries nothing; overwrite relabels everything.
    rerun_log.unlink()
    assert label_dataset_ray(dataset, f"counting:{model_file}#{rerun_log}", store_dir)["run"]["labelled"] == 0
    assert read_hashes(rerun_log) == []


def test_a_labelling_actor_killed_mid_batch_leaves_no_duplicate(ray_cluster, dataset, model_file, tmp_path):
    store_dir, marker, log = tmp_path / "store", tmp_path / "died", tmp_path / "queries.log"
    doc = label_dataset_ray(dataset, f"counting:{model_file}#{log}#0#{marker}", store_dir, batch_size=4)
    assert marker.exists()                                   # the actor really died in its second batch
    keys = part_keys(store_dir)
    assert len(keys) == len(set(keys)) == 16                 # every key once: Ray re-ran the lost batch
    assert doc["num_images"] == 16 and LabelStore(store_dir).row_count() == 16


def test_a_rerun_batch_queries_nothing_already_stored(dataset, model_file, tmp_path):
    """What Ray does when an actor dies after writing its part but before returning: the batch runs again.
    The labeller checks the store's manifests first (no Ray needed to show it)."""
    from corte_ray.blackbox.ray_label import BoxLabeller, make_decoder
    from corte_ray.blackbox.store import LabelStoreWriter, label_store_meta
    import dataclasses

    log = tmp_path / "q.log"
    spec = f"counting:{model_file}#{log}"
    with LocalBlackBox(model_file, device="cpu") as probe:
        meta = label_store_meta(probe, dataset, None, 2)
    meta["blackbox"] = spec
    LabelStoreWriter(tmp_path / "store", meta)
    labeller = BoxLabeller(spec, "probs", 2, "cpu", 4, str(tmp_path / "store"), meta)
    decode = make_decoder(dataclasses.replace(dataset, samples=[]), None)
    batch = decode({"key": np.array([s.key for s in dataset.samples[:4]]),
                    "path": np.array([str(s.image) for s in dataset.samples[:4]])})
    first, again = labeller(dict(batch)), labeller(dict(batch))
    assert int(first["queried"][0]) == 4 and int(again["queried"][0]) == 0
    assert len(read_hashes(log)) == 4 and LabelStore(tmp_path / "store").row_count() == 4


def test_hard_label_box_end_to_end(ray_cluster, dataset, model_file, tmp_path):
    store_dir = tmp_path / "store"
    # A store of another kind is refused unless overwritten (before any Ray work).
    label_dataset_local(dataset, LocalBlackBox(model_file, answer="probs", device="cpu"), store_dir)
    spec_log = tmp_path / "hard.log"
    with pytest.raises(InputError, match="answer_kind"):
        label_dataset_ray(dataset, f"counting:{model_file}#{spec_log}", store_dir, answer="hard")
    doc = label_dataset_ray(dataset, f"counting:{model_file}#{spec_log}", store_dir, answer="hard",
                            batch_size=8, overwrite=True)
    images = images_of(dataset)
    assert sorted(read_hashes(spec_log)) == sorted(image_hash(img) for img in images.values())
    store = LabelStore(store_dir)
    assert store.kind == "hard" and len(store) == 16 and len(part_keys(store_dir)) == 16
    box = LocalBlackBox(model_file, answer="hard", device="cpu")
    for key, img in images.items():
        labels = store.get(key)
        np.testing.assert_array_equal(labels.top1, box.query(img[None]).hard[0].numpy())
        assert labels.rc is None and np.all(labels.p1 == 1.0)
    assert doc["tau"] == [1.0] * NUM_CLASSES and doc["class_mean_rc"] == [None] * NUM_CLASSES
    assert doc["num_images"] == 16


def test_budget_caps_the_queries(ray_cluster, dataset, model_file, tmp_path):
    doc = label_dataset_ray(dataset, f"file:{model_file}", tmp_path / "store", budget=0)
    assert doc["run"]["labelled"] == 0 and doc["run"]["remaining"] == 16 and doc["num_images"] == 0


def test_unreadable_image_fails_naming_the_file(ray_cluster, dataset, model_file, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for sample in dataset.samples[:4]:
        shutil.copy(sample.image, folder / sample.image.name)
    bad = folder / dataset.samples[2].image.name
    bad.write_bytes(b"not a png")
    with pytest.raises(CorteError) as info:
        label_dataset_ray(open_dataset("folder", folder), f"file:{model_file}", tmp_path / "store", batch_size=2)
    # one line naming the file, not Ray's remote traceback
    assert str(bad) in str(info.value) and "cannot read image" in str(info.value) and "\n" not in str(info.value)


def test_images_of_several_sizes_in_one_batch(ray_cluster, model_file, tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    sizes = {f"im{i}": (40, 56) if i % 2 else (32, 48) for i in range(6)}
    for key, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{key}.png")
    dataset = open_dataset("folder", folder)
    doc = label_dataset_ray(dataset, f"file:{model_file}", tmp_path / "store", batch_size=4)
    assert doc["run"]["labelled"] == 6 and len(list((tmp_path / "store" / "parts").glob("*.parquet"))) == 2
    store = LabelStore(tmp_path / "store")
    box = LocalBlackBox(model_file, answer="probs", device="cpu")
    for sample in dataset.samples:
        probs = box.query(np.array(dataset.read_image(sample))[None]).probs[0]
        top2 = torch.topk(probs, 2, dim=0).values
        got = store.get(sample.key).top1
        assert got.shape == sizes[sample.key]
        assert_same_top1(got, probs.argmax(0).numpy(), (top2[0] - top2[1]).numpy())


def test_label_cli_ray_engine_and_resume(ray_cluster, bench, model_file, tmp_path, capsys):
    from corte_ray.blackbox.store import LabelStore
    from corte_ray.cli import main

    store = tmp_path / "store"
    args = ["label", "--dataset", "synth", "--root", str(bench), "--blackbox", f"file:{model_file}",
            "--device", "cpu", "--out", str(store)]
    assert main(args) == 0
    assert "holds" in capsys.readouterr().out
    n = len(LabelStore(store))
    assert n > 0 and (store / "thresholds.json").exists()
    parts = sorted(p.name for p in (store / "parts").glob("*.parquet"))
    assert main(args) == 0                               # a rerun finds everything done: no new part
    assert sorted(p.name for p in (store / "parts").glob("*.parquet")) == parts and len(LabelStore(store)) == n
