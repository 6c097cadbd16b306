"""Label spaces: how the ids stored in each dataset's label files map to the one id space of the project.

One id space everywhere: label files on disk hold their dataset's own ids (Cityscapes label ids for
Cityscapes, GTA5, NTHU and the synthetic benchmark; SYNTHIA's own ids), and everything the project
computes with (models, predictions, pseudo-labels, confusion matrices) uses Cityscapes *train ids*
0..18 with 255 = ignore. A dataset evaluated on fewer classes (SYNTHIA's 16/13, NTHU's 13, the synthetic
benchmark's 11) averages over a subset of those train ids; it never renumbers them.

The Cityscapes table is the official one (cityscapesscripts/helpers/labels.py); a test checks it against
that package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import InputError

IGNORE = 255

# (name, label id, train id, colour) in label-id order, exactly as cityscapesscripts lists them
# (the license plate row, id -1, never appears in a label PNG and is left out).
CITYSCAPES_TABLE: tuple[tuple[str, int, int, tuple[int, int, int]], ...] = (
    ("unlabeled", 0, 255, (0, 0, 0)),
    ("ego vehicle", 1, 255, (0, 0, 0)),
    ("rectification border", 2, 255, (0, 0, 0)),
    ("out of roi", 3, 255, (0, 0, 0)),
    ("static", 4, 255, (0, 0, 0)),
    ("dynamic", 5, 255, (111, 74, 0)),
    ("ground", 6, 255, (81, 0, 81)),
    ("road", 7, 0, (128, 64, 128)),
    ("sidewalk", 8, 1, (244, 35, 232)),
    ("parking", 9, 255, (250, 170, 160)),
    ("rail track", 10, 255, (230, 150, 140)),
    ("building", 11, 2, (70, 70, 70)),
    ("wall", 12, 3, (102, 102, 156)),
    ("fence", 13, 4, (190, 153, 153)),
    ("guard rail", 14, 255, (180, 165, 180)),
    ("bridge", 15, 255, (150, 100, 100)),
    ("tunnel", 16, 255, (150, 120, 90)),
    ("pole", 17, 5, (153, 153, 153)),
    ("polegroup", 18, 255, (153, 153, 153)),
    ("traffic light", 19, 6, (250, 170, 30)),
    ("traffic sign", 20, 7, (220, 220, 0)),
    ("vegetation", 21, 8, (107, 142, 35)),
    ("terrain", 22, 9, (152, 251, 152)),
    ("sky", 23, 10, (70, 130, 180)),
    ("person", 24, 11, (220, 20, 60)),
    ("rider", 25, 12, (255, 0, 0)),
    ("car", 26, 13, (0, 0, 142)),
    ("truck", 27, 14, (0, 0, 70)),
    ("bus", 28, 15, (0, 60, 100)),
    ("caravan", 29, 255, (0, 0, 90)),
    ("trailer", 30, 255, (0, 0, 110)),
    ("train", 31, 16, (0, 80, 100)),
    ("motorcycle", 32, 17, (0, 0, 230)),
    ("bicycle", 33, 18, (119, 11, 32)),
)

NUM_CLASSES = 19
TRAIN_NAMES: tuple[str, ...] = tuple(name for name, _, tid, _ in sorted(
    (r for r in CITYSCAPES_TABLE if r[2] != 255), key=lambda r: r[2]))
TRAIN_PALETTE: tuple[tuple[int, int, int], ...] = tuple(color for _, _, tid, color in sorted(
    (r for r in CITYSCAPES_TABLE if r[2] != 255), key=lambda r: r[2]))
CITYSCAPES_ID_TO_TRAIN: dict[int, int] = {lid: tid for _, lid, tid, _ in CITYSCAPES_TABLE}
LABEL_ID: dict[str, int] = {name: lid for name, lid, _, _ in CITYSCAPES_TABLE}
TRAIN_ID: dict[str, int] = {name: i for i, name in enumerate(TRAIN_NAMES)}


def _train_ids(*names: str) -> tuple[int, ...]:
    return tuple(sorted(TRAIN_ID[n] for n in names))


# SYNTHIA-RAND-CITYSCAPES ids (the dataset's README) -> Cityscapes train ids, for the 16 shared classes.
# Terrain (16), truck (18) and train (20) exist in SYNTHIA but are outside the 16-class protocol,
# so they are ignored like void (0), parking-slot (13), road-work (14) and lanemarking (22).
SYNTHIA_ID_TO_TRAIN: dict[int, int] = {
    0: IGNORE, 1: TRAIN_ID["sky"], 2: TRAIN_ID["building"], 3: TRAIN_ID["road"], 4: TRAIN_ID["sidewalk"],
    5: TRAIN_ID["fence"], 6: TRAIN_ID["vegetation"], 7: TRAIN_ID["pole"], 8: TRAIN_ID["car"],
    9: TRAIN_ID["traffic sign"], 10: TRAIN_ID["person"], 11: TRAIN_ID["bicycle"], 12: TRAIN_ID["motorcycle"],
    13: IGNORE, 14: IGNORE, 15: TRAIN_ID["traffic light"], 16: IGNORE, 17: TRAIN_ID["rider"], 18: IGNORE,
    19: TRAIN_ID["bus"], 20: IGNORE, 21: TRAIN_ID["wall"], 22: IGNORE,
}

CLASSES_19 = tuple(range(NUM_CLASSES))
SYNTHIA_16 = _train_ids("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
                        "traffic sign", "vegetation", "sky", "person", "rider", "car", "bus",
                        "motorcycle", "bicycle")
SYNTHIA_13 = tuple(c for c in SYNTHIA_16 if TRAIN_NAMES[c] not in ("wall", "fence", "pole"))
NTHU_13 = _train_ids("road", "sidewalk", "building", "traffic light", "traffic sign", "vegetation", "sky",
                     "person", "rider", "car", "bus", "motorcycle", "bicycle")
# The classes the synthetic benchmark renders in both domains (corte_ray/data/synth.py draws exactly these).
SYNTH_CLASSES = _train_ids("road", "sidewalk", "building", "pole", "traffic light", "traffic sign",
                           "vegetation", "terrain", "sky", "person", "car")


@dataclass(frozen=True)
class LabelSpace:
    """Maps a dataset's stored label ids to train ids, and names the class subsets it is evaluated on.

    `eval_sets` maps a key ("19", "16", "13", "synth", ...) to the train ids averaged in mIoU;
    `default_eval` is the key used when the user does not pick one.
    """

    name: str
    raw_to_train: Mapping[int, int]
    eval_sets: Mapping[str, tuple[int, ...]]
    default_eval: str
    class_names: tuple[str, ...] = TRAIN_NAMES
    palette: tuple[tuple[int, int, int], ...] = TRAIN_PALETTE
    _lut: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        lut = np.full(65536, -1, dtype=np.int32)  # -1 marks an id this space does not know
        for raw, train in self.raw_to_train.items():
            lut[raw] = train
        object.__setattr__(self, "_lut", lut)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def eval_classes(self, key: str | None = None) -> tuple[int, ...]:
        key = self.default_eval if key is None else str(key)
        if key not in self.eval_sets:
            raise KeyError(f"label space {self.name!r} has no {key!r}-class evaluation; "
                           f"choose one of {sorted(self.eval_sets)}")
        return self.eval_sets[key]

    def colorize(self, train_ids: np.ndarray) -> np.ndarray:
        """HxW train ids -> HxWx3 uint8 RGB with this space's palette (black for 255 and unknown ids)."""
        lut = np.zeros((256, 3), dtype=np.uint8)
        lut[: len(self.palette)] = np.asarray(self.palette, dtype=np.uint8)
        return lut[np.asarray(train_ids, dtype=np.uint8)]

    def to_train_ids(self, raw: np.ndarray, path: str | Path = "<array>") -> np.ndarray:
        """Raw label ids (any integer dtype) -> uint8 train ids; an unknown id raises InputError naming `path`."""
        raw = np.asarray(raw)
        if raw.size and (raw.min() < 0 or raw.max() >= self._lut.size):
            raise InputError(path, f"label ids outside 0..65535 (min {raw.min()}, max {raw.max()})")
        mapped = self._lut[raw.astype(np.int64, copy=False)]
        if raw.size and mapped.min() < 0:
            unknown = np.unique(raw[mapped < 0])[:10].tolist()
            raise InputError(path, f"unknown label id(s) {unknown} for the {self.name} label space")
        return mapped.astype(np.uint8)


