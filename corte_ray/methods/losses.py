"""Segmentation losses on pseudo-labels: DACS quality-weighted CE (METHODS.md 1.3) and STvM's
reliability-weighted CE (METHODS.md 2.1).

Weights and reliabilities describe the labels, not the prediction: they are detached, so the
gradient reaches the logits only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from corte_ray.methods.pseudo_labels import IGNORE_INDEX


def quality_weights(labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """(B, H, W) float32 map holding, at every pixel of image b, the fraction of b's pixels not ignored (DACS q)."""
    valid = (labels != ignore_index).to(torch.float32)
    quality = valid.mean(dim=(-2, -1), keepdim=True)
    return quality.expand_as(valid).clone()


def _pixel_cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Per-pixel CE (B, H, W), 0 at ignored pixels, and the bool map of non-ignored pixels."""
    if logits.ndim != 4 or labels.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"logits (B, C, H, W) {tuple(logits.shape)} and labels (B, H, W) {tuple(labels.shape)} do not match"
        )
    labels = labels.long()
    ce = F.cross_entropy(logits, labels, reduction="none", ignore_index=ignore_index)
    return ce, labels != ignore_index


def pixel_weighted_cross_entropy(
    logits: Tensor, labels: Tensor, weights: Tensor | None = None, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Mean over non-ignored pixels of w_i * CE_i; plain CE when weights is None.

    With no valid pixel the result is a 0 that is still connected to the logits, so backward()
    runs in every worker (DDP needs every rank to produce gradients for the same parameters).
    """
    ce, valid = _pixel_cross_entropy(logits, labels, ignore_index)
    if weights is not None:
        if weights.shape != ce.shape:
            raise ValueError(f"weights {tuple(weights.shape)} and labels {tuple(ce.shape)} differ in shape")
        # where, not *: a nan/inf weight at an ignored pixel must not poison the sum.
        ce = torch.where(valid, weights.detach().to(ce.dtype) * ce, torch.zeros_like(ce))
    return ce.sum() / valid.sum().clamp(min=1)


def reliability_weighted_cross_entropy(
    logits: Tensor, labels: Tensor, reliability: Tensor, ignore_index: int = IGNORE_INDEX, eps: float = 1e-8
) -> Tensor:
    """STvM's L_seg = sum_i r_i CE_i / sum_i r_i over non-ignored pixels, r detached.

    eps bounds the denominator from below: all-zero reliability gives a 0 loss, still on the graph.
    """
    ce, valid = _pixel_cross_entropy(logits, labels, ignore_index)
    if reliability.shape != ce.shape:
        raise ValueError(f"reliability {tuple(reliability.shape)} and labels {tuple(ce.shape)} differ in shape")
    r = torch.where(valid, reliability.detach().to(ce.dtype), torch.zeros_like(ce))
    return (r * ce).sum() / r.sum().clamp(min=eps)


def top2_set_loss(logits: Tensor, top1: Tensor, top2: Tensor, where: Tensor, valid: Tensor) -> Tensor:
    """-log(p(a) + p(b)) at the pixels `where`, {a, b} = the box's two first classes there: a set-valued
    (partial) label, right whenever the truth is either of the two, that lets the student pick between them.
    Summed over `where` and divided by the number of `valid` pixels (a share of the image, as the CE of the
    labelled pixels is a mean over them). A 0 still on the graph when no pixel qualifies."""
    logp = F.log_softmax(logits.float(), dim=1)
    a = top1.clamp(max=logits.shape[1] - 1).unsqueeze(1)
    b = top2.clamp(max=logits.shape[1] - 1).unsqueeze(1)
    pair = torch.logsumexp(torch.cat([logp.gather(1, a), logp.gather(1, b)], dim=1), dim=1)
    loss = torch.where(where, -pair, torch.zeros_like(pair))
    return loss.sum() / valid.sum().clamp(min=1)
