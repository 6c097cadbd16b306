"""The Ray engine's training feed (train/feed.py): each rank's stream is the local engine's `sample_order` for
that rank, whichever step it starts at and in whatever order Ray Data delivers its blocks; the label store is
read part by part; a real Ray Data actor pool produces exactly the local engine's batches."""

from __future__ import annotations

import itertools
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from corte_ray.config import load_config


def _rows(steps, slots, tag):
    n = len(steps)
    return {"step": np.asarray(steps, dtype=np.int64), "slot": np.asarray(slots, dtype=np.int64),
            "image": np.asarray(tag, dtype=np.int64).reshape(n, 1)}


def test_ordered_batches_puts_shuffled_split_chunks_back_in_step_order():
    from corte_ray.train.feed import ordered_batches

    b, steps = 3, range(2, 9)
    # Every row's value encodes (step, slot); chunks cut across steps and inside them, then shuffled.
    flat = [(s, k) for s in steps for k in range(b)]
    cuts = [0, 2, 3, 7, 8, 13, 16, len(flat)]
    chunks = [flat[a:z] for a, z in zip(cuts, cuts[1:])]
    random.Random(0).shuffle(chunks)
    # a chunk of rows before the start step (what a restarted stream re-reads) is dropped
    chunks.insert(1, [(1, 0), (1, 1), (1, 2)])
    chunks = [_rows([s for s, _ in c], [k for _, k in c], [10 * s + k for s, k in c]) for c in chunks]
    got = list(ordered_batches(chunks, b, start_step=2, iterations=9))
    assert [g["image"].squeeze(1).tolist() for g in got] == [[10 * s + k for k in range(b)] for s in steps]
    assert set(got[0]) == {"image"}                      # the tags do not reach the loop


def test_ordered_batches_refuses_a_stream_that_ends_early():
    from corte_ray.train.feed import ordered_batches

    with pytest.raises(RuntimeError, match="ended at step 1 of 3"):
        list(ordered_batches([_rows([0, 0], [0, 1], [0, 1])], 2, start_step=0, iterations=3))


class _Indexable:
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


@pytest.mark.parametrize("n,b,per_block", [(12, 2, 4), (13, 4, 3), (7, 3, 1)])
def test_blocks_give_the_local_engines_order_from_any_start(n, b, per_block):
    """Block j of a stream that starts at step s holds the images of steps s + j*per_block ...; joined, the
    blocks are the local engine's `sample_order` from s (n % b != 0 included), for every rank."""
    from corte_ray.train.feed import DecodeBlock
    from corte_ray.train.loop import sample_order

    iterations = 11
    for rank in (0, 1):
        for start in (0, 1, 5):
            dec = DecodeBlock(_Indexable(n), b, seed=3, rank=rank, start_step=start, iterations=iterations,
                              per_block=per_block)
            idx, steps = [], []
            for block in itertools.count():
                i, s = dec.indices(block)
                if not i:
                    break
                idx += i
                steps += s
            want = list(itertools.islice(iter(sample_order(n, b, 3, rank, start)), (iterations - start) * b))
            assert idx == want
            assert steps == [s for s in range(start, iterations) for _ in range(b)]


