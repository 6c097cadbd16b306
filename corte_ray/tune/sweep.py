"""`corte-ray tune`: a Ray Tune sweep over a search space, each trial one Ray Train adaptation.

Shape (Train V2, docs RAY_NOTES.md): Tune runs `trial_driver`, a function that builds the trial's config and fits
the Ray Train adapt trainer (train/ray_engine.fit_ray) with `TuneReportCallback`, so every evaluation the loop
reports is one Tune iteration and ASHA can stop a weak trial after any of them. Every report carries the target-val
mIoU (where the config has a val split) and the unsupervised selection score (tune/score.py); `--metric` picks
which one the scheduler and the final choice use.

The sweep directory OUT holds:
    sweep.json        the sweep's arguments (what --resume reruns)
    base.yaml         the resolved config every trial starts from (knobs then set per trial)
    labels/           the label store, when the config names a box rather than a store: labelled ONCE, here,
                      before any trial; every trial reads it (the box is never queried by a trial)
    tune/             Ray Tune's experiment (its state, for --resume; per-trial results)
    trials/ID/        one adapt run per trial: config.yaml, metrics.jsonl, tensorboard/, checkpoints
OUT may be a local path or an s3:// / gs:// URI (corte_ray.storage): Tune's state and every trial go there.
    leaderboard.csv   every trial: knobs, mIoU, unsupervised score, steps run, stopped early
    best.yaml         the best trial's resolved config: `corte-ray adapt --config OUT/best.yaml --out RUN`
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from .. import storage
from ..config import Config, load_config, save_config
from ..errors import ConfigError, InputError
from ..io_utils import append_line, write_json_atomic, write_text_atomic
from .space import Space, apply_knobs, load_space, to_param_space

log = logging.getLogger(__name__)
METRICS = {"miou": "val_miou", "unsupervised": "unsupervised"}
DEFAULT_SCORE_IMAGES = 64
DRIVER_CPUS = 0.01   # a trial's own process only waits on its trainer; Tune refuses a trial with no resources at all
OBJECT_STORE_BYTES = 500 * 1024 ** 2   # batches of decoded images stream through; the default (30 % of RAM) pins
                                       # memory that the trials' own processes need on a small machine


# ------------------------------------------------------------------------------------------------ trial
def trial_driver(config: dict[str, Any], base: dict[str, Any], sweep_dir: str) -> None:
    """One Tune trial: the trial's config from the knobs, then one Ray Train adaptation reporting to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ..train.ray_engine import fit_ray

    trial_id = tune.get_context().get_trial_id()
    cfg = apply_knobs(base, config)
    run_dir = storage.as_path(sweep_dir) / "trials" / trial_id
    run_dir.mkdir(parents=True, exist_ok=True)
    # One line per start of this trial: a resumed sweep restarts only unfinished trials (tests count these).
    append_line(run_dir / "starts.log", f"{time.time():.3f} pid {os.getpid()}")
    save_config(cfg, run_dir / "config.yaml")
    # The same Train run name on a restart: Ray Train resumes the trial from its last checkpoint.
    result = fit_ray(cfg, run_dir, cfg.blackbox.label_store or None, callbacks=[TuneReportCallback()])
    write_json_atomic(run_dir / "done.json", {"step": result.step,
                                               "metrics": {k: v for k, v in result.metrics.items()
                                                           if isinstance(v, (int, float))}})


# ------------------------------------------------------------------------------------------ the sweep
def sweep_base_config(cfg: Config, out) -> Config:
    """What every trial shares, on top of the user's config: the Ray Train engine, one report per evaluation, the
    unsupervised scores on, the shared label store."""
    from ..config import from_dict

    t = cfg.train
    if not t.eval_every or t.eval_every >= t.iterations:
        raise ConfigError(f"train.eval_every: a sweep needs several evaluations per trial (the scheduler decides "
                          f"at each); got eval_every={t.eval_every} for train.iterations={t.iterations}")
    data = cfg.to_dict()
    data["scaling"]["engine"] = "ray"
    # A report without an evaluation would be a Tune iteration without the metric: checkpoint at evaluations only.
    data["train"]["checkpoint_every"] = t.eval_every
    if not t.score_images:
        data["train"]["score_images"] = DEFAULT_SCORE_IMAGES
    return from_dict(data)


