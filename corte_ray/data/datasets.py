"""Dataset formats: where each dataset keeps its images and labels, listed as `Sample`s, read as arrays.

A `Dataset` is a list of samples (image path + label path) plus the label space that turns the ids in
its label files into train ids. Listing is cheap and happens in `open_dataset`; files are read one at a
time by `Dataset.read_image` / `Dataset.read_label`, so a bad file fails (or is skipped) where it is used
and the error names it.

Formats (DESIGN.md "Datasets and label spaces"), registered in `DATASETS` by name:
* cityscapes  root/leftImg8bit/{split}/{city}/X_leftImg8bit.png, root/gtFine/{split}/{city}/X_gtFine_labelIds.png
* gta5        root/images/N.png, root/labels/N.png (palette PNGs of Cityscapes label ids); split lists root/{split}.txt
* synthia     root/RGB/N.png, root/GT/LABELS/N.png (16-bit, id in the first channel); split lists as gta5
* nthu        root/{City}/Images/{Train,Test}/N.png, root/{City}/Labels/Test/N_eval.png
* folder      root/*.png|jpg|jpeg, optional labels_dir/{stem}.png and a YAML label space
* synth       the `corte-ray synth` output: root/source in gta5 layout, root/target in cityscapes layout
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np

from .. import storage
from ..errors import ConfigError, InputError
from ..registry import Registry
from . import io, labels
from .labels import LabelSpace

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Formats whose root may be an s3:// or gs:// URI (their listing and reading go through corte_ray.storage).
URI_DATASETS = ("synth", "cityscapes", "gta5")
NTHU_CITIES = ("Rome", "Rio", "Tokyo", "Taipei")
_CS_IMAGE_SUFFIX = "_leftImg8bit.png"
_CS_LABEL_SUFFIX = "_gtFine_labelIds.png"

# The generic folder's default: label PNGs that already hold the 19 Cityscapes train ids (255 = ignore).
FOLDER_TRAIN_IDS = LabelSpace(
    "folder", {**{i: i for i in range(labels.NUM_CLASSES)}, labels.IGNORE: labels.IGNORE},
    {"19": labels.CLASSES_19, "16": labels.SYNTHIA_16, "13": labels.SYNTHIA_13}, "19")


@dataclass(frozen=True)
class Sample:
    """One image of a dataset and its label file (None where the split has no labels)."""

    key: str  # stable unique id relative to the root, e.g. "aachen/aachen_000000_000019"
    image: Path
    label: Path | None

    @property
    def pred_name(self) -> str:
        """File name of this image's prediction PNG: the image's name with suffix .png."""
        return Path(self.image.name).with_suffix(".png").name


@dataclass
class Dataset:
    """The samples of one split of one dataset, and how to read them.

    `label_root` is the folder labels are read from (or were looked for), for error messages;
    `label_channel` is the channel holding the id in multi-channel label files (SYNTHIA: 0), None where
    a label must have a single channel.
    """

    name: str
    root: Path
    split: str
    label_space: LabelSpace
    samples: list[Sample]
    label_root: Path | None = None
    label_channel: int | None = None

    @property
    def has_labels(self) -> bool:
        return bool(self.samples) and all(s.label is not None for s in self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]

    def read_image(self, sample: Sample) -> np.ndarray:
        """HxWx3 uint8 RGB; InputError naming the file if it is missing, unreadable or corrupt."""
        return io.read_image(sample.image)

    def read_label(self, sample: Sample, image_size: tuple[int, int] | None = None) -> np.ndarray:
        """HxW uint8 train ids (255 = ignore).

        InputError naming the file for a missing or unreadable label, a label whose size is not
        `image_size` (H, W), and a label holding an id the label space does not know.
        """
        if sample.label is None:
            where = f" (looked in {self.label_root})" if self.label_root else ""
            raise InputError(sample.image, f"no label for this image in the {self.name} {self.split!r} split{where}")
        if not sample.label.exists():
            raise InputError(sample.label, f"label file not found (the label of {sample.image})")
        raw = io.read_label_ids(sample.label, channel=self.label_channel)
        if image_size is not None and tuple(raw.shape) != tuple(image_size):
            raise InputError(sample.label, f"label is {raw.shape[0]}x{raw.shape[1]} (HxW) but its image "
                                           f"{sample.image} is {image_size[0]}x{image_size[1]}")
        return self.label_space.to_train_ids(raw, sample.label)


class DatasetBuilder(Protocol):
    def __call__(self, root: Path, split: str, *, city: str | None, labels_dir: Path | None,
                 label_space: Path | None) -> Dataset: ...


DATASETS: Registry[DatasetBuilder] = Registry("dataset")


def open_dataset(name: str, root: Path, split: str = "val", city: str | None = None,
                 labels_dir: Path | None = None, label_space: Path | None = None) -> Dataset:
    """List the samples of one split of a dataset in format `name` under `root`.

    InputError for a missing root and for a split with no images (naming the folder searched);
    ConfigError for an unknown format and for options the format does not take.
    """
    if name not in DATASETS:
        raise ConfigError(f"--dataset: unknown dataset format {name!r}; known: {', '.join(DATASETS.names())}")
    root = storage.as_path(root)
    if storage.is_remote(root) and name not in URI_DATASETS:
        raise ConfigError(f"--root {root}: dataset format {name!r} reads local folders only; object-storage roots "
                          f"work for {', '.join(URI_DATASETS)} (copy the data to a local disk, or use one of those)")
    if not root.exists():
        raise InputError(root, "dataset root not found")
    if not root.is_dir():
        raise InputError(root, "dataset root is not a directory")
    return DATASETS.get(name)(root, split, city=city,
                              labels_dir=None if labels_dir is None else Path(labels_dir),
                              label_space=None if label_space is None else Path(label_space))


# ---------------------------------------------------------------------------------------------- helpers

def open_split(data, split: str) -> Dataset:
    """Split `split` of the dataset a DataConfig `data` describes (format, root, city, labels, label space)."""
    return open_dataset(data.dataset, data.root, split=split, city=data.city, labels_dir=data.labels_dir,
                        label_space=data.label_space)

def _reject_options(fmt: str, **options: object) -> None:
    """Options that do not apply to a format are an error, not silently ignored."""
    for option, value in options.items():
        if value is not None:
            flag = "--" + option.replace("_", "-")
            raise ConfigError(f"{flag} does not apply to --dataset {fmt}")


def _require_dir(folder: Path, what: str) -> None:
    if not folder.is_dir():
        raise InputError(folder, f"{what} not found" if not folder.exists() else f"{what} is not a directory")


def _list_images(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Image files directly in `folder` (not recursive), sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes
                  and not p.name.startswith("."))


def _unique_stems(images: list[Path], folder: Path) -> None:
    seen: dict[str, Path] = {}
    for p in images:
        if p.stem in seen:
            raise InputError(folder, f"two images share the name {p.stem!r} ({seen[p.stem].name} and {p.name}); "
                                     "their labels and predictions would collide")
        seen[p.stem] = p


def _no_images(folder: Path, split: str, pattern: str) -> InputError:
    return InputError(folder, f"no images for split {split!r} (searched {pattern})")


def _select_split(root: Path, images: list[Path], split: str, images_dir: Path) -> list[Path]:
    """GTA5/SYNTHIA split rule: root/{split}.txt if it exists, else 'train'/'all' = every image."""
    list_file = root / f"{split}.txt"
    if list_file.is_file():
        by_name = {p.name: p for p in images}
        by_stem = {p.stem: p for p in images}
        chosen: list[Path] = []
        seen: set[Path] = set()
        try:
            lines = list_file.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(list_file, f"cannot read split list: {exc}") from None
        for lineno, line in enumerate(lines, 1):
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            entry = Path(entry).name  # tolerate "images/00001.png"-style entries
            image = by_name.get(entry) or by_stem.get(entry)
            if image is None:
                raise InputError(list_file, f"line {lineno}: image {entry!r} not found in {images_dir}")
            if image in seen:
                raise InputError(list_file, f"line {lineno}: image {entry!r} is listed twice")
            seen.add(image)
            chosen.append(image)
        if not chosen:
            raise InputError(list_file, f"split list for {split!r} names no images")
        return chosen
    if split in ("train", "all"):
        return images
    raise InputError(list_file, f"split list not found: split {split!r} needs this file (one image file name "
                                "or stem per line); without it only 'train' or 'all' (every image) exist")


def _flat_dataset(fmt: str, root: Path, split: str, images_dir: Path, labels_dir: Path, space: LabelSpace,
                  label_channel: int | None = None) -> Dataset:
    """The GTA5-style layout: one folder of images, one folder of same-stem label PNGs."""
    _require_dir(images_dir, f"{fmt} images folder")
    images = _list_images(images_dir, (".png",))
    if not images:
        raise _no_images(images_dir, split, "*.png")
    _unique_stems(images, images_dir)
    images = _select_split(root, images, split, images_dir)
    has_labels = labels_dir.is_dir()
    samples = [Sample(p.stem, p, labels_dir / f"{p.stem}.png" if has_labels else None) for p in images]
    return Dataset(fmt, root, split, space, samples, label_root=labels_dir, label_channel=label_channel)


# --------------------------------------------------------------------------------------------- formats
@DATASETS.register("cityscapes")
def cityscapes(root: Path, split: str, *, city: str | None = None, labels_dir: Path | None = None,
               label_space: Path | None = None, space: LabelSpace = labels.CITYSCAPES,
               name: str = "cityscapes") -> Dataset:
    """Cityscapes: leftImg8bit/{split}/{city}/*_leftImg8bit.png with gtFine/{split}/{city}/*_gtFine_labelIds.png.

    A split whose gtFine/{split} folder is absent has no labels; where it exists every image must have
    its label. `city` restricts the listing to one city folder.
    """
    _reject_options(name, labels_dir=labels_dir, label_space=label_space)
    split_dir = root / "leftImg8bit" / split
    if not split_dir.is_dir():
        present = sorted(p.name for p in (root / "leftImg8bit").glob("*") if p.is_dir())
        hint = f"; splits here: {', '.join(present)}" if present else "; expected leftImg8bit/{split}/{city}/"
        raise InputError(split_dir, f"split {split!r} not found (no such folder){hint}")
    if city is not None:
        city_dirs = [split_dir / city]
        _require_dir(city_dirs[0], f"city folder for --city {city!r}")
    else:
        city_dirs = sorted(p for p in split_dir.iterdir() if p.is_dir())
    label_split_dir = root / "gtFine" / split
    has_labels = label_split_dir.is_dir()
    samples: list[Sample] = []
    for city_dir in city_dirs:
        for image in sorted(city_dir.glob("*" + _CS_IMAGE_SUFFIX)):
            prefix = image.name[: -len(_CS_IMAGE_SUFFIX)]
            label = label_split_dir / city_dir.name / (prefix + _CS_LABEL_SUFFIX) if has_labels else None
            samples.append(Sample(f"{city_dir.name}/{prefix}", image, label))
    if not samples:
        raise _no_images(split_dir, split, "{city}/*" + _CS_IMAGE_SUFFIX)
    return Dataset(name, root, split, space, samples, label_root=label_split_dir)


@DATASETS.register("gta5")
def gta5(root: Path, split: str, *, city: str | None = None, labels_dir: Path | None = None,
         label_space: Path | None = None, space: LabelSpace = labels.GTA5, name: str = "gta5") -> Dataset:
    """GTA5: images/*.png and labels/*.png (palette PNGs whose indices are Cityscapes label ids)."""
    _reject_options(name, city=city, labels_dir=labels_dir, label_space=label_space)
    return _flat_dataset(name, root, split, root / "images", root / "labels", space)


@DATASETS.register("synthia")
def synthia(root: Path, split: str, *, city: str | None = None, labels_dir: Path | None = None,
            label_space: Path | None = None) -> Dataset:
    """SYNTHIA-RAND-CITYSCAPES: RGB/*.png and GT/LABELS/*.png (16-bit, class id in the first channel)."""
    _reject_options("synthia", city=city, labels_dir=labels_dir, label_space=label_space)
    return _flat_dataset("synthia", root, split, root / "RGB", root / "GT" / "LABELS", labels.SYNTHIA,
                         label_channel=0)


@DATASETS.register("nthu")
def nthu(root: Path, split: str, *, city: str | None = None, labels_dir: Path | None = None,
         label_space: Path | None = None) -> Dataset:
    """NTHU cross-city: {City}/Images/{Train,Test}/*.png, labels {City}/Labels/Test/{stem}_eval.png.

    Split 'train' is Images/Train (unlabelled); 'val' and 'test' are Images/Test with its labels.
    The _eval.png files hold Cityscapes label ids: the public loaders map them with the Cityscapes
    id -> train id table (ZJULearning/MaxSquareLoss and LTTM/LSR, datasets/crosscity_Dataset.py:
    `id_to_trainid = {7: 0, 8: 1, 11: 2, ...}` applied to `{id}_eval.png` under Labels/Test).
    """
    _reject_options("nthu", labels_dir=labels_dir, label_space=label_space)
    if split == "train":
        folder, labelled = "Train", False
    elif split in ("val", "test"):
        folder, labelled = "Test", True
    else:
        raise ConfigError(f"--split {split!r}: NTHU has 'train' (unlabelled) and 'val'/'test' (labelled)")
    if city is not None:
        match = [c for c in NTHU_CITIES if c.lower() == city.lower()]
        if not match:
            raise ConfigError(f"--city {city!r}: NTHU cities are {', '.join(NTHU_CITIES)}")
        cities = match
        _require_dir(root / cities[0], f"NTHU city folder for --city {city!r}")
    else:
        cities = [c for c in NTHU_CITIES if (root / c).is_dir()]
        if not cities:
            raise InputError(root, f"no NTHU city folder ({', '.join(NTHU_CITIES)}) found")
    samples: list[Sample] = []
    for c in cities:
        image_dir = root / c / "Images" / folder
        if not image_dir.is_dir():
            continue
        images = _list_images(image_dir, IMAGE_SUFFIXES)
        _unique_stems(images, image_dir)
        label_dir = root / c / "Labels" / "Test"
        for image in images:
            label = label_dir / f"{image.stem}_eval.png" if labelled else None
            samples.append(Sample(f"{c}/{image.stem}", image, label))
    if not samples:
        searched = root / cities[0] / "Images" / folder if len(cities) == 1 else root
        raise _no_images(searched, split, "{City}/Images/" + folder + "/*.png|jpg")
    label_root = (root / cities[0] / "Labels" / "Test" if len(cities) == 1 else root) if labelled else None
    return Dataset("nthu", root, split, labels.NTHU, samples, label_root=label_root)


@DATASETS.register("folder")
def folder(root: Path, split: str, *, city: str | None = None, labels_dir: Path | None = None,
           label_space: Path | None = None) -> Dataset:
    """A plain folder of images (the usual real user); `split` is only a name here.

    Labels, if `labels_dir` is given, are labels_dir/{stem}.png; their ids are mapped by the YAML label
    space `label_space`, by default taken as Cityscapes train ids (0..18, 255 = ignore).
    """
    _reject_options("folder", city=city)
    images = _list_images(root, IMAGE_SUFFIXES)
    if not images:
        raise _no_images(root, split, "*.png, *.jpg, *.jpeg")
    _unique_stems(images, root)
    if labels_dir is not None:
        _require_dir(labels_dir, "labels folder (--labels-dir)")
    space = labels.load_label_space(label_space) if label_space is not None else FOLDER_TRAIN_IDS
    samples = [Sample(p.stem, p, labels_dir / f"{p.stem}.png" if labels_dir is not None else None) for p in images]
    return Dataset("folder", root, split, space, samples, label_root=labels_dir)


@DATASETS.register("synth")
def synth(root: Path, split: str, *, city: str | None = None, labels_dir: Path | None = None,
          label_space: Path | None = None) -> Dataset:
    """The `corte-ray synth` benchmark, root/source in GTA5 layout and root/target in Cityscapes layout:

    * 'source': the labelled source training images, those of root/source/train.txt (a benchmark written
      before split lists existed has none: then every image of root/source);
    * 'source_val': the held-out source images of root/source/val.txt (`corte-ray synth --n-source-val`), for
      a source model's accuracy on its own domain;
    * any other split ('train', 'val') = root/target in Cityscapes layout.
    """
    _reject_options("synth", city=city, labels_dir=labels_dir, label_space=label_space)
    on_source = split in ("source", "source_val")
    part = root / ("source" if on_source else "target")
    if not part.is_dir():
        raise InputError(part, "folder not found: not a synthetic benchmark directory "
                               "(write one with `corte-ray synth --out DIR`)")
    if not on_source:
        return cityscapes(part, split, space=labels.SYNTH, name="synth")
    if split == "source":
        # gta5 split 'train' = the images of train.txt, or every image where there is no train.txt
        dataset = gta5(part, "train", space=labels.SYNTH, name="synth")
    else:
        if not (part / "val.txt").is_file():
            raise InputError(part / "val.txt", "split list not found: this benchmark has no held-out source "
                                               "images for split 'source_val' (render it with "
                                               "`corte-ray synth --n-source-val N`)")
        dataset = gta5(part, "val", space=labels.SYNTH, name="synth")
    dataset.split = split
    return dataset
