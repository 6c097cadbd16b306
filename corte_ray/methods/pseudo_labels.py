"""Black-box pseudo-labels: relative confidence, per-class thresholds and R2CP (METHODS.md 1.1).

Also the single global confidence threshold of the `threshold_st` baseline (METHODS.md 3), so the
two labelling rules sit side by side. Pure tensor code: no Ray, no I/O; the labelling job stores
`ClassConfidenceStats.to_dict()` as JSON beside the labels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..data.labels import IGNORE as IGNORE_INDEX  # noqa: E402 - the one ignore index (255)


def per_class_sum_count(values: Tensor, classes: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-class sum of `values` and pixel count over the pixels labelled `classes` (same shape).

    Both results are float64 of shape (num_classes,) on the input's device: float64 because the
    labelling job sums hundreds of millions of confidences, where float32 loses digits.
    `index_add_` rather than `bincount(weights=...)`: it has a deterministic CUDA kernel, so this
    works under `torch.use_deterministic_algorithms(True)`.
    """
    if values.shape != classes.shape:
        raise ValueError(f"values {tuple(values.shape)} and classes {tuple(classes.shape)} differ in shape")
    index = classes.reshape(-1).long()
    sums = torch.zeros(num_classes, dtype=torch.float64, device=values.device)
    sums.index_add_(0, index, values.reshape(-1).to(torch.float64))
    counts = torch.zeros(num_classes, dtype=torch.float64, device=values.device)
    counts.index_add_(0, index, torch.ones_like(index, dtype=torch.float64))
    return sums, counts


def relative_confidence(probs: Tensor) -> tuple[Tensor, Tensor]:
    """rc = p(1) - p(2) and the top-1 class from dense probabilities (B, C, H, W).

    Returns rc (B, H, W) in the probabilities' dtype and top1 (B, H, W) long.
    """
    if probs.ndim != 4 or probs.shape[1] < 2:
        raise ValueError(f"probs must be (B, C, H, W) with C >= 2, got {tuple(probs.shape)}")
    top2 = probs.topk(2, dim=1)
    rc = top2.values[:, 0] - top2.values[:, 1]
    return rc, top2.indices[:, 0]


def relative_confidence_topk(topk_probs: Tensor) -> Tensor:
    """rc = p(1) - p(2) from a top-k box answer (B, k, H, W), k >= 2, sorted in descending order."""
    if topk_probs.ndim != 4 or topk_probs.shape[1] < 2:
        raise ValueError(f"topk_probs must be (B, k, H, W) with k >= 2, got {tuple(topk_probs.shape)}")
    return topk_probs[:, 0] - topk_probs[:, 1]