def _check_resources(cfg: Config, max_concurrent: int, resources: dict[str, float] | None = None) -> float:
    """CPUs one trial reserves (Train workers + each worker's first Ray Data decode actor + its
    driver); fails if K trials
    cannot fit, counting GPUs and scaling.resources_per_worker too. With scaling.wait_for_gpus (an autoscaling
    cluster) what is missing now is only logged. `resources`: the cluster's (default: ray.cluster_resources())."""
    import ray

    from ..train.ray_engine import job_needs

    s = cfg.scaling
    trial = job_needs(cfg)
    trial["CPU"] += DRIVER_CPUS
    have = ray.cluster_resources() if resources is None else resources
    problems = []
    if have.get("CPU", 0) < trial["CPU"] * max_concurrent - 1e-9:
        problems.append(f"--max-concurrent: {max_concurrent} trials x {trial['CPU']:g} CPUs (scaling.num_workers x "
                        f"(scaling.cpus_per_worker + scaling.data_cpus) + {DRIVER_CPUS:g} for the trial's driver) "
                        f"need {trial['CPU'] * max_concurrent:g} CPUs, the cluster has {have.get('CPU', 0):g}; "
                        f"lower --max-concurrent or the trial's CPUs")
    for name in (n for n in trial if n != "CPU"):
        if have.get(name, 0) < trial[name] * max_concurrent - 1e-9:
            key = "scaling.use_gpu" if name == "GPU" else f"scaling.resources_per_worker.{name}"
            problems.append(f"--max-concurrent: {max_concurrent} trials x {trial[name]:g} {name} ({key}) do not "
                            f"fit the cluster's {have.get(name, 0):g}")
    if problems and s.wait_for_gpus:
        log.warning("waiting for the autoscaler (scaling.wait_for_gpus): %s", "; ".join(problems))
    elif problems:
        raise ConfigError(" | ".join(problems))
    return trial["CPU"]


def _init_ray(cfg: Config, max_concurrent: int) -> None:
    from ..ray_cluster import connect

    s = cfg.scaling
    need = s.num_workers * (s.cpus_per_worker + s.data_cpus) + DRIVER_CPUS
    # Logical CPUs for K trials at once (a local instance; a cluster joined through RAY_ADDRESS keeps its own):
    # the user chose K; each trial's torch threads are train.cpu_threads. The dashboard stays on: without it,
    # placement groups of trials ASHA stops leak and later trials hang.
    connect(need * max_concurrent, OBJECT_STORE_BYTES, include_dashboard=True, log_to_driver=False)


def _scheduler(name: str, cfg: Config, metric: str):
    if name == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # One Tune iteration per evaluation; a trial that reaches max_t evaluations has run its whole schedule.
    evals = math.ceil(cfg.train.iterations / cfg.train.eval_every)
    return ASHAScheduler(time_attr="training_iteration", max_t=evals, grace_period=1, reduction_factor=2)


def _searcher(name: str, space: Space, metric: str, seed: int, max_concurrent: int):
    if name == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # Seeded: the same sweep command samples the same configurations. It limits concurrency itself (Tune's
        # max_concurrent_trials applies to Searchers only).
        return BasicVariantGenerator(random_state=seed, max_concurrent=max_concurrent)
    import importlib.util

    if importlib.util.find_spec("optuna") is None:
        raise ConfigError("--search optuna: the optuna package is not installed; pip install 'corte-ray[tune]' "
                          "(or pip install optuna), or use --search random")
    from ray.tune.search.optuna import OptunaSearch

    from ray.tune.search import ConcurrencyLimiter

    return ConcurrencyLimiter(OptunaSearch(seed=seed), max_concurrent=max_concurrent)


class ProgressTable(Callback):
    """A Tune callback: one table of every trial (status, knobs, step, mIoU, unsupervised) every `every_s`."""

    def __init__(self, knobs: list[str], iterations: int, every_s: float = 30.0) -> None:
        self.knobs, self.iterations, self.every_s = knobs, iterations, every_s
        self.t_last = 0.0

    def _print(self, trials) -> None:
        self.t_last = time.monotonic()
        rows = []
        for t in trials:
            r = t.last_result or {}
            rows.append([t.trial_id, t.status] + [_fmt(t.config.get(k)) for k in self.knobs]
                        + [f"{int(r['step'])}/{self.iterations}" if "step" in r else "-",
                           _fmt(r.get("val_miou")), _fmt(r.get("unsupervised"))])
        head = ["trial", "status"] + self.knobs + ["step", "mIoU", "unsup"]
        print(format_table(head, rows), flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if time.monotonic() - self.t_last >= self.every_s:
            self._print(trials)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._print(trials)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._print(trials)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.2f}" if abs(v) >= 1 else f"{v:.4f}"
    return str(v)


