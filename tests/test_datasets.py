"""Dataset layouts: every format lists the right samples and reads its labels into the right train ids,
pixel for pixel; bad files give an InputError naming the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from corte_ray.data import labels
from corte_ray.data.datasets import DATASETS, Dataset, Sample, open_dataset
from corte_ray.data.io import read_image, read_label_ids
from corte_ray.errors import ConfigError, InputError
from tests.layouts import (SIZE, make_cityscapes, make_folder, make_gta5, make_nthu, make_synth, make_synthia,
                           write_png, write_png16)


def check_reads(ds: Dataset, fx, keys=None) -> None:
    """Every sample's image and label read back exactly as the fixture wrote them."""
    assert [s.key for s in ds] == sorted(keys if keys is not None else fx.images)
    for sample in ds:
        image = ds.read_image(sample)
        assert image.dtype == np.uint8 and image.shape == (*SIZE, 3)
        np.testing.assert_array_equal(image, fx.images[sample.key])
        if sample.label is not None:
            train = ds.read_label(sample, image_size=image.shape[:2])
            assert train.dtype == np.uint8
            np.testing.assert_array_equal(train, fx.expected[sample.key])


def test_registry_names():
    assert DATASETS.names() == sorted(["cityscapes", "gta5", "synthia", "nthu", "folder", "synth"])


# --------------------------------------------------------------------------------------------- cityscapes
def test_cityscapes(tmp_path):
    fx = make_cityscapes(tmp_path)
    ds = open_dataset("cityscapes", tmp_path, "val")
    assert ds.label_space is labels.CITYSCAPES and ds.has_labels and len(ds) == 3
    check_reads(ds, fx)
    sample = ds[0]
    assert sample.key == "aachen/aachen_000000_000000"
    assert sample.pred_name == "aachen_000000_000000_leftImg8bit.png"
    assert sample.label == tmp_path / "gtFine/val/aachen/aachen_000000_000000_gtFine_labelIds.png"
    # the hand-written expectation really covers ids that become ignore
    assert (fx.expected[sample.key] == 255).any() and (fx.expected[sample.key] == 18).any()


def test_cityscapes_city_filter_and_unlabelled_split(tmp_path):
    make_cityscapes(tmp_path)
    assert [s.key for s in open_dataset("cityscapes", tmp_path, "val", city="bonn")] == ["bonn/bonn_000000_000000"]
    make_cityscapes(tmp_path, "test", (("berlin", 1),), labelled=False)
    ds = open_dataset("cityscapes", tmp_path, "test")
    assert not ds.has_labels and ds[0].label is None
    with pytest.raises(InputError, match="no label for this image"):
        ds.read_label(ds[0])


def test_cityscapes_missing_split_names_folder(tmp_path):
    make_cityscapes(tmp_path)
    with pytest.raises(InputError) as err:
        open_dataset("cityscapes", tmp_path, "train")
    assert str(tmp_path / "leftImg8bit" / "train") in str(err.value) and "val" in str(err.value)


# -------------------------------------------------------------------------------------------------- gta5
def test_gta5_palette_labels_read_as_indices(tmp_path):
    fx = make_gta5(tmp_path)
    label = fx.labels["00001"]
    assert Image.open(label).mode == "P"
    # converting to RGB would give colours, not ids: the reader must use the indices
    assert not np.array_equal(np.asarray(Image.open(label).convert("L")), read_label_ids(label))
    ds = open_dataset("gta5", tmp_path, "train")
    assert ds.label_space is labels.GTA5
    check_reads(ds, fx)
    assert open_dataset("gta5", tmp_path, "all").samples == ds.samples


def test_gta5_split_lists(tmp_path):
    fx = make_gta5(tmp_path, n=4, split_lists={"val": ["00003.png", "00001"], "bad": ["00009.png"]})
    ds = open_dataset("gta5", tmp_path, "val")
    assert [s.key for s in ds] == ["00003", "00001"]  # list order
    for sample in ds:
        np.testing.assert_array_equal(ds.read_image(sample), fx.images[sample.key])
        np.testing.assert_array_equal(ds.read_label(sample), fx.expected[sample.key])
    with pytest.raises(InputError, match="00009.png") as err:
        open_dataset("gta5", tmp_path, "bad")
    assert str(tmp_path / "bad.txt") in str(err.value)
    with pytest.raises(InputError) as err:
        open_dataset("gta5", tmp_path, "test")
    assert str(tmp_path / "test.txt") in str(err.value)


# ----------------------------------------------------------------------------------------------- synthia
@pytest.mark.parametrize("channels", [3, 4, 1])
def test_synthia_16bit_first_channel(tmp_path, channels):
    fx = make_synthia(tmp_path, channels=channels)
    ds = open_dataset("synthia", tmp_path, "train")
    assert ds.label_space is labels.SYNTHIA
    check_reads(ds, fx)


