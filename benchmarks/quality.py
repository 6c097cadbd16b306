"""The quality study: every method of METHODS.md section 3 and the ablations of each CoRTe and STvM component, over
several seeds (each seed renders its own benchmark, trains its own black box and seeds every training), on the
demo's benchmark and schedule (`corte-ray demo`, the full settings). mean ± std per row, written to
benchmarks/results/quality.json and .md with the command.

    python benchmarks/quality.py                      # 3 seeds, every row, 2 CPU cores: about an hour
    python benchmarks/quality.py --scenario cross-city --rows blackbox,distill,corte,stvm,oracle
    python benchmarks/quality.py --device cuda --scale 2 --lanes 4   # larger, on a GPU machine
    python benchmarks/quality.py --rows blackbox,distill,distill-rounds2,corte,corte-rounds2,oracle \
        --out benchmarks/results/quality_rounds.json   # self-training rounds (2x the schedule), not study rows

Rows run side by side, one thread each (`--lanes`, default the core count), as Ray tasks (`--engine ray`) or
local processes (`--engine local`, the default here: no Ray start-up). A stopped study resumes: each finished
run keeps RUN/done.json, and rerunning the same command skips it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# name -> (method, overrides on top of the demo's settings for that method)
ROWS: dict[str, tuple[str, list[str]]] = {
    "distill": ("distill", []),
    "threshold_st": ("threshold_st", []),
    "corte": ("corte", []),
    "corte_metric": ("corte_metric", []),
    "stvm": ("stvm", []),
    "oracle": ("oracle", []),
    "corte-no_r2cp": ("corte", ["corte.rc_scale=0"]),          # tau = 0: every box pixel kept
    "corte-no_refine": ("corte", ["corte.refine_start=1.0"]),  # the teacher never refines
    "corte-no_mix": ("corte", ["corte.mix=false"]),
    "corte-no_weak": ("corte", ["corte.weak_weight=0"]),
    "stvm-no_metric": ("stvm", ["stvm.metric_weighting=false"]),
    "stvm-no_mocm": ("stvm", ["stvm.mocm=false"]),
}
# Rows run only when named (--rows): they cost more than the study's one schedule, so they are not study rows.
EXTRA_ROWS: dict[str, tuple[str, list[str]]] = {
    "corte-rounds2": ("corte", ["train.rounds=2"]),            # self-training rounds: 2x the schedule
    "distill-rounds2": ("distill", ["train.rounds=2"]),
}
STUDY_ROWS = list(ROWS)
ROWS.update(EXTRA_ROWS)
CROSS_CITY_ROWS = ("blackbox", "distill", "corte", "stvm", "oracle")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (benchmark and training)")
    p.add_argument("--rows", default=None, help="comma-separated rows (default: all; cross-city: its five)")
    p.add_argument("--scenario", choices=("synth-to-real", "cross-city"), default="synth-to-real")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply image size (and crop) by this, and the schedules by its square (GPU runs)")
    p.add_argument("--lanes", type=int, default=0, help="rows at a time (default: the core count; 1 per GPU)")
    p.add_argument("--engine", choices=("local", "ray"), default="local")
    p.add_argument("--work", type=Path, default=None, help="run directories (default: /tmp/corte-quality-SCENARIO)")
    p.add_argument("--out", type=Path, default=None,
                   help="results JSON (default: benchmarks/results/quality.json, quality_cross_city.json)")
    p.add_argument("--source-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for the source model (the black box) only, repeatable, e.g. "
                        "train.class_balance=true; a work folder keeps the box it was made with, so give such a "
                        "study its own --work")
    args = p.parse_args()

    import torch

    from corte_ray.compare import Row, RowPool
    from corte_ray.config import load_config
    from corte_ray.data.synth import render_benchmark
    from corte_ray.demo import (SETTINGS, SOURCE_ARCH, adapt_overrides, common_overrides, evaluate_box,
                                method_overrides, source_overrides)
    from corte_ray.io_utils import write_json_atomic, write_text_atomic
    from corte_ray.log import setup_logging
    from corte_ray.pipeline import label

    setup_logging(-1)
    torch.set_num_threads(1)
    seeds = [int(v) for v in args.seeds.split(",")]
    cc = args.scenario == "cross-city"
    names = args.rows.split(",") if args.rows else (list(CROSS_CITY_ROWS) if cc else ["blackbox", *STUDY_ROWS])
    unknown = [n for n in names if n != "blackbox" and n not in ROWS]
    if unknown:
        sys.exit(f"--rows: unknown row(s) {unknown}; known: blackbox, {', '.join(ROWS)}")
    s = dict(SETTINGS["full"])
    size = tuple(int(round(v * args.scale / 16)) * 16 for v in s["size"])
    crop = tuple(int(round(v * args.scale / 16)) * 16 for v in s["crop"])
    iters = {k: int(s[k] * args.scale ** 2) for k in ("source_iters", "adapt_iters")}
    work = (args.work or Path(f"/tmp/corte-quality-{args.scenario}")).resolve()
    out = args.out or ROOT / "benchmarks" / "results" / ("quality_cross_city.json" if cc else "quality.json")
    lanes = args.lanes or os.cpu_count() or 1
    command = "python benchmarks/quality.py " + " ".join(sys.argv[1:])
    bad = [v for v in args.source_set if "=" not in v]
    if bad:
        sys.exit(f"--source-set: expected KEY=VALUE, got {bad}")
    # The boxes in a work folder are reused on resume: refuse to mix boxes trained with other source settings.
    marker = work / "source_set.json"
    if marker.exists():
        made_with = json.loads(marker.read_text())
        if made_with != args.source_set:
            sys.exit(f"{work}: its source models were trained with --source-set {made_with or '(none)'}, "
                     f"not {args.source_set or '(none)'}; pass another --work")
    elif any(work.glob("seed*/source")):
        if args.source_set:
            sys.exit(f"{work}: holds source models trained without --source-set; pass another --work")
    else:
        work.mkdir(parents=True, exist_ok=True)
        write_json_atomic(marker, args.source_set)
    t_start = time.perf_counter()

    pool = RowPool(lanes, engine=args.engine, progress_every_s=30.0)
    per_seed: dict[int, dict[str, float]] = {seed: {} for seed in seeds}
    per_class: dict[int, dict[str, dict]] = {seed: {} for seed in seeds}
    source_miou: dict[int, float] = {}

    def common(seed: int, bench: Path) -> list[str]:
        return common_overrides(bench, seed, args.device, s["batch"], crop) + ["train.progress_every_s=30"]

    def adapt_common(seed: int, bench: Path) -> list[str]:
        return adapt_overrides(common(seed, bench), iters["adapt_iters"])

    def write() -> None:
        rows = {}
        for name in names:
            vals = [per_seed[seed][name] for seed in seeds if name in per_seed[seed]]
            if not vals:
                continue
            row = {"miou": [round(v, 2) for v in vals], "mean": round(statistics.mean(vals), 2),
                   "std": round(statistics.stdev(vals), 2) if len(vals) > 1 else None,
                   "seeds": [seed for seed in seeds if name in per_seed[seed]]}
            classes = [per_class[seed][name] for seed in row["seeds"] if name in per_class[seed]]
            if classes:
                row["per_class_mean"] = {c: round(statistics.mean(pc[c] for pc in classes if pc.get(c) is not None), 2)
                                         for c in classes[0] if classes[0][c] is not None}
            if name == "blackbox" and source_miou:
                row["source_miou"] = [round(source_miou[seed], 2) for seed in row["seeds"] if seed in source_miou]
            rows[name] = row
        doc = {"rows": rows, "scenario": args.scenario, "command": command,
               "settings": {"size": list(size), "crop": list(crop), **iters, "batch": s["batch"], "device": args.device,
                            "source_arch": SOURCE_ARCH, "n_source": s["n_source"], "n_target": s["n_target"],
                            "n_val": s["n_val"], "lanes": lanes, "engine": args.engine,
                            "source_set": args.source_set},
               "seconds": round(time.perf_counter() - t_start, 1)}
        write_json_atomic(out, doc)
        write_text_atomic(out.with_suffix(".md"), markdown(doc))

    try:
        # Every seed's benchmark and source model first (the oracles need no box and run beside them).
        benches = {}
        for seed in seeds:
            bench = work / f"seed{seed}" / "bench"
            if not (bench / "stats.json").exists():
                render_benchmark(bench, seed=seed, n_source=s["n_source"], n_target=s["n_target"], n_val=s["n_val"],
                                 n_source_val=s["n_source_val"], size=size, scenario=args.scenario)
            benches[seed] = bench
            pool.submit(Row(f"source/{seed}", str(work / f"seed{seed}" / "source"),
                            export_to=str(work / f"seed{seed}" / "blackbox.pt"),
                            overrides=source_overrides(common(seed, bench), iters["source_iters"]) + args.source_set))
        for seed in seeds:
            if "oracle" in names:
                pool.submit(Row(f"oracle/{seed}", str(work / f"seed{seed}" / "runs" / "oracle"),
                                overrides=adapt_common(seed, benches[seed]) + method_overrides("oracle", None)))
        while pool.pending:
            for key, result in pool.wait_any().items():
                name, seed = key.split("/")
                seed = int(seed)
                if name == "source":
                    box_file = work / f"seed{seed}" / "blackbox.pt"
                    store = work / f"seed{seed}" / "labels"
                    bench = benches[seed]
                    if not (store / "thresholds.json").exists():
                        label(load_config(None, common(seed, bench) + [f"blackbox.spec=file:{box_file}"]), store,
                              engine="local")
                    box = evaluate_box(box_file, bench, args.device)
                    per_seed[seed]["blackbox"] = box["val"]["miou"]
                    per_class[seed]["blackbox"] = box["val"]["per_class"]
                    source_miou[seed] = box["source_val"]["miou"]
                    # Longest rows first.
                    order = sorted((n for n in names if n not in ("blackbox", "oracle")),
                                   key=lambda n: (n not in EXTRA_ROWS, ROWS[n][0] != "stvm",
                                                  ROWS[n][0] != "corte_metric"))
                    for n in order:
                        method, extra = ROWS[n]
                        pool.submit(Row(f"{n}/{seed}", str(work / f"seed{seed}" / "runs" / n),
                                        overrides=adapt_common(seed, bench) + method_overrides(method, result["checkpoint"])
                                        + [f"blackbox.label_store={store}"] + extra))
                else:
                    per_seed[seed][name] = result["miou"]
                    per_class[seed][name] = result["per_class"]
                write()
    finally:
        pool.close()
    write()
    print(markdown(json.loads(out.read_text())))
    print(f"wrote {out} and {out.with_suffix('.md')} ({time.perf_counter() - t_start:.0f} s)")


def markdown(doc: dict) -> str:
    rows = doc["rows"]
    box = rows.get("blackbox", {}).get("mean")
    oracle = rows.get("oracle", {}).get("mean")
    st = doc["settings"]
    lines = [f"# Quality study ({doc['scenario']})", "",
             f"Images {st['size'][0]}x{st['size'][1]}, {st['crop'][0]}x{st['crop'][1]} crops, batch {st['batch']}, "
             f"source model {st['source_arch']} ({st['source_iters']} steps), every student "
             f"{st['adapt_iters']} steps, the same schedule for every row"
             + (" and round" if any(n in EXTRA_ROWS for n in rows) else "") + "; target-val mIoU, mean ± std over seeds."
             + (f" Source model trained with {', '.join(st['source_set'])}." if st.get("source_set") else ""),
             "", "| row | mIoU | ± std | seeds | vs box | gap closed |", "|---|---:|---:|---|---:|---:|"]
    for name, r in rows.items():
        gap = "" if box is None or oracle is None or oracle == box else f"{100 * (r['mean'] - box) / (oracle - box):.0f} %"
        vs = "" if box is None else f"{r['mean'] - box:+.2f}"
        std = "" if r["std"] is None else f"{r['std']:.2f}"
        lines.append(f"| {name} | {r['mean']:.2f} | {std} | {r['miou']} | {vs} | {gap} |")
    rounds = [n for n in rows if n in EXTRA_ROWS]
    if rounds:
        lines += ["", f"{', '.join(rounds)}: {'this row trains' if len(rounds) == 1 else 'these rows train'} two "
                      "self-training rounds (`train.rounds=2`), twice the schedule of the other rows."]
    if "blackbox" in rows and rows["blackbox"].get("source_miou"):
        src = rows["blackbox"]["source_miou"]
        lines += ["", f"The black box on its own (source) domain, held-out split: {statistics.mean(src):.2f} mIoU "
                      f"(per seed {src}), against {box:.2f} on the target: the domain gap."]
    lines += ["", "Command:", "", "```", doc["command"], "```", "",
              f"Wall time: {doc['seconds'] / 60:.0f} min ({st['lanes']} rows at a time, {st['engine']} engine, "
              f"{st['device']})."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
