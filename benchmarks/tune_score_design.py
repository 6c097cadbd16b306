"""Which unsupervised score ranks trained students like their target mIoU? The measurement behind
corte_ray.tune.score.SELECTED (docs/tuning.md).

The quality study (benchmarks/quality.py) leaves, per seed, 12 trained students of one benchmark (every method and
ablation of METHODS 3, 300 steps each) with their final target-val mIoU. This script loads each run's final
checkpoint, computes every candidate score of tune/score.py on the seed's target TRAINING images (N evenly spaced
images; their labels are never read), and reports per seed the Spearman correlation of each candidate with mIoU.
The choice is made on seeds 1 and 2; seed 0's benchmark is kept for the sweep that checks it (benchmarks/tune.py).

    python benchmarks/tune_score_design.py --quality-dir /tmp/corte-quality-synth-to-real --seeds 1 2 \
        --out benchmarks/results/tune_score_design
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from corte_ray.blackbox.store import LabelStore  # noqa: E402
from corte_ray.config import from_dict  # noqa: E402
from corte_ray.data.datasets import open_dataset  # noqa: E402
from corte_ray.models import EMATeacher, build_model  # noqa: E402
from corte_ray.tune.score import CANDIDATES, SelectionScorer, spearman  # noqa: E402


def final_miou(run: Path) -> float:
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return float([l for l in lines if "val_miou" in l][-1]["val_miou"])


def load_models(run: Path):
    ckpt = sorted((run / "checkpoints").glob("step_*/checkpoint.pt"))[-1]
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    cfg = from_dict(state["config"])
    student = build_model(cfg.model.student, cfg.model.num_classes)
    student.load_state_dict(state["student"])
    teacher = None
    if "teacher" in state:
        teacher = EMATeacher(student, cfg.ema.momentum)
        teacher.load_state_dict(state["teacher"])
        teacher.eval()
    return student.eval(), teacher, cfg


def score_runs(root: Path, seed: int, images: int) -> dict:
    store = LabelStore(root / "labels")
    train_set = open_dataset("synth", root / "bench", split="train")
    scorer = SelectionScorer(train_set, store, None, images, 19)
    runs = {}
    for run in sorted(p for p in (root / "runs").iterdir() if (p / "metrics.jsonl").exists()):
        student, teacher, cfg = load_models(run)
        scores = scorer.score(student, teacher, torch.device("cpu"))
        runs[run.name] = {"miou": round(final_miou(run), 2),
                          **{k.split("/", 1)[1]: round(v, 3) for k, v in scores.items() if k.startswith("unsup/")}}
        print(f"seed {seed} {run.name:16s} " + " ".join(f"{k}={v}" for k, v in runs[run.name].items()), flush=True)
    return runs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quality-dir", type=Path, default=Path("/tmp/corte-quality-synth-to-real"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--images", type=int, default=64, help="target training images scored (train.score_images)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/tune_score_design"))
    ap.add_argument("--rescore", type=Path, default=None,
                    help="recompute the summary from the per-run scores of an earlier JSON of this script (a "
                         "candidate that is a mean of stored ones is derived from them) instead of the checkpoints")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    doc: dict = {"command": "python " + " ".join(sys.argv), "images": args.images, "seeds": {}}
    old = json.loads(args.rescore.read_text()) if args.rescore else None
    if old:
        doc["command"] = old["command"].split("; summary")[0] + f"; summary: python {' '.join(sys.argv)}"
    for seed in args.seeds:
        if old:
            runs = old["seeds"][str(seed)]["runs"]
            for r in runs.values():
                r.setdefault("agree_consistency", round(0.5 * (r["agree_reliable"] + r["consistency"]), 3))
        else:
            runs = score_runs(args.quality_dir / f"seed{seed}", seed, args.images)
        # The oracle trains on the target labels: no unsupervised sweep contains it, and a student better than the
        # box necessarily disagrees with it where the box is wrong. Its scores are listed, not ranked.
        names = [n for n in runs if n != "oracle"]
        rho = {c: round(spearman([runs[n][c] for n in names], [runs[n]["miou"] for n in names]), 3) for c in CANDIDATES}
        # Rows the sweep of a CoRTe space can actually reach (corte and its ablations): the ranking Tune needs.
        corte_rows = [n for n in names if n.startswith("corte")]
        rho_corte = {c: round(spearman([runs[n][c] for n in corte_rows], [runs[n]["miou"] for n in corte_rows]), 3)
                     for c in CANDIDATES}
        doc["seeds"][str(seed)] = {"runs": runs, "spearman": rho, "spearman_corte_rows": rho_corte}
    mean = {c: round(float(np.mean([doc["seeds"][s]["spearman"][c] for s in doc["seeds"]])), 3) for c in CANDIDATES}
    mean_corte = {c: round(float(np.mean([doc["seeds"][s]["spearman_corte_rows"][c] for s in doc["seeds"]])), 3)
                  for c in CANDIDATES}
    doc.update(mean_spearman=mean, mean_spearman_corte_rows=mean_corte,
               best=max(CANDIDATES, key=lambda c: mean[c] + mean_corte[c]),
               seconds=old["seconds"] if old else round(time.perf_counter() - t0, 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = ["# Unsupervised selection score: which candidate ranks students like mIoU?", "",
             f"Command: `{doc['command']}` ({doc['seconds']:.0f} s). {args.images} target training images per "
             "seed, no labels read; each seed's trained students of the quality study (every method and "
             "ablation, 300 steps; the oracle, trained on target labels, is listed but not ranked).", "",
             "Spearman correlation with final target-val mIoU (the 11 rows without the oracle | the 6 corte rows):", "",
             "| candidate | " + " | ".join(f"seed {s}" for s in doc["seeds"]) + " | mean |",
             "|:---|" + "---:|" * (len(doc["seeds"]) + 1)]
    for c in CANDIDATES:
        cells = [f"{doc['seeds'][s]['spearman'][c]:+.2f} \\| {doc['seeds'][s]['spearman_corte_rows'][c]:+.2f}"
                 for s in doc["seeds"]]
        lines.append(f"| {c} | " + " | ".join(cells) + f" | {mean[c]:+.2f} \\| {mean_corte[c]:+.2f} |")
    lines += ["", f"Best by the mean of the two means (every method's rows, and the rows a CoRTe sweep can "
              f"reach): **{doc['best']}**.", ""]
    for s, d in doc["seeds"].items():
        lines += [f"## seed {s}", "", "| run | mIoU | " + " | ".join(CANDIDATES) + " |",
                  "|:---|---:|" + "---:|" * len(CANDIDATES)]
        for n, r in d["runs"].items():
            lines.append(f"| {n} | {r['miou']:.2f} | " + " | ".join(f"{r.get(c, float('nan')):.2f}" for c in CANDIDATES)
                         + " |")
        lines.append("")
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print(json.dumps({"mean_spearman": mean, "mean_spearman_corte_rows": mean_corte, "best": doc["best"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