def format_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def run_sweep(config: str | None, overrides: list[str], space_path: str | None, samples: int | None,
              out: str | Path, scheduler: str = "asha", search: str = "random", metric: str | None = None,
              max_concurrent: int = 1, resume: bool = False) -> dict:
    """Run (or, with resume, continue) a sweep; returns {"leaderboard": rows, "best": row, "out": path}."""
    import ray
    from ray import tune

    out = storage.as_path(out)
    if not storage.is_remote(out):
        out = out.resolve()
    state_path = out / "sweep.json"
    if resume:
        if not state_path.exists():
            raise InputError(state_path, "cannot resume: no sweep here (run `corte-ray tune` without --resume first)")
        args = json.loads(state_path.read_text())
    else:
        if state_path.exists():
            raise InputError(out, "already holds a sweep; pass --resume to continue it, or choose another --out")
        if not space_path or not samples:
            raise ConfigError("--space and --samples are needed to start a sweep")
        args = {"config": config, "overrides": list(overrides), "space": str(Path(space_path).resolve())
                if Path(space_path).exists() else space_path, "samples": samples, "scheduler": scheduler,
                "search": search, "metric": metric, "max_concurrent": max_concurrent}
    if args["samples"] < 1 or args["max_concurrent"] < 1:
        raise ConfigError("--samples and --max-concurrent must be >= 1")

    # Everything that can be wrong is checked before Ray starts and before any trial.
    user_cfg = load_config(args["config"], args["overrides"]) if not resume else load_config(out / "base.yaml")
    base = sweep_base_config(user_cfg, out)
    space = load_space(args["space"], base)
    metric_name = args["metric"] or ("miou" if base.data.val_split else "unsupervised")
    if metric_name == "miou" and not base.data.val_split:
        raise ConfigError("--metric miou: the config has no labelled val split (data.val_split); use "
                          "--metric unsupervised")
    metric_key = METRICS[metric_name]
    param_space = to_param_space(space, args["search"])
    from ..methods.steps import METHODS

    needs_store = METHODS.get(base.method).needs_box_labels
    if needs_store and not base.blackbox.label_store and not base.blackbox.spec:
        raise ConfigError("blackbox.spec: the method needs black-box labels; set blackbox.spec=file:MODEL "
                          "(or http://...) or blackbox.label_store=STORE")
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        write_json_atomic(state_path, {**args, "metric": metric_name})

    _init_ray(base, args["max_concurrent"])
    _check_resources(base, args["max_concurrent"])
    # One label store for the whole sweep: labelled here, once (resumable), never per trial.
    if needs_store and not base.blackbox.label_store:
        from ..pipeline import label

        store_dir = out / "labels"
        if not (store_dir / "thresholds.json").exists():
            log.info("labelling the target once for every trial -> %s", store_dir)
            label(base, store_dir, engine="ray")
        base = apply_knobs(base.to_dict(), {"blackbox.label_store": str(store_dir)})
    save_config(base, out / "base.yaml")

    trainable = tune.with_resources(tune.with_parameters(trial_driver, base=base.to_dict(), sweep_dir=str(out)),
                                    {"CPU": DRIVER_CPUS})
    # Tune's storage: a plain path locally, (filesystem, bucket/path) on object storage.
    fs, fs_out = storage.resolve(out)
    fs = fs if storage.is_remote(out) else None
    exp_dir = f"{fs_out}/tune"
    run_config = tune.RunConfig(name="tune", storage_path=fs_out, storage_filesystem=fs, verbose=0,
                                callbacks=[ProgressTable(space.keys, base.train.iterations)])
    t0 = time.perf_counter()
    if resume and tune.Tuner.can_restore(exp_dir, storage_filesystem=fs):
        tuner = tune.Tuner.restore(exp_dir, trainable=trainable, resume_unfinished=True, resume_errored=False,
                                   storage_filesystem=fs)
    else:
        tuner = tune.Tuner(trainable, param_space=param_space, run_config=run_config,
                           tune_config=tune.TuneConfig(
                               metric=metric_key, mode="max", num_samples=args["samples"],
                               scheduler=_scheduler(args["scheduler"], base, metric_key),
                               search_alg=_searcher(args["search"], space, metric_key, base.train.seed,
                                                    args["max_concurrent"])))
    grid = tuner.fit()
    seconds = time.perf_counter() - t0
    # Ctrl-C (or a stop signal) ends fit() with trials neither finished nor failed: say so, and how to go on.
    rows = leaderboard_rows(grid, space, base, out)
    # (Tune may count a trial it stopped on Ctrl-C as terminated: one that never reported was interrupted too.)
    interrupted = (grid.num_terminated + grid.num_errors < len(grid)) or any(r["status"] == "unfinished" for r in rows)
    best = pick_best(rows, metric_name)
    write_leaderboard(rows, space, out / "leaderboard.csv")
    if best is not None:
        write_best(best, metric_name, out)
    print(format_leaderboard(rows, space, metric_name))
    if best is not None:
        print(f"\nbest trial {best['trial_id']} by {metric_name}: mIoU {_fmt(best['miou'])}, unsupervised "
              f"{_fmt(best['unsupervised'])}; its config: {out / 'best.yaml'} "
              f"(corte-ray adapt --config {out / 'best.yaml'} --out RUN)")
    print(f"leaderboard: {out / 'leaderboard.csv'}; TensorBoard: tensorboard --logdir {out / 'trials'}  "
          f"({seconds:.0f} s)")
    if interrupted:
        from ..errors import CorteError

        raise CorteError(f"the sweep was interrupted before every trial finished (the leaderboard so far is "
                         f"above); continue it with `corte-ray tune --out {out} --resume`")
    return {"leaderboard": rows, "best": best, "out": str(out), "metric": metric_name, "seconds": seconds}


