"""The weak and strong views of consistent training (METHODS.md 1.3), batched on any device.

The weak view is geometric (scale, crop, flip) and moves every per-pixel map with the image;
the strong view is photometric only, so the weak view's labels stay valid for it.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.transforms import nearest_index

# ITU-R 601 luma, the weights torchvision's rgb_to_grayscale uses.
_LUMA = (0.299, 0.587, 0.114)


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """U[0, 1) draws on `device`, taken from `generator` (on its own device) when given."""
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _nearest_index(out_size: int, in_size: int, device: torch.device) -> Tensor:
    """`data.transforms.nearest_index` (pixel centres aligned) as a tensor on `device`."""
    return torch.from_numpy(nearest_index(out_size, in_size)).to(device)


def _resize_nearest(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest resize of the last two dims by indexing: any dtype, values copied, never blended."""
    rows = _nearest_index(size[0], x.shape[-2], x.device)
    cols = _nearest_index(size[1], x.shape[-1], x.device)
    return x[..., rows[:, None], cols[None, :]]


def _pad_bottom_right(x: Tensor, size: tuple[int, int], fill: float) -> Tensor:
    """Pad the last two dims up to at least `size`, bottom and right, with `fill`."""
    h, w = x.shape[-2:]
    if h >= size[0] and w >= size[1]:
        return x
    out = torch.full((*x.shape[:-2], max(h, size[0]), max(w, size[1])), fill, dtype=x.dtype, device=x.device)
    out[..., :h, :w] = x
    return out


