"""The `corte-ray` command: one sub-command per arrow of the data flow in DESIGN.md, plus `synth` and `demo`.

Every sub-command is a function `cmd_<name>(args) -> int`. User errors (`CorteError`) are printed as one
line naming the file or key and give exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import Sequence

from . import __version__
from .errors import CorteError
from .log import setup_logging
from .storage import as_path

log = logging.getLogger("corte_ray")

DATASET_CHOICES = ("cityscapes", "gta5", "synthia", "nthu", "folder", "synth")
_CONFIG_KEY = re.compile(r"\(([a-z_]+\.[a-z_]+)\)$")


def _config_default(key: str) -> str:
    """The shipped default of a dotted config key, as a user would write it."""
    from .config import Config

    node = Config().to_dict()
    for part in key.split("."):
        node = node[part]
    if node is None or node == "":
        return "none"
    return "x".join(map(str, node)) if isinstance(node, list) else str(node)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option shows its real default. An option that only overrides a config key (its help ends in
    "(section.key)") shows the config's default, not the "None" that means "not given on the command line";
    on/off flags show none (they are off unless given); required options show "(required)"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "(default" in text or "default:" in text or action.default is argparse.SUPPRESS:
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._CountAction, argparse._VersionAction)) \
                or not action.option_strings:
            return text
        if action.required:
            return text + " (required)"
        match = _CONFIG_KEY.search(text)
        if action.default is None and match:
            return text[:match.start()] + f"({match.group(1)}, default: {_config_default(match.group(1))})"
        if action.default is None:
            return text + " (default: not set)"
        return text + " (default: %(default)s)"


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
        if h <= 0 or w <= 0:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like HxW with positive integers, got {text!r}") from None
    return h, w


def _add_dataset_args(p: argparse.ArgumentParser, split_default: str = "val") -> None:
    p.add_argument("--dataset", required=True, choices=DATASET_CHOICES,
                   help="dataset format of --root (synth = the directory written by `corte-ray synth`)")
    p.add_argument("--root", required=True, type=Path, help="dataset root directory")
    p.add_argument("--split", default=split_default, help="split to read (default: %(default)s)")
    p.add_argument("--city", default=None,
                   help="nthu only: Rome, Rio, Tokyo or Taipei (default: every city found)")
    p.add_argument("--labels-dir", type=Path, default=None,
                   help="folder only: directory of label PNGs named like the images (default: none)")
    p.add_argument("--label-space", type=Path, default=None,
                   help="folder only: YAML label space (default: the 19 Cityscapes train ids)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip unreadable or inconsistent files and report how many, instead of stopping at the first")


# ----------------------------------------------------------------------------------------------- synth
def cmd_synth(args: argparse.Namespace) -> int:
    from .data.synth import render_benchmark

    try:
        stats = render_benchmark(args.out, seed=args.seed, n_source=args.n_source, n_target=args.n_target,
                                 n_val=args.n_val, size=args.size, n_source_val=args.n_source_val,
                                 scenario=args.scenario)
    except ValueError as exc:  # bad size / seed / counts: a user error, one line
        from .errors import ConfigError

        raise ConfigError(str(exc)) from None
    print(stats.format_table())
    print(f"wrote the benchmark to {args.out}")
    return 0


# -------------------------------------------------------------------------------------------- evaluate
def cmd_evaluate(args: argparse.Namespace) -> int:
    from .data.datasets import open_dataset
    from .evaluation import evaluate_predictions

    dataset = open_dataset(args.dataset, args.root, split=args.split, city=args.city,
                           labels_dir=args.labels_dir, label_space=args.label_space)
    result = evaluate_predictions(dataset, args.predictions, classes=args.classes, skip_bad=args.skip_bad)
    print(result.format_table())
    if args.json:
        from .io_utils import write_json_atomic

        write_json_atomic(args.json, result.to_json())
        log.info("wrote %s", args.json)
    return 0



# ------------------------------------------------------------------------------------ config helpers
def _config_from_args(args: argparse.Namespace, base: dict | None = None, extra: Sequence[str] = ()):
    """Shipped defaults <- --config FILE <- convenience flags <- key=value overrides."""
    from .config import load_config

    return load_config(args.config, list(extra) + list(args.overrides), base=base)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None,
                   help="YAML config file, or the name of a shipped one (demo, cityscapes); see corte_ray/configs/ "
                        "(default: none, the built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. corte.rc_scale=0.8 train.iterations=2000 data.crop_size=[512,512]")


def _flag_overrides(args: argparse.Namespace, mapping: dict[str, str]) -> list[str]:
    out = []
    for attr, key in mapping.items():
        value = getattr(args, attr, None)
        if value is not None:
            if isinstance(value, tuple):
                value = list(value)
            out.append(f"{key}={json.dumps(value) if not isinstance(value, str) else value}")
    return out


_DATA_FLAGS = {"dataset": "data.dataset", "root": "data.root", "resize": "data.resize"}


# --------------------------------------------------------------------------------------- train-source
def cmd_train_source(args: argparse.Namespace) -> int:
    from .pipeline import train_source

    cfg = None
    if not args.resume:
        base = {"method": "oracle", "model": {"student": "deeplabv3_resnet50"},
                "data": {"train_split": "train", "val_split": ""}}
        cfg = _config_from_args(args, base, _flag_overrides(args, {**_DATA_FLAGS, "arch": "model.student"}))
    out = train_source(cfg, args.out, args.model_file, resume=args.resume)
    print(json.dumps(out, indent=2))
    return 0


# -------------------------------------------------------------------------------------------- label
def cmd_label(args: argparse.Namespace) -> int:
    from .pipeline import label

    flags = _flag_overrides(args, {**_DATA_FLAGS, "split": "data.train_split", "blackbox": "blackbox.spec",
                                   "answer": "blackbox.answer", "device": "train.device",
                                   "timeout": "blackbox.timeout", "max_retries": "blackbox.max_retries"})
    cfg = _config_from_args(args, None, flags)
    doc = label(cfg, args.out, overwrite=args.overwrite, engine=args.engine, num_actors=args.actors,
                gpus_per_actor=args.gpus_per_actor, budget=args.budget, skip_bad=args.skip_bad)
    run = doc.get("run", {})
    extra = f" ({run['images_per_s']:.1f} images/s, {run.get('store_bytes_per_image') or 0:.0f} bytes/image)" \
        if run.get("images_per_s") is not None else ""
    skipped = f"; {run['skipped_bad']} unreadable images skipped" if run.get("skipped_bad") else ""
    damaged = f"; {run['damaged_parts']} damaged parts moved aside and relabelled" if run.get("damaged_parts") else ""
    print(f"the store {args.out} holds {doc['num_images']} images{extra}{skipped}{damaged}")
    return 0


# -------------------------------------------------------------------------------------------- adapt
def cmd_adapt(args: argparse.Namespace) -> int:
    from .pipeline import adapt

    cfg = None
    if not args.resume:
        flags = _flag_overrides(args, {**_DATA_FLAGS, "method": "method", "engine": "scaling.engine",
                                       "blackbox": "blackbox.spec", "label_store": "blackbox.label_store",
                                       "student": "model.student", "device": "train.device",
                                       "rounds": "train.rounds"})
        if args.source_checkpoint is not None:
            from .pipeline import checkpoint_arch

            # STvM trains the source model's own architecture from its weights: take the arch from the file.
            flags.append(f"model.weights={args.source_checkpoint}")
            if args.student is None:
                flags.append(f"model.student={checkpoint_arch(args.source_checkpoint)}")
        cfg = _config_from_args(args, None, flags)
    elif args.overrides:
        raise SystemExit("corte-ray adapt: --resume continues a run with its saved config; drop the overrides")
    result = adapt(cfg, args.out, resume=args.resume)
    print(json.dumps({"step": result.step, "checkpoint": str(result.checkpoint) if result.checkpoint else None,
                      **{k: v for k, v in result.metrics.items() if not k.startswith("val_iou/")}}, indent=2))
    return 0


# ------------------------------------------------------------------------------------------- export
def cmd_export(args: argparse.Namespace) -> int:
    from .export import check_parity, export_model
    from .pipeline import load_checkpoint_model

    model, cfg = load_checkpoint_model(args.checkpoint, use_teacher=args.teacher)
    from .data.labels import TRAIN_NAMES

    meta = {"arch": cfg.model.student, "num_classes": cfg.model.num_classes,
            "class_names": list(TRAIN_NAMES[: cfg.model.num_classes])}
    size = tuple(args.size or cfg.data.crop_size)
    path = export_model(model, args.out, format=args.format, example_size=size, meta=meta)
    # Check at a size other than the trace size: a trace that baked in shapes would fail here.
    diff = check_parity(model, path, size=(size[0] + 16, size[1] + 32))
    print(f"exported {args.checkpoint} -> {path} ({args.format}); max |diff| vs PyTorch = {diff:.2e}")
    if diff > 1e-4:
        print("corte-ray export: error: parity check failed (max diff > 1e-4)", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------------ predict
def cmd_predict(args: argparse.Namespace) -> int:
    from .data.datasets import open_dataset
    from .pipeline import load_checkpoint_model, predict

    model, cfg = load_checkpoint_model(args.checkpoint, use_teacher=args.teacher)
    dataset = open_dataset(args.dataset, args.root, split=args.split, city=args.city,
                           labels_dir=args.labels_dir, label_space=args.label_space)
    n = predict(model, dataset, args.out, resize=args.resize or cfg.data.resize, device=args.device)
    print(f"wrote {n} predictions to {args.out}")
    return 0


# ------------------------------------------------------------------------------------------- models
def cmd_models(args: argparse.Namespace) -> int:
    from .models import describe_models

    rows = describe_models((1, 3, *args.size))
    print(f"{'model':28s} {'kind':8s} {'params (M)':>10s} {'GMACs':>8s}   at {args.size[0]}x{args.size[1]}")
    for r in rows:
        print(f"{r['name']:28s} {r['kind']:8s} {r['params'] / 1e6:10.2f} {r['gmacs']:8.2f}")
    return 0


# ----------------------------------------------------------------------------------- serve-blackbox
def cmd_serve_blackbox(args: argparse.Namespace) -> int:
    from .blackbox.server import BlackBoxServer, serve

    options = dict(host=args.host, port=args.port, hard_labels_only=args.hard_labels_only, token_env=args.token_env,
                   device=args.device, max_pixels=args.max_pixels, max_body_bytes=args.max_body_mb << 20,
                   body_timeout=args.body_timeout, queue_timeout=args.queue_timeout,
                   max_connections=args.max_connections)
    if args.error_rate or args.latency:
        # Simulating a flaky vendor is a test tool, kept out of the reference server itself.
        from .blackbox.faults import FaultInjectingServer

        server = FaultInjectingServer(args.model_file, error_rate=args.error_rate, latency=args.latency,
                                      seed=args.seed, fault_sleep=args.fault_sleep, **options)
    else:
        server = BlackBoxServer(args.model_file, **options)
    serve(server)
    return 0


# --------------------------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    engine = args.engine or "local"
    run_demo(args.out, quick=args.quick, seed=args.seed, device=args.device, threads=args.threads, engine=engine,
             lanes=args.lanes)
    return 0


# --------------------------------------------------------------------------------------------- tune
def cmd_tune(args: argparse.Namespace) -> int:
    from .tune.sweep import run_sweep

    run_sweep(args.config, list(args.overrides), args.space, args.samples, args.out, scheduler=args.scheduler,
              search=args.search, metric=args.metric, max_concurrent=args.max_concurrent, resume=args.resume)
    return 0


# ------------------------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="corte-ray",
        description="Adapt a black-box segmentation model to a new domain as a small, fast student "
                    "(CoRTe + STvM), on one machine or on a Ray cluster.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"corte-ray {__version__}")
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    verbosity.add_argument("-q", "--quiet", action="store_true", help="warnings and results only, no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    fmt = _HelpFormatter

    p = sub.add_parser("synth", formatter_class=fmt, help="render the synthetic two-domain benchmark",
                       description="Render the procedural two-domain street-scene benchmark: DIR/source in GTA5 "
                                   "layout (labelled; split lists source/train.txt and source/val.txt) and "
                                   "DIR/target in Cityscapes layout (train unlabelled for adaptation, val labelled). "
                                   "Scenario synth-to-real: flat synthetic source, textured 'real' target. Scenario "
                                   "cross-city: two 'real'-looking cities, a warm sunny city A as the source and a "
                                   "grey rainy city B as the target, with their own layouts, palettes and light. "
                                   "Read it with --dataset synth: splits source, source_val, train, val. The same "
                                   "arguments give byte-identical files.")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    # the names of corte_ray.data.synth.SCENARIOS, spelled out so building the parser imports no numpy
    p.add_argument("--scenario", choices=("synth-to-real", "cross-city"), default="synth-to-real",
                   help="the two domains: synth-to-real (flat synthetic source -> textured 'real' target) or "
                        "cross-city (real-looking city A -> real-looking city B: a smaller gap in layout, palette "
                        "and light)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--n-source", type=int, default=200, help="labelled source training images (split source)")
    p.add_argument("--n-source-val", type=int, default=50,
                   help="labelled held-out source images (split source_val: a source model's accuracy on its own "
                        "domain, beside its target accuracy); 0 = none")
    p.add_argument("--n-target", type=int, default=200, help="unlabelled target training images (split train)")
    p.add_argument("--n-val", type=int, default=50, help="labelled target validation images (split val)")
    p.add_argument("--size", type=_size, default=(128, 256), help="image size HxW")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("evaluate", formatter_class=fmt, help="mIoU of a folder of predicted PNGs",
                       description="Compute mIoU from one confusion matrix over the whole split. A prediction is a "
                                   "PNG of train ids (255 = ignore) with the same file name as its image "
                                   "(X_leftImg8bit.png for Cityscapes; .jpg images -> .png), in one flat folder.")
    _add_dataset_args(p)
    p.add_argument("--predictions", required=True, type=Path, help="folder of predicted train-id PNGs")
    p.add_argument("--classes", default=None,
                   help="class set to average over: 19, 16 or 13 (default: the dataset's own, e.g. 16 for "
                        "synthia, 13 for nthu, the rendered classes for synth)")
    p.add_argument("--json", type=Path, default=None, help="also write the result as JSON to this file (default: none)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", formatter_class=fmt, help="the whole pipeline on the embedded synthetic benchmark",
                       description="synth -> train-source (a heavy DeepLabV3+, then hidden behind the black-box "
                                   "interface) -> label the target -> adapt one student per method (distill, "
                                   "threshold_st, corte, corte_metric, stvm from the source weights, oracle) side "
                                   "by side, one CPU thread each -> a table of target-val mIoU (the box also on "
                                   "held-out source images), share of the box->oracle gap closed, parameters and "
                                   "CPU images/s, in OUT/results.md and OUT/results.json, with OUT/predictions.png "
                                   "and OUT/curves.png. Rerunning with the same --out resumes and skips finished "
                                   "rows.")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory")
    p.add_argument("--quick", action="store_true",
                   help="a smaller benchmark, shorter schedules and the rows blackbox, distill, corte, oracle "
                        "(3-4.5 min on 2 CPU cores, against 10-15 min for the full demo; README, 'How long it takes')")
    p.add_argument("--seed", type=int, default=0, help="random seed for the benchmark and training")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads per row (0 = 1: the rows run side by side)")
    p.add_argument("--lanes", type=int, default=0, help="rows trained at a time (0 = the number of CPU cores)")
    p.add_argument("--engine", choices=("ray", "local"), default=None,
                   help="ray: rows as Ray tasks and labelling as a Ray Data job; local: rows as local processes, "
                        "no Ray (the default: the rows are one-thread processes either way, and Ray's start-up "
                        "and a Ray Data labelling job cost about 30 s on 2 cores)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("tune", formatter_class=fmt, help="a Ray Tune sweep of adapt runs over a search space",
                       description="Sweep the knobs of a search space (tune_spaces/*.yaml; format in the README) with "
                                   "Ray Tune: each trial is one Ray Train adaptation from --config with the trial's "
                                   "knobs, every evaluation one Tune iteration (ASHA stops weak trials early). The "
                                   "target is labelled once for all trials. Every evaluation reports target-val mIoU "
                                   "and an unsupervised selection score that reads no target labels (docs/tuning.md). "
                                   "Writes OUT/leaderboard.csv, OUT/best.yaml (run it with corte-ray adapt --config) "
                                   "and TensorBoard per trial under OUT/trials/.")
    p.add_argument("--space", default=None,
                   help="search space: a YAML file, or the name of a shipped one (corte, stvm, threshold_st, tiny)")
    p.add_argument("--samples", type=int, default=None,
                   help="configurations to sample (each grid point is repeated this many times)")
    p.add_argument("--scheduler", choices=("asha", "none"), default="asha",
                   help="asha: stop weak trials at evaluations; none: every trial runs its whole schedule")
    p.add_argument("--search", choices=("random", "optuna"), default="random",
                   help="random sampling, or Optuna's TPE (needs the optuna package: pip install 'corte-ray[tune]')")
    p.add_argument("--metric", choices=("miou", "unsupervised"), default=None,
                   help="what the scheduler and the choice of best.yaml maximise (default: miou where the config "
                        "has a val split, else unsupervised)")
    p.add_argument("--max-concurrent", type=int, default=1,
                   help="trials at once; each reserves scaling.num_workers x (scaling.cpus_per_worker + "
                        "scaling.data_cpus) CPUs")
    p.add_argument("--out", type=as_path, default=Path("tune_out"), help="sweep directory, local or s3:// / gs:// URI")
    p.add_argument("--resume", action="store_true",
                   help="continue the sweep in --out (after a crash or a kill): finished trials are kept, "
                        "unfinished ones continue from their last checkpoint; the other options come from OUT/sweep.json")
    _add_config_args(p)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("train-source", formatter_class=fmt, help="train the source model and export it as a black box",
                       description="Supervised training on a labelled source domain (e.g. GTA5, or the synthetic "
                                   "benchmark's source), then export as a TorchScript/ONNX model file usable as "
                                   "--blackbox file:PATH.")
    p.add_argument("--out", required=True, type=as_path,
                   help="run directory, local or s3:// / gs:// URI (checkpoints, TensorBoard, config)")
    p.add_argument("--model-file", required=True, type=Path, help="where to write the exported model (.pt or .onnx)")
    p.add_argument("--dataset", choices=DATASET_CHOICES, default=None, help="source dataset format (data.dataset)")
    p.add_argument("--root", default=None, help="source dataset root (data.root)")
    p.add_argument("--arch", default=None, help="source model (model.student; default deeplabv3_resnet50)")
    p.add_argument("--resize", type=_size, default=None, help="resize images to HxW (data.resize)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    _add_config_args(p)
    p.set_defaults(func=cmd_train_source)

    p = sub.add_parser("label", formatter_class=fmt, help="query the black box once per target image; write a label store",
                       description="Label every image of a split with the black box and write the label store "
                                   "(Parquet parts + thresholds.json). Rerunning labels only the missing images.")
    p.add_argument("--dataset", choices=DATASET_CHOICES, default=None, help="dataset format (data.dataset)")
    p.add_argument("--root", default=None, help="dataset root (data.root)")
    p.add_argument("--split", default=None, help="split to label (data.train_split)")
    p.add_argument("--blackbox", default=None, help="file:PATH of a TorchScript/ONNX model, or an http(s) endpoint (blackbox.spec)")
    p.add_argument("--answer", choices=("probs", "topk", "hard"), default=None,
                   help="what to ask the box for (blackbox.answer)")
    p.add_argument("--resize", type=_size, default=None, help="resize images to HxW before querying (data.resize)")
    p.add_argument("--device", default=None, help="device for a local box: auto, cpu, cuda (train.device)")
    p.add_argument("--out", required=True, type=as_path, help="label store directory, local or s3:// / gs:// URI")
    p.add_argument("--overwrite", action="store_true", help="relabel everything instead of resuming")
    p.add_argument("--engine", choices=("ray", "local"), default="ray",
                   help="ray: a Ray Data job with an actor pool of box clients; local: one process, no Ray")
    p.add_argument("--actors", type=int, default=1, help="ray: black-box actors, each loads the model once")
    p.add_argument("--gpus-per-actor", type=float, default=0.0, help="ray: GPUs per actor (fractions share a GPU)")
    p.add_argument("--budget", type=int, default=None,
                   help="ray engine: query at most N images in this run, rerun for the rest; an http(s) box: send "
                        "at most N requests, retries included (default: no budget)")
    p.add_argument("--timeout", type=float, default=None, help="http(s) box: seconds per request (blackbox.timeout)")
    p.add_argument("--max-retries", type=int, default=None,
                   help="http(s) box: retries per request (blackbox.max_retries)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip unreadable images and report how many, instead of stopping at the first")
    _add_config_args(p)
    p.set_defaults(func=cmd_label)

    p = sub.add_parser("adapt", formatter_class=fmt, help="adapt a student to the target domain",
                       description="Train a lightweight student on unlabelled target images with black-box labels: "
                                   "CoRTe (corte), STvM (stvm), both (corte_metric), or a baseline (distill, "
                                   "threshold_st, oracle). Checkpoints, TensorBoard and metrics.jsonl go to --out.")
    p.add_argument("--out", required=True, type=as_path, help="run directory, local or s3:// / gs:// URI")
    p.add_argument("--method", default=None, help="corte, stvm, corte_metric, distill, threshold_st or oracle")
    p.add_argument("--engine", choices=("local", "ray"), default=None,
                   help="scaling.engine: ray (Ray Train workers, the default) or local (one process, no Ray)")
    p.add_argument("--dataset", choices=DATASET_CHOICES, default=None, help="target dataset format (data.dataset)")
    p.add_argument("--root", default=None, help="target dataset root (data.root)")
    p.add_argument("--blackbox", default=None, help="black box to label with first (blackbox.spec)")
    p.add_argument("--label-store", default=None, help="an existing label store (blackbox.label_store)")
    p.add_argument("--student", default=None, help="student architecture (model.student)")
    p.add_argument("--resize", type=_size, default=None, help="resize images to HxW (data.resize)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N (train.device)")
    p.add_argument("--source-checkpoint", default=None, metavar="CKPT",
                   help="white-box source model to start from (stvm: required; sets model.weights and, unless "
                        "--student is given, model.student to the checkpoint's architecture)")
    p.add_argument("--rounds", type=int, default=None, metavar="R",
                   help="train.rounds: self-training rounds (box-label methods). Each round but the last ends by "
                        "relabelling the target images with its student; the next round continues that student on "
                        "those labels at train.round_lr_scale x lr for train.round_iterations steps (default: a "
                        "whole schedule; see docs/methods.md for the measured gains and costs). Rounds 1..R-1 live "
                        "in OUT/rounds, the last in OUT")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    _add_config_args(p)
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser("export", formatter_class=fmt, help="export a checkpoint's student to TorchScript or ONNX",
                       description="Export for deployment and check parity with PyTorch (max abs diff <= 1e-4).")
    p.add_argument("checkpoint", type=as_path, help="checkpoint.pt (or its directory)")
    p.add_argument("--format", choices=("torchscript", "onnx"), default="torchscript", help="export format")
    p.add_argument("--out", required=True, type=Path, help="output model file")
    p.add_argument("--size", type=_size, default=None, help="example input HxW for tracing (default: the crop size)")
    p.add_argument("--teacher", action="store_true", help="export the EMA teacher instead of the student")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("predict", formatter_class=fmt, help="write prediction PNGs of a checkpoint",
                       description="One train-id PNG per image, named like the image, ready for `corte-ray evaluate`.")
    p.add_argument("checkpoint", type=as_path, help="checkpoint.pt (or its directory)")
    _add_dataset_args(p)
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--resize", type=_size, default=None, help="predict at HxW (default: the run's data.resize)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--teacher", action="store_true", help="predict with the EMA teacher instead of the student")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("serve-blackbox", formatter_class=fmt, help="serve a model file as an HTTP black box",
                       description="Serve a TorchScript/ONNX model file over the corte-ray HTTP wire format "
                                   "(GET /v1/info, POST /v1/segment; see corte_ray/blackbox/http.py) for "
                                   "--blackbox http://HOST:PORT. Listens on loopback unless --host says otherwise. "
                                   "--error-rate, --latency and --hard-labels-only simulate a flaky or restricted "
                                   "vendor. Ctrl-C or SIGTERM stops it, with a final line of stats.")
    p.add_argument("model_file", type=Path, help="TorchScript (.pt) or ONNX (.onnx) model file")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=0, help="port; 0 picks a free one (the URL is printed)")
    p.add_argument("--token-env", default=None,
                   help="name of an environment variable holding a token that clients must send as "
                        "'Authorization: Bearer TOKEN' (default: unset, no token is asked for)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--hard-labels-only", action="store_true", help="answer hard label maps only, whatever is asked")
    p.add_argument("--max-pixels", type=int, default=2048 * 2048,
                   help="largest image answered (width x height); larger ones get 413 before decoding")
    p.add_argument("--max-body-mb", type=int, default=32, help="largest request body in MiB (413 beyond)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a client has to send its whole request body (408 after)")
    p.add_argument("--queue-timeout", type=float, default=30.0,
                   help="seconds a request waits for the model before a 503 with Retry-After")
    p.add_argument("--max-connections", type=int, default=64, help="open connections at once (503 beyond)")
    p.add_argument("--error-rate", type=float, default=0.0,
                   help="testing: fraction of /v1/segment requests that fail: 503, 500, a hang or a dropped "
                        "connection (serves through corte_ray.blackbox.faults)")
    p.add_argument("--latency", type=float, default=0.0, help="testing: seconds added to every request")
    p.add_argument("--fault-sleep", type=float, default=5.0,
                   help="seconds an injected hang lasts (keep it above the client's timeout)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fault injection")
    p.set_defaults(func=cmd_serve_blackbox)

    p = sub.add_parser("models", formatter_class=fmt, help="list students and source models with parameters and MACs")
    p.add_argument("--size", type=_size, default=(512, 1024), help="input HxW for the MAC count")
    p.set_defaults(func=cmd_models)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(-1 if args.quiet else args.verbose)
    try:
        return int(args.func(args) or 0)
    except CorteError as exc:
        print(f"corte-ray {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"corte-ray {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
