"""Which of the box's pixels a label rule keeps, and how right they are, against the ground truth.

The rules a black-box method can apply to the box's answers before training: R2CP (CoRTe: rc >= tau_c, the
class mean of rc), threshold_st's fixed probability bar (p1 >= 0.9), and variants between them. Per rule: the
share of the pixels kept, their accuracy, and per class the precision (of the kept pixels labelled c, the share
that is c) and the recall (of the pixels that are c, the share kept *and* labelled c). It explains, for example,
why threshold_st wins on sky and loses elsewhere (docs/methods.md, "What bounds the margins"). For R2CP it also
measures what the pixels it drops still hold: how often the box's top-1 is right there, and how often the truth is
one of its top two (the case for corte.set_weight's set-valued label, docs/methods.md):

    python benchmarks/label_rules.py --root demo_out/bench --store demo_out/labels

Writes benchmarks/results/label_rules.json (or --out).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def rules(top1: np.ndarray, p1: np.ndarray, rc: np.ndarray, tau: np.ndarray, mean_rc: float) -> dict:
    """Each rule's kept mask for one image."""
    t = tau[top1]
    r2cp = rc >= t
    return {
        "raw top-1 (distill)": np.ones_like(r2cp),
        "R2CP, rc >= tau_c (corte)": r2cp,
        "p1 >= 0.9 (threshold_st)": p1 >= 0.9,
        "R2CP and p1 >= 0.8": r2cp & (p1 >= 0.8),
        "rc >= max(tau_c, mean rc)": rc >= np.maximum(t, mean_rc),
        "rc >= mean rc (one threshold)": rc >= mean_rc,
        "rc >= 1.25 tau_c": rc >= 1.25 * t,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="synth")
    p.add_argument("--root", type=Path, required=True, help="dataset root (its train split has ground truth)")
    p.add_argument("--split", default="train")
    p.add_argument("--store", type=Path, required=True, help="a label store of that split (soft labels: rc)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "label_rules.json")
    args = p.parse_args()

    from corte_ray.blackbox.store import LabelStore
    from corte_ray.data.datasets import open_dataset
    from corte_ray.io_utils import write_json_atomic

    store = LabelStore(args.store)
    c = store.num_classes
    means = store.class_mean_rc()
    tau = np.where(np.isnan(means), 1.0, means)
    ds = open_dataset(args.dataset, args.root, split=args.split)
    names = ds.label_space.class_names
    # Global mean rc over every pixel, for the single-threshold rules (a first pass).
    rc_sum, rc_n = 0.0, 0
    for sample in ds.samples:
        box = store.get(sample.key)
        if box.rc is None:
            sys.exit(f"error: {args.store} holds hard labels: no relative confidence to keep pixels by")
        rc_sum += float(box.rc.sum(dtype=np.float64))
        rc_n += box.rc.size
    mean_rc = rc_sum / max(rc_n, 1)

    stats: dict[str, dict[str, np.ndarray]] = {}
    gt_count = np.zeros(c, np.int64)
    # The pixels R2CP drops: how many, the box's top-1 right there, the truth in the box's top two.
    dropped = {"pixels": 0, "top1_right": 0, "top2_holds_truth": 0}
    for sample in ds.samples:
        gt = ds.read_label(sample).astype(np.int64)
        box = store.get(sample.key)
        top1 = box.top1.astype(np.int64)
        valid = gt != 255
        gt_count += np.bincount(gt[valid], minlength=c)[:c]
        masks = rules(top1, box.p1, box.rc, tau, mean_rc)
        d = ~masks["R2CP, rc >= tau_c (corte)"] & valid
        dropped["pixels"] += int(d.sum())
        dropped["top1_right"] += int((d & (top1 == gt)).sum())
        # A store with rc (checked above) holds the box's top 2.
        dropped["top2_holds_truth"] += int((d & ((top1 == gt) | (box.top2.astype(np.int64) == gt))).sum())
        for name, kept in masks.items():
            s = stats.setdefault(name, {k: np.zeros(c, np.int64) for k in ("kept", "right")})
            k = kept & valid
            s["kept"] += np.bincount(top1[k], minlength=c)[:c]
            s["right"] += np.bincount(top1[k & (top1 == gt)], minlength=c)[:c]

    total = max(int(gt_count.sum()), 1)
    pct = lambda a, b: 100.0 * a / b if b else float("nan")  # noqa: E731
    result = {"classes": list(names), "mean_rc": mean_rc, "tau": {names[i]: float(tau[i]) for i in range(c)},
              "rules": {}}
    for name, s in stats.items():
        result["rules"][name] = {
            "kept_share": pct(s["kept"].sum(), total),
            "accuracy": pct(s["right"].sum(), s["kept"].sum()),
            "precision": {names[i]: pct(s["right"][i], s["kept"][i]) for i in range(c) if s["kept"][i]},
            "recall": {names[i]: pct(s["right"][i], gt_count[i]) for i in range(c) if gt_count[i]},
        }
    result["r2cp_dropped"] = {
        "share": pct(dropped["pixels"], total),
        "top1_accuracy": pct(dropped["top1_right"], dropped["pixels"]),
        "top2_holds_truth": pct(dropped["top2_holds_truth"], dropped["pixels"]),
    }
    result["command"] = "python benchmarks/label_rules.py " + " ".join(sys.argv[1:])

    shown = [i for i in range(c) if stats["raw top-1 (distill)"]["kept"][i]]   # the classes the box names
    print(f"label rules on {args.dataset}:{args.split} ({len(ds.samples)} images), mean rc {mean_rc:.3f}")
    print(f"{'rule':32s} {'kept':>6s} {'acc':>6s}  " + " ".join(f"{names[i][:9]:>11s}" for i in shown))
    print(f"{'':32s} {'':6s} {'':6s}  " + " ".join(f"{'prec/rec':>11s}" for _ in shown))
    for name, r in result["rules"].items():
        cells = " ".join(f"{r['precision'].get(names[i], float('nan')):5.1f}/{r['recall'][names[i]]:5.1f}"
                         for i in shown)
        print(f"{name:32s} {r['kept_share']:5.1f}% {r['accuracy']:5.1f}%  {cells}")
    dr = result["r2cp_dropped"]
    print(f"R2CP drops {dr['share']:.1f}% of the pixels; there the box's top-1 is right on {dr['top1_accuracy']:.1f}%, "
          f"the truth is in its top 2 on {dr['top2_holds_truth']:.1f}%")
    print(f"command: {result['command']}")
    print(f"wrote {write_json_atomic(args.out, result)}")


if __name__ == "__main__":
    main()
