"""Deterministic resizing of images (bilinear) and label-like maps (nearest), in numpy/PIL.

Random augmentations live in methods/views.py and run batched on the training device; this file only
brings files to the working resolution (e.g. Cityscapes 1024x2048 -> 512x1024) before that.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def resize_image(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """HxWx3 uint8 -> size (H, W), bilinear."""
    h, w = size
    if img.shape[:2] == (h, w):
        return img
    return np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))


def nearest_index(out_size: int, in_size: int) -> np.ndarray:
    """Source index of each output pixel for a nearest resize, pixel centres aligned: the one nearest-resize
    geometry of the package (the store's maps, the loader and the training views all use it).

    The same geometry as bilinear with align_corners=False (PyTorch's 'nearest-exact'), so that a resized
    label sits under the resized image; top-left alignment (plain 'nearest') is shifted by up to a pixel."""
    centres = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size)
    return np.minimum(np.floor(centres).astype(np.int64), in_size - 1)


def resize_map(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """HxW label / confidence map -> size (H, W), nearest (labels must never be interpolated)."""
    h, w = size
    if arr.shape[:2] == (h, w):
        return arr
    rows, cols = nearest_index(h, arr.shape[0]), nearest_index(w, arr.shape[1])
    return arr[rows[:, None], cols[None, :]]