def test_synthia_16bit_rgb_values_read_exactly(tmp_path):
    # ids above 255 in the first channel survive (Pillow alone would keep only the high byte)
    label = np.zeros((2, 3, 3), dtype=np.uint16)
    label[..., 0] = [[3, 7, 300], [0, 1, 22]]
    label[..., 1] = 1000
    label[..., 2] = 65535
    path = write_png16(tmp_path / "l.png", label)
    np.testing.assert_array_equal(read_label_ids(path, channel=0), label[..., 0])
    np.testing.assert_array_equal(read_label_ids(path, channel=2), label[..., 2])


def test_synthia_8bit_single_channel_label(tmp_path):
    fx = make_synthia(tmp_path, n=1)
    write_png(fx.labels["0000000"], np.array([[0, 1, 3], [8, 21, 22]]))  # SYNTHIA ids, 8-bit grey
    ds = open_dataset("synthia", tmp_path, "train")
    np.testing.assert_array_equal(ds.read_label(ds[0]), [[255, 10, 0], [13, 3, 255]])


# -------------------------------------------------------------------------------------------------- nthu
def test_nthu_test_split_every_city(tmp_path):
    fx = make_nthu(tmp_path)
    ds = open_dataset("nthu", tmp_path, "val")
    assert ds.label_space is labels.NTHU and ds.has_labels
    assert [s.key for s in ds] == ["Rome/rome_0", "Rome/rome_1", "Tokyo/tokyo_0", "Tokyo/tokyo_1"]
    assert ds[0].label == tmp_path / "Rome/Labels/Test/rome_0_eval.png"
    check_reads(ds, fx, keys=list(fx.expected))
    assert [s.key for s in open_dataset("nthu", tmp_path, "test", city="tokyo")] == ["Tokyo/tokyo_0", "Tokyo/tokyo_1"]


def test_nthu_train_split_has_no_labels(tmp_path):
    make_nthu(tmp_path)
    ds = open_dataset("nthu", tmp_path, "train", city="Rome")
    assert [s.key for s in ds] == ["Rome/pic_100", "Rome/pic_101"] and not ds.has_labels


def test_nthu_bad_options(tmp_path):
    make_nthu(tmp_path)
    with pytest.raises(ConfigError, match="--city"):
        open_dataset("nthu", tmp_path, "val", city="Paris")
    with pytest.raises(ConfigError, match="--split"):
        open_dataset("nthu", tmp_path, "extra")
    with pytest.raises(InputError) as err:
        open_dataset("nthu", tmp_path, "val", city="Rio")
    assert str(tmp_path / "Rio") in str(err.value)


# ------------------------------------------------------------------------------------------------ folder
def test_folder_images_only(tmp_path):
    fx = make_folder(tmp_path)
    write_png(tmp_path / "sub" / "ignored.png", np.zeros((2, 2)))  # not recursive
    ds = open_dataset("folder", tmp_path)
    assert [s.key for s in ds] == ["img_0", "img_1", "img_2"] and not ds.has_labels
    assert ds[2].image.suffix == ".jpg" and ds[2].pred_name == "img_2.png"
    check_reads(ds, fx)


def test_folder_with_train_id_labels(tmp_path):
    fx = make_folder(tmp_path / "images", labels_dir=tmp_path / "labels")
    ds = open_dataset("folder", tmp_path / "images", labels_dir=tmp_path / "labels")
    assert ds.has_labels and ds.label_space.eval_classes() == tuple(range(19))
    check_reads(ds, fx)


def test_folder_with_yaml_label_space(tmp_path):
    write_png(tmp_path / "images" / "a.png", np.zeros((2, 3, 3)))
    write_png(tmp_path / "labels" / "a.png", np.array([[0, 128, 255], [128, 0, 0]]))
    (tmp_path / "space.yaml").write_text("classes: [background, lesion]\nid_to_train: {0: 0, 128: 1, 255: 255}\n")
    ds = open_dataset("folder", tmp_path / "images", labels_dir=tmp_path / "labels",
                      label_space=tmp_path / "space.yaml")
    assert ds.label_space.class_names == ("background", "lesion")
    np.testing.assert_array_equal(ds.read_label(ds[0], (2, 3)), [[0, 1, 255], [1, 0, 0]])


def test_folder_duplicate_stems(tmp_path):
    make_folder(tmp_path, n=2, jpg_last=False)
    write_png(tmp_path / "img_0.jpg", np.zeros((2, 2, 3)))
    with pytest.raises(InputError, match="img_0"):
        open_dataset("folder", tmp_path)


