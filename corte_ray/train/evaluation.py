"""Evaluation inside a run: predictions of one image, the split's mIoU all-reduced across ranks, and the
prediction overlays TensorBoard shows."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..data.datasets import Dataset
from ..data.transforms import resize_image, resize_map


@torch.no_grad()
def predict_train_ids(model: nn.Module, img: np.ndarray, device: torch.device, resize: tuple[int, int] | None = None,
                      out_size: tuple[int, int] | None = None, amp: bool = False) -> np.ndarray:
    """One HxWx3 uint8 image -> HxW uint8 train ids: predicted at `resize` (default: the image's size), logits
    up-sampled bilinearly to `out_size` (default: the image's size) before the arg-max."""
    x = torch.from_numpy(np.ascontiguousarray(resize_image(img, resize or img.shape[:2]).transpose(2, 0, 1)))
    x = x[None].to(device).float() / 255.0
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda"):
        logits = model(x)
    logits = torch.nn.functional.interpolate(logits.float(), size=tuple(out_size or img.shape[:2]), mode="bilinear",
                                             align_corners=False)
    return logits.argmax(1)[0].to(torch.uint8).cpu().numpy()


@torch.no_grad()
def evaluate_model(model: nn.Module, dataset: Dataset, classes: tuple[int, ...], num_classes: int, device: torch.device,
                   resize: tuple[int, int] | None, ctx, max_images: int | None = None, amp: bool = True,
                   shard: bool = True) -> dict:
    """mIoU from one confusion matrix over the split, all-reduced across ranks (each rank takes every
    world_size-th image). Predictions are made at the working resolution and up-sampled to the label's."""
    from ..evaluation import confusion_matrix, result_from_confusion

    model.eval()
    samples = dataset.samples[:max_images] if max_images else dataset.samples
    mine = samples[ctx.rank::ctx.world_size] if shard else samples
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    use_amp = amp and device.type == "cuda"
    for sample in mine:
        img = dataset.read_image(sample)
        label = dataset.read_label(sample, img.shape[:2])
        pred = predict_train_ids(model, img, device, resize=resize, out_size=label.shape, amp=use_amp)
        conf += confusion_matrix(pred, label, num_classes)
    total = torch.from_numpy(conf).to(device)
    if shard:
        ctx.all_reduce_(total)
    res = result_from_confusion(total.cpu().numpy(), classes, dataset.label_space.class_names, len(samples))
    return {"miou": res.miou, "per_class": res.per_class, "num_images": res.num_images}


@torch.no_grad()
def prediction_overlays(model: nn.Module, dataset: Dataset, device: torch.device, resize: tuple[int, int] | None,
                        n: int = 4) -> torch.Tensor:
    """A (3, H, W) uint8 grid for TensorBoard: per val image, the image | ground truth | prediction blended 50 %
    with the class colours."""
    model.eval()
    rows = []
    for sample in dataset.samples[:n]:
        raw = dataset.read_image(sample)
        img = resize_image(raw, resize or raw.shape[:2])
        gt = resize_map(dataset.read_label(sample), img.shape[:2])
        pred = predict_train_ids(model, img, device)
        space = dataset.label_space
        blend = [(0.5 * img + 0.5 * space.colorize(m)).astype(np.uint8) for m in (gt, pred)]
        rows.append(np.concatenate([img] + blend, axis=1))
    return torch.from_numpy(np.concatenate(rows, axis=0)).permute(2, 0, 1).contiguous()
