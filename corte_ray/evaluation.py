"""mIoU evaluation (METHODS.md section 5): one confusion matrix over the whole split, IoU per class, and
the mean over the dataset's evaluation classes.

Everything is in train ids (0..C-1, 255 = ignore). Ground-truth pixels labelled 255 are left out. A
prediction of 255 on a valid pixel means "no class predicted": it is a miss for that pixel's class (a
false negative) and a false positive for no class. A C x C matrix cannot hold such a pixel, so the
evaluation of prediction files uses one more column, C, for them (`no_class_column=True`); the official
Cityscapes script keeps them the same way in its larger label-id matrix. mIoU averages the IoU of the chosen classes that occur in the ground truth or the
predictions (a class absent from both has no IoU), like the official script; classes outside the
chosen set still take part in the matrix, so predicting an unevaluated class is still an error for the
evaluated class under it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data.datasets import Dataset, Sample
from .data.io import read_label_ids
from .data.labels import IGNORE
from .errors import ConfigError, CorteError, InputError
from .log import progress

log = logging.getLogger(__name__)


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int = IGNORE,
                     no_class_column: bool = False) -> np.ndarray:
    """int64 [C, C] pixel counts: rows = ground-truth class, columns = predicted class, via np.bincount.

    Pixels whose ground truth is `ignore_index` are skipped. A valid pixel predicted as `ignore_index`
    ("no class") is a miss for its class; a C x C matrix has no cell for it, so with
    `no_class_column=True` the result is [C, C + 1] and column C counts those pixels. With the default
    (for argmax predictions, which always name a class) such a pixel is a ValueError rather than being
    dropped silently. Any other value outside 0..C-1 is a ValueError.
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {gt.shape}")
    gt = gt.reshape(-1).astype(np.int64)
    pred = pred.reshape(-1).astype(np.int64)
    valid = gt != ignore_index
    gt, pred = gt[valid], pred[valid]
    if gt.size and (gt.min() < 0 or gt.max() >= num_classes):
        raise ValueError(f"ground truth holds values outside 0..{num_classes - 1} and {ignore_index}")
    no_class = pred == ignore_index
    if pred.size and ((pred < 0) | ((pred >= num_classes) & ~no_class)).any():
        raise ValueError(f"prediction holds values outside 0..{num_classes - 1} and {ignore_index}")
    if not no_class_column and no_class.any():
        raise ValueError(f"prediction holds {ignore_index} (no class) on labelled pixels; "
                         "count them with no_class_column=True")
    columns = num_classes + 1 if no_class_column else num_classes
    pred = np.where(no_class, num_classes, pred)
    counts = np.bincount(gt * columns + pred, minlength=num_classes * columns)
    return counts.reshape(num_classes, columns)


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """IoU = TP / (TP + FP + FN) per class, in 0..1; nan for a class absent from ground truth and predictions.

    Takes a [C, C] matrix or a [C, C + 1] one whose last column counts "no class" predictions (misses).
    """
    conf = np.asarray(conf, dtype=np.float64)
    num_classes = conf.shape[0]
    if conf.ndim != 2 or conf.shape[1] not in (num_classes, num_classes + 1):
        raise ValueError(f"confusion matrix must be [C, C] or [C, C + 1], got {conf.shape}")
    tp = np.diag(conf[:, :num_classes])
    gt_total = conf.sum(axis=1)  # includes the "no class" column: those pixels are misses
    pred_total = conf[:, :num_classes].sum(axis=0)
    union = gt_total + pred_total - tp
    iou = np.full(num_classes, np.nan)
    present = union > 0
    iou[present] = tp[present] / union[present]
    return iou


@dataclass
class EvalResult:
    """mIoU and per-class IoU (both 0-100) over one split."""

    miou: float  # mean over the chosen classes that are present; nan if none is
    per_class: dict[str, float | None]  # chosen classes only, in train-id order; None = absent
    num_images: int
    num_skipped: int
    classes: tuple[int, ...]
    confusion: np.ndarray  # int64 [C, C + 1]: confusion_matrix(..., no_class_column=True) summed

    def format_table(self) -> str:
        width = max([len(n) for n in self.per_class] + [len("mIoU")])
        lines = [f"{'class':<{width}}    IoU", "-" * (width + 7)]
        for name, iou in self.per_class.items():
            lines.append(f"{name:<{width}} " + ("absent" if iou is None else f"{iou:6.2f}"))
        lines.append("-" * (width + 7))
        miou = "   n/a" if math.isnan(self.miou) else f"{self.miou:6.2f}"
        skipped = f", {self.num_skipped} skipped" if self.num_skipped else ""
        lines.append(f"{'mIoU':<{width}} {miou}  ({len(self.classes)} classes, {self.num_images} images{skipped})")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "miou": None if math.isnan(self.miou) else float(self.miou),
            "per_class": dict(self.per_class),
            "num_images": self.num_images,
            "num_skipped": self.num_skipped,
            "classes": list(self.per_class),
        }


