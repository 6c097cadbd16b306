"""Tiny dataset fixtures (6x8 images) written in each exact on-disk layout, with known raw label ids.

Each `make_*` writes one layout under a root and returns a `Fixture`: the root, the RGB image written
for every sample key, and the train ids every label must read back as. The expected train ids are
written here by hand from each dataset's table (not computed with corte_ray's tables), so the tests
check the mapping as well as the reading. Other test files import these helpers:
`from tests.layouts import make_cityscapes, write_predictions`.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = (6, 8)  # H, W; W must equal the length of the id rows below

# Cityscapes label ids -> train ids, by hand from cityscapesScripts' table:
# unlabeled 0 -> 255, road 7 -> 0, sidewalk 8 -> 1, car 26 -> 13, bicycle 33 -> 18, parking 9 -> 255,
# person 24 -> 11, sky 23 -> 10.
CS_RAW_ROW = (0, 7, 8, 26, 33, 9, 24, 23)
CS_TRAIN_ROW = (255, 0, 1, 13, 18, 255, 11, 10)

# SYNTHIA ids -> train ids, by hand from the SYNTHIA-RAND-CITYSCAPES README: void 0 -> 255, sky 1 -> 10,
# building 2 -> 2, road 3 -> 0, car 8 -> 13, terrain 16 -> 255 (outside the 16 classes), wall 21 -> 3,
# lanemarking 22 -> 255.
SYNTHIA_RAW_ROW = (0, 1, 2, 3, 8, 16, 21, 22)
SYNTHIA_TRAIN_ROW = (255, 10, 2, 0, 13, 255, 3, 255)

# The generic folder's default: label PNGs of train ids, read as they are.
FOLDER_ROW = (0, 5, 18, 255, 3, 7, 12, 9)


@dataclass
class Fixture:
    root: Path
    images: dict[str, np.ndarray] = field(default_factory=dict)  # key -> HxWx3 uint8 written
    expected: dict[str, np.ndarray] = field(default_factory=dict)  # key -> HxW train ids (labelled samples)
    files: dict[str, Path] = field(default_factory=dict)  # key -> image path
    labels: dict[str, Path] = field(default_factory=dict)  # key -> label path


def id_map(row: tuple[int, ...], index: int, size: tuple[int, int] = SIZE) -> np.ndarray:
    """An HxW map whose rows are `row` rolled by row number + `index`: every value used, images differ."""
    h, w = size
    assert w == len(row)
    return np.stack([np.roll(np.asarray(row, dtype=np.int64), r + index) for r in range(h)])


def random_image(index: int, size: tuple[int, int] = SIZE) -> np.ndarray:
    return np.random.default_rng(1000 + index).integers(0, 256, (*size, 3), dtype=np.uint8)


def write_png(path: Path, array: np.ndarray) -> Path:
    """An 8-bit grey (HxW) or RGB (HxWx3) PNG through Pillow."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return path


def write_jpg(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path, quality=95)
    return path


