"""`corte-ray demo`: the whole comparison of METHODS.md section 3 on the embedded synthetic benchmark, on a laptop.

synth -> train the source model (a heavy DeepLabV3+) on the labelled source domain, export it and from then on use
it ONLY through the black-box interface -> label the target training images -> adapt one student per method ->
compare on the target val split: mIoU, the share of the box->oracle gap closed, parameters and CPU images/s, as a
table, OUT/results.json / results.md, OUT/predictions.png and OUT/curves.png.

The rows are independent runs, so they run side by side, one thread each (Ray tasks, or local processes with
`--engine local`): the oracle (which needs no box) trains while the source model does. Every stage writes to OUT
and is skipped (or resumed) when its output exists, so a rerun continues.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .io_utils import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

# Sizes and schedules, chosen by measurement on 2 CPU cores (docs/methods.md, "The demo benchmark"): images are
# rendered at 128x256 and every model trains on 64x128 crops of them (as Cityscapes models train on 512x512 crops
# of 1024x2048), so thin objects stay several pixels wide at the cost of a 64x128 step.
SETTINGS = {
    "quick": {"n_source": 120, "n_source_val": 30, "n_target": 120, "n_val": 40, "size": (128, 256),
              "crop": (64, 128), "source_iters": 150, "adapt_iters": 200, "batch": 8,
              "methods": ("distill", "corte", "oracle")},
    "full": {"n_source": 300, "n_source_val": 100, "n_target": 300, "n_val": 100, "size": (128, 256),
             "crop": (64, 128), "source_iters": 400, "adapt_iters": 300, "batch": 8,
             "methods": ("distill", "threshold_st", "corte", "corte_metric", "stvm", "oracle")},
}
SOURCE_ARCH = "deeplabv3plus_resnet18"
STUDENT_ARCH = "mobilenetv3_lraspp_s4"
# Longest rows first, so the last row to finish is a short one (2 lanes, rows of unequal cost).
ROW_ORDER = ("stvm", "corte_metric", "corte", "threshold_st", "distill")


def _stage(name: str) -> None:
    print(f"=== {name}", file=sys.stderr, flush=True)


def _cpu_images_per_s(model: torch.nn.Module, size: tuple[int, int], batch: int = 8, iters: int = 5) -> float:
    """Inference throughput on the CPU at the benchmark's image size (what a small device would run)."""
    model = model.to("cpu").eval()
    x = torch.rand(batch, 3, *size)
    with torch.inference_mode():
        model(x)  # warm-up: first-call allocations
        t0 = time.perf_counter()
        for _ in range(iters):
            model(x)
        dt = time.perf_counter() - t0
    return batch * iters / dt


def common_overrides(bench: Path, seed: int, device: str, batch: int, crop: tuple[int, int],
                     threads: int = 1) -> list[str]:
    """The settings every run of a comparison shares (the demo's and benchmarks/quality.py's)."""
    return [f"train.seed={seed}", f"train.device={device}", f"train.cpu_threads={threads}",
            f"data.batch_size={batch}", f"data.crop_size={list(crop)}", "data.dataset=synth",
            f"data.root={bench}", "data.cache_images=true", "scaling.engine=local"]


def adapt_overrides(common: list[str], iterations: int) -> list[str]:
    """A student's schedule: `iterations` steps, four evaluations and four checkpoints."""
    return common + [f"train.iterations={iterations}", f"train.eval_every={max(25, iterations // 4)}",
                     f"train.checkpoint_every={max(50, iterations // 4)}"]


def source_overrides(common: list[str], iterations: int) -> list[str]:
    """The source model: supervised on the labelled source split, its own architecture and learning rate."""
    return common + ["method=oracle", f"model.student={SOURCE_ARCH}", "train.lr=5e-3", "data.train_split=source",
                     "data.val_split=", f"train.iterations={iterations}", "train.eval_every=0",
                     f"train.checkpoint_every={max(50, iterations // 4)}"]