class ClassConfidenceStats:
    """Sum and count of rc per predicted class: the statistics behind the R2CP thresholds.

    Mergeable because the labelling job runs in shards and on several actors; the thresholds
    must equal those computed over the whole target training set in one pass. Kept on the CPU
    (C numbers), whatever device the label maps are on.
    """

    def __init__(self, num_classes: int) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.sums = torch.zeros(num_classes, dtype=torch.float64)
        self.counts = torch.zeros(num_classes, dtype=torch.int64)

    def update(self, rc: Tensor, top1: Tensor, valid: Tensor | None = None) -> None:
        """Add the pixels of a batch; `valid` (bool, same shape) drops pixels such as padding."""
        if valid is not None:
            if valid.shape != rc.shape:
                raise ValueError(f"valid {tuple(valid.shape)} and rc {tuple(rc.shape)} differ in shape")
            rc, top1 = rc[valid], top1[valid]
        sums, counts = per_class_sum_count(rc, top1, self.num_classes)
        # Counts come back as float64, exact up to 2**53 pixels per batch.
        self.sums += sums.cpu()
        self.counts += counts.cpu().to(torch.int64)

    def merge(self, other: ClassConfidenceStats) -> ClassConfidenceStats:
        """A new accumulator holding both; neither input changes."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge stats of {self.num_classes} and {other.num_classes} classes")
        merged = ClassConfidenceStats(self.num_classes)
        merged.sums = self.sums + other.sums
        merged.counts = self.counts + other.counts
        return merged

    def mean(self) -> Tensor:
        """Mean rc per class (float64), nan for classes never predicted."""
        mean = self.sums / self.counts.clamp(min=1).to(torch.float64)
        return torch.where(self.counts > 0, mean, torch.full_like(mean, float("nan")))

    def thresholds(self, alpha: float = 1.0) -> Tensor:
        """tau_c = alpha * mean_c (float64); a class never predicted gets 1.0, so nothing of it is kept."""
        return thresholds_from_stats(self.sums, self.counts, alpha)

    def to_dict(self) -> dict[str, Any]:
        # Python floats round-trip float64 exactly through JSON.
        return {"num_classes": self.num_classes, "sums": self.sums.tolist(), "counts": self.counts.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClassConfidenceStats:
        stats = cls(int(d["num_classes"]))
        if len(d["sums"]) != stats.num_classes or len(d["counts"]) != stats.num_classes:
            raise ValueError(f"stats for {stats.num_classes} classes must hold {stats.num_classes} sums and counts")
        stats.sums = torch.tensor(d["sums"], dtype=torch.float64)
        stats.counts = torch.tensor(d["counts"], dtype=torch.int64)
        return stats


def thresholds_from_stats(sums, counts, alpha: float = 1.0):
    """The R2CP threshold rule, in one place: tau_c = alpha * sum_c / count_c, and 1.0 for a class never
    predicted (count 0), so nothing of it is kept. Takes and returns numpy arrays or tensors (float64).

    Used by the labelling job (thresholds.json), the label store and the methods (the box thresholds)."""
    if torch.is_tensor(sums):
        counts = torch.as_tensor(counts, device=sums.device)
        mean = sums.to(torch.float64) / counts.clamp(min=1).to(torch.float64)
        return torch.where(counts > 0, alpha * mean, torch.ones_like(mean))
    sums, counts = np.asarray(sums, dtype=np.float64), np.asarray(counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, alpha * sums / np.maximum(counts, 1), 1.0)


def thresholds_from_means(means: Tensor, alpha: float = 1.0, floor: float = 0.0) -> Tensor:
    """The same rule from per-class means (nan = never predicted), as the label store gives them; `floor`
    (corte.rc_floor) is an absolute bar under the relative ones, tau_c = max(alpha * mean_c, floor)."""
    return torch.where(torch.isnan(means), torch.ones_like(means), (alpha * means).clamp(min=floor))


def class_thresholds(rc: Tensor, top1: Tensor, num_classes: int, alpha: float = 1.0) -> Tensor:
    """tau_c = alpha * mean{rc : top1 = c} in one call (float64, (num_classes,)); unseen classes -> 1."""
    stats = ClassConfidenceStats(num_classes)
    stats.update(rc, top1)
    return stats.thresholds(alpha)


def r2cp_labels(top1: Tensor, rc: Tensor, thresholds: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """y_B = top1 where rc >= tau_{top1}, else ignore_index (dtype of top1).

    Compared in float64 so that a pixel whose rc equals its class mean exactly is kept. Pixels whose top1
    is already ignore_index (padding from the geometric augmentation, no answer from the box) stay ignored.
    """
    known = (top1 >= 0) & (top1 < thresholds.numel())
    index = torch.where(known, top1.long(), torch.zeros_like(top1, dtype=torch.long))
    tau = thresholds.to(device=rc.device, dtype=torch.float64)[index]
    keep = known & (rc.to(torch.float64) >= tau)
    return torch.where(keep, top1, torch.full_like(top1, ignore_index))


def confidence_threshold_labels(
    probs_top1: Tensor, top1: Tensor, threshold: float = 0.9, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """The `threshold_st` baseline: top1 where p(1) >= threshold (one global threshold), else ignore_index."""
    return torch.where(probs_top1 >= threshold, top1, torch.full_like(top1, ignore_index))