def weak_view(
    images: Tensor,
    maps: Sequence[Tensor],
    crop_size: tuple[int, int],
    scale_range: tuple[float, float] = (0.5, 2.0),
    flip_p: float = 0.5,
    generator: torch.Generator | None = None,
    fill_values: Sequence[float] | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """Random scale, crop and horizontal flip, drawn per image and shared by the image and its maps.

    images: (B, 3, H, W) float. maps: per-pixel maps aligned with the images, (B, H, W) or
    (B, K, H, W), any dtype (labels, relative confidences, top-k answers). The image is resized
    bilinearly; maps by nearest neighbour, so labels stay labels and a confidence stays the
    confidence of the label beside it. Where the scaled image is smaller than the crop it is
    padded bottom/right: images with 0, map i with fill_values[i] (default 255 for integer maps,
    0.0 for float maps). Pass a float map of ones with fill 0 to learn which pixels are image.
    Returns the (B, 3, *crop_size) images and the maps at (B[, K], *crop_size).
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    batch, _, height, width = images.shape
    for i, m in enumerate(maps):
        if m.ndim not in (3, 4) or m.shape[0] != batch or m.shape[-2:] != images.shape[-2:]:
            raise ValueError(f"map {i} of shape {tuple(m.shape)} is not aligned with images {tuple(images.shape)}")
    if fill_values is None:
        fill_values = [0.0 if m.is_floating_point() else 255 for m in maps]
    if len(fill_values) != len(maps):
        raise ValueError(f"{len(fill_values)} fill values for {len(maps)} maps")
    crop_h, crop_w = crop_size

    # One draw for the whole batch, then plain Python numbers: reproducible under a seeded generator.
    draws = _uniform((batch, 4), generator, torch.device("cpu")).tolist()
    out_images: list[Tensor] = []
    out_maps: list[list[Tensor]] = [[] for _ in maps]
    for b, (u_scale, u_top, u_left, u_flip) in enumerate(draws):
        scale = scale_range[0] + u_scale * (scale_range[1] - scale_range[0])
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        image = F.interpolate(images[b : b + 1], size=size, mode="bilinear", align_corners=False)
        per_map = [_resize_nearest(m[b : b + 1], size) for m in maps]

        image = _pad_bottom_right(image, crop_size, 0.0)
        per_map = [_pad_bottom_right(m, crop_size, fill) for m, fill in zip(per_map, fill_values)]
        # floor(u * (n + 1)) is uniform over the n + 1 possible offsets; min() guards u -> 1.
        top = min(math.floor(u_top * (image.shape[-2] - crop_h + 1)), image.shape[-2] - crop_h)
        left = min(math.floor(u_left * (image.shape[-1] - crop_w + 1)), image.shape[-1] - crop_w)
        flip = u_flip < flip_p

        def crop(x: Tensor) -> Tensor:
            x = x[..., top : top + crop_h, left : left + crop_w]
            return x.flip(-1) if flip else x

        out_images.append(crop(image))
        for i, m in enumerate(per_map):
            out_maps[i].append(crop(m))
    return torch.cat(out_images), [torch.cat(parts) for parts in out_maps]


def _grayscale(images: Tensor) -> Tensor:
    """(B, 1, H, W) luma of (B, 3, H, W) RGB."""
    r, g, b = images.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def rgb_to_hsv(images: Tensor) -> Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> HSV in [0, 1] (hue as a fraction of the colour wheel)."""
    r, g, b = images.unbind(1)
    maxc = images.amax(1)
    minc = images.amin(1)
    delta = maxc - minc
    has_chroma = delta > 0
    saturation = torch.where(maxc > 0, delta / maxc.clamp(min=1e-12), torch.zeros_like(maxc))
    safe_delta = torch.where(has_chroma, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe_delta, (maxc - g) / safe_delta, (maxc - b) / safe_delta
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(has_chroma, (hue / 6.0) % 1.0, torch.zeros_like(hue))
    return torch.stack([hue, saturation, maxc], 1)


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    """Inverse of `rgb_to_hsv`."""
    h, s, v = hsv.unbind(1)
    sector = torch.floor(h * 6.0)
    f = h * 6.0 - sector
    sector = sector.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    # Per sector of the hue wheel, which of (v, q, p, t) is R, G and B.
    candidates = torch.stack([v, q, p, t], 1)  # (B, 4, H, W)
    table = torch.tensor(
        [[0, 3, 2], [1, 0, 2], [2, 0, 3], [2, 1, 0], [3, 2, 0], [0, 2, 1]], device=hsv.device
    )  # sector -> indices into candidates for (R, G, B)
    index = table[sector].permute(0, 3, 1, 2)  # (B, 3, H, W)
    return candidates.gather(1, index)


def _gaussian_blur(images: Tensor, sigmas: Tensor, max_sigma: float) -> Tensor:
    """Separable Gaussian blur with one sigma per image, as one grouped convolution."""
    batch, channels, height, width = images.shape
    radius = max(1, math.ceil(3.0 * max_sigma))
    offsets = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernels = torch.exp(-0.5 * (offsets[None, :] / sigmas[:, None]) ** 2)
    kernels = kernels / kernels.sum(1, keepdim=True)  # (B, 2r+1)
    kernels = kernels.repeat_interleave(channels, 0)  # one kernel per (image, channel) group
    x = images.reshape(1, batch * channels, height, width)
    # Replicate padding works for any image size (reflect needs the image wider than the radius).
    x = F.pad(x, (radius, radius, 0, 0), mode="replicate")
    x = F.conv2d(x, kernels[:, None, None, :], groups=batch * channels)
    x = F.pad(x, (0, 0, radius, radius), mode="replicate")
    x = F.conv2d(x, kernels[:, None, :, None], groups=batch * channels)
    return x.reshape(batch, channels, height, width)


def strong_view(
    images: Tensor,
    generator: torch.Generator | None = None,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.1,
    blur_p: float = 0.5,
    blur_sigma: tuple[float, float] = (0.1, 2.0),
    grayscale_p: float = 0.2,
    jitter_p: float = 1.0,
) -> Tensor:
    """Photometric augmentation of (B, 3, H, W) images in [0, 1]; geometry untouched.

    Per image: colour jitter (brightness, contrast and saturation factors uniform in
    [1 - x, 1 + x], hue shift uniform in [-hue, hue] of the colour wheel, applied in that order
    as torchvision does), then a Gaussian blur with probability blur_p (sigma uniform in
    blur_sigma), then grayscale with probability grayscale_p. Output clamped to [0, 1]. With jitter_p < 1 the
    colour jitter is applied to each image with that probability (one more draw per image, after the others).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    batch = images.shape[0]
    u = _uniform((batch, 7), generator, images.device).to(images.dtype)

    def factor(column: int, strength: float) -> Tensor:
        return (1.0 - strength + 2.0 * strength * u[:, column]).view(batch, 1, 1, 1)

    x = (images * factor(0, brightness)).clamp(0, 1)
    gray_mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    x = (gray_mean + factor(1, contrast) * (x - gray_mean)).clamp(0, 1)
    gray = _grayscale(x)
    x = (gray + factor(2, saturation) * (x - gray)).clamp(0, 1)
    if hue > 0:
        hsv = rgb_to_hsv(x)
        shift = (2.0 * u[:, 3] - 1.0).view(batch, 1, 1) * hue
        hsv = torch.stack([(hsv[:, 0] + shift) % 1.0, hsv[:, 1], hsv[:, 2]], 1)
        x = hsv_to_rgb(hsv).clamp(0, 1)

    if jitter_p < 1.0:
        keep = _uniform((batch,), generator, images.device).to(images.dtype) >= jitter_p
        x = torch.where(keep.view(batch, 1, 1, 1), images, x)
    if blur_p > 0:
        sigmas = blur_sigma[0] + u[:, 4] * (blur_sigma[1] - blur_sigma[0])
        blurred = _gaussian_blur(x, sigmas, max(blur_sigma))
        x = torch.where((u[:, 5] < blur_p).view(batch, 1, 1, 1), blurred, x)
    if grayscale_p > 0:
        x = torch.where((u[:, 6] < grayscale_p).view(batch, 1, 1, 1), _grayscale(x).expand_as(x), x)
    return x.clamp(0, 1)
