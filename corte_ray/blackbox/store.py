"""The pseudo-label store: what the black box answered for every target image, queried once, kept forever.

Layout of a store directory:
    meta.json         what was labelled how: answer kind, k, num_classes, box, dataset, image size
    parts/*.parquet   one row per image, written atomically part by part (a killed job loses at most the part
                      it was writing; a rerun labels only keys not yet in any part)
    thresholds.json   per-class relative-confidence statistics over the whole store and tau_c (METHODS 1.1)

Row: key, height, width, topk_ids (k*H*W uint8), topk_probs (k*H*W uint8, p quantised to round(255 p)) or
hard (H*W uint8) for a hard-label box, and the image's per-class rc sums and pixel counts, so thresholds
are a sum over rows (exact under sharding, resuming and several writers). The statistics are computed from
the quantised probabilities, i.e. exactly what training later reads.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import InputError
from ..io_utils import write_atomic, write_json_atomic

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
_SCHEMA = pa.schema([
    ("key", pa.string()), ("height", pa.int32()), ("width", pa.int32()),
    ("topk_ids", pa.binary()), ("topk_probs", pa.binary()), ("hard", pa.binary()),
    ("rc_sum", pa.list_(pa.float64())), ("rc_count", pa.list_(pa.int64())),
])


def quantise(p: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(p, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def dequantise(q: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) / 255.0


def encode_answer(key: str, kind: str, num_classes: int, top_ids: np.ndarray | None = None,
                  top_probs: np.ndarray | None = None, hard: np.ndarray | None = None) -> dict:
    """One store row from one image's answer: top_ids/top_probs (k,H,W) sorted desc, or hard (H,W)."""
    if kind == "hard":
        hard = np.asarray(hard, dtype=np.uint8)
        h, w = hard.shape
        return {"key": key, "height": h, "width": w, "topk_ids": None, "topk_probs": None,
                "hard": hard.tobytes(), "rc_sum": [0.0] * num_classes, "rc_count": [0] * num_classes}
    ids = np.asarray(top_ids, dtype=np.uint8)
    q = quantise(top_probs)
    _, h, w = ids.shape
    rc = dequantise(q[0]) - dequantise(q[1])
    top1 = ids[0].reshape(-1).astype(np.int64)
    sums = np.bincount(top1, weights=rc.reshape(-1).astype(np.float64), minlength=num_classes)[:num_classes]
    counts = np.bincount(top1, minlength=num_classes)[:num_classes]
    return {"key": key, "height": h, "width": w, "topk_ids": ids.tobytes(), "topk_probs": q.tobytes(),
            "hard": None, "rc_sum": sums.tolist(), "rc_count": counts.astype(np.int64).tolist()}


@dataclass
class BoxLabels:
    """One image's labels as training reads them."""

    top1: np.ndarray            # (H,W) uint8
    p1: np.ndarray              # (H,W) float32 (1.0 for a hard-label box)
    rc: np.ndarray | None       # (H,W) float32, None for a hard-label box


