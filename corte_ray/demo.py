"""`corte-ray demo`: the whole pipeline on the embedded synthetic benchmark, on a laptop.

synth -> train-source (a heavy model) -> export it and use it ONLY through the black-box interface ->
label the target training images -> adapt `distill` and `corte` students -> compare on the target val split:
mIoU, parameters and CPU images/s, as a table, OUT/results.json and a PNG grid of predictions.
Every stage writes to OUT and is skipped (or resumed) when its output exists, so a rerun continues.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .config import load_config
from .io_utils import write_json_atomic

log = logging.getLogger(__name__)

# Sizes and schedules. `quick` is sized for about 3 minutes on 2 CPU cores; the full demo for ~15 minutes.
SETTINGS = {
    "quick": {"n_source": 160, "n_target": 160, "n_val": 40, "size": (64, 128),
              "source_iters": 200, "adapt_iters": 250, "batch": 8},
    "full": {"n_source": 400, "n_target": 400, "n_val": 100, "size": (96, 192),
             "source_iters": 1000, "adapt_iters": 1200, "batch": 8},
}
SOURCE_ARCH = "deeplabv3_resnet18"
STUDENT_ARCH = "mobilenetv3_lraspp"
METHODS_SHOWN = ("distill", "corte")


def _stage(name: str) -> None:
    print(f"\n=== {name}", file=sys.stderr, flush=True)


def _cpu_images_per_s(model: torch.nn.Module, size: tuple[int, int], batch: int = 8, iters: int = 5) -> float:
    """Inference throughput on the CPU at the demo's resolution (what a small device would run)."""
    model = model.to("cpu").eval()
    x = torch.rand(batch, 3, *size)
    with torch.inference_mode():
        model(x)  # warm-up: first-call allocations
        t0 = time.perf_counter()
        for _ in range(iters):
            model(x)
        dt = time.perf_counter() - t0
    return batch * iters / dt


def _prediction_grid(dataset, pred_dirs: dict[str, Path], out: Path, n: int = 4) -> None:
    """Rows: val images; columns: image, ground truth, then each method's prediction."""
    from PIL import Image

    rows = []
    for sample in dataset.samples[:n]:
        img = dataset.read_image(sample)
        gt = dataset.read_label(sample, img.shape[:2])
        cols = [img, dataset.label_space.colorize(gt)]
        for d in pred_dirs.values():
            pred = np.asarray(Image.open(d / sample.pred_name))
            cols.append(dataset.label_space.colorize(pred))
        rows.append(np.concatenate([np.pad(c, ((2, 2), (2, 2), (0, 0)), constant_values=255) for c in cols], axis=1))
    grid = np.concatenate(rows, axis=0)
    from .io_utils import write_atomic

    write_atomic(out, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))


