"""What each CLI sub-command does, as plain functions (the CLI parses arguments; `demo` chains these).

Every function writes into a run directory that the next one reads; nothing lives only in memory, so a killed
command is rerun with `--resume` and continues from its last checkpoint or label part.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import torch

from . import storage
from .config import Config, load_config, save_config
from .errors import ConfigError, InputError

log = logging.getLogger(__name__)


def check_run_inputs(cfg: Config) -> None:
    """Open what a run reads before the run exists: the train and val splits, the label store, the initial
    weights and a local box file. A wrong path fails here, naming it, and leaves no run directory behind."""
    from .data.datasets import open_split
    from .methods.steps import METHODS

    d = cfg.data
    for split in (d.train_split, d.val_split):
        if split:
            open_split(d, split)
    if cfg.model.weights and not storage.as_path(cfg.model.weights).is_file():
        raise InputError(cfg.model.weights, "model.weights: file not found")
    if METHODS.get(cfg.method).needs_box_labels:
        if cfg.blackbox.label_store:
            from .blackbox.store import LabelStore

            LabelStore(cfg.blackbox.label_store)
        elif cfg.blackbox.spec.startswith("file:") and not storage.as_path(cfg.blackbox.spec[5:]).exists():
            raise InputError(cfg.blackbox.spec[5:], "blackbox.spec: model file not found")


def prepare_run_dir(run_dir: str | Path, cfg: Config | None, resume: bool) -> Config:
    """New run: refuse to clobber an existing run, check its inputs, then save the resolved config (from then
    on the directory is a run). Resume: load the saved config. `run_dir` may be an s3:// or gs:// URI."""
    run_dir = storage.as_path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if resume:
        if not cfg_path.exists():
            raise InputError(cfg_path, "cannot resume: no saved config in this run directory")
        return load_config(cfg_path)
    if cfg_path.exists():
        raise InputError(run_dir, "already holds a run; pass --resume to continue it, or choose another --out")
    assert cfg is not None
    check_run_inputs(cfg)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(run_dir, f"cannot create the run directory ({err.strerror or type(err).__name__})") from None
    save_config(cfg, cfg_path)
    return cfg


class _FreshRun:
    """Undo a new run's config.yaml when the command fails on the user's input before its first checkpoint:
    the corrected command then starts afresh instead of being refused ("already holds a run")."""

    def __init__(self, run_dir, resume: bool) -> None:
        from .train.context import CheckpointDir

        self.cfg_path, self.resume = run_dir / "config.yaml", resume
        self.checkpoints = CheckpointDir(run_dir)

    def __enter__(self) -> "_FreshRun":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        from .errors import CorteError

        # A run whose earlier self-training rounds began (RUN/rounds) keeps its config: `--resume` continues them.
        if (exc is not None and isinstance(exc, CorteError) and not self.resume and self.cfg_path.exists()
                and not self.checkpoints.step_dirs() and not (self.cfg_path.parent / "rounds").exists()):
            self.cfg_path.unlink()
            log.info("%s removed: the run failed before its first checkpoint", self.cfg_path)


def open_label_store(cfg: Config, run_dir):
    """The run's label store: the one named in the config, or one labelled now into RUN/labels (once)."""
    from .blackbox.store import LabelStore

    if cfg.blackbox.label_store:
        return LabelStore(cfg.blackbox.label_store)
    if not cfg.blackbox.spec:
        raise ConfigError("blackbox.spec: the method needs black-box labels; set blackbox.spec=file:MODEL "
                          "(or http://...) or blackbox.label_store=STORE")
    store_dir = run_dir / "labels"
    label(cfg, store_dir, engine=cfg.scaling.engine)   # `adapt --engine local` never starts Ray
    return LabelStore(store_dir)