def method_overrides(method: str, source_ckpt: str | None) -> list[str]:
    """What a demo row of `method` sets beyond the shared settings."""
    if method == "stvm":
        # The white-box start: the source model's own architecture and weights (METHODS 2.1).
        # Fine-tuning a trained model: 1e-2 (the students' rate from scratch) wrecked it within 50 steps (28.0 ->
        # 9.9 mIoU); 5e-4 with a slow teacher (m = 0.999, constant: it starts trained) holds and improves, 2.5e-4
        # drifts less (docs/methods.md).
        return ["method=stvm", f"model.student={SOURCE_ARCH}", f"model.weights={source_ckpt}", "train.lr=2.5e-4",
                "ema.momentum=0.999"]
    return [f"method={method}", f"model.student={STUDENT_ARCH}"]


def run_demo(out: str | Path, quick: bool = False, seed: int = 0, device: str = "auto", threads: int = 0,
             engine: str = "local", lanes: int = 0) -> dict:
    from .compare import Row, RowPool
    from .config import load_config
    from .data.datasets import open_dataset
    from .data.synth import render_benchmark
    from .export import load_model_file
    from .models import count_parameters
    from .pipeline import label, load_checkpoint_model
    from .report import gap_closed, results_markdown

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    s = SETTINGS["quick" if quick else "full"]
    size, crop = s["size"], s["crop"]
    lanes = lanes or os.cpu_count() or 1
    # One thread while rows train beside the driver (the labelling: its store, and so every row, is then the same
    # bytes for a seed whatever the core count); every core for the report at the end, when nothing else runs.
    torch.set_num_threads(threads or 1)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    # 1. The benchmark.
    bench = out / "bench"
    _stage(f"1/5 synthetic benchmark -> {bench}")
    t0 = time.perf_counter()
    if not (bench / "stats.json").exists():
        stats = render_benchmark(bench, seed=seed, n_source=s["n_source"], n_target=s["n_target"], n_val=s["n_val"],
                                 n_source_val=s["n_source_val"], size=size)
        print(stats.format_table(), file=sys.stderr)
    timings["synth"] = time.perf_counter() - t0

    common = common_overrides(bench, seed, device, s["batch"], crop, threads or 1)
    adapt_common = adapt_overrides(common, s["adapt_iters"])
    pool = RowPool(lanes, engine=engine)
    try:
        # 2. The source model (trained on labelled source images, exported, then only used as a black box), and
        #    beside it the oracle, which needs no box.
        box_file = out / "blackbox.pt"
        src_run = out / "source"
        _stage(f"2/5 train the source model ({SOURCE_ARCH}) -> {box_file}"
               + (", and the oracle beside it" if "oracle" in s["methods"] else ""))
        t0 = time.perf_counter()
        pool.submit(Row("source", str(src_run), export_to=str(box_file),
                        overrides=source_overrides(common, s["source_iters"])))
        if "oracle" in s["methods"]:
            pool.submit(Row("oracle", str(out / "runs" / "oracle"), overrides=adapt_common + method_overrides("oracle", None)))
        source = pool.wait(["source"])["source"]
        timings["train_source"] = time.perf_counter() - t0

        # stvm needs the source weights but no labels: it starts while the driver labels (a free core).
        store = out / "labels"
        t0 = time.perf_counter()
        early = [m for m in ROW_ORDER if m in s["methods"] and not _needs_labels(m)]
        for method in early:
            pool.submit(Row(method, str(out / "runs" / method),
                            overrides=adapt_common + method_overrides(method, source["checkpoint"])))

        # 3. Label the target training images through the black-box interface (once; resumable).
        _stage(f"3/5 label the target with the black box -> {store}"
               + (f", {', '.join(early)} adapting beside it" if early else ""))
        t_label = time.perf_counter()
        box_spec = f"file:{box_file}"
        if not (store / "thresholds.json").exists():
            label(load_config(None, common + [f"blackbox.spec={box_spec}"]), store, engine=engine)
        timings["label"] = time.perf_counter() - t_label

        # 4. Adapt the students, side by side; the box's own evaluation (target val, source val) takes the
        #    first lane that frees up.
        _stage(f"4/5 adapt: {', '.join(m for m in s['methods'])} ({lanes} at a time, one thread each)")
        for method in (m for m in ROW_ORDER if m in s["methods"] and m not in early):
            pool.submit(Row(method, str(out / "runs" / method), overrides=adapt_common
                            + method_overrides(method, source["checkpoint"]) + [f"blackbox.label_store={store}"]))
        pool.submit_task("box evaluation", evaluate_box, box_file=str(box_file), bench=str(bench), device=device)
        results = pool.wait()
        box_eval = results.pop("box evaluation")
        timings["adapt"] = time.perf_counter() - t0
    finally:
        pool.close()

    # 5. Report: the box on target val and on source val, then every student.
    _stage("5/5 results")
    torch.set_num_threads(os.cpu_count() or 1)
    val = open_dataset("synth", bench, split="val")
    box_model = load_model_file(box_file, "cpu").module  # no torch.jit deprecation warning in the report
    # Throughput is a property of the architecture, not of the weights: measured once per architecture.
    speed: dict[str, float] = {SOURCE_ARCH: round(_cpu_images_per_s(box_model, size), 1)}
    rows: dict[str, dict] = {"blackbox": {
        "miou": round(box_eval["val"]["miou"], 2), "source_miou": round(box_eval["source_val"]["miou"], 2),
        "arch": SOURCE_ARCH, "params": int(sum(p.numel() for p in box_model.parameters())),
        "cpu_images_per_s": speed[SOURCE_ARCH]}}
    models = {}
    for method in s["methods"]:
        r = results[method]
        model, run_cfg = load_checkpoint_model(r["checkpoint"])
        models[method] = model
        arch = run_cfg.model.student
        if arch not in speed:
            speed[arch] = round(_cpu_images_per_s(model, size), 1)
        rows[method] = {"miou": round(r["miou"], 2), "params": count_parameters(model),
                        "cpu_images_per_s": speed[arch], "arch": arch, "seconds": r["seconds"]}
    oracle = rows.get("oracle", {}).get("miou")
    for name, r in rows.items():
        r["gap_closed"] = None if oracle is None else gap_closed(r["miou"], rows["blackbox"]["miou"], oracle)
        if r["gap_closed"] is not None:
            r["gap_closed"] = round(r["gap_closed"], 3)

    _pictures(out, val, box_eval["val"]["predictions"], models, results, rows["blackbox"]["miou"])
    total = time.perf_counter() - t_start
    command = (f"corte-ray demo --out {out}" + (" --quick" if quick else "") + (f" --seed {seed}" if seed else "")
               + (f" --engine {engine}" if engine != "local" else ""))
    results_doc = {"rows": rows, "settings": {**{k: v for k, v in s.items() if k != "methods"},
                                             "methods": list(s["methods"]), "size": list(size), "crop": list(crop),
                                             "source_arch": SOURCE_ARCH, "student_arch": STUDENT_ARCH,
                                             "engine": engine, "seed": seed, "lanes": lanes},
                   "seconds": {k: round(v, 1) for k, v in timings.items()} | {"total": round(total, 1)},
                   "command": command}
    write_json_atomic(out / "results.json", results_doc)
    write_text_atomic(out / "results.md", results_markdown(rows, command, "corte-ray demo") + "\n")
    print(format_table(rows))
    corte, boxr = rows["corte"]["miou"], rows["blackbox"]["miou"]
    print(f"\nThe corte student ({rows['corte']['params'] / 1e6:.1f} M params) {'beats' if corte >= boxr else 'trails'} "
          f"the black box ({rows['blackbox']['params'] / 1e6:.1f} M params) by {abs(corte - boxr):.2f} mIoU "
          f"and runs {rows['corte']['cpu_images_per_s'] / max(rows['blackbox']['cpu_images_per_s'], 1e-9):.1f}x "
          f"faster on this CPU; corte vs distill: {corte - rows['distill']['miou']:+.2f} mIoU.")
    print(f"results: {out / 'results.md'}, pictures: {out / 'predictions.png'} {out / 'curves.png'}, "
          f"TensorBoard: tensorboard --logdir {out / 'runs'}   ({total:.0f} s)")
    return results_doc


