"""Images/s of the Ray Data labelling job against the direct batched loop (`label_dataset_local`), same box,
same images, same batch size, same torch threads, same parts (one per batch), and their ratio (goal >= 0.95).

    python benchmarks/label.py --n-images 200 --size 128x256 --device cpu
    python benchmarks/label.py --n-images 2000 --size 512x1024 --device cuda --actors 1

The box is a randomly initialised source model (--arch) exported to TorchScript, on the rendered synthetic
target domain. Two rates per engine:
  steady      images after the first batch / time from the first batch's end to the last's: model loading,
              actor start-up and Ray Data's planning are excluded from both engines;
  end-to-end  images / time from the call to the finished store (thresholds.json), box opening included for
              both; `ray.init` is excluded and reported on its own (a cluster is started once per session).
--repeats alternates the engines (local, ray, local, ray, ...) and reports medians, so load from other
processes hits both alike. Writes JSON to benchmarks/results/label_<device>.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


class TimedBox:
    """A black box that records when each query returns (the local loop's batch completion times)."""

    def __init__(self, box) -> None:
        self._box = box
        self.ends: list[tuple[float, int]] = []
        self.query_seconds = 0.0

    def __getattr__(self, name: str):
        return getattr(self._box, name)

    def query(self, images):
        start = time.perf_counter()
        answer = self._box.query(images)
        self.ends.append((time.perf_counter(), len(images)))
        self.query_seconds += self.ends[-1][0] - start
        return answer


def prepare(args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    """Render the target images and export the box once per (work dir, size, count, arch)."""
    from corte_ray.data.synth import render_benchmark
    from corte_ray.export import export_model
    from corte_ray.models import build_source_model

    h, w = args.size
    bench = work / f"synth_{args.n_images}_{h}x{w}"
    if not (bench / "stats.json").exists():
        render_benchmark(bench, seed=0, n_source=0, n_target=args.n_images, n_val=0, size=(h, w))
    model_file = work / f"{args.arch}_{h}x{w}.pt"
    if not model_file.exists():
        torch.manual_seed(0)
        model = build_source_model(args.arch, num_classes=19).eval()
        export_model(model, model_file, example_size=(h, w), meta={"arch": args.arch})
    return bench, model_file


def run_local(args: argparse.Namespace, dataset, model_file: Path, store: Path) -> dict:
    from corte_ray.blackbox import open_blackbox
    from corte_ray.blackbox.store import label_dataset_local

    t0 = time.perf_counter()
    box = TimedBox(open_blackbox(f"file:{model_file}", answer=args.answer, device=args.device,
                                 batch_size=args.batch_size))
    try:
        # One part per batch, as the Ray job writes: both pay the same Parquet writes.
        label_dataset_local(dataset, box, store, batch_size=args.batch_size,
                            overwrite=True)
    finally:
        box.close()
    seconds = time.perf_counter() - t0
    (first_end, _), (last_end, _) = box.ends[0], box.ends[-1]
    after_first = sum(n for _, n in box.ends[1:])
    return {"images": len(dataset), "seconds": seconds, "images_per_s": len(dataset) / seconds,
            "steady_images_per_s": after_first / (last_end - first_end), "first_batch_seconds": first_end - t0,
            "query_seconds": box.query_seconds}


def run_ray(args: argparse.Namespace, dataset, model_file: Path, store: Path) -> dict:
    from corte_ray.blackbox.ray_label import label_dataset_ray

    gpus = 1.0 if args.device.startswith("cuda") else 0.0
    doc = label_dataset_ray(dataset, f"file:{model_file}", store, answer=args.answer, batch_size=args.batch_size,
                            num_actors=args.actors, num_gpus_per_actor=gpus, overwrite=True, device=args.device,
                            threads_per_actor=args.threads, cpus_per_actor=args.cpus_per_actor)
    run = doc["run"]
    return {"images": run["labelled"], "seconds": run["seconds"], "images_per_s": run["images_per_s"],
            "steady_images_per_s": run["steady_images_per_s"], "first_batch_seconds": run["first_batch_seconds"],
            "query_seconds": run["query_seconds"], "store_bytes_per_image": run["store_bytes_per_image"],
            "retries": run["retries"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-images", type=int, default=200)
    p.add_argument("--size", type=lambda s: tuple(int(v) for v in s.split("x")), default=(128, 256), help="HxW")
    p.add_argument("--arch", default="deeplabv3_resnet18", help="source model behind the box")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--actors", type=int, default=1)
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="logical CPUs Ray reserves per actor")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of the local loop and of each actor (0 = this process's default)")
    p.add_argument("--answer", default="probs", choices=("probs", "topk", "hard"))
    p.add_argument("--repeats", type=int, default=1, help="runs per engine, alternating")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "corte_label_bench",
                   help="where images, model and stores go (kept between runs)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("CORTE_NO_PROGRESS", "1")
    args.threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(args.threads)

    import ray

    from corte_ray.blackbox.ray_label import OBJECT_STORE_BYTES
    from corte_ray.data.datasets import open_dataset

    args.work.mkdir(parents=True, exist_ok=True)
    bench, model_file = prepare(args, args.work)
    dataset = open_dataset("synth", bench, split="train")
    t0 = time.perf_counter()
    # What label_dataset_ray does when it starts Ray itself; done here once so every repeat joins it.
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=max(os.cpu_count() or 1, int(args.actors * args.cpus_per_actor + 1)),
             object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False, logging_level=logging.WARNING)
    ray_init_s = time.perf_counter() - t0

    local_runs, ray_runs = [], []
    try:
        for i in range(args.repeats):
            local_runs.append(run_local(args, dataset, model_file, args.work / "store_local"))
            print(f"[{i}] local: {json.dumps(local_runs[-1])}", flush=True)
            ray_runs.append(run_ray(args, dataset, model_file, args.work / "store_ray"))
            print(f"[{i}] ray:   {json.dumps(ray_runs[-1])}", flush=True)
    finally:
        ray.shutdown()
    shutil.rmtree(args.work / "store_local", ignore_errors=True)

    # Medians and bests: on a shared machine the best run is the one least disturbed by other processes.
    summary = {engine: {f"{stat}_{key}": fn(r[key] for r in runs)
                        for key in ("steady_images_per_s", "images_per_s", "first_batch_seconds", "query_seconds")
                        for stat, fn in (("median", statistics.median), ("best", max if "per_s" in key else min))}
               for engine, runs in (("local", local_runs), ("ray", ray_runs))}
    ratios = {f"{stat}_{key}": summary["ray"][f"{stat}_{key}"] / summary["local"][f"{stat}_{key}"]
              for stat in ("median", "best") for key in ("steady_images_per_s", "images_per_s")}
    h, w = args.size
    dev = (torch.cuda.get_device_name() if args.device.startswith("cuda")
           else f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})")
    command = "python benchmarks/label.py " + " ".join(sys.argv[1:])
    print(f"\nlabelling {args.n_images} images {h}x{w}, box {args.arch} ({args.answer}), batch {args.batch_size}, "
          f"{args.threads} torch threads, {args.actors} actor(s), {dev}; {args.repeats} runs per engine")
    print(f"{'engine':8s} {'stat':6s} {'steady img/s':>13s} {'end-to-end img/s':>17s} {'1st batch s':>12s} "
          f"{'box s/img':>10s}")
    for engine in ("local", "ray"):
        for stat in ("median", "best"):
            s = summary[engine]
            print(f"{engine:8s} {stat:6s} {s[f'{stat}_steady_images_per_s']:13.2f} {s[f'{stat}_images_per_s']:17.2f} "
                  f"{s[f'{stat}_first_batch_seconds']:12.1f} {s[f'{stat}_query_seconds'] / args.n_images:10.4f}")
    for stat in ("median", "best"):
        print(f"ratio ray/local ({stat}): steady {ratios[f'{stat}_steady_images_per_s']:.3f} (goal >= 0.95), "
              f"end-to-end {ratios[f'{stat}_images_per_s']:.3f}")
    print(f"ray.init: {ray_init_s:.1f} s (not in either rate); store: {ray_runs[-1]['store_bytes_per_image']:.0f} "
          "bytes/image")
    print(f"command: {command}")
    out = args.out or ROOT / "benchmarks" / "results" / f"label_{args.device.split(':')[0]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "device": dev, "n_images": args.n_images, "size": [h, w], "arch": args.arch, "answer": args.answer,
        "batch_size": args.batch_size, "actors": args.actors, "cpus_per_actor": args.cpus_per_actor,
        "threads": args.threads, "repeats": args.repeats, "ray_init_seconds": ray_init_s, "summary": summary,
        "ratios": ratios, "local_runs": local_runs, "ray_runs": ray_runs,
        "timing": "steady: after the first batch, start-up excluded from both; end-to-end: call to finished "
                  "store, box opening included for both, ray.init excluded (ray_init_seconds)",
        "command": command, "torch": torch.__version__, "ray": ray.__version__}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