def label(cfg: Config, store_dir: str | Path, overwrite: bool = False, engine: str = "ray", num_actors: int = 1,
          gpus_per_actor: float = 0.0, budget: int | None = None, skip_bad: bool = False) -> dict:
    """Query the black box once for every target training image; write the label store.

    engine "ray": a Ray Data job with an actor pool of box clients; "local": one process, no Ray.
    skip_bad: unreadable images are skipped and counted (doc["run"]["skipped_bad"]) instead of stopping."""
    from .blackbox import open_blackbox
    from .blackbox.store import label_dataset_local
    from .data.datasets import open_split

    if not cfg.blackbox.spec:
        raise ConfigError("blackbox.spec: no black box to label with; pass --blackbox file:MODEL or http(s)://...")
    dataset = open_split(cfg.data, cfg.data.train_split)
    remote = cfg.blackbox.remote_options()
    if engine == "ray":
        from .blackbox.ray_label import label_dataset_ray

        return label_dataset_ray(dataset, cfg.blackbox.spec, store_dir, resize=cfg.data.resize,
                                 answer=cfg.blackbox.answer, topk=cfg.blackbox.topk,
                                 batch_size=cfg.blackbox.batch_size, num_actors=num_actors,
                                 num_gpus_per_actor=gpus_per_actor, overwrite=overwrite, budget=budget,
                                 device=cfg.train.device, threads_per_actor=cfg.train.cpu_threads or None,
                                 box_options=remote, skip_bad=skip_bad)
    if cfg.train.cpu_threads:
        # The box's forward passes run on this process's threads: the same limit as training, for the same
        # reason (more threads than free cores slows everything down).
        torch.set_num_threads(cfg.train.cpu_threads)
    if budget is not None and not cfg.blackbox.spec.lower().startswith(("http://", "https://")):
        raise ConfigError("--budget: a query budget applies to an http(s) box, or to the ray engine")
    box = open_blackbox(cfg.blackbox.spec, answer=cfg.blackbox.answer, topk=cfg.blackbox.topk,
                        device=cfg.train.device, batch_size=cfg.blackbox.batch_size, budget=budget, **remote)
    try:
        t0 = time.perf_counter()
        doc = label_dataset_local(dataset, box, store_dir, resize=cfg.data.resize, batch_size=cfg.blackbox.batch_size,
                                  overwrite=overwrite, k=cfg.blackbox.topk, skip_bad=skip_bad)
        log.info("labelled %d images into %s in %.1fs", doc["num_images"], store_dir, time.perf_counter() - t0)
        return doc
    finally:
        box.close()


def adapt(cfg: Config | None, run_dir, resume: bool = False, hooks=None):
    """Adapt a student on the target domain (any method); returns the loop's TrainResult. `run_dir`: a local
    path or an s3:// / gs:// URI. `hooks`: a train.context.TrainHooks (tests)."""
    from .train.context import LocalContext, resolve_device
    from .train.loop import train
    from .methods.steps import METHODS

    run_dir = storage.as_path(run_dir)
    if cfg is not None and METHODS.get(cfg.method).needs_source_weights and not cfg.model.weights:
        # Before the run directory exists: a refused command leaves nothing behind to block the corrected one.
        raise ConfigError(f"model.weights: method {cfg.method} starts student and teacher from the white-box "
                          f"source model; pass --source-checkpoint CKPT (or model.weights=CKPT)")
    if cfg is not None and cfg.train.rounds > 1 and not METHODS.get(cfg.method).needs_box_labels:
        raise ConfigError(f"train.rounds: method {cfg.method} does not train on black-box labels, so there is "
                          f"nothing to relabel between rounds; rounds apply to distill, threshold_st, corte and "
                          f"corte_metric")
    cfg = prepare_run_dir(run_dir, cfg, resume)
    with _FreshRun(run_dir, resume):
        store = open_label_store(cfg, run_dir) if METHODS.get(cfg.method).needs_box_labels else None
        if cfg.train.rounds > 1:
            # Earlier rounds under RUN/rounds/; the last one trains here, so RUN is the final student's run.
            from .blackbox.store import LabelStore

            cfg = earlier_rounds(cfg, run_dir, store, hooks)
            store = LabelStore(cfg.blackbox.label_store)
        if cfg.scaling.engine == "ray":
            from .train.ray_engine import fit_ray

            return fit_ray(cfg, run_dir, str(store.root) if store is not None else None, hooks=hooks)
        ctx = LocalContext(run_dir, resolve_device(cfg.train.device), cfg.train.keep_checkpoints)
        return train(cfg, ctx, store, hooks=hooks)