CITYSCAPES = LabelSpace("cityscapes", CITYSCAPES_ID_TO_TRAIN,
                        {"19": CLASSES_19, "16": SYNTHIA_16, "13": SYNTHIA_13}, "19")
GTA5 = LabelSpace("gta5", CITYSCAPES_ID_TO_TRAIN, {"19": CLASSES_19}, "19")
SYNTHIA = LabelSpace("synthia", SYNTHIA_ID_TO_TRAIN, {"16": SYNTHIA_16, "13": SYNTHIA_13}, "16")
NTHU = LabelSpace("nthu", CITYSCAPES_ID_TO_TRAIN, {"13": NTHU_13}, "13")
SYNTH = LabelSpace("synth", CITYSCAPES_ID_TO_TRAIN, {"synth": SYNTH_CLASSES, "19": CLASSES_19}, "synth")

LABEL_SPACES: dict[str, LabelSpace] = {s.name: s for s in (CITYSCAPES, GTA5, SYNTHIA, NTHU, SYNTH)}


def load_label_space(path: str | Path) -> LabelSpace:
    """A label space from YAML, for the generic folder dataset.

    Fields: `name` (optional), `classes` (list of class names = train ids 0..C-1; default the 19
    Cityscapes classes), `id_to_train` (mapping stored id -> train id or 255; default identity on
    0..C-1 plus 255 -> 255), `eval_classes` (train ids to average; default all), `palette` (optional
    list of [r, g, b]).
    """
    import yaml

    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        detail = " ".join(str(exc).split())  # YAML errors span lines; the CLI prints one
        raise InputError(path, f"cannot read label space YAML: {detail}") from None
    if not isinstance(doc, dict):
        raise InputError(path, "label space YAML must be a mapping")
    unknown = set(doc) - {"name", "classes", "id_to_train", "eval_classes", "palette"}
    if unknown:
        raise InputError(path, f"unknown field(s) {sorted(unknown)} in label space")
    names = tuple(str(n) for n in doc.get("classes", TRAIN_NAMES))
    num = len(names)
    if num == 0 or num > 254:
        raise InputError(path, f"field 'classes' must list 1..254 names, got {num}")
    mapping = doc.get("id_to_train")
    if mapping is None:
        mapping = {i: i for i in range(num)}
        mapping[IGNORE] = IGNORE
    try:
        mapping = {int(k): int(v) for k, v in mapping.items()}
    except (TypeError, ValueError, AttributeError):
        raise InputError(path, "field 'id_to_train' must map integer ids to integer train ids") from None
    bad = {k: v for k, v in mapping.items() if not (0 <= v < num or v == IGNORE) or not 0 <= k < 65536}
    if bad:
        raise InputError(path, f"field 'id_to_train' has entries outside the class range: {bad}")
    eval_classes = tuple(int(c) for c in doc.get("eval_classes", range(num)))
    if any(not 0 <= c < num for c in eval_classes):
        raise InputError(path, f"field 'eval_classes' must be train ids in 0..{num - 1}")
    palette = doc.get("palette")
    if palette is None:
        rng = np.random.default_rng(0)
        palette = TRAIN_PALETTE if num == NUM_CLASSES else [tuple(int(x) for x in rng.integers(0, 256, 3))
                                                             for _ in range(num)]
    elif len(palette) != num:
        raise InputError(path, f"field 'palette' has {len(palette)} colours for {num} classes")
    return LabelSpace(str(doc.get("name", path.stem)), mapping, {"all": eval_classes}, "all",
                      class_names=names, palette=tuple(tuple(int(x) for x in c) for c in palette))