def write_palette_png(path: Path, ids: np.ndarray) -> Path:
    """A palette ('P') PNG like the real GTA5 labels: the indices are the ids; the colours are unrelated
    to them, so a reader that converts to RGB gets other numbers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(np.asarray(ids, dtype=np.uint8), mode="P")
    palette = [(37 * i + 11) % 256 for i in range(256 * 3)]
    im.putpalette(palette)
    im.save(path)
    return path


def write_png16(path: Path, array: np.ndarray) -> Path:
    """A 16-bit PNG (grey HxW, RGB HxWx3 or RGBA HxWx4), encoded here by hand with zlib so that the
    reader under test is checked against an independent writer (Pillow cannot write 16-bit RGB)."""
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[..., None]
    h, w, c = array.shape
    colour_type = {1: 0, 3: 2, 4: 6}[c]
    rows = array.astype(">u2").reshape(h, w * c)
    raw = b"".join(b"\x00" + rows[i].tobytes() for i in range(h))  # filter type 0 on every row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    return path


def _to_train(raw: np.ndarray, raw_row: tuple[int, ...], train_row: tuple[int, ...]) -> np.ndarray:
    lookup = dict(zip(raw_row, train_row))
    return np.vectorize(lookup.__getitem__)(raw).astype(np.uint8)


# ---------------------------------------------------------------------------------------------- layouts
def make_cityscapes(root: Path, split: str = "val", cities: tuple[tuple[str, int], ...] = (("aachen", 2), ("bonn", 1)),
                    labelled: bool = True, start: int = 0, fixture: Fixture | None = None) -> Fixture:
    """root/leftImg8bit/{split}/{city}/{city}_000000_{i:06d}_leftImg8bit.png (+ gtFine labelIds)."""
    fx = fixture or Fixture(root)
    index = start
    for city, count in cities:
        for i in range(count):
            prefix = f"{city}_000000_{i:06d}"
            key = f"{city}/{prefix}"
            image = random_image(index)
            fx.images[key] = image
            fx.files[key] = write_png(root / "leftImg8bit" / split / city / f"{prefix}_leftImg8bit.png", image)
            if labelled:
                raw = id_map(CS_RAW_ROW, index)
                fx.labels[key] = write_png(root / "gtFine" / split / city / f"{prefix}_gtFine_labelIds.png", raw)
                fx.expected[key] = _to_train(raw, CS_RAW_ROW, CS_TRAIN_ROW)
            index += 1
    return fx


def make_gta5(root: Path, n: int = 3, split_lists: dict[str, list[str]] | None = None, start: int = 0) -> Fixture:
    """root/images/{i:05d}.png, root/labels/{i:05d}.png as palette PNGs of Cityscapes label ids,
    and root/{split}.txt for each entry of `split_lists`."""
    fx = Fixture(root)
    for i in range(n):
        key = f"{i + 1:05d}"
        image = random_image(start + i)
        raw = id_map(CS_RAW_ROW, start + i)
        fx.images[key] = image
        fx.files[key] = write_png(root / "images" / f"{key}.png", image)
        fx.labels[key] = write_palette_png(root / "labels" / f"{key}.png", raw)
        fx.expected[key] = _to_train(raw, CS_RAW_ROW, CS_TRAIN_ROW)
    for split, names in (split_lists or {}).items():
        (root / f"{split}.txt").write_text("".join(name + "\n" for name in names))
    return fx


def make_synthia(root: Path, n: int = 3, channels: int = 3) -> Fixture:
    """root/RGB/{i:07d}.png and root/GT/LABELS/{i:07d}.png: 16-bit PNGs with the SYNTHIA class id in the
    first channel and junk (instance-id-like values up to 65535) in the others; channels=1 writes a
    single-channel 16-bit label."""
    fx = Fixture(root)
    rng = np.random.default_rng(7)
    for i in range(n):
        key = f"{i:07d}"
        image = random_image(i)
        raw = id_map(SYNTHIA_RAW_ROW, i)
        label = np.zeros((*SIZE, channels), dtype=np.uint16)
        label[..., 0] = raw
        if channels > 1:
            label[..., 1:] = rng.integers(256, 65536, (*SIZE, channels - 1))
        fx.images[key] = image
        fx.files[key] = write_png(root / "RGB" / f"{key}.png", image)
        fx.labels[key] = write_png16(root / "GT" / "LABELS" / f"{key}.png", label)
        fx.expected[key] = _to_train(raw, SYNTHIA_RAW_ROW, SYNTHIA_TRAIN_ROW)
    return fx


def make_nthu(root: Path, cities: tuple[str, ...] = ("Rome", "Tokyo"), n_train: int = 2, n_test: int = 2) -> Fixture:
    """root/{City}/Images/{Train,Test}/pic_{i}.png and root/{City}/Labels/Test/pic_{i}_eval.png
    (Cityscapes label ids). Keys: Train images 'train:{City}/{stem}', Test images '{City}/{stem}'."""
    fx = Fixture(root)
    index = 0
    for city in cities:
        for i in range(n_train):
            key = f"train:{city}/pic_{100 + i}"
            image = random_image(index)
            fx.images[key] = image
            fx.files[key] = write_png(root / city / "Images" / "Train" / f"pic_{100 + i}.png", image)
            index += 1
        for i in range(n_test):
            stem = f"{city.lower()}_{i}"  # test names differ per city, so one flat prediction folder works
            key = f"{city}/{stem}"
            image = random_image(index)
            raw = id_map(CS_RAW_ROW, index)
            fx.images[key] = image
            fx.files[key] = write_png(root / city / "Images" / "Test" / f"{stem}.png", image)
            fx.labels[key] = write_png(root / city / "Labels" / "Test" / f"{stem}_eval.png", raw)
            fx.expected[key] = _to_train(raw, CS_RAW_ROW, CS_TRAIN_ROW)
            index += 1
    return fx


def make_folder(root: Path, n: int = 3, labels_dir: Path | None = None, jpg_last: bool = True) -> Fixture:
    """root/img_{i}.png (the last one .jpg when `jpg_last`) and, if `labels_dir`, labels_dir/img_{i}.png
    holding train ids."""
    fx = Fixture(root)
    for i in range(n):
        key = f"img_{i}"
        image = random_image(i)
        if jpg_last and i == n - 1:
            fx.files[key] = write_jpg(root / f"{key}.jpg", image)
            image = np.asarray(Image.open(fx.files[key]).convert("RGB"))  # what JPEG kept
        else:
            fx.files[key] = write_png(root / f"{key}.png", image)
        fx.images[key] = image
        if labels_dir is not None:
            ids = id_map(FOLDER_ROW, i)
            fx.labels[key] = write_png(labels_dir / f"{key}.png", ids)
            fx.expected[key] = ids.astype(np.uint8)
    return fx


def make_synth(root: Path, n_source: int = 2, n_train: int = 2, n_val: int = 2) -> tuple[Fixture, Fixture, Fixture]:
    """The `corte-ray synth` output shape: root/source in GTA5 layout, root/target in Cityscapes layout
    (train unlabelled, val labelled). Returns the (source, train, val) fixtures."""
    source = make_gta5(root / "source", n=n_source)
    train = make_cityscapes(root / "target", "train", (("synthcity", n_train),), labelled=False)
    val = make_cityscapes(root / "target", "val", (("synthcity", n_val),), start=n_train)
    return source, train, val


def write_predictions(folder: Path, fixture: Fixture, pred_names: dict[str, str],
                      preds: dict[str, np.ndarray] | None = None) -> Path:
    """Write one 8-bit prediction PNG per labelled key: `preds[key]` or, by default, the expected labels."""
    folder.mkdir(parents=True, exist_ok=True)
    for key, expected in fixture.expected.items():
        write_png(folder / pred_names[key], (preds or {}).get(key, expected))
    return folder