def round_config(cfg: Config, r: int, store_root, previous_checkpoint=None) -> Config:
    """The config round `r` (1-based) of a `train.rounds` run trains with: one round on `store_root`; a later round
    warm-starts from `previous_checkpoint` (train.round_start=warm) at train.round_lr_scale x lr for
    train.round_iterations steps."""
    cfg = replace(cfg, blackbox=replace(cfg.blackbox, label_store=str(store_root), spec=""))
    train = replace(cfg.train, rounds=1)
    model = cfg.model
    if r > 1:
        t = cfg.train
        train = replace(train, lr=t.lr * t.round_lr_scale, iterations=t.round_iterations or t.iterations)
        if t.round_start == "warm":
            model = replace(model, weights=str(previous_checkpoint))
    return replace(cfg, train=train, model=model)


def earlier_rounds(cfg: Config, run_dir, store, hooks=None):
    """Rounds 1 .. R-1 of a `train.rounds` = R run; returns the config the last round trains with (in RUN).

    Round r trains a student on store r (the box's own labels for r = 1) in RUN/rounds/r, its final student is
    exported to RUN/rounds/r/student.pt, and that file, queried as a black box, labels the target training images
    into RUN/rounds/labels_{r+1}. Every piece resumes: a round whose last checkpoint exists is not trained again,
    an exported file is reused, and the labelling skips the images already in the store."""
    from .export import export_model
    from .train.context import CheckpointDir

    total = cfg.train.rounds
    store_root, previous = store.root, None
    for r in range(1, total):
        sub = run_dir / "rounds" / str(r)
        round_cfg = round_config(cfg, r, store_root, previous)
        final = CheckpointDir(sub).step_file(round_cfg.train.iterations)
        if (sub / "config.yaml").exists() and final.exists():
            log.info("round %d/%d: already trained (%s)", r, total, sub)
        else:
            log.info("round %d/%d: training on %s", r, total, store_root)
            adapt(round_cfg, sub, resume=(sub / "config.yaml").exists(), hooks=hooks)
        box_file = sub / "student.pt"
        if not box_file.exists():
            model, _ = load_checkpoint_model(final)
            export_model(model, box_file, example_size=_image_size(cfg))
        store_root = run_dir / "rounds" / f"labels_{r + 1}"
        log.info("round %d/%d: the round's student labels the target images into %s", r + 1, total, store_root)
        label(replace(cfg, blackbox=replace(cfg.blackbox, spec=f"file:{box_file}", label_store="")), store_root,
              engine=cfg.scaling.engine)
        previous = final
    log.info("round %d/%d: training on %s", total, total, store_root)
    return round_config(cfg, total, store_root, previous)


def _image_size(cfg: Config) -> tuple[int, int]:
    """(H, W) the box sees: data.resize, or the first target training image's own size."""
    from .data.datasets import open_split

    if cfg.data.resize:
        return tuple(cfg.data.resize)
    dataset = open_split(cfg.data, cfg.data.train_split)
    return tuple(dataset.read_image(dataset.samples[0]).shape[:2])


