"""Every method's training step on tiny tensors: losses finite, gradients reach the student, each phase of
CoRTe taken (warm-up on y_B only, teacher refinement after refine_start), padding never labelled."""

from __future__ import annotations

import math

import pytest
import torch

from corte_ray.config import load_config
from corte_ray.methods.steps import METHODS, Models, build_method
from corte_ray.models import ClassProxies, EMATeacher, MetricHead, build_student

C = 19


def _batch(hard: bool = False, b: int = 4, h: int = 32, w: int = 48) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    # Peaked like a trained box: rc spread over [0, 1], p(1) above 0.9 on a good share of pixels.
    probs = (torch.randn(b, C, h, w, generator=g) * 4).softmax(1)
    top2 = probs.topk(2, dim=1)
    batch = {"image": torch.rand(b, 3, h, w, generator=g), "box_top1": top2.indices[:, 0],
             "box_p1": top2.values[:, 0], "label": torch.randint(0, C, (b, h, w), generator=g)}
    if hard:
        batch["box_p1"] = torch.ones(b, h, w)
    else:
        batch["box_rc"] = top2.values[:, 0] - top2.values[:, 1]
    return batch


def _setup(method: str, *overrides: str):
    cfg = load_config(None, [f"method={method}", "data.crop_size=[32,48]", "model.student=mobilenetv3_small_lraspp",
                             "stvm.metric_pixels=64", *overrides])
    student = build_student("mobilenetv3_small_lraspp", num_classes=C)
    cls = METHODS.get(method)
    models = Models(student=student, teacher=EMATeacher(student, 0.9) if cls.uses_teacher else None)
    if cls.uses_metric:
        models.metric_head, models.proxies = MetricHead(student.feature_dim, embed_dim=16), ClassProxies(C, 16)
        cfg.stvm.embed_dim = 16
    means = torch.full((C,), 0.2)
    means[5] = float("nan")  # a class the box never predicted: tau = 1
    return cfg, models, build_method(cfg, means, torch.device("cpu"), seed=0)


@pytest.mark.parametrize("method", METHODS.names())
@pytest.mark.parametrize("iteration", [0, 90])
def test_every_method_step_trains_the_student(method, iteration):
    cfg, models, step = _setup(method)
    out = step.step(models, _batch(), iteration, 100)
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    out["loss"].backward()
    grads = [p.grad for p in models.student.parameters() if p.requires_grad]
    assert sum(g is not None and bool(g.abs().sum() > 0) for g in grads) > len(grads) // 2
    if models.metric_head is not None:
        # corte_metric trains the metric head only after the warm-up (the teacher is untrained before it).
        trained = method == "stvm" or iteration >= cfg.corte.warmup * 100
        assert any(p.grad is not None for p in models.metric_head.parameters()) == trained
    if models.teacher is not None:
        assert all(p.grad is None for p in models.teacher.parameters())


def test_box_thresholds_scale_with_rc_scale_and_unseen_class_is_one():
    _, _, step = _setup("corte", "corte.rc_scale=0.5")
    assert torch.allclose(step.box_thresholds[0], torch.tensor(0.1)) and step.box_thresholds[5] == 1.0


def test_box_thresholds_rc_floor_raises_low_class_bars_only():
    # means 0.2 at alpha 0.5 give 0.1; a floor of 0.3 lifts them, the unseen class stays at 1.
    _, _, step = _setup("corte", "corte.rc_scale=0.5", "corte.rc_floor=0.3")
    assert torch.allclose(step.box_thresholds[0], torch.tensor(0.3)) and step.box_thresholds[5] == 1.0
    _, _, low = _setup("corte", "corte.rc_floor=0.05")                 # under every class bar: no change
    assert torch.allclose(low.box_thresholds[0], torch.tensor(0.2))


def test_corte_phases_warmup_then_refinement():
    cfg, models, step = _setup("corte", "corte.warmup=0.1", "corte.refine_start=0.5")
    warm = step.step(models, _batch(), 0, 100)
    assert warm["labels/overridden"] == 0 and warm["labels/filled"] == 0
    assert not step.teacher_thresholds._seen.any()          # the teacher is not consulted during warm-up
    mid = step.step(models, _batch(), 20, 100)                # after warm-up, before refinement: y = y_B
    assert mid["labels/filled"] == 0 and step.teacher_thresholds._seen.any()
    late = step.step(models, _batch(), 60, 100)
    assert abs(sum(late[f"labels/{k}"] for k in ("kept_box", "overridden", "filled", "ignored")) - 1) < 1e-6


def test_hard_label_box_runs_without_relative_confidence():
    _, models, step = _setup("corte", "corte.warmup=0.0", "corte.refine_start=0.0")
    out = step.step(models, _batch(hard=True), 50, 100)
    assert torch.isfinite(out["loss"]) and out["labels/filled"] == 0  # a hard box leaves nothing to fill