class LabelStoreWriter:
    """Appends atomic Parquet parts; knows which keys are already done so a rerun never queries twice."""

    def __init__(self, root: str | Path, meta: dict, overwrite: bool = False) -> None:
        self.root = Path(root)
        self.parts = self.root / "parts"
        if overwrite and self.root.exists():
            for p in list(self.parts.glob("*.parquet")) + [self.root / "thresholds.json", self.root / "meta.json"]:
                p.unlink(missing_ok=True)
        self.parts.mkdir(parents=True, exist_ok=True)
        meta = {"format_version": FORMAT_VERSION, **meta}
        meta_path = self.root / "meta.json"
        if meta_path.exists():
            old = json.loads(meta_path.read_text())
            for field in ("answer_kind", "k", "num_classes"):
                if old.get(field) != meta.get(field):
                    raise InputError(meta_path, f"existing store has {field}={old.get(field)!r}, this job "
                                                f"{meta.get(field)!r}; use --overwrite to relabel")
        else:
            write_json_atomic(meta_path, meta)
        self.meta = meta

    def done_keys(self) -> set[str]:
        keys: set[str] = set()
        for part in sorted(self.parts.glob("*.parquet")):
            keys.update(pq.read_table(part, columns=["key"]).column("key").to_pylist())
        return keys

    def write_part(self, rows: Sequence[dict]) -> Path | None:
        if not rows:
            return None
        # A box that answers a weaker kind than the store was opened for (e.g. hard labels into a top-k store)
        # would only fail later, on read; refuse it here, before anything is written.
        hard_store = self.meta["answer_kind"] == "hard"
        for row in rows:
            if (row["hard"] is not None) != hard_store:
                got = "hard labels" if row["hard"] is not None else "top-k probabilities"
                raise InputError(self.root, f"the box answered {got} for {row['key']!r}, but this store holds "
                                            f"{self.meta['answer_kind']} answers; relabel with --overwrite or "
                                            f"--answer hard")
        table = pa.Table.from_pylist(list(rows), schema=_SCHEMA)
        # A unique name per part lets several writers (Ray Data tasks) add parts without coordination.
        path = self.parts / f"part-{uuid.uuid4().hex}.parquet"
        write_atomic(path, lambda tmp: pq.write_table(table, tmp, compression="zstd", row_group_size=4))
        return path

    def finalize(self) -> dict:
        """Write thresholds.json from every part (duplicate keys, e.g. from a retried task, count once)."""
        return write_thresholds(self.root, int(self.meta["num_classes"]))