def _needs_labels(method: str) -> bool:
    from .methods.steps import METHODS

    return METHODS.get(method).needs_box_labels


def evaluate_box(box_file: str | Path, bench: str | Path, device: str = "auto", n_keep: int = 4) -> dict[str, dict]:
    """The black box, queried through its interface, on the target val split and on the held-out source split:
    {split: {"miou", "per_class", "predictions" (of the first `n_keep` images)}}."""
    from .blackbox import open_blackbox
    from .data.datasets import open_dataset
    from .evaluation import confusion_matrix, result_from_confusion

    box = open_blackbox(f"file:{box_file}", answer="probs", device=device)
    out = {}
    try:
        for split in ("val", "source_val"):
            ds = open_dataset("synth", Path(bench), split=split)
            n = ds.label_space.num_classes
            conf = np.zeros((n, n), np.int64)
            preds = []
            for sample in ds.samples:
                img = ds.read_image(sample)
                pred = box.query(img[None]).top1()[0].to(torch.uint8).cpu().numpy()
                conf += confusion_matrix(pred, ds.read_label(sample, img.shape[:2]), n)
                if len(preds) < n_keep:
                    preds.append(pred)
            res = result_from_confusion(conf, ds.label_space.eval_classes(), ds.label_space.class_names, len(ds))
            out[split] = {"miou": res.miou, "per_class": res.per_class, "predictions": preds}
    finally:
        box.close()
    return out


