"""One training step per method: CoRTe, STvM, CoRTe + metric reliability, and the baselines.

A step takes a batch of target images with the black box's answer (already aligned pixel for pixel),
builds the views, the pseudo-labels and the mix, and returns a dict of losses and diagnostics. The loop
owns `backward`, the optimiser steps, the EMA update and logging (STYLE.md rule 2), so the same step runs
in a plain loop, on one GPU and under Ray Train. Pure PyTorch: no Ray, no I/O.

Batch contract (all tensors on the training device, one image size per batch):
    image     (B,3,H,W) float in [0,1]
    box_top1  (B,H,W) long     the box's arg-max class (255 where the box gave nothing)
    box_p1    (B,H,W) float    the box's top probability (1.0 for a hard-label box)
    box_rc    (B,H,W) float    the box's relative confidence p(1)-p(2); absent (None) for a hard-label box
    label     (B,H,W) long     ground truth, only for the `oracle` baseline (and diagnostics)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import Config
from ..registry import Registry
from .losses import (pixel_weighted_cross_entropy, quality_weights, reliability_weighted_cross_entropy,
                     top2_set_loss)
from .mixing import classmix_batch, classmix_mask, mocm_mask
from .pseudo_labels import confidence_threshold_labels, r2cp_labels, relative_confidence, thresholds_from_means
from .refine import TeacherThresholds, label_diagnostics, refine_labels
from .views import strong_view, weak_view

from ..data.labels import IGNORE  # noqa: E402 - the one ignore index (255)
METHODS: Registry[type["Method"]] = Registry("method")
# Sums a tensor over all workers in place (torch.distributed.all_reduce under DDP); identity in one process.
Reducer = Callable[[Tensor], Tensor]


def _identity(t: Tensor) -> Tensor:
    return t


@dataclass
class Models:
    """What a step may touch. `student` may be DDP-wrapped; the teacher and metric parts never are."""

    student: nn.Module
    teacher: nn.Module | None = None          # corte_ray.models.EMATeacher
    metric_head: nn.Module | None = None      # corte_ray.models.MetricHead
    proxies: nn.Module | None = None          # corte_ray.models.ClassProxies


class Method:
    """Base: holds the method's config, its random generator and its running state (teacher thresholds)."""

    uses_teacher = False
    uses_metric = False
    needs_ground_truth = False      # trains on target labels (oracle)
    needs_box_labels = True         # reads the black box's stored answers (every black-box method)
    needs_source_weights = False    # starts from the white-box source model (stvm)

    @classmethod
    def wants_box_top2(cls, cfg: Config) -> bool:
        """Whether the step reads the box's second class (`box_top2`) beside its first."""
        return False

    def __init__(self, cfg: Config, box_class_means: Tensor | None, device: torch.device,
                 reduce: Reducer = _identity, seed: int = 0) -> None:
        self.cfg = cfg
        self.num_classes = cfg.model.num_classes
        self.device = device
        self.reduce = reduce
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        # tau_c = alpha * (mean relative confidence of class c over the whole target set), METHODS 1.1;
        # a class the box never predicted keeps tau = 1 (nothing kept). Means come from the label store.
        if box_class_means is not None:
            means = box_class_means.to(device=device, dtype=torch.float32)
            self.box_thresholds = thresholds_from_means(means, cfg.corte.rc_scale, cfg.corte.rc_floor)
        else:
            self.box_thresholds = None
        self.teacher_thresholds = TeacherThresholds(self.num_classes, cfg.ema.threshold_momentum, device=device)
        # Names of the train ids, for per-class diagnostics; the loop sets the target dataset's.
        self.class_names: tuple[str, ...] | None = None

    # ---- helpers shared by the steps
    def views(self, batch: dict[str, Tensor], keys: tuple[str, ...]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Weak view (shared geometry for the image and every map in `keys`) and the strong view on top of it.

        A map of ones rides along as `valid` (padded with 0): a down-scaled image is padded with black, and no
        label may come from there. The teacher would otherwise "fill" the padding with confident labels.
        """
        image = batch["image"]
        ones = torch.ones(image.shape[0], *image.shape[-2:], device=image.device)
        maps = [batch[k] for k in keys] + [ones]
        fills = [255.0 if batch[k].dtype == torch.long else 0.0 for k in keys] + [0.0]
        weak, maps_out = weak_view(image, maps, tuple(self.cfg.data.crop_size), generator=self.generator,
                                   fill_values=fills)
        a = self.cfg.augment
        strong = strong_view(weak, generator=self.generator, brightness=a.jitter, contrast=a.jitter,
                             saturation=a.jitter, hue=a.hue, jitter_p=a.jitter_p, blur_p=a.blur_p,
                             blur_sigma=tuple(a.blur_sigma), grayscale_p=a.grayscale_p)
        out = dict(zip(keys, maps_out[:-1]))
        out["valid"] = maps_out[-1] > 0.5
        return weak, strong, out

    def box_labels(self, top1: Tensor, rc: Tensor | None) -> Tensor:
        """R2CP labels y_B; a hard-label box has no relative confidence, so every pixel keeps its label."""
        if rc is None or self.box_thresholds is None:
            return top1
        return r2cp_labels(top1, rc, self.box_thresholds)

    def teacher_predict(self, models: Models, image: Tensor, features: bool = False):
        """Teacher soft-max, relative confidence and arg-max on the weak view (no gradient)."""
        # fp32 even under AMP: rc = p(1) - p(2) is a small difference of probabilities near 1, which bf16
        # (8 bits of mantissa) rounds to a handful of values, and every threshold compares against it.
        with torch.no_grad(), torch.autocast(image.device.type, enabled=False):
            image = image.float()
            if features:
                logits, feats = models.teacher.forward_features(image)
            else:
                logits, feats = models.teacher(image), None
            probs = logits.float().softmax(1)
            rc, pred = relative_confidence(probs)
        return probs, rc, pred, feats

    def update_teacher_thresholds(self, rc: Tensor, pred: Tensor, valid: Tensor) -> None:
        # Padding is not image content: its pixels do not enter the running class thresholds.
        # They go to an extra bin (index C) that is dropped.
        pred = torch.where(valid, pred, torch.full_like(pred, self.num_classes))
        sums, counts = TeacherThresholds.batch_sums(rc, pred, self.num_classes + 1)
        self.teacher_thresholds.update(self.reduce(sums[:-1].contiguous()), self.reduce(counts[:-1].contiguous()))

    def metric_terms(self, models: Models, feats: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """STvM 2.2: Proxy-Anchor loss of the metric head on the detached teacher features, and the pixel
        reliability r of `labels` (at label resolution, detached)."""
        from ..models import class_balanced_pixel_sample, pixel_reliability, proxy_anchor_loss

        st = self.cfg.stvm
        emb = models.metric_head(feats.detach().float())
        proxies = models.proxies()
        # Pseudo-labels at the feature resolution, nearest, so every sampled embedding has one class.
        small = F.interpolate(labels[:, None].float(), size=emb.shape[-2:], mode="nearest")[:, 0].long()
        idx = class_balanced_pixel_sample(small, st.metric_pixels, self.num_classes, generator=self.generator)
        flat_emb = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
        if idx.numel() > 0:
            loss = proxy_anchor_loss(flat_emb[idx.to(flat_emb.device)], small.reshape(-1)[idx.to(small.device)],
                                     proxies, alpha=st.proxy_alpha, delta=st.proxy_margin)
        else:
            loss = emb.sum() * 0.0
        with torch.no_grad():
            rel = pixel_reliability(emb.detach(), proxies.detach(), labels, scale=st.temperature_scale, gamma=st.gamma)
        return loss, rel

    def loss_weights(self, rel: Tensor, labels: Tensor) -> Tensor:
        """The reliability as CE weights: per pixel (the spec) or normalised per class (`stvm.reliability_norm`)."""
        if self.cfg.stvm.reliability_norm == "class":
            from ..models.metric import class_normalised_reliability

            return class_normalised_reliability(rel, labels, self.num_classes)
        return rel

    def diagnostics(self, y_box: Tensor, y: Tensor, ground_truth: Tensor) -> dict[str, float]:
        """Accuracy of the pseudo-labels against ground truth (diagnostics only: never a loss term)."""
        return {f"label_acc/{k}": v for k, v in label_diagnostics(y_box, y, ground_truth, self.class_names).items()}

    def phase(self, iteration: int, total: int) -> tuple[bool, bool]:
        """(warm-up over?, refinement on?) for this iteration."""
        warm_done = iteration >= math.floor(self.cfg.corte.warmup * total)
        refine_on = iteration >= math.floor(self.cfg.corte.refine_start * total)
        return warm_done, refine_on

    def step(self, models: Models, batch: dict[str, Tensor], iteration: int, total: int) -> dict[str, Tensor | float]:
        raise NotImplementedError

    # ---- state for checkpoints
    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "teacher_thresholds": self.teacher_thresholds.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.teacher_thresholds.load_state_dict(state["teacher_thresholds"])


def agreement_weights(probs: Tensor, labels: Tensor, power: float, num_classes: int | None = None) -> Tensor:
    """p_T(y)^k per pixel: the teacher's soft-max probability of the training label, to the power k. Labels the
    teacher does not believe weigh less (`corte.agree_power`). With `num_classes` (`corte.agree_norm=class`) the
    weights are divided by their mean over the pixels of the same label class in the batch, as stvm's reliability
    is: every class keeps its weight, the teacher only ranks pixels within a class. Ignored pixels: 1 (per pixel)
    or 0 (per class); no loss reads them."""
    from ..models.metric import class_normalised_reliability, label_probability

    p = label_probability(probs, labels) ** power
    if num_classes is not None:
        return class_normalised_reliability(p, labels, num_classes).detach()
    return torch.where(labels == IGNORE, torch.ones_like(p), p).detach()


def class_balance_weights(labels: Tensor, num_classes: int) -> Tensor:
    """Per-class CE weights 1/sqrt(f_c) from the pixel frequencies f_c of the classes present in `labels`, scaled so
    that the pixel-weighted mean weight is 1 (classes absent from the batch get 0: they have no pixel to weigh)."""
    valid = labels[labels != IGNORE]
    counts = torch.bincount(valid, minlength=num_classes)[:num_classes].to(torch.float32)
    present = counts > 0
    weight = torch.where(present, counts.clamp(min=1).rsqrt(), torch.zeros_like(counts))
    mean = (weight * counts).sum() / counts.sum().clamp(min=1)
    return weight / mean.clamp(min=1e-12)


def strong_ramp(iteration: int, total: int, rampup: float) -> float:
    """Weight of the strong-view loss: Mean Teacher's sigmoid ramp exp(-5 (1 - t/T)^2) over the first `rampup`
    of the schedule, then 1; 1 throughout when rampup is 0."""
    length = rampup * total
    if length <= 0 or iteration >= length:
        return 1.0
    t = max(iteration, 0) / length
    return math.exp(-5.0 * (1.0 - t) ** 2)


def _label_fractions(labels: Tensor) -> float:
    return float((labels != IGNORE).float().mean())


@METHODS.register("distill")
class Distill(Method):
    """Baseline: imitate the box's raw hard labels, no threshold, no teacher, no mixing."""

    def step(self, models, batch, iteration, total):
        weak, _, m = self.views(batch, ("box_top1",))
        loss = F.cross_entropy(models.student(weak), m["box_top1"], ignore_index=IGNORE)
        return {"loss": loss, "loss_seg": loss.detach(), "label_coverage": _label_fractions(m["box_top1"])}


@METHODS.register("oracle")
class Oracle(Method):
    """Upper bound: supervised on target ground truth (also trains the source model on source labels)."""

    needs_ground_truth = True
    needs_box_labels = False

    def step(self, models, batch, iteration, total):
        weak, strong, m = self.views(batch, ("label",))
        # Photometric augmentation on half the batch keeps the model from over-fitting one look.
        half = weak.shape[0] // 2
        image = torch.cat([weak[:half], strong[half:]]) if half else weak
        weight = class_balance_weights(m["label"], self.num_classes) if self.cfg.train.class_balance else None
        loss = F.cross_entropy(models.student(image), m["label"], weight=weight, ignore_index=IGNORE)
        return {"loss": loss, "loss_seg": loss.detach(), "label_coverage": _label_fractions(m["label"])}


@METHODS.register("corte")
class Corte(Method):
    """CoRTe (METHODS 1): R2CP labels, EMA-teacher refinement, consistent training with ClassMix."""

    uses_teacher = True

    @classmethod
    def wants_box_top2(cls, cfg):
        return cfg.corte.set_weight > 0

    def set_term(self, logits_weak: Tensor, y: Tensor, m: dict[str, Tensor]) -> Tensor | None:
        """The top-2 set loss on the pixels the final label leaves ignored (`corte.set_weight`), or None."""
        if self.cfg.corte.set_weight <= 0 or "box_top2" not in m:
            return None
        where = (y == IGNORE) & m["valid"] & (m["box_top1"] != IGNORE) & (m["box_top2"] != IGNORE)
        return top2_set_loss(logits_weak, m["box_top1"], m["box_top2"], where, m["valid"])

    def reliability_weights(self, models, feats, labels, stats):  # overridden by corte_metric
        return quality_weights(labels), None

    def mixing_masks(self, labels: Tensor, weights: Tensor) -> Tensor:
        return classmix_mask(labels, generator=self.generator)

    def step(self, models, batch, iteration, total):
        rc_box = batch.get("box_rc")
        keys = (("box_top1",) + (("box_rc",) if rc_box is not None else ()) + (("label",) if "label" in batch else ())
                + (("box_top2",) if "box_top2" in batch else ()))
        weak, strong, m = self.views(batch, keys)
        y_box = self.box_labels(m["box_top1"], m.get("box_rc"))
        warm_done, refine_on = self.phase(iteration, total)
        out: dict[str, Tensor | float] = {}
        student = models.student

        if not warm_done:
            # Warm-up: the student first imitates the box's reliable pixels, so the EMA teacher that
            # refines labels later starts from something that already knows the task.
            y = m["box_top1"] if self.cfg.corte.warmup_labels == "raw" else y_box
            w = quality_weights(y)
            loss_strong = pixel_weighted_cross_entropy(student(strong), y, w)
            logits_weak = student(weak)
            loss_weak = pixel_weighted_cross_entropy(logits_weak, y)
            metric_loss = None
            stats = {"kept_box": _label_fractions(y), "overridden": 0.0, "filled": 0.0,
                     "ignored": 1 - _label_fractions(y)}
        else:
            probs_t, rc_t, pred_t, feats = self.teacher_predict(models, weak, features=self.uses_metric)
            self.update_teacher_thresholds(rc_t, pred_t, m["valid"])
            if refine_on:
                # Padding gets teacher confidence -1: it can pass no threshold, so it is never filled.
                rc_t_valid = torch.where(m["valid"], rc_t, torch.full_like(rc_t, -1.0))
                y, stats = refine_labels(y_box, m.get("box_rc"), pred_t, rc_t_valid, self.teacher_thresholds.value,
                                         beta=self.cfg.corte.teacher_scale,
                                         beta_hard=self.cfg.corte.hard_override_scale,
                                         beta_override=self.cfg.corte.override_scale,
                                         drop_contradicted=self.cfg.corte.contradicted == "ignore",
                                         box_top1=m["box_top1"] if self.cfg.corte.fill == "agree" else None)
            else:
                y = y_box
                stats = {"kept_box": _label_fractions(y), "overridden": 0.0, "filled": 0.0,
                         "ignored": 1 - _label_fractions(y)}
            w, metric_loss = self.reliability_weights(models, feats, y, stats)
            w_weak = None
            if self.cfg.corte.agree_power > 0:
                w_weak = agreement_weights(probs_t, y, self.cfg.corte.agree_power,
                                           self.num_classes if self.cfg.corte.agree_norm == "class" else None)
                w = w * w_weak
            if self.cfg.corte.mix:
                # The classes to paste come from the label the student trains on, or from the box's dense top-1
                # (`corte.mix_mask=box`): whole regions, their ignored pixels pasted as ignored.
                drawn_from = m["box_top1"] if self.cfg.corte.mix_mask == "box" else y
                mixed_img, mixed_y, mixed_w = classmix_batch(strong, y, w, self.mixing_masks(drawn_from, w))
            else:   # the ablation: the strong view alone
                mixed_img, mixed_y, mixed_w = strong, y, w
            loss_strong = self.weighted_ce(student(mixed_img), mixed_y, mixed_w)
            logits_weak = student(weak)
            loss_weak = pixel_weighted_cross_entropy(logits_weak, y, w_weak)
        loss_set = self.set_term(logits_weak, y, m)
        if loss_set is not None:
            loss_weak = loss_weak + self.cfg.corte.set_weight * loss_set
            out["loss_set"] = loss_set.detach()
        ramp = strong_ramp(iteration, total, self.cfg.corte.strong_rampup)
        loss = ramp * loss_strong + self.cfg.corte.weak_weight * loss_weak
        if self.cfg.corte.strong_rampup > 0:
            out["strong_weight"] = ramp
        out["loss_strong"] = loss_strong.detach()
        out["loss_weak"] = loss_weak.detach()
        if metric_loss is not None:
            loss = loss + self.cfg.stvm.metric_weight * metric_loss
            out["loss_metric"] = metric_loss.detach()
        out["loss"] = loss
        out.update({f"labels/{k}": float(v) for k, v in stats.items()})
        if "label" in m:
            out.update(self.diagnostics(y_box, y, m["label"]))
            if self.uses_metric and warm_done:
                out.update(reliability_diagnostics(w, y, m["label"]))
        return out

    def weighted_ce(self, logits, labels, weights):
        return pixel_weighted_cross_entropy(logits, labels, weights)


@METHODS.register("corte_metric")
class CorteMetric(Corte):
    """CoRTe labels with STvM's metric reliability as pixel weights and metric-guided mixing (MOCM)."""

    uses_metric = True

    def reliability_weights(self, models, feats, labels, stats):
        metric_loss, rel = self.metric_terms(models, feats, labels)
        stats["mean_reliability"] = float(rel[labels != IGNORE].mean()) if (labels != IGNORE).any() else 0.0
        if not self.cfg.stvm.metric_weighting:   # the ablation: the metric head trains, its weights are unused
            rel = torch.ones_like(rel)
        # The CE weights and MOCM read the same (by default class-normalised) reliability, as in stvm.
        return self.loss_weights(rel, labels), metric_loss

    def mixing_masks(self, labels, weights):
        if not self.cfg.stvm.mocm:
            return classmix_mask(labels, generator=self.generator)
        return mocm_mask(labels, weights, power=self.cfg.stvm.mocm_power, generator=self.generator)

    def weighted_ce(self, logits, labels, weights):
        return reliability_weighted_cross_entropy(logits, labels, weights)


@METHODS.register("stvm")
class STvM(Method):
    """STvM (METHODS 2): mean teacher on ALL teacher pseudo-labels, each pixel weighted by the metric
    reliability, metric-guided ClassMix. Student and teacher start from the white-box source weights."""

    uses_teacher = True
    uses_metric = True
    needs_box_labels = False        # source-free, not black-box: no label store
    needs_source_weights = True

    def step(self, models, batch, iteration, total):
        weak, strong, m = self.views(batch, ("label",) if "label" in batch else ())
        _, rc_t, y_t, feats = self.teacher_predict(models, weak, features=True)
        self.update_teacher_thresholds(rc_t, y_t, m["valid"])
        y_t = torch.where(m["valid"], y_t, torch.full_like(y_t, IGNORE))
        metric_loss, rel = self.metric_terms(models, feats, y_t)
        st = self.cfg.stvm
        # MOCM picks what to paste by the same reliability the loss uses (class-normalised by default: raw
        # reliability would always paste the easy classes, docs/methods.md), before the no-weighting ablation
        # flattens it.
        weights = self.loss_weights(rel, y_t)
        masks = (mocm_mask(y_t, weights, power=st.mocm_power, generator=self.generator) if st.mocm
                 else classmix_mask(y_t, generator=self.generator))
        if not st.metric_weighting:
            weights = torch.where(y_t != IGNORE, torch.ones_like(rel), rel)
        mixed_img, mixed_y, mixed_r = classmix_batch(strong, y_t, weights, masks)
        loss_seg = reliability_weighted_cross_entropy(models.student(mixed_img), mixed_y, mixed_r)
        loss = loss_seg + self.cfg.stvm.metric_weight * metric_loss
        out = {"loss": loss, "loss_seg": loss_seg.detach(), "loss_metric": metric_loss.detach(),
               "mean_reliability": float(rel[y_t != IGNORE].mean()) if (y_t != IGNORE).any() else 0.0}
        if "label" in m:
            out.update(self.diagnostics(y_t, y_t, m["label"]))
            out.update(reliability_diagnostics(rel, y_t, m["label"]))
        return out


def reliability_diagnostics(rel: Tensor, labels: Tensor, ground_truth: Tensor) -> dict[str, float]:
    """Mean reliability of the pseudo-labels that are right and of those that are wrong: a useful reliability
    separates them (diagnostics only)."""
    scored = (labels != IGNORE) & (ground_truth != IGNORE)
    right = scored & (labels == ground_truth)
    wrong = scored & (labels != ground_truth)
    out = {}
    if right.any():
        out["label_acc/reliability_right"] = float(rel[right].mean())
    if wrong.any():
        out["label_acc/reliability_wrong"] = float(rel[wrong].mean())
    return out


@METHODS.register("threshold_st")
class ThresholdST(Method):
    """Classic self-training baseline (METHODS 3): one global confidence threshold t = `threshold_st.threshold`
    on p(1), where CoRTe has relative, per-class thresholds.

    Label: y_B = the box's top-1 where its p(1) >= t, else ignore. During the warm-up (`corte.warmup`, the same
    schedule as CoRTe) the student trains on y_B alone, strong and weak view, no mixing. After it, the EMA
    teacher labels the weak view the same way (its p(1) >= t) and y = the teacher's label where it has one,
    else y_B; the loss is CE(strong view ClassMixed with y, DACS quality weights) + CE(weak view, y)."""

    uses_teacher = True

    def step(self, models, batch, iteration, total):
        weak, strong, m = self.views(batch, ("box_top1", "box_p1") + (("label",) if "label" in batch else ()))
        t = self.cfg.threshold_st.threshold
        y_box = confidence_threshold_labels(m["box_p1"], m["box_top1"], t)
        warm_done, _ = self.phase(iteration, total)
        if warm_done:
            probs_t, _, pred_t, _ = self.teacher_predict(models, weak)
            y_t = confidence_threshold_labels(probs_t.max(1).values, pred_t, t)
            y_t = torch.where(m["valid"], y_t, torch.full_like(y_t, IGNORE))
            y = torch.where(y_t != IGNORE, y_t, y_box)   # the teacher where it is sure, else the box
            masks = classmix_mask(y, generator=self.generator)
            img, y_mix, w_mix = classmix_batch(strong, y, quality_weights(y), masks)
        else:
            y, img, y_mix, w_mix = y_box, strong, y_box, quality_weights(y_box)
        loss_strong = pixel_weighted_cross_entropy(models.student(img), y_mix, w_mix)
        loss_weak = pixel_weighted_cross_entropy(models.student(weak), y)
        loss = loss_strong + loss_weak
        out = {"loss": loss, "loss_strong": loss_strong.detach(), "loss_weak": loss_weak.detach(),
               "label_coverage": _label_fractions(y)}
        if "label" in m:
            out.update(self.diagnostics(y_box, y, m["label"]))
        return out


def build_method(cfg: Config, box_class_means: Tensor | None, device: torch.device,
                 reduce: Reducer = _identity, seed: int = 0) -> Method:
    return METHODS.get(cfg.method)(cfg, box_class_means, device, reduce=reduce, seed=seed)
