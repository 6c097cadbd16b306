"""ClassMix (DACS, METHODS.md 1.3) and metric-based online ClassMix, MOCM (STvM, METHODS.md 2.3).

A mask says which pixels of image A are pasted onto its partner B; the same mask mixes the
images, the labels and the per-pixel weights, so all three stay aligned. The masks are drawn
per image on the CPU (a handful of classes each), the mixing itself runs on the tensors' device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from corte_ray.methods.pseudo_labels import IGNORE_INDEX

# Weight of a class whose mean reliability is 0: multinomial needs a positive total, and a tiny
# weight picks such a class only when there is nothing else left to pick.
_MIN_CLASS_WEIGHT = 1e-12


def partner_index(batch_size: int) -> Tensor:
    """Image i is pasted onto image (i + B//2) % B: the two halves of the batch mix with each other.

    A permutation for every B; with B = 1 an image is its own partner (mixing changes nothing).
    """
    return (torch.arange(batch_size) + batch_size // 2) % batch_size


def _generator_device(generator: torch.Generator | None) -> torch.device:
    """Where random draws happen: on the generator's device, else on the CPU (tiny draws, no kernel launch)."""
    return generator.device if generator is not None else torch.device("cpu")


def _num_to_paste(num_present: int) -> int:
    """Half of the present classes, rounded up (DACS: (n + n % 2) // 2)."""
    return (num_present + num_present % 2) // 2


def classmix_mask(labels: Tensor, generator: torch.Generator | None = None, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """(B, H, W) labels -> (B, H, W) bool: per image, the pixels of half its present classes, drawn uniformly.

    Ignored pixels never belong to the mask.
    """
    masks = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    for b in range(labels.shape[0]):
        classes = torch.unique(labels[b])
        classes = classes[classes != ignore_index]
        order = torch.randperm(classes.numel(), generator=generator, device=_generator_device(generator))
        chosen = classes[order[: _num_to_paste(classes.numel())].to(classes.device)]
        masks[b] = torch.isin(labels[b], chosen)
    return masks


def mocm_mask(
    labels: Tensor,
    reliability: Tensor,
    power: float = 2.0,
    generator: torch.Generator | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Like `classmix_mask`, but the classes of each image are drawn without replacement with
    probability proportional to (mean reliability of the class in that image) ** power.

    Pasting what the teacher is sure of keeps unreliable labels from being spread onto the
    partner. labels, reliability: (B, H, W).
    """
    if reliability.shape != labels.shape:
        raise ValueError(f"reliability {tuple(reliability.shape)} and labels {tuple(labels.shape)} differ in shape")
    masks = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    for b in range(labels.shape[0]):
        classes, inverse = torch.unique(labels[b], return_inverse=True)
        inverse = inverse.reshape(-1)
        sums = torch.zeros(classes.numel(), dtype=torch.float64, device=labels.device)
        sums.index_add_(0, inverse, reliability[b].detach().reshape(-1).to(torch.float64))
        counts = torch.bincount(inverse, minlength=classes.numel()).to(torch.float64)
        present = classes != ignore_index
        classes = classes[present]
        mean = (sums / counts)[present].clamp(min=0.0)
        weights = (mean**power).to(_generator_device(generator))
        weights = torch.where(weights > 0, weights, torch.full_like(weights, _MIN_CLASS_WEIGHT))
        num = _num_to_paste(classes.numel())
        if num == 0:
            continue
        picked = torch.multinomial(weights, num, replacement=False, generator=generator)
        masks[b] = torch.isin(labels[b], classes[picked.to(classes.device)])
    return masks


def mix(masks: Tensor, pasted: Tensor, base: Tensor) -> Tensor:
    """torch.where(mask, pasted, base); masks (B, H, W) broadcast over the channels of (B, K, H, W)."""
    if pasted.shape != base.shape:
        raise ValueError(f"pasted {tuple(pasted.shape)} and base {tuple(base.shape)} differ in shape")
    if pasted.ndim < masks.ndim or pasted.shape[-2:] != masks.shape[-2:] or pasted.shape[0] != masks.shape[0]:
        raise ValueError(f"masks {tuple(masks.shape)} do not fit tensors {tuple(pasted.shape)}")
    shaped = masks.reshape(masks.shape[0], *([1] * (pasted.ndim - 3)), *masks.shape[-2:])
    return torch.where(shaped, pasted, base)


def classmix_batch(images: Tensor, labels: Tensor, weights: Tensor, masks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Mix a batch with itself: the masked pixels of sample i go onto sample j = partner_index(B)[i].

    masks[i] is the mask of sample i (drawn from labels[i]); the result at position j is
    mix(masks[i], x[i], x[j]) for x in images, labels and weights: sample j's background with
    sample i's pasted classes, so image, label and weight stay aligned pixel for pixel.
    """
    batch = images.shape[0]
    partner = partner_index(batch)
    source = torch.argsort(partner).to(images.device)  # source[j] = i with partner[i] = j
    src_masks = masks[source]
    return (
        mix(src_masks, images[source], images),
        mix(src_masks, labels[source], labels),
        mix(src_masks, weights[source], weights),
    )
