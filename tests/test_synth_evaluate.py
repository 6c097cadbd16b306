"""`corte-ray synth` + `corte-ray evaluate` through the CLI: the ground truth against itself is 100 mIoU;
perturbed predictions give exactly what torchmetrics computes from the same files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from corte_ray.cli import main
from corte_ray.data.datasets import open_dataset
from corte_ray.data.labels import SYNTH_CLASSES, TRAIN_NAMES


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    assert main(["-q", "synth", "--out", str(root), "--n-source", "2", "--n-target", "2", "--n-val", "6",
                 "--size", "64x96", "--seed", "3"]) == 0
    return root


def _write_predictions(bench, out, perturb: float, seed: int = 0):
    ds = open_dataset("synth", bench, split="val")
    rng = np.random.default_rng(seed)
    out.mkdir()
    preds, gts = [], []
    for s in ds.samples:
        gt = ds.read_label(s)
        pred = gt.copy()
        flip = rng.random(gt.shape) < perturb
        pred[flip] = rng.choice(np.array(SYNTH_CLASSES + (3,)), size=int(flip.sum()))  # 3 = wall: never in gt
        pred[pred == 255] = 0   # a model always names a class
        Image.fromarray(pred).save(out / s.pred_name)
        preds.append(pred)
        gts.append(gt)
    return np.stack(preds), np.stack(gts)


def test_ground_truth_against_itself_is_100(bench, tmp_path):
    ds = open_dataset("synth", bench, split="val")
    (tmp_path / "p").mkdir()
    for s in ds.samples:
        Image.fromarray(ds.read_label(s)).save(tmp_path / "p" / s.pred_name)
    assert main(["-q", "evaluate", "--dataset", "synth", "--root", str(bench), "--predictions", str(tmp_path / "p"),
                 "--json", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["miou"] == pytest.approx(100.0) and r["num_images"] == 6
    assert set(r["per_class"]) == {TRAIN_NAMES[c] for c in SYNTH_CLASSES}


def test_perturbed_predictions_match_torchmetrics(bench, tmp_path):
    from torchmetrics.classification import MulticlassJaccardIndex

    preds, gts = _write_predictions(bench, tmp_path / "p", perturb=0.3)
    assert main(["-q", "evaluate", "--dataset", "synth", "--root", str(bench), "--predictions", str(tmp_path / "p"),
                 "--json", str(tmp_path / "r.json")]) == 0
    ours = json.loads((tmp_path / "r.json").read_text())
    metric = MulticlassJaccardIndex(num_classes=19, average=None, ignore_index=255)
    ref = metric(torch.from_numpy(preds).long(), torch.from_numpy(gts).long()).numpy() * 100
    for c in SYNTH_CLASSES:
        assert ours["per_class"][TRAIN_NAMES[c]] == pytest.approx(float(ref[c]), abs=1e-4)  # torchmetrics works in float32
    assert ours["miou"] == pytest.approx(float(np.mean([ref[c] for c in SYNTH_CLASSES])), abs=1e-4)  # torchmetrics works in float32
    assert 20 < ours["miou"] < 95   # the perturbation really changed the score