# ------------------------------------------------------------------------------------------ outputs
def leaderboard_rows(grid, space: Space, base: Config, out) -> list[dict]:
    """One row per trial from Tune's results: knobs, the last evaluation's mIoU and scores, steps, stopped early."""
    rows = []
    for res in grid:
        m = res.metrics or {}
        trial_id = m.get("trial_id") or (Path(res.path).name if res.path else "?")
        steps = int(m.get("step", 0))
        status = "error" if res.error else ("done" if steps >= base.train.iterations else
                                            "stopped" if steps else "unfinished")
        rows.append({"trial_id": trial_id, "knobs": {k: res.config.get(k) for k in space.keys},
                     "miou": m.get("val_miou"), "unsupervised": m.get("unsupervised"), "steps": steps,
                     "stopped_early": status == "stopped", "status": status,
                     "scores": {k.split("/", 1)[1]: v for k, v in m.items() if k.startswith("unsup/")},
                     "run_dir": str(out / "trials" / trial_id)})
    return rows


def pick_best(rows: list[dict], metric: str) -> dict | None:
    """The best trial that ran its whole schedule (a stopped trial's score is of a shorter run), by `metric`."""
    key = "miou" if metric == "miou" else "unsupervised"
    done = [r for r in rows if r["status"] == "done" and r[key] is not None]
    pool = done or [r for r in rows if r[key] is not None]
    return max(pool, key=lambda r: r[key]) if pool else None


def _sorted(rows: list[dict], metric: str) -> list[dict]:
    key = "miou" if metric == "miou" else "unsupervised"
    return sorted(rows, key=lambda r: (r["status"] != "done", -(r[key] if r[key] is not None else -1e9)))


def write_leaderboard(rows: list[dict], space: Space, path) -> None:
    import io

    candidates = sorted({k for r in rows for k in r["scores"]})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["trial_id", *space.keys, "miou", "unsupervised", "steps", "stopped_early", "status",
                *[f"unsup_{c}" for c in candidates]])
    for r in rows:
        w.writerow([r["trial_id"], *[r["knobs"][k] for k in space.keys], r["miou"], r["unsupervised"], r["steps"],
                    r["stopped_early"], r["status"], *[r["scores"].get(c) for c in candidates]])
    write_text_atomic(path, buf.getvalue())


def format_leaderboard(rows: list[dict], space: Space, metric: str) -> str:
    head = ["#", "trial", *space.keys, "mIoU", "unsup", "steps", "stopped early", "status"]
    body = [[str(i + 1), r["trial_id"], *[_fmt(r["knobs"][k]) for k in space.keys], _fmt(r["miou"]),
             _fmt(r["unsupervised"]), str(r["steps"]), "yes" if r["stopped_early"] else "no", r["status"]]
            for i, r in enumerate(_sorted(rows, metric))]
    return format_table(head, body)


def write_best(best: dict, metric: str, out):
    cfg_text = (storage.as_path(best["run_dir"]) / "config.yaml").read_text()
    header = (f"# The best trial ({best['trial_id']}, by {metric}) of the sweep in {out}: val mIoU "
              f"{_fmt(best['miou'])}, unsupervised {_fmt(best['unsupervised'])} after {best['steps']} steps.\n"
              f"# Knobs: {json.dumps(best['knobs'])}\n"
              f"# Rerun it: corte-ray adapt --config {out / 'best.yaml'} --out RUN\n")
    return write_text_atomic(out / "best.yaml", header + cfg_text)
