"""Images/s and peak memory of one training step per method (student forward/backward, teacher, metric head,
views and mixing: everything `method.step` does plus backward, optimiser and EMA update), at a given size and
device. Ray-free on purpose, so it runs on a bare GPU machine.

    python benchmarks/step.py --device cpu --size 64x128 --batch 8
    python benchmarks/step.py --device cuda --size 512x1024 --batch 8 --bf16 --channels-last

Each method runs in its own subprocess, so peak memory (CUDA: max allocated; CPU: max RSS) is per method.
Prints a table and the command; writes JSON to --out (default benchmarks/results/step_<device>_<HxW>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ALL = ("distill", "threshold_st", "corte", "corte_metric", "stvm", "oracle")


def one(args: argparse.Namespace) -> dict:
    from corte_ray.config import load_config
    from corte_ray.methods.steps import METHODS, Models, build_method
    from corte_ray.models import ClassProxies, EMATeacher, MetricHead, build_model

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    h, w = args.size
    method = args.one
    cfg = load_config(None, [f"method={method}", f"data.crop_size=[{h},{w}]", f"model.student={args.student}",
                             "corte.warmup=0", "corte.refine_start=0"])
    cls = METHODS.get(method)
    student = build_model(args.student, 19).to(device)
    cl = args.channels_last and device.type == "cuda"
    if cl:
        student = student.to(memory_format=torch.channels_last)
    models = Models(student=student, teacher=EMATeacher(student, 0.999) if cls.uses_teacher else None)
    params = list(student.parameters())
    if cls.uses_metric:
        models.metric_head = MetricHead(student.feature_dim).to(device)
        models.proxies = ClassProxies(19).to(device)
        params += list(models.metric_head.parameters()) + list(models.proxies.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4)
    step = build_method(cfg, torch.full((19,), 0.3), device)
    g = torch.Generator(device="cpu").manual_seed(0)
    b = args.batch
    probs = (torch.randn(b, 19, h, w, generator=g) * 4).softmax(1)
    top2 = probs.topk(2, dim=1)
    batch = {"image": torch.rand(b, 3, h, w, generator=g), "box_top1": top2.indices[:, 0],
             "box_p1": top2.values[:, 0], "box_rc": top2.values[:, 0] - top2.values[:, 1],
             "label": torch.randint(0, 19, (b, h, w), generator=g)}
    batch = {k: v.to(device) for k, v in batch.items()}
    if cl:
        batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
    use_amp = args.bf16 and device.type == "cuda"

    def run_step(i: int) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            out = step.step(models, batch, 10_000 + i, 20_000)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        if models.teacher is not None:
            models.teacher.update(student)

    for i in range(args.warmup):
        run_step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(args.iters):
        run_step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"method": method, "images_per_s": b * args.iters / dt, "s_per_step": dt / args.iters, "peak_mb": peak_mb}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=lambda s: tuple(int(v) for v in s.split("x")), default=(64, 128), help="crop HxW")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--student", default="mobilenetv3_lraspp")
    p.add_argument("--methods", default=",".join(ALL))
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format (CUDA only)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args)))
        return
    rows = []
    for m in args.methods.split(","):
        cmd = [sys.executable, __file__, "--one", m] + [a for a in sys.argv[1:]]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            sys.exit(f"{m} failed:\n{res.stderr}")
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    h, w = args.size
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    command = "python benchmarks/step.py " + " ".join(sys.argv[1:])
    print(f"one training step, {args.student}, batch {args.batch}, {h}x{w}, {dev}"
          f"{', bf16' if args.bf16 else ''}{', channels_last' if args.channels_last else ''}"
          f"{f', {args.threads} threads' if args.threads else ''}")
    print(f"{'method':14s} {'images/s':>9s} {'s/step':>8s} {'peak MB':>9s}")
    for r in rows:
        print(f"{r['method']:14s} {r['images_per_s']:9.2f} {r['s_per_step']:8.3f} {r['peak_mb']:9.0f}")
    print(f"command: {command}")
    out = args.out or Path(__file__).parent / "results" / f"step_{args.device.split(':')[0]}_{h}x{w}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": dev, "student": args.student, "batch": args.batch, "size": [h, w],
                               "bf16": args.bf16, "channels_last": args.channels_last, "threads": args.threads,
                               "rows": rows, "command": command, "torch": torch.__version__}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