def test_padding_is_never_labelled():
    # Force down-scaling (scale < 1 -> the crop is padded) and a teacher that is confident everywhere.
    cfg, models, step = _setup("corte", "corte.warmup=0.0", "corte.refine_start=0.0")
    weak, _, m = step.views(_batch(), ("box_top1",))
    assert m["valid"].dtype == torch.bool and (m["box_top1"][~m["valid"]] == 255).all()
    from corte_ray.methods import steps as steps_mod

    step.teacher_thresholds.update(torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64))
    captured = {}
    real = steps_mod.classmix_batch

    def spy(images, labels, weights, masks):
        captured["labels"] = labels
        return real(images, labels, weights, masks)

    steps_mod.classmix_batch = spy
    try:
        gen_state = step.generator.get_state()
        step.step(models, _batch(), 50, 100)
    finally:
        steps_mod.classmix_batch = real
    step.generator.set_state(gen_state)
    _, _, m2 = step.views(_batch(), ("box_top1",))           # the same geometry the step drew
    assert (captured["labels"][~m2["valid"]] == 255).all()


@pytest.mark.parametrize("norm", ["class", "pixel"])
def test_stvm_mocm_reads_the_reliability_the_loss_uses(norm, monkeypatch):
    """MOCM picks classes by the same reliability as the CE weights: class-normalised by default (raw reliability
    always pastes the classes the teacher is surest of, docs/methods.md), the raw one with reliability_norm=pixel."""
    import corte_ray.methods.steps as steps
    from corte_ray.models.metric import class_normalised_reliability

    torch.manual_seed(0)   # the models' initial weights: a class whose reliability underflows to 0 has no mean of 1
    seen = []
    real = steps.mocm_mask
    monkeypatch.setattr(steps, "mocm_mask", lambda labels, rel, **kw: seen.append((labels, rel)) or real(labels, rel, **kw))
    cfg, models, step = _setup("stvm", f"stvm.reliability_norm={norm}")
    step.step(models, _batch(), 10, 100)
    (labels, rel_used), = seen
    normalised = class_normalised_reliability(rel_used, labels, C)
    valid = labels != 255
    # Normalised reliability has mean 1 within every class present; the raw one (a softmax probability) does not.
    means = [rel_used[labels == c].mean().item() for c in labels[valid].unique()]
    if norm == "class":
        # Normalising again changes nothing (relative tolerance: normalised values reach ~5).
        assert torch.allclose(normalised[valid], rel_used[valid], rtol=1e-4, atol=1e-5)
        assert all(abs(m - 1) < 1e-4 for m in means)
    else:
        assert (rel_used[valid] <= 1).all() and not all(abs(m - 1) < 1e-4 for m in means)


def test_strong_ramp_is_mean_teachers_sigmoid_and_weights_the_strong_loss():
    from corte_ray.methods.steps import strong_ramp

    assert strong_ramp(0, 100, 0.0) == 1.0 and strong_ramp(50, 100, 0.0) == 1.0
    assert abs(strong_ramp(0, 100, 0.5) - math.exp(-5)) < 1e-12
    ramp = [strong_ramp(t, 100, 0.5) for t in range(0, 60)]
    assert all(a < b for a, b in zip(ramp[:50], ramp[1:51])) and ramp[50:] == [1.0] * 10
    # The step's total loss is ramp * strong + weak_weight * weak, in warm-up and after it.
    _, models, step = _setup("corte", "corte.strong_rampup=0.5", "corte.warmup=0.1", "corte.weak_weight=0.7")
    for it in (5, 30):
        out = step.step(models, _batch(), it, 100)
        expected = strong_ramp(it, 100, 0.5) * out["loss_strong"] + 0.7 * out["loss_weak"]
        assert out["strong_weight"] == strong_ramp(it, 100, 0.5)
        torch.testing.assert_close(out["loss"].detach(), expected)


def test_augment_settings_reach_the_strong_view():
    # With every photometric part off, the strong view is the weak view; with the defaults it is not.
    _, _, step = _setup("corte", "augment.jitter=0.0", "augment.hue=0.0", "augment.blur_p=0.0",
                        "augment.grayscale_p=0.0")
    weak, strong, _ = step.views(_batch(), ("box_top1",))
    torch.testing.assert_close(strong, weak)
    _, _, step = _setup("corte")
    weak, strong, _ = step.views(_batch(), ("box_top1",))
    assert (strong - weak).abs().mean() > 1e-3


def test_raw_warmup_labels_every_box_pixel_then_r2cp():
    # corte.warmup_labels=raw: during the warm-up the student learns the box's raw top-1 on every pixel the view
    # holds; after it, R2CP's labels as before. The default (r2cp) keeps R2CP from the first step.
    _, models, raw = _setup("corte", "corte.warmup_labels=raw", "corte.warmup=0.5", "corte.refine_start=1.0")
    _, models2, r2cp = _setup("corte", "corte.warmup=0.5", "corte.refine_start=1.0")
    warm_raw, warm_r2cp = raw.step(models, _batch(), 0, 100), r2cp.step(models2, _batch(), 0, 100)
    assert warm_raw["labels/kept_box"] > warm_r2cp["labels/kept_box"]
    late_raw, late_r2cp = raw.step(models, _batch(), 60, 100), r2cp.step(models2, _batch(), 60, 100)
    assert late_raw["labels/kept_box"] == pytest.approx(late_r2cp["labels/kept_box"])


