"""Training throughput: the plain loop (local engine) vs Ray Train with 1 worker (overhead %, goal <= 3 %) and with
2 workers, on the synthetic benchmark with a stored label set; and the Ray engine's decode pipeline alone
(train/feed.py, 1 and 2 decode actors, no trainer), the images/s it can feed.

    python benchmarks/train.py --iterations 60 --size 64x128 --batch 8 --threads 1

Steady-state images/s is the median of the loop's own TensorBoard `train/images_per_s` windows, the first window
(start-up, first-call allocations) excluded; wall time including engine start-up is reported beside it. Every
engine gets the same per-worker thread count, so the comparison measures the engine, not the thread setting.
Writes benchmarks/results/train_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def steady_images_per_s(run: Path) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    vals = [e.value for e in acc.Scalars("train/images_per_s")][1:]
    return statistics.median(vals)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=60)
    p.add_argument("--size", default="64x128")
    p.add_argument("--batch", type=int, default=8, help="per worker")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--method", default="corte")
    p.add_argument("--student", default="mobilenetv3_lraspp")
    p.add_argument("--work", type=Path, default=None, help="working directory (default: a temporary one)")
    args = p.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    work = args.work or Path(tempfile.mkdtemp(prefix="corte-bench-train-"))
    os.environ.setdefault("CORTE_NO_PROGRESS", "1")
    torch.set_num_threads(args.threads)

    from corte_ray.blackbox import open_blackbox
    from corte_ray.blackbox.store import LabelStore, label_dataset_local
    from corte_ray.config import load_config
    from corte_ray.data.datasets import open_dataset
    from corte_ray.data.synth import render_benchmark
    from corte_ray.export import export_model
    from corte_ray.models import build_source_model
    from corte_ray.train.context import LocalContext
    from corte_ray.train.loop import train

    bench, store = work / "bench", work / "labels"
    if not (bench / "stats.json").exists():
        render_benchmark(bench, n_source=2, n_target=64, n_val=4, size=(h, w))
    if not (store / "thresholds.json").exists():
        box = work / "box.pt"
        export_model(build_source_model("deeplabv3_resnet18").eval(), box, example_size=(h, w))
        label_dataset_local(open_dataset("synth", bench, split="train"), open_blackbox(f"file:{box}", device="cpu"), store)
    log_every = max(2, args.iterations // 10)

    def cfg(workers: int, engine: str):
        return load_config(None, [
            f"method={args.method}", "data.dataset=synth", f"data.root={bench}", f"blackbox.label_store={store}",
            f"model.student={args.student}", f"data.batch_size={args.batch}", f"data.crop_size=[{h},{w}]",
            f"train.iterations={args.iterations}", f"train.log_every={log_every}", "train.eval_every=0",
            f"train.checkpoint_every={args.iterations}", f"train.cpu_threads={args.threads}",
            f"scaling.engine={engine}", f"scaling.num_workers={workers}", "scaling.cpus_per_worker=0.5"])

    rows = {}
    run = work / "local"
    t0 = time.perf_counter()
    train(cfg(1, "local"), LocalContext(run, torch.device("cpu")), LabelStore(store))
    rows["plain loop"] = {"images_per_s": steady_images_per_s(run), "wall_s": time.perf_counter() - t0}

    import ray

    os.environ.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), object_store_memory=300 * 1024**2, include_dashboard=False)
    ray_start = time.perf_counter() - t0
    from corte_ray.train.ray_engine import fit_ray

    # The decode pipeline alone (train/feed.py): what one rank's stream can feed, no trainer consuming it; its
    # headroom over the trainer's images/s is what the decode actors leave to spare.
    from corte_ray.train.feed import ordered_batches, rank_stream
    from corte_ray.train.loop import TargetTrainSet

    for actors in (1, 2):
        c = cfg(1, "ray")
        c.scaling.data_workers = actors
        data = TargetTrainSet(open_dataset("synth", bench, split="train"), LabelStore(store), c.data.resize)
        t0 = time.perf_counter()
        n, t_first = 0, None
        for batch in ordered_batches(rank_stream(data, c, 0, 0).iter_batches(batch_size=None, batch_format="numpy"),
                                     args.batch, 0, args.iterations):
            n += batch["image"].shape[0]
            if t_first is None:
                t_first, n = time.perf_counter(), 0   # exclude start-up (actor start, first block)
        steady = n / max(time.perf_counter() - t_first, 1e-9)
        rows[f"decode pipeline alone, {actors} actor{'s' if actors > 1 else ''}"] = {
            "images_per_s": steady, "wall_s": time.perf_counter() - t0}

    for workers in (1, 2):
        run = work / f"ray{workers}"
        run.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        fit_ray(cfg(workers, "ray"), run, str(store))
        rows[f"ray train, {workers} worker{'s' if workers > 1 else ''}"] = {
            "images_per_s": steady_images_per_s(run), "wall_s": time.perf_counter() - t0}
    ray.shutdown()

    base = rows["plain loop"]["images_per_s"]
    command = "python benchmarks/train.py " + " ".join(sys.argv[1:])
    print(f"training throughput: {args.method}, {args.student}, {h}x{w}, batch {args.batch}/worker, "
          f"{args.threads} thread(s)/worker, {args.iterations} steps, cpu ({os.cpu_count()} cores)")
    print(f"{'engine':32s} {'images/s':>9s} {'vs plain':>9s} {'wall s':>8s}")
    for name, r in rows.items():
        r["vs_plain_pct"] = 100 * (r["images_per_s"] / base - 1)
        print(f"{name:32s} {r['images_per_s']:9.2f} {r['vs_plain_pct']:+8.1f}% {r['wall_s']:8.1f}")
    overhead = -rows["ray train, 1 worker"]["vs_plain_pct"]
    print(f"Ray Train 1-worker overhead: {overhead:.1f} % (goal <= 3 %); ray.init took {ray_start:.1f} s")
    print(f"command: {command}")
    out = Path(__file__).parent / "results" / "train_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "ray_init_s": ray_start, "overhead_pct": overhead, "command": command,
                               "size": [h, w], "batch": args.batch, "threads": args.threads,
                               "iterations": args.iterations, "method": args.method, "student": args.student},
                              indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
