"""What the training loop reads: target images joined with the black box's stored answer, in an order that is
a pure function of (seed, rank, step), so a resumed run sees exactly the batches it would have seen.

`TargetTrainSet` reads one sample; `sample_order` gives the order; `local_batches` is the local engine's
DataLoader over it (the Ray engine streams the same samples through Ray Data); `to_device_batch` turns a
batch into the tensors a method step takes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset as TorchDataset, Sampler

from ..config import Config
from ..data.datasets import Dataset
from ..data.transforms import resize_image, resize_map
from ..errors import ConfigError, InputError


class TargetTrainSet(TorchDataset):
    """Target images joined with the black box's stored answer (or ground truth for `oracle`)."""

    def __init__(self, dataset: Dataset, store=None, resize: tuple[int, int] | None = None,
                 with_labels: bool = False, cache: bool = False, with_top2: bool = False) -> None:
        self.dataset, self.store, self.resize, self.with_labels = dataset, store, resize, with_labels
        self.with_top2 = with_top2   # the box's second class too (corte.set_weight: top-2 set labels)
        # Decoded samples by index: PNG/JPEG decoding and the label-store lookup cost more than a training step
        # of a small student on CPU, and every image is read once per epoch.
        self._cache: dict[int, dict[str, np.ndarray]] | None = {} if cache else None
        if store is not None:
            missing = [s.key for s in dataset.samples if s.key not in store]
            if missing:
                raise InputError(store.root, f"{len(missing)} of {len(dataset)} images have no labels in the store "
                                             f"(first: {missing[0]}); rerun `corte-ray label` to complete it")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if self._cache is not None:
            if i not in self._cache:
                self._cache[i] = self._read(i)
            return self._cache[i]
        return self._read(i)

    def _read(self, i: int) -> dict[str, np.ndarray]:
        sample = self.dataset[i]
        img = self.dataset.read_image(sample)
        out: dict[str, np.ndarray] = {}
        if self.with_labels:
            out["label"] = self.dataset.read_label(sample, img.shape[:2])
        if self.store is not None:
            box = self.store.get(sample.key)
            out["box_top1"], out["box_p1"] = box.top1, box.p1
            if box.rc is not None:
                out["box_rc"] = box.rc
            if self.with_top2 and box.top2 is not None:
                out["box_top2"] = box.top2
        size = self.resize or img.shape[:2]
        img = resize_image(img, size)
        out = {k: resize_map(v, size) for k, v in out.items()}   # the store may hold another resolution
        out["image"] = np.ascontiguousarray(img.transpose(2, 0, 1))
        return out


class ResumableSampler(Sampler[int]):
    """Image indices, epoch after epoch: epoch e is the first `keep` items (default: all n) of a permutation drawn
    from (seed, e); iteration starts `skip` items into epoch `start_epoch`.

    `sample_order` makes `keep` a whole number of batches, so no batch straddles two epochs: batch k of epoch e
    is fixed by (seed, e, k) alone, and a run resumed at any step sees exactly the batches it would have seen.
    Iterating has no side effects: every `iter()` starts again at (start_epoch, skip).
    """

    def __init__(self, n: int, seed: int, start_epoch: int = 0, skip: int = 0, keep: int | None = None) -> None:
        keep = n if keep is None else keep
        if not 0 < keep <= n or not 0 <= skip < keep:
            raise ValueError(f"ResumableSampler: need 0 < keep={keep} <= n={n} and 0 <= skip={skip} < keep")
        self.n, self.seed, self.start_epoch, self.skip, self.keep = n, seed, start_epoch, skip, keep

    def __iter__(self):
        epoch, skip = self.start_epoch, self.skip
        while True:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            yield from torch.randperm(self.n, generator=g)[skip:self.keep].tolist()
            epoch, skip = epoch + 1, 0

    def __len__(self) -> int:  # infinite in practice; DataLoader only needs it for len(loader)
        return 2 ** 62


def sample_order(n: int, batch_size: int, seed: int, rank: int, start_step: int) -> ResumableSampler:
    """Image indices in training order from `start_step` on, a pure function of (seed, rank, step).

    An epoch is the first n // batch_size whole batches of a fresh permutation; its n % batch_size left-over
    images sit that epoch out (the next permutation gives them their turn). So step s reads batch
    s % per_epoch of epoch s // per_epoch, whether the run got there in one go or resumed at any step.
    (When batch_size divides n this is the plain permutation-per-epoch order of earlier versions.)"""
    per_epoch = max(1, n // batch_size)
    return ResumableSampler(n, seed * 7919 + rank, start_epoch=start_step // per_epoch,
                            skip=(start_step % per_epoch) * batch_size, keep=min(n, per_epoch * batch_size))


def local_batches(data: TargetTrainSet, cfg: Config, rank: int, start_step: int):
    """Batches for one process: a DataLoader over `sample_order` (workers decode in parallel when asked)."""
    sampler = sample_order(len(data), cfg.data.batch_size, cfg.train.seed, rank, start_step)
    # Its own generator: a DataLoader without one draws its worker base seed from the global RNG when it is
    # iterated, which would put a resumed run's global RNG one draw away from the uninterrupted run's.
    loader = DataLoader(data, batch_size=cfg.data.batch_size, sampler=sampler, collate_fn=_collate,
                        num_workers=cfg.data.loader_workers, drop_last=True,
                        persistent_workers=cfg.data.loader_workers > 0,
                        generator=torch.Generator().manual_seed(cfg.train.seed * 7919 + rank))
    return iter(loader)


def _collate(items: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    keys = items[0].keys()
    shapes = {it["image"].shape for it in items}
    if len(shapes) > 1:
        raise ConfigError(f"data.resize: images of different sizes {sorted(shapes)} in one batch; set data.resize=[H, W]")
    return {k: torch.from_numpy(np.stack([it[k] for it in items])) for k in keys}


def to_device_batch(batch: dict[str, torch.Tensor], device: torch.device, channels_last: bool) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in batch.items():
        v = v.to(device, non_blocking=True)
        if k == "image":
            v = v.float().div_(255.0)
            if channels_last:
                v = v.contiguous(memory_format=torch.channels_last)
        elif k in ("box_top1", "box_top2", "label"):
            v = v.long()
        else:
            v = v.float()
        out[k] = v
    return out
