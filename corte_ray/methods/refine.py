"""Refinement of the black-box pseudo-labels by the student's EMA teacher (METHODS.md 1.2).

`TeacherThresholds` keeps the running per-class mean of the teacher's relative confidence;
`refine_labels` applies the three rules of 1.2 pixel by pixel and says how many pixels each
rule touched. Pure tensor code: the training loop owns the all-reduce between the two calls.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from corte_ray.methods.pseudo_labels import IGNORE_INDEX, per_class_sum_count


class TeacherThresholds:
    """tau^T_c: EMA over batches of the mean rc of the pixels the teacher predicts as class c.

    A class seen for the first time takes its batch mean directly: decaying from 0 would leave the
    threshold near 0 for hundreds of batches and let the teacher fill pixels it is unsure of.
    A class never seen is +inf: the teacher has shown no confidence in it, so it overrides nothing.
    Update in two calls, `batch_sums` then `update`, so that the loop can all-reduce the sums and
    counts in between and every worker keeps identical thresholds.
    """

    def __init__(self, num_classes: int, momentum: float = 0.99, device: torch.device | str | None = None) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.num_classes = num_classes
        self.momentum = momentum
        self._mean = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self._seen = torch.zeros(num_classes, dtype=torch.bool, device=device)

    @staticmethod
    def batch_sums(rc: Tensor, pred: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
        """Per-class sum of rc and pixel count (both float64, (num_classes,)) of one batch."""
        return per_class_sum_count(rc.detach(), pred, num_classes)

    def update(self, sums: Tensor, counts: Tensor) -> None:
        """Fold one (all-reduced) batch in; classes absent from the batch keep their threshold."""
        sums = sums.to(device=self._mean.device, dtype=torch.float64)
        counts = counts.to(device=self._mean.device, dtype=torch.float64)
        present = counts > 0
        batch_mean = sums / counts.clamp(min=1.0)
        ema = self.momentum * self._mean + (1.0 - self.momentum) * batch_mean
        # torch.where, not `if`: no CPU-GPU sync in the training step.
        updated = torch.where(self._seen, ema, batch_mean)
        self._mean = torch.where(present, updated, self._mean)
        self._seen = self._seen | present

    @property
    def value(self) -> Tensor:
        """(C,) float64 thresholds; +inf for classes never seen."""
        return torch.where(self._seen, self._mean, torch.full_like(self._mean, float("inf")))

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "momentum": self.momentum,
            "mean": self._mean.clone(),
            "seen": self._seen.clone(),
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if int(d["num_classes"]) != self.num_classes:
            raise ValueError(f"state for {d['num_classes']} classes, thresholds have {self.num_classes}")
        self.momentum = float(d["momentum"])
        self._mean = d["mean"].to(device=self._mean.device, dtype=torch.float64).clone()
        self._seen = d["seen"].to(device=self._seen.device, dtype=torch.bool).clone()


def refine_labels(
    y_box: Tensor,
    rc_box: Tensor | None,
    y_teacher: Tensor,
    rc_teacher: Tensor,
    teacher_thresholds: Tensor,
    beta: float = 1.0,
    beta_hard: float = 1.5,
    ignore_index: int = IGNORE_INDEX,
    box_top1: Tensor | None = None,
    beta_override: float | None = None,
    drop_contradicted: bool = False,
) -> tuple[Tensor, dict[str, float]]:
    """The refined pseudo-label of METHODS.md 1.2, per pixel, and the fraction of pixels per rule.

    y_box: black-box labels, already R2CP-masked (ignore where the box was unsure); rc_box: its
    relative confidence, or None for a hard-label box. y_teacher / rc_teacher: the teacher's
    prediction on the same (weak) view. Rules, with confident = rc_T >= scale * tau^T_{y_T}:
      * y_box labelled, rc_box given: y_T overrides where y_T != y_box, confident (scale beta)
        and rc_T > rc_box (the student learned something the box did not know);
      * y_box labelled, rc_box None: y_T overrides where y_T != y_box and confident with the
        stricter scale beta_hard (nothing says the box was unsure there);
      * y_box ignored: y_T fills where confident (scale beta), else the pixel stays ignored.
        This also applies to ignored pixels of a hard-label box, and to padding: the caller
        re-masks pixels that are not image (see views.weak_view) after refining.
    With `box_top1` (the box's arg-max before R2CP masked it), a fill also needs the teacher to agree with
    it: the box's unsure guess confirmed by a confident teacher (`corte.fill=agree`). `beta_override` (default:
    beta) is the scale of the confidence bar for overrides of labelled pixels with rc_box given. With
    `drop_contradicted`, a labelled pixel the teacher contradicts above that bar but with rc_T <= rc_box (no
    override) is ignored instead of kept (`corte.contradicted=ignore`); it counts as "ignored".
    Fractions {"kept_box", "overridden", "filled", "ignored"} are over all pixels and sum to 1.
    """
    if not (y_box.shape == y_teacher.shape == rc_teacher.shape):
        raise ValueError(
            f"y_box {tuple(y_box.shape)}, y_teacher {tuple(y_teacher.shape)} and rc_teacher "
            f"{tuple(rc_teacher.shape)} must have the same shape"
        )
    if rc_box is not None and rc_box.shape != y_box.shape:
        raise ValueError(f"rc_box {tuple(rc_box.shape)} and y_box {tuple(y_box.shape)} differ in shape")
    y_teacher = y_teacher.to(y_box.dtype)
    # float64 comparisons: tau is float64 and an rc equal to it must count as confident.
    tau = teacher_thresholds.to(device=rc_teacher.device, dtype=torch.float64)[y_teacher.long()]
    rc_t = rc_teacher.detach().to(torch.float64)
    has_box = y_box != ignore_index
    disagrees = y_teacher != y_box
    if rc_box is None:
        overridden = has_box & disagrees & (rc_t >= beta_hard * tau)
    else:
        b_o = beta if beta_override is None else beta_override
        overridden = has_box & disagrees & (rc_t >= b_o * tau) & (rc_t > rc_box.detach().to(torch.float64))
    dropped = torch.zeros_like(has_box)
    if drop_contradicted and rc_box is not None:
        dropped = has_box & disagrees & (rc_t >= b_o * tau) & ~overridden
    filled = ~has_box & (rc_t >= beta * tau)
    if box_top1 is not None:
        filled &= y_teacher == box_top1.to(y_teacher.dtype)
    refined = torch.where(overridden | filled, y_teacher, y_box)
    refined = torch.where(dropped, torch.full_like(refined, ignore_index), refined)

    kept = has_box & ~overridden & ~dropped
    ignored = (~has_box & ~filled) | dropped
    fractions = torch.stack([kept.sum(), overridden.sum(), filled.sum(), ignored.sum()]).to(torch.float64)
    fractions = fractions / max(y_box.numel(), 1)
    # One .tolist() for the four numbers: a single CPU-GPU sync per step instead of four.
    kept_f, overridden_f, filled_f, ignored_f = fractions.tolist()
    return refined, {"kept_box": kept_f, "overridden": overridden_f, "filled": filled_f, "ignored": ignored_f}


def label_diagnostics(y_box: Tensor, y: Tensor, ground_truth: Tensor, class_names: tuple[str, ...] | None = None,
                      ignore_index: int = IGNORE_INDEX) -> dict[str, float]:
    """How right the pseudo-labels are, against ground truth the method never trains on (diagnostics only).

    Pixel accuracy of the box's kept labels, of the teacher's fills and overrides, and of the final label y,
    plus per class the precision of y (the share of pixels labelled c that are c). Pixels whose ground truth is
    ignore do not count; a rule that touched no pixel reports nothing (no key) rather than a fake 0.
    """
    gt = ground_truth.to(y.dtype)
    scored = gt != ignore_index
    has_box = y_box != ignore_index
    rules = {
        "kept": has_box & (y == y_box),
        "overridden": has_box & (y != y_box) & (y != ignore_index),
        "filled": ~has_box & (y != ignore_index),
        "label": y != ignore_index,
    }
    masks = torch.stack([m & scored for m in rules.values()])
    correct = torch.stack([(m & (y == gt)) for m in masks])
    counts = torch.stack([masks.flatten(1).sum(1), correct.flatten(1).sum(1)]).tolist()
    out = {f"acc_{name}": c / n for name, n, c in zip(rules, counts[0], counts[1]) if n > 0}
    if class_names:
        labelled = rules["label"] & scored
        C = len(class_names)
        yl = y[labelled].long().clamp(max=C)
        total = torch.bincount(yl, minlength=C + 1)[:C]
        right = torch.bincount(yl[gt[labelled] == y[labelled]], minlength=C + 1)[:C]
        for name, n, c in zip(class_names, total.tolist(), right.tolist()):
            if n > 0:
                out[f"precision/{name}"] = c / n
    return out
