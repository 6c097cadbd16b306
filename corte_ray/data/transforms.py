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


def resize_map(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """HxW label / confidence map -> size (H, W), nearest (labels must never be interpolated)."""
    h, w = size
    if arr.shape[:2] == (h, w):
        return arr
    rows = (np.arange(h) * arr.shape[0] / h).astype(np.int64)
    cols = (np.arange(w) * arr.shape[1] / w).astype(np.int64)
    return arr[rows[:, None], cols[None, :]]