def run_demo(out: str | Path, quick: bool = False, seed: int = 0, device: str = "auto", threads: int = 0,
             engine: str = "ray") -> dict:
    from .blackbox import open_blackbox
    from .data.datasets import open_dataset
    from .data.synth import render_benchmark
    from .evaluation import evaluate_predictions
    from .models import count_parameters
    from .pipeline import adapt, label, load_checkpoint_model, predict, train_source

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    s = SETTINGS["quick" if quick else "full"]
    size = s["size"]
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    # 1. The benchmark.
    bench = out / "bench"
    _stage(f"1/5 synthetic benchmark -> {bench}")
    t0 = time.perf_counter()
    if not (bench / "stats.json").exists():
        stats = render_benchmark(bench, seed=seed, n_source=s["n_source"], n_target=s["n_target"], n_val=s["n_val"],
                                 size=size)
        print(stats.format_table(), file=sys.stderr)
    timings["synth"] = time.perf_counter() - t0

    if threads:
        torch.set_num_threads(threads)
    if engine == "ray":
        import ray

        if not ray.is_initialized():
            # One local Ray instance for the labelling job and both Train runs; the workers get fractional CPUs
            # so Ray Data tasks still find a CPU next to them.
            ray.init(**({} if os.environ.get("RAY_ADDRESS") else
                        {"num_cpus": os.cpu_count(), "object_store_memory": 300 * 1024**2}),
                     log_to_driver=False)
    # A Ray Train worker gets OMP threads = its CPU share (1 here); the demo's single worker may use every core.
    worker_threads = threads or (os.cpu_count() or 1 if engine == "ray" else 0)
    common = [f"train.seed={seed}", f"train.device={device}", f"train.cpu_threads={worker_threads}", f"data.batch_size={s['batch']}",
              f"data.crop_size={list(size)}", "data.dataset=synth", f"data.root={bench}"]

    # 2. The source model, trained on labelled source images, exported, then only used as a black box.
    box_file = out / "blackbox.pt"
    _stage(f"2/5 train the source model ({SOURCE_ARCH}) -> {box_file}")
    t0 = time.perf_counter()
    if not box_file.exists():
        src_run = out / "source"
        resume = (src_run / "config.yaml").exists()
        cfg = None if resume else load_config(None, common + [
            "method=oracle", f"model.student={SOURCE_ARCH}", "data.train_split=source", "data.val_split=",
            f"train.iterations={s['source_iters']}", "train.lr=2e-3", "train.eval_every=0",
            f"train.checkpoint_every={max(50, s['source_iters'] // 4)}", "train.lr_warmup=20"])
        train_source(cfg, src_run, box_file, resume=resume)
    timings["train_source"] = time.perf_counter() - t0

    # 3. Label the target training images through the black-box interface (once; resumable).
    store = out / "labels"
    _stage(f"3/5 label the target with the black box -> {store}")
    t0 = time.perf_counter()
    box_spec = f"file:{box_file}"
    if not (store / "thresholds.json").exists():
        label(load_config(None, common + [f"blackbox.spec={box_spec}"]), store, engine=engine)
    timings["label"] = time.perf_counter() - t0

    val = open_dataset("synth", bench, split="val")
    preds = out / "predictions"
    rows: dict[str, dict] = {}

    # The black box itself on the target val split (the `source_only` row).
    box = open_blackbox(box_spec, answer="probs", device=device)
    try:
        from .log import progress

        (preds / "blackbox").mkdir(parents=True, exist_ok=True)
        from PIL import Image

        for sample in progress(val.samples, desc="black box on val", unit="img"):
            img = val.read_image(sample)
            pred = box.query(img[None]).top1()[0].to(torch.uint8).cpu().numpy()
            Image.fromarray(pred).save(preds / "blackbox" / sample.pred_name)
    finally:
        box.close()
    res = evaluate_predictions(val, preds / "blackbox")
    box_model = torch.jit.load(str(box_file), map_location="cpu")
    rows["blackbox"] = {"miou": round(res.miou, 2), "params": int(sum(p.numel() for p in box_model.parameters())),
                        "cpu_images_per_s": round(_cpu_images_per_s(box_model, size), 1), "arch": SOURCE_ARCH}

    # 4. Adapt the students.
    for i, method in enumerate(METHODS_SHOWN):
        run = out / "runs" / method
        _stage(f"4/5 adapt: {method} ({STUDENT_ARCH}) -> {run}")
        t0 = time.perf_counter()
        if not (run / "done.json").exists():
            resume = (run / "config.yaml").exists()
            cfg = None if resume else load_config("demo", common + [
                f"method={method}", f"model.student={STUDENT_ARCH}", f"blackbox.label_store={store}",
                f"scaling.engine={engine}", "scaling.cpus_per_worker=0.5",
                f"train.iterations={s['adapt_iters']}", f"train.checkpoint_every={max(50, s['adapt_iters'] // 4)}",
                f"train.eval_every={max(50, s['adapt_iters'] // 4)}"])
            result = adapt(cfg, run, resume=resume)
            write_json_atomic(run / "done.json", {"step": result.step, "metrics": result.metrics})
        timings[f"adapt_{method}"] = time.perf_counter() - t0
        model, _ = load_checkpoint_model(_latest_checkpoint(run))
        predict(model, val, preds / method, device=device)
        res = evaluate_predictions(val, preds / method)
        rows[method] = {"miou": round(res.miou, 2), "params": count_parameters(model),
                        "cpu_images_per_s": round(_cpu_images_per_s(model, size), 1), "arch": STUDENT_ARCH}

    # 5. Report.
    _stage("5/5 results")
    _prediction_grid(val, {m: preds / m for m in ("blackbox",) + METHODS_SHOWN}, out / "predictions.png")
    total = time.perf_counter() - t_start
    command = (f"corte-ray demo --out {out}" + (" --quick" if quick else "") + (f" --seed {seed}" if seed else "")
               + (f" --engine {engine}" if engine != "ray" else "") + (f" --threads {threads}" if threads else ""))
    results = {"rows": rows, "settings": {**s, "size": list(size), "source_arch": SOURCE_ARCH, "engine": engine,
                                          "student_arch": STUDENT_ARCH, "seed": seed},
               "seconds": {k: round(v, 1) for k, v in timings.items()} | {"total": round(total, 1)},
               "command": command}
    write_json_atomic(out / "results.json", results)
    print(format_table(rows))
    corte, boxr = rows["corte"]["miou"], rows["blackbox"]["miou"]
    print(f"\nThe corte student ({rows['corte']['params'] / 1e6:.1f} M params) {'beats' if corte >= boxr else 'trails'} "
          f"the black box ({rows['blackbox']['params'] / 1e6:.1f} M params) by {abs(corte - boxr):.2f} mIoU "
          f"and runs {rows['corte']['cpu_images_per_s'] / max(rows['blackbox']['cpu_images_per_s'], 1e-9):.1f}x "
          f"faster on this CPU; corte vs distill: {corte - rows['distill']['miou']:+.2f} mIoU.")
    print(f"results: {out / 'results.json'}, predictions: {out / 'predictions.png'}, "
          f"TensorBoard: tensorboard --logdir {out / 'runs'}   ({total:.0f} s)")
    return results


def _latest_checkpoint(run: Path) -> Path:
    """The newest checkpoint of a run, whichever engine wrote it (local: RUN/checkpoints/step_N, Ray: RUN/step_N)."""
    found = sorted(run.glob("checkpoints/step_*/checkpoint.pt"), key=lambda p: p.parent.name) + \
        sorted(run.glob("step_*/checkpoint.pt"), key=lambda p: p.parent.name)
    return max(found, key=lambda p: int(p.parent.name.split("_")[1]))


def format_table(rows: dict[str, dict]) -> str:
    lines = [f"{'method':10s} {'model':22s} {'target-val mIoU':>15s} {'params (M)':>10s} {'CPU img/s':>10s}"]
    for name, r in rows.items():
        lines.append(f"{name:10s} {r['arch']:22s} {r['miou']:15.2f} {r['params'] / 1e6:10.2f} {r['cpu_images_per_s']:10.1f}")
    return "\n".join(lines)
