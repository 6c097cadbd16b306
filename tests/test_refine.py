"""Teacher thresholds and the three refinement rules of METHODS.md 1.2, one pixel per branch."""

from __future__ import annotations

import math

import pytest
import torch

from corte_ray.methods.refine import TeacherThresholds, refine_labels

INF = math.inf


def row(values, dtype=torch.float32):
    """A (1, 1, N) map: one image, one row, one pixel per rule under test."""
    return torch.tensor([[values]], dtype=dtype)


def test_teacher_thresholds_first_observation_ema_and_unseen():
    thresholds = TeacherThresholds(3, momentum=0.9)
    assert thresholds.value.tolist() == [INF, INF, INF]

    sums, counts = TeacherThresholds.batch_sums(row([0.25, 0.5, 0.75]), row([0, 0, 1], torch.long), 3)
    assert sums.dtype == counts.dtype == torch.float64
    assert sums.tolist() == [0.75, 0.75, 0.0] and counts.tolist() == [2.0, 1.0, 0.0]
    thresholds.update(sums, counts)
    # First sight: the batch mean itself, not 0.1 * mean (no decay from 0).
    assert thresholds.value.tolist() == [0.375, 0.75, INF]

    thresholds.update(*TeacherThresholds.batch_sums(row([0.5]), row([0], torch.long), 3))
    # class 0: 0.9 * 0.375 + 0.1 * 0.5 = 0.3875; class 1 absent from the batch: unchanged.
    torch.testing.assert_close(thresholds.value[:2], torch.tensor([0.3875, 0.75], dtype=torch.float64))
    assert thresholds.value[2] == INF

    thresholds.update(*TeacherThresholds.batch_sums(row([0.125]), row([2], torch.long), 3))
    torch.testing.assert_close(thresholds.value, torch.tensor([0.3875, 0.75, 0.125], dtype=torch.float64))


def test_teacher_thresholds_default_momentum():
    thresholds = TeacherThresholds(1)
    thresholds.update(torch.tensor([1.0]), torch.tensor([2.0]))  # mean 0.5
    thresholds.update(torch.tensor([1.0]), torch.tensor([1.0]))  # mean 1.0
    torch.testing.assert_close(thresholds.value, torch.tensor([0.99 * 0.5 + 0.01 * 1.0], dtype=torch.float64))


def test_teacher_thresholds_state_dict_round_trip():
    thresholds = TeacherThresholds(3, momentum=0.9)
    thresholds.update(torch.tensor([0.5, 0.0, 0.0]), torch.tensor([1.0, 0.0, 0.0]))
    state = thresholds.state_dict()
    restored = TeacherThresholds(3)
    restored.load_state_dict(state)
    assert restored.momentum == 0.9 and torch.equal(restored.value, thresholds.value)
    # The restored copy must keep counting "class 0 seen" (EMA) and "class 1 unseen" (direct).
    for t in (thresholds, restored):
        t.update(torch.tensor([1.0, 0.25, 0.0]), torch.tensor([1.0, 1.0, 0.0]))
    assert torch.equal(restored.value, thresholds.value)
    torch.testing.assert_close(restored.value, torch.tensor([0.55, 0.25, INF], dtype=torch.float64))
    # The state is a copy, not a view of the live tensors.
    thresholds.update(torch.tensor([0.0, 0.0, 3.0]), torch.tensor([0.0, 0.0, 1.0]))
    assert not bool(state["seen"][2])
    with pytest.raises(ValueError):
        TeacherThresholds(4).load_state_dict(state)


TAU = torch.tensor([0.5, 0.4, 0.2, INF], dtype=torch.float64)  # class 3: never seen by the teacher


def test_refine_soft_box_one_pixel_per_rule():
    #         kept   overrid  rcT<=rcB  rcT<tau  filled  left 255  unseen class
    y_box = row([0, 0, 0, 0, 255, 255, 255], torch.long)
    rc_box = row([0.6, 0.3, 0.5, 0.1, 0.05, 0.0, 0.0])
    y_t = row([0, 1, 1, 1, 2, 0, 3], torch.long)
    rc_t = row([0.9, 0.5, 0.5, 0.35, 0.25, 0.45, 1.0])
    inputs = [t.clone() for t in (y_box, rc_box, y_t, rc_t)]
    refined, fractions = refine_labels(y_box, rc_box, y_t, rc_t, TAU)
    assert refined.tolist() == [[[0, 1, 0, 0, 2, 255, 255]]]
    assert refined.dtype == torch.long
    assert fractions == pytest.approx({"kept_box": 3 / 7, "overridden": 1 / 7, "filled": 1 / 7, "ignored": 2 / 7})
    assert sum(fractions.values()) == pytest.approx(1.0)
    assert all(torch.equal(a, b) for a, b in zip(inputs, (y_box, rc_box, y_t, rc_t)))

    # beta = 2 doubles the teacher's bar: 0.5 < 0.8 stops the override, 0.25 < 0.4 the fill.
    refined, fractions = refine_labels(y_box, rc_box, y_t, rc_t, TAU, beta=2.0)
    assert refined.tolist() == [[[0, 0, 0, 0, 255, 255, 255]]]
    assert fractions == pytest.approx({"kept_box": 4 / 7, "overridden": 0.0, "filled": 0.0, "ignored": 3 / 7})


