"""R2CP pseudo-labels (METHODS.md 1.1) on a 2x3 probability map computed by hand."""

from __future__ import annotations

import json

import pytest
import torch

from corte_ray.methods.pseudo_labels import (
    ClassConfidenceStats,
    class_thresholds,
    confidence_threshold_labels,
    per_class_sum_count,
    r2cp_labels,
    relative_confidence,
    relative_confidence_topk,
)

# Sixteenths are exact in binary, so the hand values below are exact, comparisons included.
# (p0, p1, p2) * 16 per pixel, rows of a 2x3 map; classes 0 and 1 are predicted, class 2 never.
PIXELS = [
    [(12, 2, 2), (7, 6, 3), (3, 10, 3)],
    [(1, 14, 1), (9, 5, 2), (4, 9, 3)],
]
RC = torch.tensor([[[10, 1, 7], [13, 4, 5]]], dtype=torch.float64) / 16
TOP1 = torch.tensor([[[0, 0, 1], [1, 0, 1]]])
# class 0: rc 10, 1, 4 -> mean 5/16; class 1: rc 7, 13, 5 -> mean 25/48; class 2: never predicted.
MEAN = torch.tensor([5 / 16, 25 / 48, float("nan")], dtype=torch.float64)


def probs() -> torch.Tensor:
    return torch.tensor(PIXELS, dtype=torch.float64).permute(2, 0, 1).unsqueeze(0) / 16  # (1, 3, 2, 3)


def test_relative_confidence_and_top1():
    rc, top1 = relative_confidence(probs())
    assert rc.shape == (1, 2, 3) and top1.dtype == torch.long
    torch.testing.assert_close(rc, RC)
    assert torch.equal(top1, TOP1)


def test_relative_confidence_topk_matches_dense():
    topk = probs().sort(dim=1, descending=True).values[:, :2]
    torch.testing.assert_close(relative_confidence_topk(topk), RC)
    with pytest.raises(ValueError):
        relative_confidence_topk(topk[:, :1])


def test_class_thresholds_by_hand():
    torch.testing.assert_close(class_thresholds(RC, TOP1, 3), torch.tensor([5 / 16, 25 / 48, 1.0], dtype=torch.float64))
    # alpha scales the seen classes only; a class never predicted stays at 1 (nothing kept).
    torch.testing.assert_close(
        class_thresholds(RC, TOP1, 3, alpha=0.5), torch.tensor([5 / 32, 25 / 96, 1.0], dtype=torch.float64)
    )


def test_r2cp_labels_by_hand():
    rc, top1 = relative_confidence(probs())
    tau1 = class_thresholds(rc, top1, 3, alpha=1.0)
    assert r2cp_labels(top1, rc, tau1).tolist() == [[[0, 255, 255], [1, 255, 255]]]
    tau_half = class_thresholds(rc, top1, 3, alpha=0.5)
    assert r2cp_labels(top1, rc, tau_half).tolist() == [[[0, 255, 1], [1, 0, 1]]]
    assert r2cp_labels(top1, rc, tau_half, ignore_index=99).tolist() == [[[0, 99, 1], [1, 0, 1]]]


def test_r2cp_keeps_pixel_equal_to_its_float32_class_mean():
    # float32 0.3 is not 0.3; the comparison must still keep a pixel whose rc is the class mean.
    rc = torch.full((1, 1, 3), 0.3, dtype=torch.float32)
    top1 = torch.zeros((1, 1, 3), dtype=torch.long)
    assert r2cp_labels(top1, rc, class_thresholds(rc, top1, 2)).tolist() == [[[0, 0, 0]]]


def test_stats_merged_halves_equal_whole_and_round_trip():
    whole = ClassConfidenceStats(3)
    whole.update(RC, TOP1)
    first, second = ClassConfidenceStats(3), ClassConfidenceStats(3)
    first.update(RC[:, :1], TOP1[:, :1])
    second.update(RC[:, 1:], TOP1[:, 1:])
    merged = first.merge(second)
    assert torch.equal(merged.counts, torch.tensor([3, 3, 0]))
    torch.testing.assert_close(merged.sums, whole.sums)
    torch.testing.assert_close(merged.mean(), MEAN, equal_nan=True)
    torch.testing.assert_close(merged.thresholds(), whole.thresholds())
    assert torch.equal(first.counts, torch.tensor([2, 1, 0]))  # merge leaves its inputs alone

    restored = ClassConfidenceStats.from_dict(json.loads(json.dumps(merged.to_dict())))
    assert restored.num_classes == 3 and torch.equal(restored.counts, merged.counts)
    assert torch.equal(restored.sums, merged.sums)  # float64 survives JSON exactly
    with pytest.raises(ValueError):
        ClassConfidenceStats(2).merge(merged)
    with pytest.raises(ValueError):
        ClassConfidenceStats.from_dict({"num_classes": 3, "sums": [0.0], "counts": [0]})


def test_stats_valid_mask_drops_pixels():
    stats = ClassConfidenceStats(3)
    valid = torch.tensor([[[True, True, True], [False, True, False]]])
    stats.update(RC, TOP1, valid)
    # class 0: rc 10, 1, 4 -> 15/48; class 1: only the 7/16 pixel is left.
    expected = torch.tensor([5 / 16, 7 / 16, float("nan")], dtype=torch.float64)
    torch.testing.assert_close(stats.mean(), expected, equal_nan=True)


def test_per_class_sum_count():
    sums, counts = per_class_sum_count(torch.tensor([0.5, 0.25, 1.0]), torch.tensor([2, 0, 2]), 4)
    assert sums.dtype == counts.dtype == torch.float64
    assert sums.tolist() == [0.25, 0.0, 1.5, 0.0] and counts.tolist() == [1.0, 0.0, 2.0, 0.0]


def test_confidence_threshold_labels():
    p1 = torch.tensor([[[0.95, 0.9, 0.5]]], dtype=torch.float64)
    top1 = torch.tensor([[[3, 1, 2]]])
    assert confidence_threshold_labels(p1, top1).tolist() == [[[3, 1, 255]]]
    assert confidence_threshold_labels(p1, top1, threshold=0.96).tolist() == [[[255, 255, 255]]]


def test_inputs_untouched():
    p = probs()
    before = p.clone()
    rc, top1 = relative_confidence(p)
    rc_before, top1_before = rc.clone(), top1.clone()
    r2cp_labels(top1, rc, class_thresholds(rc, top1, 3))
    assert torch.equal(p, before) and torch.equal(rc, rc_before) and torch.equal(top1, top1_before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    rc, top1 = relative_confidence(probs().cuda())
    stats = ClassConfidenceStats(3)
    stats.update(rc, top1)
    assert stats.sums.device.type == "cpu"
    labels = r2cp_labels(top1, rc, stats.thresholds(0.5))
    assert labels.is_cuda and labels.cpu().tolist() == [[[0, 255, 1], [1, 0, 1]]]


def test_r2cp_labels_keep_ignored_pixels_ignored():
    # Padding from the weak view arrives as top1 = 255; it must stay 255 whatever its rc.
    top1 = torch.tensor([[0, 255, 1]])
    rc = torch.tensor([[0.9, 1.0, 0.1]])
    out = r2cp_labels(top1, rc, torch.tensor([0.5, 0.5]))
    assert out.tolist() == [[0, 255, 255]]
