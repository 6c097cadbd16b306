"""Would test-time augmentation of the black box's queries give better pseudo-labels? Asks the box about flipped
and rescaled copies of each target image, maps each answer back to the image's pixels, averages the
probabilities and scores the arg-max against the ground truth (mIoU, pixel accuracy, per-class IoU), one row per
set of views. Every view is one more query per image: a paid API multiplies its bill by the number of views.

    python benchmarks/box_tta.py --root demo_out/bench --blackbox file:demo_out/blackbox.pt --split val

Writes benchmarks/results/box_tta.json (each row's views, queries per image, mIoU, accuracy, per-class IoU) and
prints the table and the command. Measured on the demo's benchmark: docs/methods.md, "Asking the box more
than once".
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

# Each row: the views averaged, as (scale, horizontal flip).
VIEWS = {
    "single query": [(1.0, False)],
    "flip": [(1.0, False), (1.0, True)],
    "scales 0.75, 1, 1.5": [(0.75, False), (1.0, False), (1.5, False)],
    "scales 0.75, 1, 1.5 + flip": [(s, f) for s in (0.75, 1.0, 1.5) for f in (False, True)],
    "scales 1, 1.5 + flip": [(s, f) for s in (1.0, 1.5) for f in (False, True)],
    "scales 1, 1.5, 2 + flip": [(s, f) for s in (1.0, 1.5, 2.0) for f in (False, True)],
    "upscaled 1.5 only": [(1.5, False)],
    "upscaled 2 only": [(2.0, False)],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="synth")
    p.add_argument("--root", type=Path, required=True, help="the dataset root (e.g. the demo's OUT/bench)")
    p.add_argument("--split", default="val", help="a split with ground truth (default: val)")
    p.add_argument("--blackbox", required=True, help="black-box spec: file:PATH or an http(s):// endpoint")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "box_tta.json")
    args = p.parse_args()

    import torch
    import torch.nn.functional as F

    from corte_ray.blackbox.protocol import open_blackbox
    from corte_ray.data.datasets import open_dataset
    from corte_ray.evaluation import confusion_matrix, result_from_confusion
    from corte_ray.io_utils import write_json_atomic

    torch.set_num_threads(args.threads)
    ds = open_dataset(args.dataset, args.root, split=args.split)
    box = open_blackbox(args.blackbox, device="cpu")
    c = box.num_classes

    def query(batch: np.ndarray, scale: float, flip: bool) -> torch.Tensor:
        x = torch.from_numpy(batch).permute(0, 3, 1, 2).float()
        h, w = x.shape[-2:]
        if flip:
            x = x.flip(-1)
        if scale != 1.0:
            x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
        arr = x.round().clamp(0, 255).byte().permute(0, 2, 3, 1).contiguous().numpy()
        probs = box.query(arr).probs.float()
        if scale != 1.0:
            probs = F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)
        return probs.flip(-1) if flip else probs

    conf = {name: np.zeros((c, c), np.int64) for name in VIEWS}
    wanted = sorted({v for views in VIEWS.values() for v in views})
    t0 = time.perf_counter()
    samples = list(ds.samples)
    for i in range(0, len(samples), args.batch):
        chunk = samples[i:i + args.batch]
        batch = np.stack([ds.read_image(s) for s in chunk])
        gt = np.stack([ds.read_label(s) for s in chunk])
        probs = {v: query(batch, *v) for v in wanted}
        for name, views in VIEWS.items():
            pred = torch.stack([probs[v] for v in views]).mean(0).argmax(1).numpy()
            conf[name] += confusion_matrix(pred, gt, c)
        print(f"  {min(i + args.batch, len(samples))}/{len(samples)} images", file=sys.stderr, flush=True)
    classes = ds.label_space.eval_classes()
    rows = {}
    for name, m in conf.items():
        res = result_from_confusion(m, classes, ds.label_space.class_names, len(ds))
        rows[name] = {"views": [list(v) for v in VIEWS[name]], "queries_per_image": len(VIEWS[name]),
                      "miou": round(res.miou, 2), "pixel_accuracy": round(float(np.trace(m) / max(m.sum(), 1)), 4),
                      "per_class": {k: (None if v is None else round(v, 1)) for k, v in res.per_class.items()}}
    command = "python benchmarks/box_tta.py " + " ".join(sys.argv[1:])
    base = rows["single query"]["miou"]
    print(f"{'views':30s} {'queries':>7s} {'mIoU':>6s} {'vs one':>7s} {'acc':>6s}")
    for name, r in rows.items():
        print(f"{name:30s} {r['queries_per_image']:7d} {r['miou']:6.2f} {r['miou'] - base:+7.2f} "
              f"{r['pixel_accuracy']:6.3f}")
    print(f"command: {command}   ({time.perf_counter() - t0:.0f} s, {len(samples)} images)")
    write_json_atomic(args.out, {"rows": rows, "split": args.split, "images": len(samples), "command": command})


if __name__ == "__main__":
    main()