def test_refine_override_scale_moves_only_the_override_bar():
    # Same pixels as above at beta = 2, which stops both the override and the fill. beta_override = 1 lets the
    # override back in (0.5 >= 0.4 and 0.5 > 0.3) and leaves the fill stopped; rc_T > rc_B still holds the third.
    y_box = row([0, 0, 0, 0, 255, 255, 255], torch.long)
    rc_box = row([0.6, 0.3, 0.5, 0.1, 0.05, 0.0, 0.0])
    y_t = row([0, 1, 1, 1, 2, 0, 3], torch.long)
    rc_t = row([0.9, 0.5, 0.5, 0.35, 0.25, 0.45, 1.0])
    refined, fractions = refine_labels(y_box, rc_box, y_t, rc_t, TAU, beta=2.0, beta_override=1.0)
    assert refined.tolist() == [[[0, 1, 0, 0, 255, 255, 255]]]
    assert fractions["overridden"] == pytest.approx(1 / 7) and fractions["filled"] == 0.0
    # beta_override = 0: any disagreement the teacher is surer of than the box (0.35 > 0.1 now counts too).
    refined, _ = refine_labels(y_box, rc_box, y_t, rc_t, TAU, beta=2.0, beta_override=0.0)
    assert refined.tolist() == [[[0, 1, 0, 1, 255, 255, 255]]]


def test_refine_drop_contradicted_ignores_what_the_teacher_contradicts_without_overriding():
    # The pixels of the first test: pixel 2 (teacher says 1 above its bar, rc_T 0.5 <= rc_B 0.5: no override)
    # is kept by the spec's rule and ignored with drop_contradicted; pixel 3 (teacher below its bar) stays kept.
    y_box = row([0, 0, 0, 0, 255, 255, 255], torch.long)
    rc_box = row([0.6, 0.3, 0.5, 0.1, 0.05, 0.0, 0.0])
    y_t = row([0, 1, 1, 1, 2, 0, 3], torch.long)
    rc_t = row([0.9, 0.5, 0.5, 0.35, 0.25, 0.45, 1.0])
    refined, fractions = refine_labels(y_box, rc_box, y_t, rc_t, TAU, drop_contradicted=True)
    assert refined.tolist() == [[[0, 1, 255, 0, 2, 255, 255]]]
    assert fractions == pytest.approx({"kept_box": 2 / 7, "overridden": 1 / 7, "filled": 1 / 7, "ignored": 3 / 7})
    # The bar is the override's: at beta_override = 2 pixel 2 is no longer contradicted with confidence.
    refined, _ = refine_labels(y_box, rc_box, y_t, rc_t, TAU, beta_override=2.0, drop_contradicted=True)
    assert refined.tolist() == [[[0, 0, 0, 0, 2, 255, 255]]]
    # A hard-label box has no rc_B to compare: the flag changes nothing there.
    hard, _ = refine_labels(y_box, None, y_t, rc_t, TAU, drop_contradicted=True)
    assert torch.equal(hard, refine_labels(y_box, None, y_t, rc_t, TAU)[0])


def test_refine_hard_box_uses_beta_hard():
    #          override  rcT<1.5tau  agree  filled (beta, not beta_hard)
    y_box = row([0, 0, 2, 255], torch.long)
    y_t = row([1, 1, 2, 2], torch.long)
    rc_t = row([0.65, 0.5, 0.9, 0.25])  # 1.5 * tau: [0.75, 0.6, 0.3]
    refined, fractions = refine_labels(y_box, None, y_t, rc_t, TAU, beta=1.0, beta_hard=1.5)
    assert refined.tolist() == [[[1, 0, 2, 2]]]
    assert fractions == pytest.approx({"kept_box": 0.5, "overridden": 0.25, "filled": 0.25, "ignored": 0.0})
    # With beta_hard = 1 the 0.5 >= 0.4 pixel is overridden too: the scale is what stopped it.
    refined, _ = refine_labels(y_box, None, y_t, rc_t, TAU, beta_hard=1.0)
    assert refined.tolist() == [[[1, 1, 2, 2]]]


def test_refine_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        refine_labels(row([0, 1], torch.long), None, row([0], torch.long), row([0.5]), TAU)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    thresholds = TeacherThresholds(4, device="cuda")
    thresholds.update(*TeacherThresholds.batch_sums(row([0.5, 0.4]).cuda(), row([0, 1], torch.long).cuda(), 4))
    assert thresholds.value.is_cuda
    refined, fractions = refine_labels(
        row([0, 255], torch.long).cuda(), row([0.1, 0.0]).cuda(), row([1, 0], torch.long).cuda(),
        row([0.45, 0.6]).cuda(), thresholds.value,
    )
    assert refined.cpu().tolist() == [[[1, 0]]] and fractions["overridden"] == 0.5 and fractions["filled"] == 0.5
