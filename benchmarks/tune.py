"""The demo-benchmark sweep of issue 9: `corte-ray tune` over tune_spaces/corte.yaml on the demo benchmark (the
demo's corte row and schedule: 300 steps, 64x128 crops, batch 8, one thread per trial), then, from its outputs,
each trial's final mIoU and unsupervised score, their Spearman rank correlation, and the mIoU of the trial the
unsupervised score picks against the best trial's. Writes benchmarks/results/tune_corte.json (the shape of the
issue) and tune_corte.md (with every candidate score's correlation, and the correlation at every evaluation).

It reuses a demo output (bench/ and labels/ of `corte-ray demo --out DIR`, or of benchmarks/quality.py's seed 0):

    python benchmarks/tune.py --demo-dir /tmp/corte-quality-synth-to-real/seed0 --samples 12 --max-concurrent 2

All trials run their whole schedule (--scheduler none): a trial ASHA stopped after one evaluation would be
compared at 75 steps with trials at 300, and "trained longer" would dominate the ranking being checked.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from corte_ray.demo import SETTINGS, adapt_overrides, common_overrides, method_overrides  # noqa: E402
from corte_ray.tune.score import CANDIDATES, SELECTED, spearman  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo-dir", type=Path, default=Path("/tmp/corte-quality-synth-to-real/seed0"),
                    help="a demo output holding bench/ and labels/")
    ap.add_argument("--samples", type=int, default=12)
    ap.add_argument("--max-concurrent", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("/tmp/corte-tune-corte"), help="the sweep directory")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "tune_corte")
    ap.add_argument("--resume", action="store_true", help="continue a killed sweep in --out")
    ap.add_argument("--report-only", action="store_true",
                    help="no sweep: report the trials of --out that have finished so far (a sweep still running or "
                         "interrupted; the files say how many)")
    args = ap.parse_args()
    bench, store = args.demo_dir / "bench", args.demo_dir / "labels"
    if not (bench / "stats.json").exists() or not (store / "thresholds.json").exists():
        print(f"{args.demo_dir} holds no demo benchmark (bench/, labels/): run `corte-ray demo --out "
              f"{args.demo_dir}` first", file=sys.stderr)
        return 2
    s = SETTINGS["full"]
    overrides = (adapt_overrides(common_overrides(bench, 0, "cpu", s["batch"], s["crop"], 1), s["adapt_iters"])
                 + method_overrides("corte", None) + [f"blackbox.label_store={store}"])
    # data.cache_images is the local engine's; a sweep runs Ray Train, fed by Ray Data.
    overrides = [o for o in overrides if not o.startswith(("data.cache_images", "scaling.engine"))]
    cmd = (["corte-ray", "tune", "--config", "demo", "--space", "tune_spaces/corte.yaml", "--samples",
            str(args.samples), "--scheduler", "none", "--max-concurrent", str(args.max_concurrent), "--out",
            str(args.out)] + overrides)
    command = " ".join(shlex.quote(c) for c in cmd)
    t0 = time.perf_counter()
    if args.report_only:
        return report(args, command, rows_so_far(args.out), None, partial=True)
    run = [sys.executable, "-m", "corte_ray.cli", *cmd[1:]] + (["--resume"] if args.resume else [])
    if args.resume:
        run = [sys.executable, "-m", "corte_ray.cli", "tune", "--out", str(args.out), "--resume"]
    code = subprocess.call(run, cwd=REPO)
    if code != 0:
        return code
    seconds = time.perf_counter() - t0
    return report(args, command, list(csv.DictReader((args.out / "leaderboard.csv").open())), seconds)


def rows_so_far(out: Path) -> list[dict]:
    """Leaderboard-like rows of the trials of a sweep directory that have finished (trials/ID/done.json)."""
    import yaml

    keys = list(yaml.safe_load(Path(json.loads((out / "sweep.json").read_text())["space"]).read_text())["knobs"])
    rows = []
    for done in sorted(out.glob("trials/*/done.json")):
        m = json.loads(done.read_text())["metrics"]
        cfg = yaml.safe_load((done.parent / "config.yaml").read_text())
        row = {k: cfg[k.split(".")[0]][k.split(".")[1]] for k in keys}
        row.update(trial_id=done.parent.name, miou=m["val_miou"], unsupervised=m["unsupervised"],
                   steps=int(m["step"]), stopped_early=str(False))
        row.update({f"unsup_{c}": m.get(f"unsup/{c}") for c in CANDIDATES})
        rows.append(row)
    return rows


def report(args, command: str, rows: list[dict], seconds: float | None, partial: bool = False) -> int:
    knobs = [k for k in rows[0] if "." in k]
    trials, details = [], []
    for r in rows:
        lines = [json.loads(l) for l in (args.out / "trials" / r["trial_id"] / "metrics.jsonl").read_text().splitlines()]
        trials.append({"config": {k: float(r[k]) for k in knobs}, "miou": round(float(r["miou"]), 2),
                       "unsupervised": round(float(r["unsupervised"]), 3), "stopped_early": r["stopped_early"] == "True"})
        details.append({"trial_id": r["trial_id"], "steps": int(r["steps"]),
                        "scores": {c: float(r[f"unsup_{c}"]) for c in CANDIDATES if r.get(f"unsup_{c}")},
                        "curve": [(l["step"], l["val_miou"], l.get("unsupervised")) for l in lines if "val_miou" in l]})
    miou = [t["miou"] for t in trials]
    unsup = [t["unsupervised"] for t in trials]
    rho = spearman(unsup, miou)
    doc = {"trials": trials, "spearman": round(rho, 3), "command": command}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")

    best = max(range(len(trials)), key=lambda i: miou[i])
    picked = max(range(len(trials)), key=lambda i: unsup[i])
    per_candidate = {c: spearman([d["scores"].get(c, float("nan")) for d in details], miou) for c in CANDIDATES}
    n_evals = min(len(d["curve"]) for d in details)
    per_eval = [(details[0]["curve"][e][0], spearman([d["curve"][e][2] for d in details],
                                                     [d["curve"][e][1] for d in details])) for e in range(n_evals)]
    order = sorted(range(len(trials)), key=lambda i: -miou[i])
    when = (f"{seconds / 60:.1f} min on 2 shared CPU cores" if seconds is not None else
            f"**partial: the {len(trials)} trials finished when the sweep was interrupted**; `python benchmarks/tune.py "
            f"--demo-dir {args.demo_dir} --out {args.out} --resume` finishes it and rewrites these files")
    md = ["# Sweep of tune_spaces/corte.yaml on the demo benchmark (seed 0)", "",
          f"Command (run by `python benchmarks/tune.py`; {when}):", "",
          f"    {command}", "",
          f"{len(trials)} configurations, each the demo's corte schedule (300 steps, evaluations at 75/150/225/300), "
          f"2 at a time, no early stopping; the label store of the demo (labelled once, shared by every trial). "
          f"`unsupervised` = `{SELECTED}` (chosen beforehand on seeds 1 and 2: "
          f"[tune_score_design.md](tune_score_design.md)), computed on 64 target training images without their "
          f"labels.", "",
          f"* **Spearman(unsupervised, mIoU) = {rho:+.3f}** over the {len(trials)} trials (goal >= 0.7).",
          f"* The trial the unsupervised score picks ({details[picked]['trial_id']}): **{miou[picked]:.2f} mIoU**; "
          f"the best trial by mIoU ({details[best]['trial_id']}): **{miou[best]:.2f}**; spread of the sweep "
          f"{min(miou):.2f} - {max(miou):.2f}; median {sorted(miou)[len(miou) // 2]:.2f}.",
          "* Spearman at each evaluation: " + ", ".join(f"step {s_}: {r_:+.2f}" for s_, r_ in per_eval) + ".",
          "* Every candidate at the last evaluation: " + ", ".join(f"{c} {v:+.2f}" for c, v in per_candidate.items())
          + ".", "",
          "| trial | " + " | ".join(knobs) + " | mIoU | unsupervised | " + " | ".join(CANDIDATES) + " |",
          "|:---|" + "---:|" * (len(knobs) + 2 + len(CANDIDATES))]
    for i in order:
        t, d = trials[i], details[i]
        mark = " (picked)" if i == picked else ""
        md.append(f"| {d['trial_id']}{mark} | " + " | ".join(f"{t['config'][k]:.4g}" for k in knobs)
                  + f" | {t['miou']:.2f} | {t['unsupervised']:.2f} | "
                  + " | ".join(f"{d['scores'].get(c, float('nan')):.2f}" for c in CANDIDATES) + " |")
    args.results.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md[:12]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
