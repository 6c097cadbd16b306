"""Pixel-weighted and reliability-weighted cross-entropy (METHODS.md 1.3, 2.1) against hand values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from corte_ray.methods.losses import (pixel_weighted_cross_entropy, quality_weights, reliability_weighted_cross_entropy,
                                     top2_set_loss)

# Two classes, logits (0, ln 3) everywhere: p = (1/4, 3/4), so CE is -ln(3/4) for label 1, -ln(1/4) for label 0.
CE1, CE0 = -math.log(0.75), -math.log(0.25)


def logits(n: int) -> torch.Tensor:
    """(1, 2, 1, n) logits (0, ln 3) at every pixel, a leaf that collects gradients."""
    return torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1).expand(1, 2, 1, n).clone().requires_grad_(True)


def test_quality_weights():
    labels = torch.tensor([[[1, 255], [0, 2]], [[255, 255], [255, 255]]])
    expected = torch.tensor([[[0.75, 0.75], [0.75, 0.75]], [[0.0, 0.0], [0.0, 0.0]]])
    assert torch.equal(quality_weights(labels), expected)
    assert torch.equal(quality_weights(labels, ignore_index=2)[0], torch.full((2, 2), 0.75))


def test_pixel_weighted_cross_entropy_by_hand():
    labels = torch.tensor([[[1, 0, 255]]])
    weights = torch.tensor([[[2.0, 0.5, 100.0]]])
    loss = pixel_weighted_cross_entropy(logits(3), labels, weights)
    # Mean over the two non-ignored pixels; the ignored pixel's weight counts for nothing.
    assert loss.item() == pytest.approx((2.0 * CE1 + 0.5 * CE0) / 2)
    plain = pixel_weighted_cross_entropy(logits(3), labels)
    assert plain.item() == pytest.approx((CE1 + CE0) / 2)
    assert plain.item() == pytest.approx(F.cross_entropy(logits(3), labels, ignore_index=255).item())


def test_pixel_weighted_cross_entropy_matches_functional_on_random_input():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 4, 3, generator=g)
    labels = torch.randint(0, 5, (2, 4, 3), generator=g)
    labels[0, 0] = 255
    weights = torch.rand(2, 4, 3, generator=g)
    expected = (F.cross_entropy(x, labels, ignore_index=255, reduction="none") * weights).sum() / (labels != 255).sum()
    torch.testing.assert_close(pixel_weighted_cross_entropy(x, labels, weights), expected)
    torch.testing.assert_close(pixel_weighted_cross_entropy(x, labels), F.cross_entropy(x, labels, ignore_index=255))
    # uint8 labels, as stored on disk, work too.
    torch.testing.assert_close(
        pixel_weighted_cross_entropy(x, labels.to(torch.uint8)), F.cross_entropy(x, labels, ignore_index=255)
    )


def test_no_valid_pixel_gives_zero_on_the_graph():
    x = logits(2)
    labels = torch.tensor([[[255, 255]]])
    for loss in (
        pixel_weighted_cross_entropy(x, labels, torch.ones(1, 1, 2)),
        reliability_weighted_cross_entropy(x, labels, torch.ones(1, 1, 2)),
        reliability_weighted_cross_entropy(x, torch.tensor([[[0, 1]]]), torch.zeros(1, 1, 2)),
    ):
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert torch.equal(x.grad, torch.zeros_like(x))


def test_reliability_weighted_cross_entropy_by_hand():
    labels = torch.tensor([[[1, 0, 255, 0]]])
    reliability = torch.tensor([[[0.75, 0.25, 1.0, 0.0]]])
    loss = reliability_weighted_cross_entropy(logits(4), labels, reliability)
    # sum r CE / sum r over non-ignored pixels: the 255 pixel (r = 1) and the r = 0 pixel drop out.
    assert loss.item() == pytest.approx((0.75 * CE1 + 0.25 * CE0) / (0.75 + 0.25))
    # The r = 0 pixel's label does not matter, the ignored pixel's reliability neither.
    assert reliability_weighted_cross_entropy(
        logits(4), torch.tensor([[[1, 0, 255, 1]]]), torch.tensor([[[0.75, 0.25, 0.5, 0.0]]])
    ).item() == pytest.approx(loss.item())


def test_gradients_reach_logits_only():
    labels = torch.tensor([[[1, 0, 255]]])
    for loss_fn in (pixel_weighted_cross_entropy, reliability_weighted_cross_entropy):
        x = logits(3)
        weights = torch.tensor([[[0.5, 1.0, 1.0]]], requires_grad=True)
        loss = loss_fn(x, labels, weights)
        loss.backward()
        assert weights.grad is None
        assert x.grad is not None and x.grad[..., :2].abs().sum() > 0
        assert torch.equal(x.grad[..., 2], torch.zeros(1, 2, 1))  # the ignored pixel gets no gradient
    # Reliability pixel 0: dL/dz = r_0 / sum r * (softmax - onehot) = (0.5 / 1.5) * (1/4, 3/4 - 1).
    x = logits(3)
    reliability_weighted_cross_entropy(x, labels, torch.tensor([[[0.5, 1.0, 1.0]]])).backward()
    torch.testing.assert_close(x.grad[0, :, 0, 0], torch.tensor([0.25, -0.25]) / 3)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        pixel_weighted_cross_entropy(logits(3), torch.tensor([[[1, 0]]]))
    with pytest.raises(ValueError):
        reliability_weighted_cross_entropy(logits(2), torch.tensor([[[1, 0]]]), torch.ones(1, 2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    labels = torch.tensor([[[1, 0, 255, 0]]])
    reliability = torch.tensor([[[0.75, 0.25, 1.0, 0.0]]])
    cpu = reliability_weighted_cross_entropy(logits(4), labels, reliability)
    gpu = reliability_weighted_cross_entropy(logits(4).cuda(), labels.cuda(), reliability.cuda())
    torch.testing.assert_close(gpu.cpu(), cpu)


def test_top2_set_loss_by_hand():
    # Three classes, logits (0, ln 2, ln 3): p = (1/6, 2/6, 3/6). Pixel 0's set {1, 2} holds 5/6 of the mass,
    # pixel 1's {0, 1} 3/6; pixel 2 is not in `where`; all three are valid.
    lg = torch.tensor([0.0, math.log(2.0), math.log(3.0)]).view(1, 3, 1, 1).expand(1, 3, 1, 3).clone()
    lg.requires_grad_(True)
    top1 = torch.tensor([[[2, 0, 2]]])
    top2 = torch.tensor([[[1, 1, 0]]])
    where = torch.tensor([[[True, True, False]]])
    valid = torch.ones(1, 1, 3, dtype=torch.bool)
    loss = top2_set_loss(lg, top1, top2, where, valid)
    assert loss.item() == pytest.approx((-math.log(5 / 6) - math.log(3 / 6)) / 3)
    loss.backward()
    assert lg.grad[0, :, 0, 2].abs().sum() == 0          # a pixel outside `where` gets no gradient
    # Order within the set does not matter, and a pixel whose set holds all the mass costs nothing.
    assert top2_set_loss(lg, top2, top1, where, valid).item() == pytest.approx(loss.item())
    two = torch.tensor([0.0, 0.0]).view(1, 2, 1, 1).expand(1, 2, 1, 3)
    assert top2_set_loss(two, torch.zeros(1, 1, 3, dtype=torch.long), torch.ones(1, 1, 3, dtype=torch.long),
                         torch.ones(1, 1, 3, dtype=torch.bool), valid).item() == pytest.approx(0.0, abs=1e-6)


def test_top2_set_loss_no_pixel_is_zero_on_the_graph():
    lg = torch.randn(2, 4, 3, 5, requires_grad=True)
    none = torch.zeros(2, 3, 5, dtype=torch.bool)
    loss = top2_set_loss(lg, torch.zeros(2, 3, 5, dtype=torch.long), torch.ones(2, 3, 5, dtype=torch.long), none,
                         ~none)
    assert loss.item() == 0.0
    loss.backward()
    assert lg.grad is not None
