"""Quality of the black box's pseudo-labels on a labelled target training set: raw arg-max vs the pixels R2CP keeps
(METHODS 1.1, tau_c = alpha * class-mean relative confidence). Needs a label store and the split's ground truth,
e.g. the synthetic benchmark written by `corte-ray demo`:

    python benchmarks/pseudo_labels.py --root demo_out/bench --store demo_out/labels

Prints pixel accuracy, coverage and mIoU (over the pixels each keeps) and writes
benchmarks/results/pseudo_labels.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="synth")
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--rc-scale", type=float, default=1.0, help="alpha of tau_c = alpha * mean rc")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pseudo_labels.json")
    args = p.parse_args()

    import torch

    from corte_ray.blackbox.store import LabelStore
    from corte_ray.data.datasets import open_dataset
    from corte_ray.evaluation import confusion_matrix, result_from_confusion
    from corte_ray.methods.pseudo_labels import thresholds_from_means

    ds = open_dataset(args.dataset, args.root, split=args.split)
    store = LabelStore(args.store)
    tau = thresholds_from_means(torch.from_numpy(store.class_mean_rc()), args.rc_scale).numpy()
    c = store.num_classes
    conf = {"raw": np.zeros((c, c), np.int64), "r2cp": np.zeros((c, c), np.int64)}
    valid_total = kept_total = 0
    for sample in ds.samples:
        gt = ds.read_label(sample)
        box = store.get(sample.key)
        top1 = box.top1.astype(np.int64)
        kept = gt != 255
        valid_total += int(kept.sum())
        conf["raw"] += confusion_matrix(np.where(kept, top1, 255), gt, c, no_class_column=True)[:, :c]
        if box.rc is not None:
            kept = kept & (box.rc >= tau[top1])
        kept_total += int(kept.sum())
        conf["r2cp"] += confusion_matrix(top1[kept], gt[kept], c)
    classes = ds.label_space.eval_classes()
    rows = {}
    for name, m in conf.items():
        res = result_from_confusion(m, classes, ds.label_space.class_names, len(ds))
        rows[name] = {"pixel_accuracy": float(np.trace(m) / max(m.sum(), 1)),
                      "coverage": float(m.sum() / max(valid_total, 1)), "miou": res.miou}
    command = "python benchmarks/pseudo_labels.py " + " ".join(sys.argv[1:])
    print(f"pseudo-labels of {args.store} on {args.dataset}:{args.split} ({len(ds)} images), alpha {args.rc_scale}")
    print(f"{'labels':8s} {'pixel acc':>9s} {'coverage':>9s} {'mIoU':>7s}")
    for name, r in rows.items():
        print(f"{name:8s} {r['pixel_accuracy']:9.3f} {r['coverage']:9.3f} {r['miou']:7.2f}")
    print(f"command: {command}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "command": command, "rc_scale": args.rc_scale}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
