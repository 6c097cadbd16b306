"""STvM's metric network (METHODS.md 2.2): embedding head, class proxies, Proxy-Anchor loss, reliability.

The head embeds the teacher's (detached) last encoder features; one learnable proxy per class lives
in the same unit sphere. Proxy-Anchor pulls pixels of class c to proxy c and pushes others away; the
softmax over scaled cosine similarities to the proxies then says how much the teacher's pseudo-label
of each pixel can be trusted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MetricHead(nn.Module):
    """1x1 conv (in_dim -> hidden) -> BN -> ReLU -> 1x1 conv (hidden -> embed), L2-normalised over channels."""

    def __init__(self, in_dim: int, hidden_dim: int = 256, embed_dim: int = 128) -> None:
        super().__init__()
        self.embed = nn.Sequential(
            nn.Conv2d(in_dim, hidden_dim, 1, bias=False),
            nn.BatchNorm2d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden_dim, embed_dim, 1),
        )

    def forward(self, features: Tensor) -> Tensor:
        return F.normalize(self.embed(features), dim=1)


class ClassProxies(nn.Module):
    """One learnable vector per class; forward() returns them L2-normalised, shape (num_classes, embed_dim)."""

    def __init__(self, num_classes: int, embed_dim: int = 128) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, embed_dim))
        # As in the Proxy-Anchor reference code: Kaiming-normal (fan_out) initialisation.
        nn.init.kaiming_normal_(self.weight, mode="fan_out")

    def forward(self) -> Tensor:
        return F.normalize(self.weight, dim=1)


def _log1p_sum_exp(logits: Tensor, members: Tensor) -> Tensor:
    """Per column c: log(1 + sum_{i: members[i, c]} exp(logits[i, c])), stable, 0 for an empty set."""
    masked = logits.masked_fill(~members, float("-inf"))
    # Prepending a row of zeros turns log(1 + sum exp) into a plain logsumexp and keeps it finite
    # (and its gradient defined) when a column has no members.
    return torch.logsumexp(torch.cat([logits.new_zeros(1, logits.shape[1]), masked], dim=0), dim=0)


def proxy_anchor_loss(
    embeddings: Tensor, labels: Tensor, proxies: Tensor, alpha: float = 32.0, delta: float = 0.1
) -> Tensor:
    """Proxy-Anchor loss (Kim et al., CVPR 2020) of embeddings (N, D) with labels (N,) against proxies (C, D).

    L = 1/|P+| sum_{p in P+} log(1 + sum_{x in X_p+} exp(-alpha (s(x, p) - delta)))
      + 1/|P|  sum_{p in P}  log(1 + sum_{x in X_p-} exp( alpha (s(x, p) + delta)))
    with s the cosine similarity, P all proxies and P+ those with a positive in the batch. Both inputs
    are L2-normalised here (a no-op for the outputs of MetricHead / ClassProxies). Labels outside
    [0, C) (the ignore index 255) take no part.
    """
    num_classes = proxies.shape[0]
    valid = (labels >= 0) & (labels < num_classes)
    embeddings, labels = embeddings[valid], labels[valid]
    cosine = F.normalize(embeddings, dim=1) @ F.normalize(proxies, dim=1).T  # (N, C)
    positive = F.one_hot(labels.long(), num_classes).bool()
    positive_term = _log1p_sum_exp(-alpha * (cosine - delta), positive)  # (C,)
    negative_term = _log1p_sum_exp(alpha * (cosine + delta), ~positive)  # (C,)
    has_positive = positive.any(dim=0)
    positive_loss = positive_term[has_positive].sum() / has_positive.sum().clamp(min=1)
    return positive_loss + negative_term.mean()


def class_balanced_pixel_sample(
    labels: Tensor,
    max_pixels: int,
    num_classes: int,
    generator: torch.Generator | None = None,
    ignore_index: int = 255,
) -> Tensor:
    """Flat indices into labels.view(-1): at most `max_pixels`, spread as evenly as possible over the
    classes present, random within a class, never an ignored pixel (or any label outside [0, C)).

    Even per class, not per pixel: road and sky would otherwise fill the whole sample and the proxies
    of small classes (poles, signs) would never see a positive.
    """
    flat = labels.reshape(-1)
    valid = (flat != ignore_index) & (flat >= 0) & (flat < num_classes)
    candidates = valid.nonzero().squeeze(1)
    candidate_labels = flat[candidates].long()
    counts = torch.bincount(candidate_labels, minlength=num_classes).cpu().tolist()  # one small sync

    # Water filling: the rarest classes give all they have, the rest share what is left equally
    # (shares differ by at most one pixel).
    quota = [0] * num_classes
    remaining = max(int(max_pixels), 0)
    present = sorted((count, c) for c, count in enumerate(counts) if count > 0)
    for position, (count, c) in enumerate(present):
        share = remaining // (len(present) - position)
        quota[c] = min(count, share)
        remaining -= quota[c]

    # Random order within each class: sort by class + a random fraction in [0, 1).
    device = generator.device if generator is not None else flat.device
    random_keys = torch.rand(candidates.numel(), generator=generator, device=device, dtype=torch.float64)
    order = torch.argsort(candidate_labels.double() + random_keys.to(flat.device))
    sorted_labels = candidate_labels[order]
    class_starts = torch.cumsum(torch.tensor([0] + counts[:-1], device=flat.device), dim=0)
    rank_in_class = torch.arange(order.numel(), device=flat.device) - class_starts[sorted_labels]
    keep = rank_in_class < torch.tensor(quota, device=flat.device)[sorted_labels]
    return candidates[order[keep]]


def pixel_reliability(
    embeddings: Tensor, proxies: Tensor, labels: Tensor, scale: float = 16.0, gamma: float = 1.0
) -> Tensor:
    """METHODS.md 2.2: r = softmax_c(scale * cos(e, w_c)) at the pseudo-label, at label resolution, ** gamma.

    embeddings (B, D, h, w), proxies (C, D), labels (B, H, W) with 255 (or anything outside [0, C))
    for ignored pixels, whose reliability is 0. The class probabilities are upsampled bilinearly
    (a convex combination, so they stay probabilities) before picking each pixel's label.
    """
    num_classes = proxies.shape[0]
    cosine = torch.einsum("bdhw,cd->bchw", F.normalize(embeddings, dim=1), F.normalize(proxies, dim=1))
    probabilities = torch.softmax(scale * cosine, dim=1)
    probabilities = F.interpolate(probabilities, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    reliability = label_probability(probabilities, labels)
    if gamma != 1.0:
        reliability = reliability**gamma
    return reliability


def label_probability(probabilities: Tensor, labels: Tensor) -> Tensor:
    """probabilities (B, C, H, W) at each pixel's label (B, H, W), clamped to [0, 1]; 0 where the label is ignored
    (outside [0, C)). Shared by STvM's reliability and CoRTe's teacher-belief weights."""
    valid = (labels >= 0) & (labels < probabilities.shape[1])
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels)).long()
    picked = probabilities.gather(1, safe_labels.unsqueeze(1)).squeeze(1).clamp(0.0, 1.0)
    return torch.where(valid, picked, torch.zeros_like(picked))


def class_normalised_reliability(reliability: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Reliability divided by its mean over the pixels of the same pseudo-label class in the batch.

    Plain reliability weights move loss *between* classes: the teacher is surest of the easy, large classes,
    so hard ones (terrain, car on the demo benchmark) lose weight and decay further. Normalised per class,
    every class keeps the weight of its pixel count (as with uniform weights) and the reliability only ranks
    pixels *within* a class. Ignored pixels (outside [0, C)) stay 0.
    """
    valid = (labels >= 0) & (labels < num_classes)
    index = torch.where(valid, labels, torch.full_like(labels, num_classes)).long().reshape(-1)
    sums = torch.zeros(num_classes + 1, dtype=reliability.dtype, device=reliability.device)
    counts = torch.zeros_like(sums)
    sums.index_add_(0, index, reliability.reshape(-1))
    counts.index_add_(0, index, torch.ones_like(reliability).reshape(-1))
    mean = (sums / counts.clamp(min=1.0)).clamp(min=1e-6)
    out = reliability / mean[index].view_as(reliability)
    return torch.where(valid, out, torch.zeros_like(out))