def _read_checkpoint(path: str | Path) -> tuple[dict, Path]:
    """A checkpoint file (or its directory, e.g. RUN/checkpoints/best), local or on object storage, loaded with
    weights_only=True; InputError naming it otherwise."""
    path = storage.as_path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise InputError(path, "checkpoint not found")
    try:
        state = storage.load_torch(path, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise InputError(path, f"not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise InputError(path, "not a corte-ray checkpoint (not a dict)")
    return state, path


def load_checkpoint_model(path: str | Path, use_teacher: bool = False):
    """(model in eval mode, resolved Config) from a training checkpoint, loaded with weights_only=True."""
    from .config import from_dict
    from .models import build_model

    state, path = _read_checkpoint(path)
    if "config" not in state or "student" not in state:
        raise InputError(path, "not a corte-ray checkpoint (no config/student inside)")
    cfg = from_dict(state["config"])
    model = build_model(cfg.model.student, cfg.model.num_classes)
    key = "teacher" if use_teacher and "teacher" in state else "student"
    sd = state[key]
    if key == "teacher":  # EMATeacher keeps the copy under `module.`
        sd = {k.split("module.", 1)[1] if k.startswith("module.") else k: v for k, v in sd.items()}
    model.load_state_dict(sd)
    return model.eval(), cfg


def checkpoint_arch(path: str | Path) -> str:
    """The architecture name stored in a corte-ray training checkpoint (for `--source-checkpoint`)."""
    state, path = _read_checkpoint(path)
    arch = state.get("arch")
    if not arch:
        raise InputError(path, "names no architecture (not a corte-ray training checkpoint); pass --student ARCH "
                               "and model.weights=FILE instead")
    return str(arch)


def train_source(cfg: Config, run_dir: str | Path, export_path: str | Path, resume: bool = False) -> dict:
    """Supervised training of the (heavy) source model on labelled source data, then export it as the
    black-box model file. The training is the `oracle` method of the same loop, on the source domain."""
    from .export import export_model
    from .train.context import LocalContext, resolve_device
    from .train.loop import train

    run_dir = storage.as_path(run_dir)
    if cfg is not None and cfg.method != "oracle":
        raise ConfigError("method: train-source trains on source labels (method=oracle)")
    cfg = prepare_run_dir(run_dir, cfg, resume)
    ctx = LocalContext(run_dir, resolve_device(cfg.train.device), cfg.train.keep_checkpoints)
    with _FreshRun(run_dir, resume):
        result = train(cfg, ctx, store=None)
    ckpt = ctx.latest_checkpoint()
    model, _ = load_checkpoint_model(ckpt)
    from .data.labels import TRAIN_NAMES

    meta = {"arch": cfg.model.student, "num_classes": cfg.model.num_classes,
            "class_names": list(TRAIN_NAMES[: cfg.model.num_classes]), "trained_on": f"{cfg.data.dataset}:{cfg.data.root}"}
    size = tuple(cfg.data.crop_size)
    export_model(model, export_path, format=_format_of(export_path), example_size=size, meta=meta)
    log.info("exported the source model to %s", export_path)
    return {"step": result.step, "checkpoint": str(ckpt), "model_file": str(export_path)}


def _format_of(path: str | Path) -> str:
    return "onnx" if str(path).endswith(".onnx") else "torchscript"


def predict(model: torch.nn.Module, dataset, out_dir: str | Path, resize: tuple[int, int] | None = None,
            device: str = "auto", max_images: int | None = None) -> int:
    """Write one train-id PNG per image (same file name as the image), predicted at `resize`, saved at the
    image's own size. Returns the number written."""
    from PIL import Image

    from .io_utils import write_atomic
    from .log import progress
    from .train.context import resolve_device
    from .train.loop import predict_train_ids

    dev = resolve_device(device)
    model = model.to(dev).eval()
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file in the way, no permission, a read-only disk
        raise InputError(out_dir, f"cannot write predictions here ({err.strerror or type(err).__name__})") from None
    samples = dataset.samples[:max_images] if max_images else dataset.samples
    for sample in progress(samples, desc="predict", unit="img"):
        pred = predict_train_ids(model, dataset.read_image(sample), dev, resize=resize)
        write_atomic(out_dir / sample.pred_name, lambda tmp, p=pred: Image.fromarray(p).save(tmp, format="PNG"))
    return len(samples)