def _pictures(out: Path, val, box_preds: list[np.ndarray], models: dict, results: dict, box_miou: float,
              n: int = 4) -> None:
    """predictions.png (image | ground truth | box | every method, nearest-upscaled, with a legend) and
    curves.png (target-val mIoU over training steps, the box as a line)."""
    from .report import plot_curves, prediction_grid
    from .train.loop import predict_train_ids

    cpu = torch.device("cpu")
    images, columns = [], {"ground truth": [], "black box": []}
    columns.update({m: [] for m in models})
    for i, sample in enumerate(val.samples[:n]):
        img = val.read_image(sample)
        images.append(img)
        columns["ground truth"].append(val.read_label(sample, img.shape[:2]))
        columns["black box"].append(box_preds[i])
        for m, model in models.items():
            columns[m].append(predict_train_ids(model, img, cpu))
    space = val.label_space
    prediction_grid(images, columns, space.class_names, np.asarray(space.palette, np.uint8), out / "predictions.png",
                    scale=2)
    plot_curves({m: [tuple(p) for p in results[m]["curve"]] for m in models}, out / "curves.png", box_miou=box_miou)


def format_table(rows: dict[str, dict]) -> str:
    lines = [f"{'method':13s} {'model':22s} {'target-val mIoU':>15s} {'source-val':>10s} {'gap closed':>10s} "
             f"{'params (M)':>10s} {'CPU img/s':>10s}"]
    for name, r in rows.items():
        gap = r.get("gap_closed")
        src = r.get("source_miou")
        lines.append(f"{name:13s} {r['arch']:22s} {r['miou']:15.2f} {'' if src is None else f'{src:.2f}':>10s} "
                     f"{'' if gap is None else f'{round(100 * gap):d} %':>10s} {r['params'] / 1e6:10.2f} "
                     f"{r['cpu_images_per_s']:10.1f}")
    return "\n".join(lines)