# ------------------------------------------------------------------------------------------------- synth
def test_synth_splits(tmp_path):
    source, train, val = make_synth(tmp_path)
    ds = open_dataset("synth", tmp_path, "source")
    assert ds.label_space is labels.SYNTH and ds.split == "source" and ds.has_labels
    check_reads(ds, source)
    ds = open_dataset("synth", tmp_path, "train")
    assert not ds.has_labels and ds.label_space is labels.SYNTH
    check_reads(ds, train)
    ds = open_dataset("synth", tmp_path, "val")
    assert ds.has_labels
    check_reads(ds, val)
    with pytest.raises(InputError) as err:
        open_dataset("synth", tmp_path / "source", "val")
    assert str(tmp_path / "source" / "target") in str(err.value)


# ------------------------------------------------------------------------------------------------ errors
def test_missing_and_empty_roots(tmp_path):
    with pytest.raises(InputError) as err:
        open_dataset("cityscapes", tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError) as err:
        open_dataset("folder", tmp_path / "empty")
    assert str(tmp_path / "empty") in str(err.value) and "no images" in str(err.value)
    (tmp_path / "g" / "images").mkdir(parents=True)
    with pytest.raises(InputError) as err:
        open_dataset("gta5", tmp_path / "g", "train")
    assert str(tmp_path / "g" / "images") in str(err.value)
    with pytest.raises(ConfigError, match="unknown dataset"):
        open_dataset("kitti", tmp_path)


def test_options_a_format_does_not_take(tmp_path):
    make_gta5(tmp_path)
    with pytest.raises(ConfigError, match="--city"):
        open_dataset("gta5", tmp_path, "train", city="Rome")
    with pytest.raises(ConfigError, match="--labels-dir"):
        open_dataset("cityscapes", tmp_path, labels_dir=tmp_path)


@pytest.fixture
def cs(tmp_path):
    fx = make_cityscapes(tmp_path, cities=(("aachen", 1),))
    ds = open_dataset("cityscapes", tmp_path)
    return fx, ds, ds[0]


def test_label_size_mismatch(cs):
    fx, ds, sample = cs
    write_png(sample.label, np.full((5, 8), 7))
    with pytest.raises(InputError, match="5x8") as err:
        ds.read_label(sample, image_size=SIZE)
    assert str(sample.label) in str(err.value)


def test_unknown_label_id(cs):
    fx, ds, sample = cs
    raw = np.full(SIZE, 7)
    raw[0, 0] = 40
    write_png(sample.label, raw)
    with pytest.raises(InputError, match="40") as err:
        ds.read_label(sample)
    assert str(sample.label) in str(err.value)


def test_missing_label(cs):
    fx, ds, sample = cs
    sample.label.unlink()
    with pytest.raises(InputError, match="not found") as err:
        ds.read_label(sample)
    assert str(sample.label) in str(err.value)


def test_colour_label_refused(cs):
    fx, ds, sample = cs
    write_png(sample.label, np.full((*SIZE, 3), 7))
    with pytest.raises(InputError, match="3 channels") as err:
        ds.read_label(sample)
    assert str(sample.label) in str(err.value)


@pytest.mark.parametrize("corruption", ["garbage", "truncated", "empty"])
def test_corrupt_image(cs, corruption):
    fx, ds, sample = cs
    data = sample.image.read_bytes()
    sample.image.write_bytes({"garbage": b"not an image at all", "truncated": data[: len(data) // 2],
                              "empty": b""}[corruption])
    with pytest.raises(InputError, match="cannot read image") as err:
        ds.read_image(sample)
    assert str(sample.image) in str(err.value)
    assert "\n" not in str(err.value)


def test_corrupt_16bit_label(tmp_path):
    make_synthia(tmp_path, n=1)
    ds = open_dataset("synthia", tmp_path, "train")
    data = ds[0].label.read_bytes()
    ds[0].label.write_bytes(data[:60])
    with pytest.raises(InputError, match="cannot read label") as err:
        ds.read_label(ds[0])
    assert str(ds[0].label) in str(err.value)


def test_read_image_converts_grey_and_palette(tmp_path):
    grey = write_png(tmp_path / "g.png", np.arange(6).reshape(2, 3))
    assert read_image(grey).shape == (2, 3, 3)
    np.testing.assert_array_equal(read_image(grey)[..., 1], np.arange(6).reshape(2, 3))


def test_sample_is_frozen():
    s = Sample("a", Path("a.jpg"), None)
    with pytest.raises(Exception):
        s.key = "b"  # type: ignore[misc]
    assert s.pred_name == "a.png"