def test_class_balance_weights_favour_rare_classes_with_mean_weight_one():
    from corte_ray.methods.steps import class_balance_weights

    labels = torch.tensor([[0] * 90 + [1] * 9 + [2] * 1 + [255] * 4])
    w = class_balance_weights(labels, 4)
    assert w[3] == 0 and w[2] > w[1] > w[0] > 0
    torch.testing.assert_close(w[2] / w[0], torch.tensor(90 ** 0.5))
    torch.testing.assert_close((w[:3] * torch.tensor([90.0, 9.0, 1.0])).sum() / 100, torch.tensor(1.0))
    _, models, step = _setup("oracle", "train.class_balance=true")
    assert torch.isfinite(step.step(models, _batch(), 0, 10)["loss"])


@pytest.mark.parametrize("mix_mask", ["label", "box"])
def test_classmix_draws_its_classes_from_the_chosen_map(mix_mask):
    # corte.mix_mask=label: the classes come from the training label (R2CP drops pixels: the map has holes);
    # corte.mix_mask=box: from the box's dense top-1, so the pasted regions are whole (no hole inside the view).
    _, models, step = _setup("corte", f"corte.mix_mask={mix_mask}", "corte.refine_start=1.0")
    seen = []
    original = step.mixing_masks
    step.mixing_masks = lambda labels, weights: seen.append(labels.clone()) or original(labels, weights)
    out = step.step(models, _batch(), 50, 100)
    assert torch.isfinite(out["loss"]) and len(seen) == 1
    ignored = float((seen[0] == 255).float().mean())
    assert out["labels/ignored"] > 0.05
    if mix_mask == "box":
        assert ignored < 0.5 * out["labels/ignored"]
    else:
        assert ignored == pytest.approx(out["labels/ignored"], abs=1e-6)


def test_agreement_weights_are_the_teachers_probability_of_the_label_and_lower_the_loss():
    from corte_ray.methods.steps import agreement_weights

    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]).T.reshape(1, 3, 1, 2)  # 2 pixels, 3 classes
    labels = torch.tensor([[[1, 255]]])
    w = agreement_weights(probs, labels, 2.0)  # per pixel
    torch.testing.assert_close(w, torch.tensor([[[0.2 ** 2, 1.0]]]))
    # In a step after the warm-up the weights (all <= 1) scale the weak-view CE down; off (k = 0), the step is
    # the plain one. Same models and batch for both: the first step of each starts from identical weights.
    losses = {}
    for k in (0.0, 1.0):
        _, models, step = _setup("corte", f"corte.agree_power={k}", "corte.agree_norm=pixel", "corte.warmup=0.1",
                                 "corte.refine_start=1.0")
        losses[k] = step.step(models, _batch(), 50, 100)["loss_weak"]
    assert losses[1.0] < losses[0.0]


def test_class_normalised_agreement_weights_keep_each_class_weight():
    from corte_ray.methods.steps import agreement_weights

    g = torch.Generator().manual_seed(0)
    probs = torch.rand(2, 4, 5, 6, generator=g).softmax(1)
    labels = torch.randint(0, 4, (2, 5, 6), generator=g)
    labels[0, 0] = 255
    w = agreement_weights(probs, labels, 1.0, num_classes=4)
    for c in labels.unique().tolist():
        if c != 255:
            assert float(w[labels == c].mean()) == pytest.approx(1.0, abs=1e-5)
    assert bool((w[labels == 255] == 0).all())
    # Within a class the order is the teacher's: a pixel it believes more weighs more.
    raw = agreement_weights(probs, labels, 1.0)
    m = labels == int(labels[1, 0, 0])
    assert torch.equal(w[m].argsort(), raw[m].argsort())


@pytest.mark.parametrize("iteration", [0, 60])
def test_corte_set_loss_trains_the_pixels_r2cp_leaves_ignored(iteration):
    """corte.set_weight: the weak view's loss gains -log(p_a + p_b) over the box's top-2 at the pixels the label
    ignores, in the warm-up and after it; the method asks for the top-2 only when the weight is on."""
    assert not METHODS.get("corte").wants_box_top2(_setup("corte")[0])
    cfg, models, step = _setup("corte", "corte.set_weight=0.5")
    assert METHODS.get("corte").wants_box_top2(cfg)
    batch = _batch()
    batch["box_top2"] = (batch["box_top1"] + 1) % C      # any second class but the first
    torch.manual_seed(0)
    out = step.step(models, batch, iteration, 100)
    assert out["loss_set"] > 0
    # The same step without the top-2 in the batch: no set term, and the weak loss is smaller by exactly it.
    cfg0, models0, step0 = _setup("corte", "corte.set_weight=0.5")
    models0.student.load_state_dict(models.student.state_dict())
    models0.teacher.load_state_dict(models.teacher.state_dict())
    batch.pop("box_top2")
    torch.manual_seed(0)
    out0 = step0.step(models0, batch, iteration, 100)
    assert "loss_set" not in out0
    assert out["loss_weak"].item() == pytest.approx(out0["loss_weak"].item() + 0.5 * out["loss_set"].item(), rel=1e-5)
