"""The pseudo-label store: what the black box answered for every target image, queried once, kept forever.

Layout of a store directory:
    meta.json              what was labelled how: answer kind, k, num_classes, box, dataset, split, image size;
                           a store refuses to add rows made any other way (it would mix two label sets)
    parts/*.parquet        one row per image, written atomically part by part (a killed job loses at most the
                           part it was writing; a rerun labels only keys not yet in any part)
    parts/*.parquet.json   the part's manifest: its keys, row count, size and sha256, written atomically right
                           after the part. A part whose bytes no longer match (a flipped byte, a truncated
                           copy) is damaged: readers refuse the store naming the part, and the next `label` run
                           moves it to damaged/ and relabels its keys. A part without a manifest (a store of
                           format 1, or a kill between the two renames) is adopted when it reads back whole.
    thresholds.json        per-class relative-confidence statistics over the whole store and tau_c (METHODS 1.1)

The root may be a local path or an s3:// / gs:// URI (corte_ray.storage): every part is one whole object, and
labelling actors on any node write theirs straight to the store's storage.

Row: key, height, width, topk_ids (k*H*W uint8), topk_probs (k*H*W uint8, p quantised to round(255 p)) or
hard (H*W uint8) for a hard-label box, and the image's per-class rc sums and pixel counts, so thresholds
are a sum over rows (exact under sharding, resuming and several writers, and over any subset of keys: training
computes its thresholds over the split it trains on). The statistics are computed from the quantised
probabilities, i.e. exactly what training later reads.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from ..errors import InputError
from ..io_utils import write_atomic, write_json_atomic

log = logging.getLogger(__name__)
FORMAT_VERSION = 2
MANIFEST_SUFFIX = ".json"
DAMAGED_DIR = "damaged"
# What a store was made with: rows made any other way may not join it.
IDENTITY_FIELDS = ("answer_kind", "k", "num_classes", "blackbox", "dataset", "split", "resize")
_SCHEMA = pa.schema([
    ("key", pa.string()), ("height", pa.int32()), ("width", pa.int32()),
    ("topk_ids", pa.binary()), ("topk_probs", pa.binary()), ("hard", pa.binary()),
    ("rc_sum", pa.list_(pa.float64())), ("rc_count", pa.list_(pa.int64())),
])


def quantise(p: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(p, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def dequantise(q: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) / 255.0


def encode_store_row(key: str, kind: str, num_classes: int, top_ids: np.ndarray | None = None,
                  top_probs: np.ndarray | None = None, hard: np.ndarray | None = None) -> dict:
    """One store row from one image's answer: top_ids/top_probs (k,H,W) sorted desc, or hard (H,W). (The wire
    format's encoder is `http.encode_wire_answer`.)"""
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
    top2: np.ndarray | None = None  # (H,W) uint8, the box's second class; None for a hard-label box


@contextlib.contextmanager
def _parquet_source(path):
    """What pyarrow.parquet reads: a local path as it is, an object as a seekable remote file (closed after)."""
    if isinstance(path, Path):
        yield path
        return
    with path.open("rb") as f:
        yield f


