"""Where a run's student or EMA teacher stands on the black box's errors, on a labelled target training split.

Splits the pixels by what R2CP does with the box's answer (kept and right, kept and wrong: the box's *confident*
errors, dropped) and gives the model's accuracy on each, the confusion of the confident errors (ground truth ->
model), and how many pixels CoRTe's override rule (ŷ_T != y_B, rc_T > rc_B) would change, and how rightly. A model
that memorises the box's confident errors gets fewer of them right the longer it trains (docs/methods.md, "Why the
strong-view loss ramps up"):

    python benchmarks/teacher_errors.py --run demo_out/runs/corte --checkpoint best --root demo_out/bench \\
        --store demo_out/labels

--checkpoint is a folder name under RUN/checkpoints (`best`, `step_0000200`); --model student or teacher.
Writes benchmarks/results/teacher_errors.json (or --out).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a run directory of `corte-ray adapt`")
    p.add_argument("--checkpoint", default="best", help="folder under RUN/checkpoints")
    p.add_argument("--model", choices=("teacher", "student"), default="teacher")
    p.add_argument("--dataset", default="synth")
    p.add_argument("--root", type=Path, required=True, help="dataset root (its train split has ground truth)")
    p.add_argument("--split", default="train")
    p.add_argument("--store", type=Path, required=True, help="the run's label store")
    p.add_argument("--rc-scale", type=float, default=1.0, help="alpha of tau_c = alpha * mean rc")
    p.add_argument("--beta", type=float, default=None,
                   help="the override bar beta of rc_model >= beta tau^T (default: the run's corte.teacher_scale); "
                        "1.0 with the 'confident only' rule counts every confident contradiction of a kept label")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "teacher_errors.json")
    args = p.parse_args()

    import torch

    from corte_ray.blackbox.store import LabelStore
    from corte_ray.data.datasets import open_dataset
    from corte_ray.io_utils import write_json_atomic
    from corte_ray.methods.pseudo_labels import relative_confidence, thresholds_from_means
    from corte_ray.models.student import build_student

    torch.set_num_threads(args.threads)
    path = args.run / "checkpoints" / args.checkpoint / "checkpoint.pt"
    if not path.exists():
        sys.exit(f"error: no checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get(args.model) is None:
        sys.exit(f"error: {path} holds no {args.model} (method {state['config'].get('method')})")
    store = LabelStore(args.store)
    c = store.num_classes
    model = build_student(state["arch"], num_classes=c)
    model.load_state_dict({k.removeprefix("module."): v for k, v in state[args.model].items()})
    model.eval()
    ds = open_dataset(args.dataset, args.root, split=args.split)
    tau = thresholds_from_means(torch.from_numpy(store.class_mean_rc()), args.rc_scale).numpy()

    counts = {k: [0, 0] for k in ("kept_right", "kept_wrong", "dropped", "all")}
    box_right = {k: [0, 0] for k in ("kept", "dropped", "all")}
    confusion = np.zeros((c, c), np.int64)      # confident errors: ground truth -> model
    # Override rules on R2CP-kept pixels where the model disagrees with the box, with the run's teacher class
    # thresholds tau^T (from the checkpoint) and beta = corte.teacher_scale: the spec's (rc_T > rc_B), confidence
    # alone, and each confidence relative to its own model's class threshold (rc_T / tau^T > rc_B / tau^B).
    beta = float(state["config"]["corte"]["teacher_scale"]) if args.beta is None else args.beta
    tt = state.get("method", {}).get("teacher_thresholds")
    tau_t = tt["mean"].double().numpy() if tt is not None else None
    rules = ("rc_T > rc_B", "confident only", "relative to class")
    override = {r: [0, 0, 0] for r in rules}    # pixels changed, model right there, box right there
    for sample in ds.samples:
        gt = ds.read_label(sample).astype(np.int64)
        box = store.get(sample.key)
        if box.rc is None:
            sys.exit(f"error: {args.store} holds hard labels: no relative confidence to split by")
        x = torch.from_numpy(ds.read_image(sample)).permute(2, 0, 1)[None].float() / 255
        with torch.no_grad():
            rc_m, pred = relative_confidence(model(x).float().softmax(1))
        rc_m, pred = rc_m[0].numpy(), pred[0].numpy()
        top1 = box.top1.astype(np.int64)
        valid = gt != 255
        kept = valid & (box.rc >= tau[top1])
        wrong = top1 != gt
        for name, mask in (("kept_right", kept & ~wrong), ("kept_wrong", kept & wrong), ("dropped", valid & ~kept),
                           ("all", valid)):
            counts[name][0] += int((mask & (pred == gt)).sum())
            counts[name][1] += int(mask.sum())
        for name, mask in (("kept", kept), ("dropped", valid & ~kept), ("all", valid)):
            box_right[name][0] += int((mask & ~wrong).sum())
            box_right[name][1] += int(mask.sum())
        np.add.at(confusion, (gt[kept & wrong], pred[kept & wrong]), 1)
        if tau_t is not None:
            t_pred = tau_t[pred]
            confident = rc_m >= beta * t_pred
            rel_m = rc_m / np.maximum(t_pred, 1e-6)
            rel_b = box.rc / np.maximum(tau[top1], 1e-6)
            for rule, extra in zip(rules, (rc_m > box.rc, np.ones_like(confident), rel_m > rel_b)):
                changed = kept & (pred != top1) & confident & extra
                override[rule][0] += int(changed.sum())
                override[rule][1] += int((changed & (pred == gt)).sum())
                override[rule][2] += int((changed & ~wrong).sum())

    total = max(counts["all"][1], 1)
    names = ds.label_space.class_names
    share = lambda r, n: 100.0 * r / max(n, 1)  # noqa: E731
    result = {
        "run": str(args.run), "checkpoint": args.checkpoint, "model": args.model, "step": int(state["step"]),
        "box_accuracy": {k: share(*v) for k, v in box_right.items()},
        "model_accuracy": {k: share(*v) for k, v in counts.items()},
        "pixel_share": {k: share(v[1], total) for k, v in counts.items()},
        "teacher_scale": beta,
        "override": {r: {"pixel_share": share(o[0], total), "model_right": share(o[1], o[0]),
                         "box_right": share(o[2], o[0]), "net_right_pixels": o[1] - o[2]}
                     for r, o in override.items()} if tau_t is not None else {},
        "confident_errors": {names[g]: {"pixels": int(confusion[g].sum()),
                                        "model_says": {names[j]: share(confusion[g, j], confusion[g].sum())
                                                       for j in np.argsort(-confusion[g])[:3]}}
                             for g in range(c) if confusion[g].sum() > 0},
    }
    result["command"] = "python benchmarks/teacher_errors.py " + " ".join(sys.argv[1:])
    print(f"{args.model} of {args.run} at step {result['step']} ({args.checkpoint}) on {args.dataset}:{args.split}")
    print(f"{'pixels':22s} {'share':>7s} {'box right':>9s} {'model right':>11s}")
    print(f"{'R2CP kept, box right':22s} {result['pixel_share']['kept_right']:6.1f}% {100.0:8.1f}% "
          f"{result['model_accuracy']['kept_right']:10.1f}%")
    print(f"{'R2CP kept, box wrong':22s} {result['pixel_share']['kept_wrong']:6.1f}% {0.0:8.1f}% "
          f"{result['model_accuracy']['kept_wrong']:10.1f}%")
    print(f"{'R2CP dropped':22s} {result['pixel_share']['dropped']:6.1f}% {result['box_accuracy']['dropped']:8.1f}% "
          f"{result['model_accuracy']['dropped']:10.1f}%")
    print(f"{'all':22s} {100.0:6.1f}% {result['box_accuracy']['all']:8.1f}% {result['model_accuracy']['all']:10.1f}%")
    if result["override"]:
        print(f"overrides of R2CP-kept pixels (model != box, rc_model >= {beta} tau^T), by rule:")
    for rule, o in result["override"].items():
        print(f"  {rule:18s} {o['pixel_share']:5.2f}% of the pixels, model right on {o['model_right']:5.1f}%, box on "
              f"{o['box_right']:5.1f}%: {o['net_right_pixels']:+d} right pixels")
    print("the box's confident errors, ground truth -> what the model says:")
    for g, row in sorted(result["confident_errors"].items(), key=lambda kv: -kv[1]["pixels"]):
        says = ", ".join(f"{k} {v:.0f}%" for k, v in row["model_says"].items())
        print(f"  {g:14s} {row['pixels']:8d} px: {says}")
    print(f"command: {result['command']}")
    print(f"wrote {write_json_atomic(args.out, result)}")


if __name__ == "__main__":
    main()