def write_thresholds(root: str | Path, num_classes: int) -> dict:
    root = Path(root)
    sums = np.zeros(num_classes, dtype=np.float64)
    counts = np.zeros(num_classes, dtype=np.int64)
    seen: set[str] = set()
    images = 0
    for part in sorted((root / "parts").glob("*.parquet")):
        table = pq.read_table(part, columns=["key", "rc_sum", "rc_count"]).to_pydict()
        for key, s, c in zip(table["key"], table["rc_sum"], table["rc_count"]):
            if key in seen:
                continue
            seen.add(key)
            images += 1
            sums += np.asarray(s, dtype=np.float64)
            counts += np.asarray(c, dtype=np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    doc = {
        "num_classes": num_classes,
        "num_images": images,
        "class_mean_rc": [None if np.isnan(m) else float(m) for m in mean],
        "class_pixels": counts.tolist(),
        # tau_c at alpha = 1; training scales by corte.rc_scale, so Tune can vary alpha without relabelling.
        "tau": [1.0 if np.isnan(m) else float(m) for m in mean],
    }
    write_json_atomic(root / "thresholds.json", doc)
    return doc


class LabelStore:
    """Reads a finished store: random access by image key."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        meta_path = self.root / "meta.json"
        if not meta_path.exists():
            raise InputError(self.root, "not a label store (no meta.json); write one with `corte-ray label`")
        self.meta = json.loads(meta_path.read_text())
        self.kind: str = self.meta["answer_kind"]
        self.num_classes: int = int(self.meta["num_classes"])
        self._index: dict[str, tuple[Path, int, int]] = {}
        for part in sorted((self.root / "parts").glob("*.parquet")):
            f = pq.ParquetFile(part)
            for rg in range(f.num_row_groups):
                keys = f.read_row_group(rg, columns=["key"]).column("key").to_pylist()
                for i, key in enumerate(keys):
                    self._index.setdefault(key, (part, rg, i))
        self._cache: tuple[tuple[Path, int], dict] | None = None

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def keys(self) -> list[str]:
        return sorted(self._index)

    def class_mean_rc(self) -> np.ndarray:
        """Per-class mean relative confidence (nan for never-predicted classes) from thresholds.json."""
        path = self.root / "thresholds.json"
        if not path.exists():
            raise InputError(path, "missing: the labelling job did not finish; rerun it to complete the store")
        doc = json.loads(path.read_text())
        return np.array([np.nan if v is None else v for v in doc["class_mean_rc"]], dtype=np.float64)

    def get(self, key: str) -> BoxLabels:
        try:
            part, rg, i = self._index[key]
        except KeyError:
            raise InputError(self.root, f"no labels for image {key!r} in the store; rerun `corte-ray label` "
                                        "on this dataset to add it") from None
        if self._cache is None or self._cache[0] != (part, rg):
            self._cache = ((part, rg), pq.ParquetFile(part).read_row_group(rg).to_pydict())
        row = {k: v[i] for k, v in self._cache[1].items()}
        h, w = row["height"], row["width"]
        if self.kind == "hard":
            top1 = np.frombuffer(row["hard"], dtype=np.uint8).reshape(h, w)
            return BoxLabels(top1=top1, p1=np.ones((h, w), np.float32), rc=None)
        ids = np.frombuffer(row["topk_ids"], dtype=np.uint8).reshape(-1, h, w)
        probs = dequantise(np.frombuffer(row["topk_probs"], dtype=np.uint8).reshape(-1, h, w))
        return BoxLabels(top1=ids[0], p1=probs[0], rc=probs[0] - probs[1])


def answer_rows(answer, keys: Sequence[str], k: int) -> list[dict]:
    """Store rows from a BoxAnswer (corte_ray.blackbox.protocol) for a batch of images."""
    rows = []
    if answer.kind == "hard":
        hard = answer.hard.cpu().numpy()
        for i, key in enumerate(keys):
            rows.append(encode_answer(key, "hard", answer.num_classes, hard=hard[i]))
        return rows
    a = answer if answer.kind == "topk" else answer.to_topk(k)
    ids, probs = a.topk_ids.cpu().numpy(), a.topk_probs.float().cpu().numpy()
    for i, key in enumerate(keys):
        rows.append(encode_answer(key, "topk", answer.num_classes, top_ids=ids[i], top_probs=probs[i]))
    return rows


def label_store_meta(box, dataset, resize: tuple[int, int] | None, k: int) -> dict:
    """meta.json of a store labelled by `box` over `dataset` (one definition for the local and the Ray job)."""
    kind = box.answer_kind
    return {
        "answer_kind": "hard" if kind == "hard" else "topk", "box_answer": kind,
        "k": None if kind == "hard" else k, "num_classes": box.num_classes, "blackbox": box.name,
        "dataset": dataset.name, "split": dataset.split, "resize": list(resize) if resize else None,
    }


def label_dataset_local(dataset, box, store_dir: str | Path, resize: tuple[int, int] | None = None,
                        batch_size: int = 8, part_size: int = 64, overwrite: bool = False, k: int = 2) -> dict:
    """Label every image of `dataset` with `box` in this process (no Ray) and write the store.

    Skips keys already in the store (resume), writes a part every `part_size` images, finalises the thresholds.
    Returns the thresholds document.
    """
    from ..data.transforms import resize_image
    from ..log import progress

    writer = LabelStoreWriter(store_dir, label_store_meta(box, dataset, resize, k), overwrite=overwrite)
    done = writer.done_keys()
    todo = [s for s in dataset.samples if s.key not in done]
    if done:
        log.info("label store %s already holds %d images; labelling the %d missing", store_dir, len(done), len(todo))
    rows: list[dict] = []
    batch_imgs: list[np.ndarray] = []
    batch_keys: list[str] = []

    def flush_batch() -> None:
        if batch_imgs:
            answer = box.query(np.stack(batch_imgs))
            rows.extend(answer_rows(answer, batch_keys, k))
            batch_imgs.clear()
            batch_keys.clear()

    for sample in progress(todo, desc="label", unit="img"):
        img = dataset.read_image(sample)
        if resize is not None:
            img = resize_image(img, resize)
        if batch_imgs and img.shape != batch_imgs[0].shape:
            flush_batch()
        batch_imgs.append(img)
        batch_keys.append(sample.key)
        if len(batch_imgs) >= batch_size:
            flush_batch()
        if len(rows) >= part_size:
            writer.write_part(rows)
            rows = []
    flush_batch()
    writer.write_part(rows)
    return writer.finalize()
