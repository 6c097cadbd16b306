"""Typed configuration: dataclasses validated on construction, loaded from YAML plus `key=value` overrides.

Every knob of METHODS.md is a field here with the default given there, under the section name METHODS.md
uses (`corte.rc_scale`, `ema.momentum`, `stvm.metric_weight`, `threshold_st.threshold`), so a Tune search space
and a command-line override name the same key. Unknown keys fail with their dotted name (and a suggestion),
bad values fail naming the key and the allowed range. The resolved config is saved beside every run and
inside every checkpoint (`to_dict` / `from_dict` round-trip exactly).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from .errors import ConfigError

METHOD_NAMES = ("corte", "stvm", "corte_metric", "distill", "threshold_st", "oracle")


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {message}")


def _in_range(value: float, key: str, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> None:
    ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    lb, rb = ("(" if lo_open else "["), (")" if hi_open else "]")
    _check(ok, key, f"must be in {lb}{lo}, {hi}{rb}, got {value}")


@dataclass
class DataConfig:
    dataset: str = "synth"                         # format of `root`: cityscapes, gta5, synthia, nthu, folder, synth
    root: str = ""                                 # dataset root (local path, or s3:// / gs:// for synth, cityscapes, gta5)
    train_split: str = "train"                     # unlabelled target images to adapt on
    val_split: str = "val"                         # labelled target split for evaluation ("" = none)
    city: str | None = None                        # nthu only
    labels_dir: str | None = None                  # folder only
    label_space: str | None = None                 # folder only: YAML label space
    resize: tuple[int, int] | None = None          # resize every image to HxW first (e.g. Cityscapes 1024x2048 -> 512x1024)
    crop_size: tuple[int, int] = (128, 256)        # training crop HxW (weak/strong views)
    batch_size: int = 8                            # per worker
    loader_workers: int = 0                        # torch DataLoader worker processes in the local engine
    val_max_images: int | None = None              # evaluate on the first N val images only (quick runs)
    cache_images: bool = False                     # keep decoded training images (and their labels) in memory:
                                                   # small datasets and slow disks; the local engine only

    def validate(self, p: str = "data") -> None:
        _check(self.dataset in ("cityscapes", "gta5", "synthia", "nthu", "folder", "synth"), f"{p}.dataset",
               f"unknown dataset format {self.dataset!r}")
        _check(self.batch_size >= 1, f"{p}.batch_size", f"must be >= 1, got {self.batch_size}")
        _check(self.loader_workers >= 0, f"{p}.loader_workers", "must be >= 0")
        for key, size in (("crop_size", self.crop_size), ("resize", self.resize)):
            if size is not None:
                _check(len(size) == 2 and min(size) >= 16, f"{p}.{key}", f"must be [H, W] with H, W >= 16, got {size}")


@dataclass
class ModelConfig:
    student: str = "mobilenetv3_lraspp"            # a registered student (corte-ray models lists them)
    num_classes: int = 19                          # Cityscapes train ids
    pretrained: bool = False                       # ImageNet weights through timm (downloads; off for offline use)
    weights: str | None = None                     # initial student weights (a checkpoint or state dict file; path or URI)

    def validate(self, p: str = "model") -> None:
        _check(2 <= self.num_classes <= 254, f"{p}.num_classes", f"must be in [2, 254], got {self.num_classes}")


@dataclass
class BlackBoxConfig:
    spec: str = ""                                 # file:PATH (TorchScript/ONNX) or http(s)://... endpoint
    answer: Literal["probs", "topk", "hard"] = "probs"  # what the box returns (restricts a local box, to simulate a vendor)
    topk: int = 2                                  # k for answer=topk
    batch_size: int = 8                            # images per query
    label_store: str | None = None                 # a store written by `corte-ray label`, path or URI (else label now)
    # http(s) boxes only:
    token_env: str | None = "CORTE_BLACKBOX_TOKEN"  # environment variable holding the bearer token (null: none)
    timeout: float = 30.0                          # seconds per request before it is retried
    max_retries: int = 8                           # retries per request (timeouts, dropped connections, 408/429/5xx)
    allow_http: bool = False                       # allow plain http to a host that is not loopback (unencrypted)

    def validate(self, p: str = "blackbox") -> None:
        _check(self.topk >= 2, f"{p}.topk", f"must be >= 2 (relative confidence needs two classes), got {self.topk}")
        _check(self.batch_size >= 1, f"{p}.batch_size", "must be >= 1")
        _in_range(self.timeout, f"{p}.timeout", 0.0, 3600.0, lo_open=True)
        _check(self.max_retries >= 0, f"{p}.max_retries", f"must be >= 0, got {self.max_retries}")

    def remote_options(self) -> dict:
        """The options of an http(s) box (blackbox.protocol.REMOTE_OPTIONS), for open_blackbox(**...)."""
        return {"token_env": self.token_env, "timeout": self.timeout, "max_retries": self.max_retries,
                "allow_http": self.allow_http}


@dataclass
class CorteConfig:
    rc_scale: float = 1.0                          # alpha: tau_c = alpha * mean relative confidence of class c (METHODS 1.1)
    rc_floor: float = 0.0                          # tau_c = max(alpha * mean rc_c, rc_floor) for every class the box
                                                   # predicts: an absolute bar under the relative one (0 = none)
    teacher_scale: float = 1.0                     # beta for teacher overrides/fills (1.2)
    hard_override_scale: float = 1.5               # beta_h for hard-label boxes (1.2)
    override_scale: float | None = None            # beta of overrides of kept box labels (None: teacher_scale);
                                                   # an override also needs rc_T > rc_B
    refine_start: float = 0.25                     # fraction of the schedule before teacher refinement starts
    warmup: float = 0.10                           # fraction of the schedule on y_B only, no mixing
    warmup_labels: Literal["r2cp", "raw"] = "r2cp"  # warm-up on the R2CP labels, or on the box's raw top-1 (every pixel)
    mix_mask: Literal["label", "box"] = "label"    # ClassMix's classes drawn from the training label (ignored
                                                   # pixels never pasted) or from the box's dense top-1 (whole regions)
    weak_weight: float = 1.0                       # lambda_w of the weak-view CE
    strong_rampup: float = 0.0                     # fraction of the schedule over which the strong-view CE's weight
                                                   # ramps up, exp(-5 (1 - t/T)^2) (Mean Teacher's ramp); 0 = none
    mix: bool = True                               # ClassMix the strong view (false: the ablation without mixing)
    fill: Literal["confident", "agree"] = "confident"  # teacher fills of R2CP-ignored pixels: where it is
                                                   # confident, or where it is confident and agrees with the box's top-1
    agree_power: float = 0.0                       # k: after warm-up each labelled pixel's CE weight is multiplied by
                                                   # p_T(y)^k, the teacher's probability of the training label (0 = off)
    agree_norm: Literal["class", "pixel"] = "class"  # those weights divided by their class mean in the batch, or raw
    contradicted: Literal["keep", "ignore"] = "keep"  # a kept box label the teacher contradicts above the override
                                                   # bar without an override (rc_T <= rc_B): kept, or ignored
    set_weight: float = 0.0                        # weight of the top-2 set loss -log(p_a + p_b) on the pixels the
                                                   # label leaves ignored, {a, b} = the box's two first classes;
                                                   # measured: -0.9 mIoU over 3 seeds at 0.5 (docs/methods.md)

    def validate(self, p: str = "corte") -> None:
        _in_range(self.rc_scale, f"{p}.rc_scale", 0.0, 5.0)
        _in_range(self.rc_floor, f"{p}.rc_floor", 0.0, 1.0)
        _in_range(self.teacher_scale, f"{p}.teacher_scale", 0.0, 5.0)
        _in_range(self.hard_override_scale, f"{p}.hard_override_scale", 0.0, 10.0)
        if self.override_scale is not None:
            _in_range(self.override_scale, f"{p}.override_scale", 0.0, 5.0)
        _in_range(self.refine_start, f"{p}.refine_start", 0.0, 1.0)
        _in_range(self.warmup, f"{p}.warmup", 0.0, 1.0)
        _in_range(self.weak_weight, f"{p}.weak_weight", 0.0, 100.0)
        _in_range(self.strong_rampup, f"{p}.strong_rampup", 0.0, 1.0)
        _in_range(self.agree_power, f"{p}.agree_power", 0.0, 10.0)
        _in_range(self.set_weight, f"{p}.set_weight", 0.0, 100.0)


@dataclass
class AugmentConfig:
    """The strong (photometric) view of consistent training, on top of the weak view (METHODS 1.3)."""

    jitter: float = 0.4                            # brightness, contrast, saturation factors uniform in [1-x, 1+x]
    hue: float = 0.1                               # hue shift uniform in [-hue, hue] of the colour wheel
    jitter_p: float = 1.0                          # probability of the colour jitter, per image
    blur_p: float = 0.5                            # probability of a Gaussian blur, per image
    blur_sigma: tuple[float, float] = (0.1, 2.0)   # its sigma, uniform, in pixels of the training crop
    grayscale_p: float = 0.2                       # probability of grayscale, per image

    def validate(self, p: str = "augment") -> None:
        _in_range(self.jitter, f"{p}.jitter", 0.0, 1.0)
        _in_range(self.hue, f"{p}.hue", 0.0, 0.5)
        for key in ("jitter_p", "blur_p", "grayscale_p"):
            _in_range(getattr(self, key), f"{p}.{key}", 0.0, 1.0)
        lo, hi = self.blur_sigma
        _check(0.0 < lo <= hi <= 10.0, f"{p}.blur_sigma", f"must be [lo, hi] with 0 < lo <= hi <= 10, got {list(self.blur_sigma)}")


@dataclass
class EMAConfig:
    momentum: float = 0.999                        # teacher <- m teacher + (1 - m) student, every optimiser step
    threshold_momentum: float = 0.99               # running teacher class thresholds tau^T_c
    # How the teacher starts (docs/methods.md): ramp = m_t = min(m, 1 - 1/(t+1)) from step 0 (a running average
    # of the student from the first step); copy = a copy of the student at the end of the CoRTe warm-up, then
    # constant m; init = a copy of the initial student and constant m from step 0 (kept for the measurement
    # that rules it out: the teacher is still mostly random weights when refinement starts).
    start: Literal["ramp", "copy", "init"] = "ramp"

    def validate(self, p: str = "ema") -> None:
        _in_range(self.momentum, f"{p}.momentum", 0.0, 1.0, hi_open=True)
        _in_range(self.threshold_momentum, f"{p}.threshold_momentum", 0.0, 1.0, hi_open=True)


@dataclass
class STvMConfig:
    metric_pixels: int = 4096                      # pixels sampled (class-balanced) for the Proxy-Anchor loss per batch
    metric_lr: float = 1e-3                        # AdamW lr of the metric head and proxies
    temperature_scale: float = 16.0                # s in r = softmax(s cos(e, w))[y]
    gamma: float = 1.0                             # reliability sharpening r <- r^gamma
    mocm_power: float = 2.0                        # kappa: MOCM class sampling prob ~ mean reliability^kappa
    metric_weight: float = 1.0                     # lambda_metric
    proxy_alpha: float = 32.0                      # Proxy-Anchor scale
    proxy_margin: float = 0.1                      # Proxy-Anchor margin delta
    embed_dim: int = 128
    metric_weighting: bool = True                  # weight each pixel's CE by its reliability (false: uniform, the ablation)
    mocm: bool = True                              # classes to paste chosen by reliability (false: plain ClassMix)
    reliability_norm: Literal["pixel", "class"] = "class"  # CE weights: reliability divided by its class mean
                                                   # in the batch (measured better), or per pixel as in the paper

    def validate(self, p: str = "stvm") -> None:
        _check(self.metric_pixels >= 16, f"{p}.metric_pixels", "must be >= 16")
        _in_range(self.metric_lr, f"{p}.metric_lr", 0.0, 1.0, lo_open=True)
        _in_range(self.temperature_scale, f"{p}.temperature_scale", 0.0, 1000.0, lo_open=True)
        _in_range(self.gamma, f"{p}.gamma", 0.0, 20.0, lo_open=True)
        _in_range(self.mocm_power, f"{p}.mocm_power", 0.0, 20.0)
        _in_range(self.metric_weight, f"{p}.metric_weight", 0.0, 100.0)


@dataclass
class ThresholdSTConfig:
    threshold: float = 0.9                         # global p(1) threshold of classic self-training

    def validate(self, p: str = "threshold_st") -> None:
        _in_range(self.threshold, f"{p}.threshold", 0.0, 1.0)


@dataclass
class TrainConfig:
    iterations: int = 4000                         # optimiser steps in total
    lr: float = 1e-3                               # AdamW, poly decay (power 0.9) after a linear warm-up
    lr_warmup: int = 100                           # linear lr warm-up steps
    weight_decay: float = 0.01
    class_balance: bool = False                    # supervised CE (oracle, source model) weighted per class by
                                                   # 1/sqrt(pixel frequency in the batch), mean weight 1
    seed: int = 0
    device: str = "auto"                           # auto | cpu | cuda | cuda:N (local engine)
    amp: bool = True                               # bf16 autocast on CUDA (ignored on CPU)
    channels_last: bool = True                     # NHWC memory format on CUDA
    eval_every: int = 500                          # evaluate on the val split every N steps (0 = only at the end)
    checkpoint_every: int = 500                    # write a checkpoint every N steps (and at the end)
    keep_checkpoints: int = 2                      # newest checkpoints kept (plus the best by val mIoU)
    log_every: int = 20                            # TensorBoard scalars every N steps
    cpu_threads: int = 0                           # torch intra-op threads on CPU (0 = torch's default); set it
                                                   # below the core count when other processes share the CPUs
    progress_every_s: float = 10.0                 # a progress line (and RUN/progress.json) every N seconds (0 = off)
    label_diagnostics: bool = True                 # where the training images have ground truth, log the accuracy
                                                   # of the pseudo-labels (kept / filled / overridden) to TensorBoard
    score_images: int = 0                          # at every evaluation, the unsupervised selection scores on this
                                                   # many target TRAIN images (no labels read; tune/score.py,
                                                   # docs/tuning.md); 0 = off (`corte-ray tune` turns it on)
    rounds: int = 1                                # self-training rounds of a method trained on box labels: after
                                                   # each round but the last, its final student relabels the target
                                                   # training images as the next round's box (docs/methods.md,
                                                   # "Self-training rounds")
    round_start: Literal["warm", "fresh"] = "warm"  # a later round's student (and teacher) starts from the previous
                                                   # round's final student (warm), or from scratch like round 1
    round_lr_scale: float = 0.2                    # a later round's lr = this x lr (warm: the full lr undoes the
                                                   # trained student; measured 0.2 against 1.0)
    round_iterations: int = 0                      # a later round's steps (0 = iterations)

    def validate(self, p: str = "train") -> None:
        _check(self.iterations >= 1, f"{p}.iterations", f"must be >= 1, got {self.iterations}")
        _in_range(self.lr, f"{p}.lr", 0.0, 10.0, lo_open=True)
        _check(self.lr_warmup >= 0, f"{p}.lr_warmup", "must be >= 0")
        _check(self.eval_every >= 0 and self.checkpoint_every >= 0, f"{p}.eval_every", "must be >= 0")
        _check(self.keep_checkpoints >= 1, f"{p}.keep_checkpoints", "must be >= 1")
        _check(self.log_every >= 1, f"{p}.log_every", "must be >= 1")
        _check(self.cpu_threads >= 0, f"{p}.cpu_threads", "must be >= 0 (0 = torch's default)")
        _check(self.score_images >= 0, f"{p}.score_images", f"must be >= 0 (0 = off), got {self.score_images}")
        _check(self.rounds >= 1, f"{p}.rounds", f"must be >= 1, got {self.rounds}")
        _in_range(self.round_lr_scale, f"{p}.round_lr_scale", 0.0, 10.0, lo_open=True)
        _check(self.round_iterations >= 0, f"{p}.round_iterations", f"must be >= 0 (0 = iterations), got "
               f"{self.round_iterations}")
        _check(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), f"{p}.device",
               f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass
class ScalingConfig:
    engine: Literal["local", "ray"] = "ray"        # ray: Ray Train TorchTrainer (+ Ray Data); local: one process
    num_workers: int = 1                           # Ray Train workers (one student replica each)
    use_gpu: bool = False                          # one GPU per worker
    cpus_per_worker: float = 1.0                   # fractional values leave CPUs to Ray Data
    max_failures: int = 0                          # worker-group restarts from the last checkpoint
    data_cpus: float = 0.5                         # CPUs of each Ray Data actor that decodes training images
    data_workers: int = 2                          # decode actors per Train worker: the pool grows 1 -> this
    wait_for_gpus: bool = False                    # an autoscaling cluster: resources missing now (GPUs, CPUs,
                                                   # custom ones) are waited for, not refused at once
    resources_per_worker: dict[str, float] = field(default_factory=dict)  # custom Ray resources per Train worker,
                                                   # e.g. {accelerator_type:A10G: 0.01} (CPU/GPU: the keys above)

    def validate(self, p: str = "scaling") -> None:
        _check(self.num_workers >= 1, f"{p}.num_workers", "must be >= 1")
        _check(self.cpus_per_worker > 0, f"{p}.cpus_per_worker", "must be > 0")
        _check(self.data_cpus > 0, f"{p}.data_cpus", "must be > 0")
        _check(self.data_workers >= 1, f"{p}.data_workers", "must be >= 1")
        _check(self.max_failures >= -1, f"{p}.max_failures", "must be >= -1 (-1 = retry forever)")
        for name, amount in self.resources_per_worker.items():
            _check(name not in ("CPU", "GPU"), f"{p}.resources_per_worker.{name}",
                   "set CPUs with scaling.cpus_per_worker and GPUs with scaling.use_gpu")
            _check(amount > 0, f"{p}.resources_per_worker.{name}", f"must be > 0, got {amount}")


@dataclass
class Config:
    method: str = "corte"                          # corte | stvm | corte_metric | distill | threshold_st | oracle
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    blackbox: BlackBoxConfig = field(default_factory=BlackBoxConfig)
    corte: CorteConfig = field(default_factory=CorteConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    stvm: STvMConfig = field(default_factory=STvMConfig)
    threshold_st: ThresholdSTConfig = field(default_factory=ThresholdSTConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)

    def validate(self) -> "Config":
        _check(self.method in METHOD_NAMES, "method", f"unknown method {self.method!r}; one of {list(METHOD_NAMES)}")
        for f in fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                section.validate(f.name)
        return self

    def to_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ------------------------------------------------------------------------------------------- loading
def _plain(obj: Any) -> Any:
    """Tuples -> lists, recursively, so the dict is YAML/JSON friendly and round-trips through from_dict."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        _check(value in args, key, f"must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        _check(isinstance(value, (list, tuple)), key, f"must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        _check(len(value) == len(args), key, f"must have {len(args)} items, got {list(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        _check(isinstance(value, Mapping), key, f"must be a mapping, got {value!r}")
        return {_coerce(k, args[0], key): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        _check(isinstance(value, (list, tuple)), key, f"must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        _check(isinstance(value, bool), key, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 2e-3 (no dot) as a string; users write it anyway
            try:
                value = float(value)
            except ValueError:
                pass
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"must be a number, got {value!r}")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), key, f"must be a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, Mapping), key, f"must be a mapping, got {value!r}")
        return _build(tp, value, key)
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix + '.' if prefix else ''}{close[0]}?)" if close else ""
            raise ConfigError(f"{dotted}: unknown config key{hint}")
        kwargs[key] = _coerce(value, hints[key], dotted)
    return cls(**kwargs)


def from_dict(data: Mapping[str, Any]) -> Config:
    return _build(Config, data).validate()


def _deep_update(base: dict, update: Mapping) -> dict:
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v
    return base


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value); the value is parsed as YAML (numbers, booleans, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. corte.rc_scale=0.8)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def shipped_config_path(name: str) -> Path:
    """Path of a config shipped inside the package (corte_ray/configs/NAME.yaml)."""
    return Path(str(resources.files("corte_ray") / "configs" / f"{name}.yaml"))


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                base: Mapping[str, Any] | None = None) -> Config:
    """Defaults <- `base` <- YAML file <- `key=value` overrides, validated.

    `path` may name a shipped config ("demo") as well as a file.
    """
    data: dict[str, Any] = _plain(dict(base or {}))
    if path is not None:
        from .storage import as_path

        p = as_path(path)   # a local file or an object (a run's config.yaml on s3:// or gs://)
        if not p.exists() and not p.suffix and shipped_config_path(str(path)).exists():
            p = shipped_config_path(str(path))
        try:
            doc = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {p} does not exist") from None
        except IsADirectoryError:
            raise ConfigError(f"config file {p} is a directory; give a YAML file") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {p} is not text (not UTF-8); give a YAML file") from None
        except OSError as exc:
            raise ConfigError(f"config file {p} cannot be read ({exc.strerror or type(exc).__name__})") from None
        except yaml.YAMLError as exc:
            # The parser's first line says where; its full report spans lines and quotes the file.
            where = str(exc).splitlines()
            raise ConfigError(f"config file {p} is not valid YAML ({' '.join(w.strip() for w in where[:3])})") \
                from None
        if not isinstance(doc, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        _deep_update(data, doc)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{'.'.join(keys)}: {k} is not a section")
        node[keys[-1]] = value
    return from_dict(data)


def save_config(cfg: Config, path: str | Path) -> Path:
    from .io_utils import write_text_atomic

    return write_text_atomic(path, cfg.to_yaml())
