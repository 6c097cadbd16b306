"""mIoU evaluation: hand-computed examples, agreement with torchmetrics, and every bad input through the
real CLI (exit code != 0 and one stderr line naming the offending file)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from corte_ray.cli import main
from corte_ray.data.datasets import open_dataset
from corte_ray.data.labels import SYNTHIA_13
from tests.conftest import require_reference
from corte_ray.errors import ConfigError, CorteError, InputError
from corte_ray.evaluation import EvalResult, confusion_matrix, evaluate_predictions, iou_per_class
from tests.layouts import SIZE, make_cityscapes, make_folder, write_png, write_predictions


@pytest.fixture(autouse=True)
def no_progress_bars(monkeypatch):
    monkeypatch.setenv("CORTE_NO_PROGRESS", "1")


# ---------------------------------------------------------------------------------------- pure functions
def test_two_class_example_by_hand():
    gt = np.array([[0, 0, 0], [1, 1, 255]])
    pred = np.array([[0, 0, 1], [1, 255, 0]])
    conf = confusion_matrix(pred, gt, 2, no_class_column=True)
    # gt 0: two hits, one predicted as 1; gt 1: one hit, one with no class (255); the gt-255 pixel is skipped
    np.testing.assert_array_equal(conf, [[2, 1, 0], [0, 1, 1]])
    assert conf.dtype == np.int64
    # IoU(0) = 2 / (3 gt + 2 pred - 2) ; IoU(1) = 1 / (2 gt + 2 pred - 1)
    np.testing.assert_allclose(iou_per_class(conf), [2 / 3, 1 / 3])
    np.testing.assert_allclose(iou_per_class(conf[:, :2]), [2 / 3, 1 / 2])  # a plain CxC matrix also works
    # without the extra column a "no class" prediction is refused, never dropped silently
    with pytest.raises(ValueError, match="no_class_column"):
        confusion_matrix(pred, gt, 2)
    plain = confusion_matrix(np.where(pred == 255, 0, pred), gt, 2)
    np.testing.assert_array_equal(plain, [[2, 1], [1, 1]])


def test_absent_class_is_nan_and_predicted_only_class_is_zero():
    gt = np.array([0, 0, 1, 1])
    pred = np.array([0, 2, 1, 1])
    iou = iou_per_class(confusion_matrix(pred, gt, 4))
    np.testing.assert_allclose(iou[:3], [1 / 2, 1.0, 0.0])
    assert math.isnan(iou[3])


def test_confusion_matrix_rejects_values_outside_classes():
    with pytest.raises(ValueError):
        confusion_matrix(np.array([0, 7]), np.array([0, 1]), 2)
    with pytest.raises(ValueError):
        confusion_matrix(np.array([0, 1]), np.array([0, 5]), 2)
    with pytest.raises(ValueError):
        confusion_matrix(np.array([0, 1]), np.array([0, 1, 1]), 2)


def perturbed(gt: np.ndarray, rng: np.random.Generator, no_class: bool) -> np.ndarray:
    """gt with ~30% of pixels set to random classes (and ~10% to 255 when `no_class`); ignore pixels random."""
    pred = np.where(gt == 255, rng.integers(0, 19, gt.shape), gt)
    flip = rng.random(gt.shape) < 0.3
    pred = np.where(flip, rng.integers(0, 19, gt.shape), pred)
    if no_class:
        pred = np.where(rng.random(gt.shape) < 0.1, 255, pred)
    return pred.astype(np.uint8)


def random_gt(rng: np.random.Generator, shape=(3, 20, 24)) -> np.ndarray:
    gt = rng.integers(0, 17, shape)  # classes 17, 18 absent from gt
    return np.where(rng.random(shape) < 0.15, 255, gt).astype(np.uint8)


def test_matches_torchmetrics_19_classes():
    torch = require_reference("torch")
    tm = require_reference("torchmetrics.classification")
    rng = np.random.default_rng(0)
    gt = random_gt(rng)
    pred = perturbed(gt, rng, no_class=False)
    conf = sum(confusion_matrix(p, g, 19) for p, g in zip(pred, gt))  # per image, accumulated
    ours = iou_per_class(conf)
    ref = tm.MulticlassJaccardIndex(num_classes=19, average=None, ignore_index=255)(
        torch.from_numpy(pred.astype(np.int64)).reshape(-1), torch.from_numpy(gt.astype(np.int64)).reshape(-1)).numpy()
    present = ~np.isnan(ours)
    assert present.sum() >= 17
    np.testing.assert_allclose(ours[present], ref[present], rtol=1e-6)
    macro = tm.MulticlassJaccardIndex(num_classes=19, average="macro", ignore_index=255)(
        torch.from_numpy(pred.astype(np.int64)).reshape(-1), torch.from_numpy(gt.astype(np.int64)).reshape(-1))
    assert np.nanmean(ours) == pytest.approx(float(macro), rel=1e-6)


def test_matches_torchmetrics_with_no_class_predictions():
    # torchmetrics drops gt == ignore pixels but cannot take pred == 255 (it would index past its
    # 19 x 19 bins); a 20th "no class" class reproduces our semantics: a miss for the gt class.
    torch = require_reference("torch")
    tm = require_reference("torchmetrics.classification")
    rng = np.random.default_rng(1)
    gt = random_gt(rng)
    pred = perturbed(gt, rng, no_class=True)
    assert ((pred == 255) & (gt != 255)).any()
    ours = iou_per_class(confusion_matrix(pred, gt, 19, no_class_column=True))
    ref = tm.MulticlassJaccardIndex(num_classes=20, average=None, ignore_index=255)(
        torch.from_numpy(np.where(pred == 255, 19, pred).astype(np.int64)).reshape(-1),
        torch.from_numpy(gt.astype(np.int64)).reshape(-1)).numpy()[:19]
    present = ~np.isnan(ours)
    np.testing.assert_allclose(ours[present], ref[present], rtol=1e-6)


# ------------------------------------------------------------------------------------- on a real layout
def cityscapes_with_predictions(tmp_path: Path, preds=None):
    fx = make_cityscapes(tmp_path / "cs", cities=(("aachen", 2), ("bonn", 2)))
    ds = open_dataset("cityscapes", tmp_path / "cs")
    names = {s.key: s.pred_name for s in ds}
    write_predictions(tmp_path / "pred", fx, names, preds)
    return fx, ds


def test_ground_truth_against_itself_is_100(tmp_path):
    fx, ds = cityscapes_with_predictions(tmp_path)
    result = evaluate_predictions(ds, tmp_path / "pred")
    assert result.miou == pytest.approx(100.0)
    assert result.num_images == 4 and result.num_skipped == 0
    # the fixture holds road, sidewalk, sky, person, car, bicycle; the other classes are absent
    present = {k for k, v in result.per_class.items() if v is not None}
    assert present == {"road", "sidewalk", "sky", "person", "car", "bicycle"}
    assert all(v == pytest.approx(100.0) for v in result.per_class.values() if v is not None)
    assert result.confusion.shape == (19, 20)


def test_perturbed_predictions_match_torchmetrics(tmp_path):
    torch = require_reference("torch")
    tm = require_reference("torchmetrics.classification")
    rng = np.random.default_rng(3)
    fx = make_cityscapes(tmp_path / "cs", cities=(("aachen", 2), ("bonn", 2)))
    preds = {k: perturbed(g, rng, no_class=False) for k, g in fx.expected.items()}
    fx, ds = cityscapes_with_predictions(tmp_path, preds)
    result = evaluate_predictions(ds, tmp_path / "pred")
    keys = sorted(fx.expected)
    gt = torch.from_numpy(np.concatenate([fx.expected[k].reshape(-1) for k in keys]).astype(np.int64))
    pred = torch.from_numpy(np.concatenate([preds[k].reshape(-1) for k in keys]).astype(np.int64))
    ref = tm.MulticlassJaccardIndex(num_classes=19, average=None, ignore_index=255)(pred, gt).numpy() * 100
    names = list(result.per_class)
    for c, name in enumerate(names):
        if result.per_class[name] is not None:
            assert result.per_class[name] == pytest.approx(ref[c], rel=1e-6), name
    macro = tm.MulticlassJaccardIndex(num_classes=19, average="macro", ignore_index=255)(pred, gt)
    assert result.miou == pytest.approx(float(macro) * 100, rel=1e-6)
    assert result.miou < 100


def test_mean_over_chosen_classes_only(tmp_path):
    rng = np.random.default_rng(4)
    fx = make_cityscapes(tmp_path / "cs", cities=(("aachen", 2), ("bonn", 2)))
    preds = {k: perturbed(g, rng, no_class=True) for k, g in fx.expected.items()}
    fx, ds = cityscapes_with_predictions(tmp_path, preds)
    full = evaluate_predictions(ds, tmp_path / "pred", classes="19")
    sub = evaluate_predictions(ds, tmp_path / "pred", classes="13")
    assert sub.classes == SYNTHIA_13 and len(sub.per_class) == 13
    chosen = [full.per_class[name] for name in sub.per_class]
    assert [sub.per_class[n] for n in sub.per_class] == chosen  # same IoUs, fewer classes
    assert sub.miou == pytest.approx(np.mean([v for v in chosen if v is not None]))
    assert sub.miou != pytest.approx(full.miou)


def test_bad_classes_key_names_the_option(tmp_path):
    fx, ds = cityscapes_with_predictions(tmp_path)
    with pytest.raises(ConfigError, match="--classes"):
        evaluate_predictions(ds, tmp_path / "pred", classes="7")


def test_format_table_and_json(tmp_path):
    fx, ds = cityscapes_with_predictions(tmp_path)
    result = evaluate_predictions(ds, tmp_path / "pred")
    table = result.format_table()
    assert "road" in table and "absent" in table and "100.00" in table and "mIoU" in table
    doc = result.to_json()
    assert set(doc) == {"miou", "per_class", "num_images", "num_skipped", "classes"}
    assert doc["classes"][:3] == ["road", "sidewalk", "building"] and doc["per_class"]["building"] is None
    json.dumps(doc, allow_nan=False)


def test_empty_result_json_has_no_nan():
    result = EvalResult(math.nan, {"road": None}, 1, 0, (0,), np.zeros((19, 20), np.int64))
    assert result.to_json()["miou"] is None and "n/a" in result.format_table()


# -------------------------------------------------------------------------------------- through the CLI
def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["evaluate", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def cs_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["--dataset", "cityscapes", "--root", str(tmp_path / "cs"), "--predictions", str(tmp_path / "pred"),
            *extra]


def corrupt_image(tmp_path, ds):
    ds[1].image.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return ds[1].image


def label_wrong_size(tmp_path, ds):
    write_png(ds[1].label, np.full((SIZE[0] + 1, SIZE[1]), 7))
    return ds[1].label


def unknown_label_id(tmp_path, ds):
    raw = np.full(SIZE, 7)
    raw[2, 3] = 77
    write_png(ds[1].label, raw)
    return ds[1].label


def missing_label(tmp_path, ds):
    ds[1].label.unlink()
    return ds[1].label


def missing_prediction(tmp_path, ds):
    (tmp_path / "pred" / ds[1].pred_name).unlink()
    return tmp_path / "pred" / ds[1].pred_name


def prediction_wrong_size(tmp_path, ds):
    write_png(tmp_path / "pred" / ds[1].pred_name, np.zeros((SIZE[0], SIZE[1] + 2)))
    return tmp_path / "pred" / ds[1].pred_name


def prediction_bad_value(tmp_path, ds):
    write_png(tmp_path / "pred" / ds[1].pred_name, np.full(SIZE, 19))
    return tmp_path / "pred" / ds[1].pred_name


def prediction_unreadable(tmp_path, ds):
    (tmp_path / "pred" / ds[1].pred_name).write_bytes(b"garbage")
    return tmp_path / "pred" / ds[1].pred_name


def prediction_colour(tmp_path, ds):
    write_png(tmp_path / "pred" / ds[1].pred_name, np.zeros((*SIZE, 3)))
    return tmp_path / "pred" / ds[1].pred_name


BAD_INPUTS = [corrupt_image, label_wrong_size, unknown_label_id, missing_label, missing_prediction,
              prediction_wrong_size, prediction_bad_value, prediction_unreadable, prediction_colour]


@pytest.mark.parametrize("break_it", BAD_INPUTS, ids=[f.__name__ for f in BAD_INPUTS])
def test_cli_bad_input_is_one_line_naming_the_file(tmp_path, capsys, break_it):
    fx, ds = cityscapes_with_predictions(tmp_path)
    culprit = break_it(tmp_path, ds)
    code, out, err = run_cli(capsys, *cs_args(tmp_path))
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(culprit) in lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("break_it", BAD_INPUTS, ids=[f.__name__ for f in BAD_INPUTS])
def test_cli_skip_bad_skips_and_counts(tmp_path, capsys, break_it):
    fx, ds = cityscapes_with_predictions(tmp_path)
    culprit = break_it(tmp_path, ds)
    code, out, err = run_cli(capsys, *cs_args(tmp_path, "--skip-bad", "--json", str(tmp_path / "r.json")))
    assert code == 0, err
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["num_skipped"] == 1 and doc["num_images"] == 3 and doc["miou"] == pytest.approx(100.0)
    assert str(culprit) in err and "1 skipped" in out


def test_cli_skip_bad_with_nothing_usable_is_an_error(tmp_path, capsys):
    fx, ds = cityscapes_with_predictions(tmp_path)
    for sample in ds:
        (tmp_path / "pred" / sample.pred_name).unlink()
    code, out, err = run_cli(capsys, *cs_args(tmp_path, "--skip-bad"))
    assert code != 0 and "no usable image" in err.strip().splitlines()[-1]


@pytest.mark.parametrize("where", ["missing root", "empty root", "missing predictions folder", "empty split"])
def test_cli_missing_or_empty_folders(tmp_path, capsys, where):
    fx, ds = cityscapes_with_predictions(tmp_path)
    args = ["--dataset", "folder", "--root", str(tmp_path / "imgs"), "--predictions", str(tmp_path / "pred")]
    if where == "missing root":
        culprit = tmp_path / "imgs"
    elif where == "empty root":
        culprit = tmp_path / "imgs"
        culprit.mkdir()
    elif where == "missing predictions folder":
        culprit = tmp_path / "nopred"
        args = cs_args(tmp_path)[:-1] + [str(culprit)]
    else:
        culprit = tmp_path / "cs" / "leftImg8bit" / "train"
        args = cs_args(tmp_path, "--split", "train")
    code, out, err = run_cli(capsys, *args)
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and str(culprit) in lines[0], err


def test_cli_unlabelled_split_and_bad_classes(tmp_path, capsys):
    make_folder(tmp_path / "imgs", n=2)
    (tmp_path / "pred").mkdir()
    code, out, err = run_cli(capsys, "--dataset", "folder", "--root", str(tmp_path / "imgs"),
                             "--predictions", str(tmp_path / "pred"))
    assert code != 0 and "no label" in err and len(err.strip().splitlines()) == 1
    fx, ds = cityscapes_with_predictions(tmp_path)
    code, out, err = run_cli(capsys, *cs_args(tmp_path, "--classes", "12"))
    assert code != 0 and "--classes" in err and len(err.strip().splitlines()) == 1


def test_cli_json_file(tmp_path, capsys):
    rng = np.random.default_rng(5)
    fx = make_cityscapes(tmp_path / "cs", cities=(("aachen", 2), ("bonn", 2)))
    preds = {k: perturbed(g, rng, no_class=True) for k, g in fx.expected.items()}
    fx, ds = cityscapes_with_predictions(tmp_path, preds)
    code, out, err = run_cli(capsys, *cs_args(tmp_path, "--json", str(tmp_path / "out" / "r.json")))
    assert code == 0, err
    doc = json.loads((tmp_path / "out" / "r.json").read_text())
    expected = evaluate_predictions(ds, tmp_path / "pred").to_json()
    assert doc == expected
    assert doc["num_images"] == 4 and doc["num_skipped"] == 0 and len(doc["classes"]) == 19
    assert set(doc["per_class"]) == set(doc["classes"]) and 0 < doc["miou"] < 100
    assert f"{doc['miou']:.2f}" in out


def test_duplicate_prediction_names_are_refused(tmp_path):
    # two NTHU-style cities with the same image names cannot share one flat prediction folder
    for city in ("Rome", "Rio"):
        write_png(tmp_path / "n" / city / "Images" / "Test" / "pic_1.png", np.zeros((*SIZE, 3)))
        write_png(tmp_path / "n" / city / "Labels" / "Test" / "pic_1_eval.png", np.full(SIZE, 7))
    (tmp_path / "pred").mkdir()
    ds = open_dataset("nthu", tmp_path / "n", "val")
    with pytest.raises(InputError, match="--city"):
        evaluate_predictions(ds, tmp_path / "pred")
    write_png(tmp_path / "pred" / "pic_1.png", np.zeros(SIZE))
    result = evaluate_predictions(open_dataset("nthu", tmp_path / "n", "val", city="Rio"), tmp_path / "pred")
    assert result.per_class["road"] == pytest.approx(100.0) and result.num_images == 1


def test_all_skipped_raises_corte_error(tmp_path):
    fx, ds = cityscapes_with_predictions(tmp_path)
    for sample in ds:
        sample.label.unlink()
    with pytest.raises(CorteError, match="no usable image"):
        evaluate_predictions(ds, tmp_path / "pred", skip_bad=True)