def result_from_confusion(conf: np.ndarray, classes: tuple[int, ...], class_names: tuple[str, ...],
                          num_images: int, num_skipped: int = 0) -> EvalResult:
    """The EvalResult of an accumulated confusion matrix, averaged over the train ids `classes`."""
    iou = iou_per_class(conf) * 100.0
    chosen = iou[list(classes)]
    miou = float(np.nanmean(chosen)) if not np.isnan(chosen).all() else math.nan
    per_class = {class_names[c]: (None if np.isnan(iou[c]) else float(iou[c])) for c in classes}
    return EvalResult(miou, per_class, num_images, num_skipped, tuple(classes), conf)


def evaluate_predictions(dataset: Dataset, predictions: Path, classes: str | None = None,
                         skip_bad: bool = False) -> EvalResult:
    """mIoU of the prediction PNGs in the flat folder `predictions` against the labels of `dataset`.

    `classes` is a key of the label space's eval sets ("19", "16", "13", "synth"); None = its default.
    Each image's prediction is predictions/{sample.pred_name}, 8-bit train ids (255 = no class).
    A bad image, label or prediction raises InputError naming the file; with `skip_bad` it is
    logged, skipped and counted instead (zero usable images is still an error).
    """
    space = dataset.label_space
    try:
        chosen = space.eval_classes(classes)
    except KeyError:
        raise ConfigError(f"--classes {classes!r}: the {space.name} label space is evaluated on "
                          f"{', '.join(sorted(space.eval_sets))} (default {space.default_eval})") from None
    predictions = Path(predictions)
    if not predictions.is_dir():
        raise InputError(predictions, "predictions folder not found" if not predictions.exists()
                         else "predictions path is not a directory")
    if not any(s.label is not None for s in dataset):
        where = dataset.label_root if dataset.label_root is not None else dataset.root
        raise InputError(where, f"the {dataset.name} {dataset.split!r} split has no label files here; "
                                "evaluation needs labels")
    _check_unique_pred_names(dataset, predictions)

    num_classes = space.num_classes
    conf = np.zeros((num_classes, num_classes + 1), dtype=np.int64)
    used = skipped = 0
    for sample in progress(dataset.samples, desc=f"evaluate {dataset.name}/{dataset.split}",
                           total=len(dataset), unit="img"):
        try:
            conf += _image_confusion(dataset, sample, predictions / sample.pred_name, num_classes)
            used += 1
        except InputError as exc:
            if not skip_bad:
                raise
            skipped += 1
            log.warning("skipped %s", exc)
    if used == 0:
        raise CorteError(f"no usable image: all {skipped} images of {dataset.name} {dataset.split!r} were "
                         "skipped (see the warnings above)")
    if skipped:
        log.warning("skipped %d of %d images (--skip-bad)", skipped, len(dataset))
    return result_from_confusion(conf, chosen, space.class_names, used, skipped)


def _image_confusion(dataset: Dataset, sample: Sample, pred_path: Path, num_classes: int) -> np.ndarray:
    """One image's confusion matrix; InputError naming the file for any bad image, label or prediction."""
    image = dataset.read_image(sample)  # a corrupt image makes its prediction meaningless: check it too
    gt = dataset.read_label(sample, image_size=image.shape[:2])
    if not pred_path.exists():
        raise InputError(pred_path, f"prediction file not found (for image {sample.image})")
    pred = read_label_ids(pred_path, what="prediction")
    if pred.shape != gt.shape:
        raise InputError(pred_path, f"prediction is {pred.shape[0]}x{pred.shape[1]} (HxW) but its label "
                                    f"{sample.label} is {gt.shape[0]}x{gt.shape[1]}")
    bad = (pred < 0) | ((pred >= num_classes) & (pred != IGNORE))
    if bad.any():
        values = np.unique(pred[bad])[:10].tolist()
        raise InputError(pred_path, f"prediction holds value(s) {values}; expected train ids "
                                    f"0..{num_classes - 1} or {IGNORE} (no class)")
    return confusion_matrix(pred, gt, num_classes, no_class_column=True)


def _check_unique_pred_names(dataset: Dataset, predictions: Path) -> None:
    """Predictions live in one flat folder, so two images with one file name cannot both be evaluated."""
    seen: dict[str, Sample] = {}
    for sample in dataset:
        other = seen.setdefault(sample.pred_name, sample)
        if other is not sample:
            raise InputError(predictions / sample.pred_name,
                             f"images {other.image} and {sample.image} share this prediction file name; "
                             "evaluate them separately (e.g. one --city at a time)")
