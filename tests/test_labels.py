"""Label spaces: the Cityscapes table against the official cityscapesscripts package, the class subsets
of the literature's protocols, id mapping, and YAML label spaces (good and bad files)."""

from __future__ import annotations

import numpy as np
import pytest

from corte_ray.data import labels
from tests.conftest import require_reference
from corte_ray.errors import InputError


def test_cityscapes_table_matches_cityscapesscripts():
    official = require_reference("cityscapesscripts.helpers.labels")
    expected = [(lb.name, lb.id, lb.trainId, tuple(lb.color)) for lb in official.labels if lb.id >= 0]
    assert list(labels.CITYSCAPES_TABLE) == expected


def test_train_names_and_palette_match_cityscapesscripts():
    official = require_reference("cityscapesscripts.helpers.labels")
    by_train = {lb.trainId: lb for lb in official.labels if 0 <= lb.trainId < 255}
    assert labels.TRAIN_NAMES == tuple(by_train[t].name for t in range(19))
    assert labels.TRAIN_PALETTE == tuple(tuple(by_train[t].color) for t in range(19))


def names(ids):
    return [labels.TRAIN_NAMES[i] for i in ids]


def test_protocol_class_sets():
    assert len(labels.CLASSES_19) == 19
    assert names(labels.SYNTHIA_16) == ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
                                        "traffic sign", "vegetation", "sky", "person", "rider", "car", "bus",
                                        "motorcycle", "bicycle"]
    assert names(labels.SYNTHIA_13) == ["road", "sidewalk", "building", "traffic light", "traffic sign",
                                        "vegetation", "sky", "person", "rider", "car", "bus", "motorcycle",
                                        "bicycle"]
    # NTHU cross-city's 13 classes (Chen et al., ICCV 2017) are the same 13
    assert names(labels.NTHU_13) == names(labels.SYNTHIA_13)
    assert labels.SYNTHIA.eval_classes() == labels.SYNTHIA_16
    assert labels.SYNTHIA.eval_classes("13") == labels.SYNTHIA_13
    assert labels.NTHU.eval_classes() == labels.NTHU_13
    with pytest.raises(KeyError, match="19"):
        labels.NTHU.eval_classes("19")


def test_synthia_ids_by_hand():
    # SYNTHIA-RAND-CITYSCAPES README ids: 3 road, 4 sidewalk, 2 building, 21 wall, 5 fence, 7 pole,
    # 15 traffic light, 9 traffic sign, 6 vegetation, 1 sky, 10 pedestrian, 17 rider, 8 car, 19 bus,
    # 12 motorcycle, 11 bicycle; 0 void and 13 parking-slot are ignored.
    raw = np.array([3, 4, 2, 21, 5, 7, 15, 9, 6, 1, 10, 17, 8, 19, 12, 11, 0, 13])
    expected = [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18, 255, 255]
    np.testing.assert_array_equal(labels.SYNTHIA.to_train_ids(raw), expected)


def test_to_train_ids_unknown_id_names_the_file():
    with pytest.raises(InputError, match="34") as err:
        labels.CITYSCAPES.to_train_ids(np.array([[7, 34]]), "some/label.png")
    assert str(err.value).startswith("some/label.png:")
    with pytest.raises(InputError, match="some/other.png"):
        labels.CITYSCAPES.to_train_ids(np.array([-1]), "some/other.png")


def test_load_label_space_good(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("name: medical\nclasses: [background, organ, lesion]\n"
                    "id_to_train: {0: 0, 100: 1, 200: 2, 255: 255}\neval_classes: [1, 2]\n")
    space = labels.load_label_space(path)
    assert space.name == "medical" and space.class_names == ("background", "organ", "lesion")
    assert space.eval_classes() == (1, 2) and len(space.palette) == 3
    np.testing.assert_array_equal(space.to_train_ids(np.array([0, 100, 200, 255])), [0, 1, 2, 255])


def test_load_label_space_defaults(tmp_path):
    path = tmp_path / "default.yaml"
    path.write_text("{}\n")
    space = labels.load_label_space(path)
    assert space.class_names == labels.TRAIN_NAMES and space.eval_classes() == tuple(range(19))
    np.testing.assert_array_equal(space.to_train_ids(np.array([0, 18, 255])), [0, 18, 255])


@pytest.mark.parametrize("text, problem", [
    ("classes: [a, b]\ncolours: [[0, 0, 0]]\n", "unknown field"),
    ("classes: [a, b]\nid_to_train: {0: 0, 1: 2}\n", "id_to_train"),
    ("classes: [a, b]\neval_classes: [0, 5]\n", "eval_classes"),
    ("classes: [a, b]\npalette: [[0, 0, 0]]\n", "palette"),
    ("- just\n- a list\n", "mapping"),
    ("classes: [a\n", "cannot read"),
])
def test_load_label_space_bad_names_the_file(tmp_path, text, problem):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=problem) as err:
        labels.load_label_space(path)
    assert str(err.value).startswith(str(path))


def test_load_label_space_missing_file(tmp_path):
    with pytest.raises(InputError) as err:
        labels.load_label_space(tmp_path / "nope.yaml")
    assert str(tmp_path / "nope.yaml") in str(err.value)


def test_colorize_uses_the_palette_and_blacks_out_ignore():
    from corte_ray.data.labels import CITYSCAPES, TRAIN_ID, TRAIN_PALETTE

    ids = np.array([[TRAIN_ID["road"], 255], [TRAIN_ID["car"], 0]], dtype=np.uint8)
    rgb = CITYSCAPES.colorize(ids)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 0]) == TRAIN_PALETTE[TRAIN_ID["road"]] == (128, 64, 128)
    assert tuple(rgb[0, 1]) == (0, 0, 0) and tuple(rgb[1, 0]) == (0, 0, 142)