def _read_table(path, columns: list[str] | None = None) -> pa.Table:
    with _parquet_source(path) as src:
        return pq.read_table(src, columns=columns)


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with storage.open_input(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest_path(part: Path) -> Path:
    return part.with_name(part.name + MANIFEST_SUFFIX)


def _manifest_of(part: Path) -> dict:
    """The manifest of a part file as it is on disk now (reads the whole part)."""
    keys = _read_table(part, columns=["key"]).column("key").to_pylist()
    return {"part": part.name, "rows": len(keys), "bytes": part.stat().st_size, "sha256": _sha256(part),
            "keys": keys}


@dataclass
class PartCheck:
    """One part of a store as found on disk: healthy (with its keys) or damaged (with why)."""

    path: Path
    keys: list[str]
    problem: str | None = None   # None: healthy


def check_parts(root: str | Path, adopt: bool = False) -> list[PartCheck]:
    """Every part of the store at `root`, verified against its manifest (size and sha256). A part without a
    manifest is read back whole: readable, it is healthy (and with `adopt` its manifest is written now)."""
    parts_dir = storage.as_path(root) / "parts"
    checks = []
    for part in sorted(parts_dir.glob("*.parquet")):
        manifest_path = _manifest_path(part)
        manifest = None
        if manifest_path.exists():
            try:
                manifest = json.loads(manifest_path.read_text())
                keys = list(manifest["keys"])
            except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                manifest = None   # a torn manifest says nothing; judge the part by reading it
        if manifest is not None:
            size = part.stat().st_size
            if size != manifest.get("bytes"):
                checks.append(PartCheck(part, keys, f"{size} bytes where its manifest says {manifest.get('bytes')} "
                                                    "(truncated or overwritten)"))
            elif _sha256(part) != manifest.get("sha256"):
                checks.append(PartCheck(part, keys, "its sha256 does not match its manifest (bytes changed)"))
            else:
                checks.append(PartCheck(part, keys))
            continue
        try:
            found = _manifest_of(part)
            _read_table(part)   # every column, not only the keys
        except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a damaged file
            checks.append(PartCheck(part, [], f"unreadable Parquet ({type(err).__name__}: "
                                              f"{str(err).splitlines()[0][:120] if str(err) else ''})"))
            continue
        if adopt:
            write_json_atomic(manifest_path, found)
        checks.append(PartCheck(part, found["keys"]))
    return checks


def _damage_message(check: PartCheck, root: Path) -> str:
    known = f"its {len(check.keys)} images" if check.keys else "its images"
    return (f"damaged label-store part: {check.problem}; run `corte-ray label` again on this store ({root}): it "
            f"moves the part to {DAMAGED_DIR}/ and relabels {known}")


class LabelStoreWriter:
    """Appends atomic Parquet parts (each with its manifest); knows which keys are already done so a rerun
    never queries twice, and moves damaged parts aside so their keys are labelled again."""

    def __init__(self, root: str | Path, meta: dict, overwrite: bool = False, check: bool = True) -> None:
        self.root = storage.as_path(root)
        self.parts = self.root / "parts"
        if overwrite and self.root.exists():
            for p in list(self.parts.glob("*.parquet*")) + [self.root / "thresholds.json", self.root / "meta.json"]:
                p.unlink(missing_ok=True)
        try:
            self.parts.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise InputError(self.root, f"cannot create the label store here ({err.strerror})") from None
        meta = {"format_version": FORMAT_VERSION, **meta}
        meta_path = self.root / "meta.json"
        if meta_path.exists():
            old = _read_meta(meta_path)
            for field in IDENTITY_FIELDS:
                if field in old and field in meta and old[field] != meta[field]:
                    raise InputError(meta_path, f"existing store has {field}={old[field]!r}, this job "
                                                f"{meta[field]!r}; a store holds one labelling; use --overwrite "
                                                "to relabel, or another --out")
            meta = {**old, **{k: v for k, v in meta.items() if k not in old}}
        else:
            write_json_atomic(meta_path, meta)
        self.meta = meta
        self.damaged: list[Path] = []

    def done_keys(self) -> set[str]:
        """Keys in healthy parts. Damaged parts are reported (one line each) and moved to damaged/, so that
        their keys count as not done and are labelled again."""
        keys: set[str] = set()
        for check in check_parts(self.root, adopt=True):
            if check.problem is None:
                keys.update(check.keys)
                continue
            target = self.root / DAMAGED_DIR / check.path.name
            storage.move(check.path, target)
            _manifest_path(check.path).unlink(missing_ok=True)
            self.damaged.append(target)
            log.warning("%s: damaged (%s); moved to %s, its %s relabelled", check.path, check.problem, target,
                        f"{len(check.keys)} images are" if check.keys else "images are")
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
        manifest = {"part": path.name, "rows": len(rows), "bytes": path.stat().st_size, "sha256": _sha256(path),
                    "keys": [row["key"] for row in rows]}
        write_json_atomic(_manifest_path(path), manifest)
        return path

    def finalize(self, keys: Iterable[str] | None = None) -> dict:
        """Write thresholds.json from every part (duplicate keys, e.g. from a retried task, count once)."""
        return write_thresholds(self.root, int(self.meta["num_classes"]), keys=keys)


def known_keys(root: str | Path) -> set[str]:
    """Keys listed in the manifests of the store's parts (cheap: no Parquet is read); parts without a
    manifest are not counted."""
    keys: set[str] = set()
    for manifest in (storage.as_path(root) / "parts").glob("*.parquet" + MANIFEST_SUFFIX):
        try:
            keys.update(json.loads(manifest.read_text())["keys"])
        except (OSError, ValueError, KeyError):
            continue
    return keys


def _read_meta(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(path, f"unreadable label-store metadata ({type(err).__name__}); relabel with --overwrite") \
            from None
    if not isinstance(meta, dict) or "answer_kind" not in meta or "num_classes" not in meta:
        raise InputError(path, "not label-store metadata (no answer_kind/num_classes)")
    return meta


def _sum_stats(root: Path, num_classes: int, parts: Sequence[Path], keys: Iterable[str] | None):
    """(per-class rc sums, pixel counts, images) over the rows of `parts` whose key is in `keys` (all: None),
    each key once (first part wins, as for reads)."""
    wanted = None if keys is None else set(keys)
    sums = np.zeros(num_classes, dtype=np.float64)
    counts = np.zeros(num_classes, dtype=np.int64)
    seen: set[str] = set()
    for part in parts:
        try:
            table = _read_table(part, columns=["key", "rc_sum", "rc_count"]).to_pydict()
        except Exception as err:  # noqa: BLE001
            raise InputError(part, f"damaged label-store part ({type(err).__name__}); run `corte-ray label` "
                                   f"again on {root} to relabel it") from None
        for key, s, c in zip(table["key"], table["rc_sum"], table["rc_count"]):
            if key in seen or (wanted is not None and key not in wanted):
                continue
            seen.add(key)
            sums += np.asarray(s, dtype=np.float64)
            counts += np.asarray(c, dtype=np.int64)
    return sums, counts, len(seen)


def write_thresholds(root: str | Path, num_classes: int, keys: Iterable[str] | None = None) -> dict:
    from ..methods.pseudo_labels import thresholds_from_stats

    root = storage.as_path(root)
    sums, counts, images = _sum_stats(root, num_classes, sorted((root / "parts").glob("*.parquet")), keys)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    doc = {
        "num_classes": num_classes,
        "num_images": images,
        "class_mean_rc": [None if np.isnan(m) else float(m) for m in mean],
        "class_pixels": counts.tolist(),
        # tau_c at alpha = 1; training scales by corte.rc_scale, so Tune can vary alpha without relabelling.
        "tau": thresholds_from_stats(sums, counts, alpha=1.0).tolist(),
    }
    write_json_atomic(root / "thresholds.json", doc)
    return doc


class LabelStore:
    """Reads a finished store: random access by image key. Refuses, naming the part, a store with a damaged
    part (checked against the manifests when opened)."""

    def __init__(self, root) -> None:
        self.root = storage.as_path(root)
        meta_path = self.root / "meta.json"
        if not meta_path.exists():
            raise InputError(self.root, "not a label store (no meta.json); write one with `corte-ray label`")
        self.meta = _read_meta(meta_path)
        self.kind: str = self.meta["answer_kind"]
        self.num_classes: int = int(self.meta["num_classes"])
        self._index: dict[str, tuple[Path, int, int]] = {}
        self._rows = 0
        self._parts: list[Path] = []
        for check in check_parts(self.root):
            if check.problem is not None:
                raise InputError(check.path, _damage_message(check, self.root))
            try:
                with _parquet_source(check.path) as src:
                    f = pq.ParquetFile(src)
                    for rg in range(f.num_row_groups):
                        keys = f.read_row_group(rg, columns=["key"]).column("key").to_pylist()
                        for i, key in enumerate(keys):
                            self._rows += 1
                            self._index.setdefault(key, (check.path, rg, i))
            except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a damaged file
                raise InputError(check.path, _damage_message(
                    PartCheck(check.path, check.keys, f"unreadable ({type(err).__name__})"), self.root)) from None
            self._parts.append(check.path)
        self._cache: tuple[tuple[Path, int], dict] | None = None
        self._prefetched: dict[str, dict] = {}

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def keys(self) -> list[str]:
        return sorted(self._index)

    def row_count(self) -> int:
        """Rows in all parts, duplicates included (a key answered twice is two rows)."""
        return self._rows

    def class_mean_rc(self, keys: Iterable[str] | None = None) -> np.ndarray:
        """Per-class mean relative confidence (nan for never-predicted classes): over the images `keys` (the
        split being trained on) from the rows' own statistics, or over the whole store from thresholds.json."""
        if keys is not None:
            sums, counts, _ = _sum_stats(self.root, self.num_classes, self._parts, keys)
            with np.errstate(invalid="ignore", divide="ignore"):
                return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        path = self.root / "thresholds.json"
        if not path.exists():
            raise InputError(path, "missing: the labelling job did not finish; rerun it to complete the store")
        doc = json.loads(path.read_text())
        return np.array([np.nan if v is None else v for v in doc["class_mean_rc"]], dtype=np.float64)

    def _locate(self, key: str) -> tuple[Path, int, int]:
        try:
            return self._index[key]
        except KeyError:
            raise InputError(self.root, f"no labels for image {key!r} in the store; rerun `corte-ray label` "
                                        "on this dataset to add it") from None

    def _read_row_groups(self, part: Path, row_groups: list[int]) -> dict[int, dict]:
        """{row group: its rows as a column dict} of one part, in one read."""
        try:
            with _parquet_source(part) as src:
                f = pq.ParquetFile(src)
                return {rg: f.read_row_group(rg).to_pydict() for rg in row_groups}
        except Exception as err:  # noqa: BLE001 - changed on disk since it was opened
            raise InputError(part, _damage_message(PartCheck(part, [], f"unreadable ({type(err).__name__})"),
                                                   self.root)) from None

    def prefetch(self, keys: Sequence[str]) -> None:
        """Read the rows of `keys` part by part (each part opened once, only the row groups needed), for the
        `get` calls that follow; replaces what an earlier prefetch held. The training stream calls it once
        per block of images: random access costs one file open per part touched, not one per image."""
        by_part: dict[Path, set[int]] = {}
        for key in keys:
            part, rg, _ = self._locate(key)
            by_part.setdefault(part, set()).add(rg)
        groups = {(part, rg): cols for part, rgs in by_part.items()
                  for rg, cols in self._read_row_groups(part, sorted(rgs)).items()}
        self._prefetched = {}
        for key in keys:
            part, rg, i = self._index[key]
            self._prefetched[key] = {k: v[i] for k, v in groups[(part, rg)].items()}

    def get(self, key: str) -> BoxLabels:
        row = self._prefetched.get(key)
        if row is None:
            part, rg, i = self._locate(key)
            if self._cache is None or self._cache[0] != (part, rg):
                self._cache = ((part, rg), self._read_row_groups(part, [rg])[rg])
            row = {k: v[i] for k, v in self._cache[1].items()}
        h, w = row["height"], row["width"]
        if self.kind == "hard":
            top1 = np.frombuffer(row["hard"], dtype=np.uint8).reshape(h, w)
            return BoxLabels(top1=top1, p1=np.ones((h, w), np.float32), rc=None)
        ids = np.frombuffer(row["topk_ids"], dtype=np.uint8).reshape(-1, h, w)
        probs = dequantise(np.frombuffer(row["topk_probs"], dtype=np.uint8).reshape(-1, h, w))
        return BoxLabels(top1=ids[0], p1=probs[0], rc=probs[0] - probs[1], top2=ids[1])


def answer_rows(answer, keys: Sequence[str], k: int) -> list[dict]:
    """Store rows from a BoxAnswer (corte_ray.blackbox.protocol) for a batch of images."""
    rows = []
    if answer.kind == "hard":
        hard = answer.hard.cpu().numpy()
        for i, key in enumerate(keys):
            rows.append(encode_store_row(key, "hard", answer.num_classes, hard=hard[i]))
        return rows
    a = answer if answer.kind == "topk" else answer.to_topk(k)
    ids, probs = a.topk_ids.cpu().numpy(), a.topk_probs.float().cpu().numpy()
    for i, key in enumerate(keys):
        rows.append(encode_store_row(key, "topk", answer.num_classes, top_ids=ids[i], top_probs=probs[i]))
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
                        batch_size: int = 8, overwrite: bool = False, k: int = 2, skip_bad: bool = False) -> dict:
    """Label every image of `dataset` with `box` in this process (no Ray) and write the store.

    Skips keys already in the store (resume) and writes one part per batch of `batch_size` images, so a kill or
    a bad image loses at most the batch in flight (answers already paid for are on disk). With `skip_bad` an
    unreadable image is logged, skipped and counted instead of stopping the job. Finalises the thresholds and
    returns their document, with the run's counts under "run": labelled, skipped (already in the store),
    skipped_bad, damaged_parts (moved aside and relabelled).
    """
    from ..data.transforms import resize_image
    from ..errors import CorteError
    from ..log import progress

    writer = LabelStoreWriter(store_dir, label_store_meta(box, dataset, resize, k), overwrite=overwrite)
    done = writer.done_keys()
    todo = [s for s in dataset.samples if s.key not in done]
    if done:
        log.info("label store %s already holds %d images; labelling the %d missing", store_dir, len(done), len(todo))
    run = {"labelled": 0, "skipped": len(dataset.samples) - len(todo), "skipped_bad": 0,
           "damaged_parts": len(writer.damaged)}
    batch_imgs: list[np.ndarray] = []
    batch_keys: list[str] = []

    def flush_batch() -> None:
        if batch_imgs:
            answer = box.query(np.stack(batch_imgs))
            writer.write_part(answer_rows(answer, batch_keys, k))
            run["labelled"] += len(batch_keys)
            batch_imgs.clear()
            batch_keys.clear()

    for sample in progress(todo, desc="label", unit="img"):
        try:
            img = dataset.read_image(sample)
        except CorteError as exc:
            if not skip_bad:
                raise
            run["skipped_bad"] += 1
            log.warning("skipped %s", exc)
            continue
        if resize is not None:
            img = resize_image(img, resize)
        if batch_imgs and img.shape != batch_imgs[0].shape:
            flush_batch()
        batch_imgs.append(img)
        batch_keys.append(sample.key)
        if len(batch_imgs) >= batch_size:
            flush_batch()
    flush_batch()
    if run["skipped_bad"]:
        log.warning("skipped %d of %d images (--skip-bad); they are not in the store", run["skipped_bad"],
                    len(todo))
    return {**writer.finalize(), "run": run}