def test_prefetch_reads_each_part_once_and_answers_like_get(tiny_bench, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from corte_ray.blackbox import open_blackbox
    from corte_ray.blackbox.store import LabelStore, label_dataset_local
    from corte_ray.data.datasets import open_dataset
    from corte_ray.export import export_model
    from corte_ray.models import build_source_model

    torch.manual_seed(0)
    export_model(build_source_model("deeplabv3_resnet18").eval(), tmp_path / "box.pt", example_size=(64, 96))
    ds = open_dataset("synth", tiny_bench, split="train")
    label_dataset_local(ds, open_blackbox(f"file:{tmp_path / 'box.pt'}", device="cpu"), tmp_path / "labels",
                        batch_size=4)
    keys = [s.key for s in ds.samples][::-1]
    plain = LabelStore(tmp_path / "labels")
    want = {k: plain.get(k) for k in keys}

    store = LabelStore(tmp_path / "labels")
    opened = []
    real = pq.ParquetFile

    def counting(path, *a, **kw):   # the real reader, counted
        opened.append(path)
        return real(path, *a, **kw)

    monkeypatch.setattr(pq, "ParquetFile", counting)
    store.prefetch(keys)
    got = {k: store.get(k) for k in keys}
    assert len(opened) == len(set(opened)) == len(list((tmp_path / "labels" / "parts").glob("*.parquet"))) == 3
    for k in keys:
        for field in ("top1", "p1", "rc"):
            assert np.array_equal(getattr(got[k], field), getattr(want[k], field)), (k, field)
    assert len(opened) == 3                              # the gets read nothing more


@pytest.mark.ray
def test_a_rank_stream_on_ray_is_the_local_engines_batches(tiny_bench, tmp_path):
    """A real Ray Data actor pool (up to 2 actors) feeds rank 1 from step 3: the batches equal the local
    engine's DataLoader batches for rank 1 from step 3, image for image and label for label."""
    import ray

    from corte_ray.blackbox import open_blackbox
    from corte_ray.blackbox.store import LabelStore, label_dataset_local
    from corte_ray.data.datasets import open_dataset
    from corte_ray.export import export_model
    from corte_ray.models import build_source_model
    from corte_ray.train.feed import ordered_batches, rank_stream
    from corte_ray.train.loop import TargetTrainSet, local_batches

    torch.manual_seed(0)
    export_model(build_source_model("deeplabv3_resnet18").eval(), tmp_path / "box.pt", example_size=(64, 96))
    ds = open_dataset("synth", tiny_bench, split="train")
    label_dataset_local(ds, open_blackbox(f"file:{tmp_path / 'box.pt'}", device="cpu"), tmp_path / "labels")
    cfg = load_config(None, ["data.dataset=synth", f"data.root={tiny_bench}", "data.batch_size=5",
                             "train.iterations=9", "scaling.data_workers=2", "scaling.data_cpus=0.5",
                             "data.resize=[32,48]"])
    data = TargetTrainSet(ds, LabelStore(tmp_path / "labels"), (32, 48), with_labels=True)

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=2, object_store_memory=150 * 1024**2, include_dashboard=False)
    try:
        stream = rank_stream(data, cfg, rank=1, start_step=3)
        got = list(ordered_batches(stream.iter_batches(batch_size=None, batch_format="numpy"), 5, 3, 9))
    finally:
        ray.shutdown()
    want = list(itertools.islice(local_batches(data, cfg, rank=1, start_step=3), 6))
    assert len(got) == len(want) == 6
    for g, w in zip(got, want):
        assert set(g) == set(w) == {"image", "label", "box_top1", "box_p1", "box_rc"}
        for k in w:
            assert torch.equal(g[k], w[k]), k


@pytest.mark.ray
def test_the_backoff_stops_the_scheduling_loop_spinning_beside_a_slow_consumer():
    """benchmarks/feed_spin.py's stream (actor pool, 2 MB outputs, a consumer taking 50 ms per block), with and
    without feed's IdleBackoff: without it Ray Data's loop spins (measured ~2800 steps in 15 s, half a core of the
    consumer's process), with it it pauses while nothing moves (~250 steps), and the consumer is no slower."""
    import importlib.util

    import ray

    spec = importlib.util.spec_from_file_location("feed_spin", Path(__file__).parents[1] / "benchmarks" / "feed_spin.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=2, object_store_memory=150 * 1024**2, include_dashboard=False)
    try:
        spinning, paused = bench.run(False, 120), bench.run(True, 120)
    finally:
        ray.shutdown()
    assert paused["loop_steps"] < 0.3 * spinning["loop_steps"], (paused, spinning)
    assert paused["wall_s"] < 1.2 * spinning["wall_s"], (paused, spinning)


def test_target_train_set_reads_the_boxs_second_class_only_when_asked(tiny_bench, tmp_path):
    """corte.set_weight needs the box's top-2: the store's second class rides along as box_top2 (uint8, never
    the first class), and a run that does not ask for it reads no more than before."""
    from corte_ray.blackbox import open_blackbox
    from corte_ray.blackbox.store import LabelStore, label_dataset_local
    from corte_ray.data.datasets import open_dataset
    from corte_ray.export import export_model
    from corte_ray.models import build_source_model
    from corte_ray.train.data import TargetTrainSet

    torch.manual_seed(0)
    export_model(build_source_model("deeplabv3_resnet18").eval(), tmp_path / "box.pt", example_size=(64, 96))
    ds = open_dataset("synth", tiny_bench, split="train")
    label_dataset_local(ds, open_blackbox(f"file:{tmp_path / 'box.pt'}", answer="probs", device="cpu"),
                        tmp_path / "labels")
    store = LabelStore(tmp_path / "labels")
    with_top2 = TargetTrainSet(ds, store, with_top2=True)
    plain = TargetTrainSet(ds, store)
    for i, sample in enumerate(ds.samples):
        box = store.get(sample.key)
        item = with_top2[i]
        assert np.array_equal(item["box_top2"], box.top2) and item["box_top2"].dtype == np.uint8
        assert not np.any(item["box_top2"] == item["box_top1"])
        assert "box_top2" not in plain[i]
