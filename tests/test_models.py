"""Tests of corte_ray.models: every registered student and source model, weight loading, EMA, complexity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from corte_ray.errors import InputError
from corte_ray.models import (
    SOURCE_MODELS,
    STUDENTS,
    EMATeacher,
    SegmentationModel,
    build_model,
    build_source_model,
    build_student,
    count_macs,
    count_parameters,
    describe_models,
    load_weights,
)

ALL_MODELS = [("student", name) for name in STUDENTS.names()] + [("source", name) for name in SOURCE_MODELS.names()]
BUILDERS = {"student": build_student, "source": build_source_model}
NUM_CLASSES = 5


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Convolution backward on a CPU shared with other processes is ~20x slower with 2 OpenMP threads
    than with 1 (threads spin waiting for each other); restored afterwards for other test files."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_registries_hold_the_expected_models() -> None:
    assert set(STUDENTS.names()) == {"mobilenetv3_lraspp", "mobilenetv3_lraspp_s4", "mobilenetv3_small_lraspp",
                                   "efficientnet_b0_mlp"}
    assert set(SOURCE_MODELS.names()) == {"deeplabv3_resnet50", "deeplabv3_resnet18", "deeplabv3plus_resnet18"}


@pytest.mark.parametrize("kind,name", ALL_MODELS)
def test_forward_backward_at_odd_sizes(kind: str, name: str) -> None:
    torch.manual_seed(0)
    model = BUILDERS[kind](name, num_classes=NUM_CLASSES)
    assert isinstance(model, SegmentationModel)
    assert model.arch == name and model.num_classes == NUM_CLASSES
    # timm zero-initialises the last BN of every residual block (zero_init_last), which blocks gradients
    # into the block at init; unit BN scales make "every parameter is connected" checkable.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.fill_(1.0)
    model.train()
    # A multiple of 32 and an odd size (not a multiple of any stride): both must come back at full size.
    for height, width in [(32, 64), (37, 45)]:
        model.zero_grad(set_to_none=True)
        images = torch.rand(2, 3, height, width)
        logits, features = model.forward_features(images)
        assert logits.shape == (2, NUM_CLASSES, height, width)
        assert features.ndim == 4 and features.shape[:2] == (2, model.feature_dim)
        logits.square().mean().backward()
        for param_name, parameter in model.named_parameters():
            assert parameter.grad is not None, f"{param_name} got no gradient"
            assert torch.isfinite(parameter.grad).all(), param_name
            assert parameter.grad.abs().sum() > 0, f"{param_name} got an all-zero gradient"


@pytest.mark.parametrize("kind,name", ALL_MODELS)
def test_rebuild_from_saved_state_dict_gives_the_same_output(kind: str, name: str, tmp_path) -> None:
    torch.manual_seed(1)
    original = BUILDERS[kind](name, num_classes=NUM_CLASSES)
    # Move BN running statistics away from their init, so that buffers are part of what must round-trip.
    original.train()
    with torch.no_grad():
        original(torch.rand(2, 3, 40, 56))
    original.eval()
    path = tmp_path / "weights.pt"
    torch.save(original.state_dict(), path)

    rebuilt = BUILDERS[kind](name, num_classes=NUM_CLASSES, weights=path).eval()
    images = torch.rand(1, 3, 48, 72)
    with torch.no_grad():
        assert torch.equal(rebuilt(images), original(images))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("kind,name", ALL_MODELS)
def test_torchscript_matches_eager_at_a_new_size(kind: str, name: str) -> None:
    # The exporter ships scripted models: normalisation and upsampling must survive scripting.
    model = BUILDERS[kind](name, num_classes=NUM_CLASSES).eval()
    scripted = torch.jit.script(model)
    images = torch.rand(1, 3, 37, 45)
    with torch.no_grad():
        assert torch.allclose(scripted(images), model(images), atol=1e-5)


def test_build_model_rebuilds_from_build_kwargs(tmp_path) -> None:
    original = build_student("mobilenetv3_small_lraspp", num_classes=NUM_CLASSES).eval()
    assert original.build_kwargs == {"name": "mobilenetv3_small_lraspp", "num_classes": NUM_CLASSES}
    path = tmp_path / "weights.pt"
    torch.save(original.state_dict(), path)
    rebuilt = build_model(**original.build_kwargs, weights=path).eval()
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(images), original(images))
    assert build_model("deeplabv3_resnet18", num_classes=3).arch == "deeplabv3_resnet18"
    with pytest.raises(KeyError, match="known: .*mobilenetv3_lraspp"):
        build_model("no_such_model")


def test_input_is_normalised_inside_the_model() -> None:
    model = build_student("mobilenetv3_small_lraspp", num_classes=3).eval()
    # ImageNet statistics travel with the model (and into exports) but stay out of its state_dict.
    assert "pixel_mean" not in model.state_dict()
    assert torch.allclose(model.pixel_mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))
    assert torch.allclose(model.pixel_std.flatten(), torch.tensor([0.229, 0.224, 0.225]))
    images = torch.rand(1, 3, 32, 40)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        low_res, _ = model.segment((images - mean) / std)
        expected = F.interpolate(low_res, size=(32, 40), mode="bilinear", align_corners=False)
        logits = model(images)
    assert low_res.shape[-2:] == (4, 5)  # the stride-8 decoder output, before forward's upsampling
    assert torch.allclose(logits, expected, atol=1e-6)


# ---------------------------------------------------------------- load_weights


@pytest.fixture(scope="module")
def small_student() -> SegmentationModel:
    return build_student("mobilenetv3_small_lraspp", num_classes=NUM_CLASSES).eval()


def test_load_weights_accepts_wrapped_and_prefixed_checkpoints(small_student: SegmentationModel, tmp_path) -> None:
    target = build_student("mobilenetv3_small_lraspp", num_classes=NUM_CLASSES).eval()
    state = small_student.state_dict()
    path = tmp_path / "checkpoint.pt"
    torch.save({"student": {f"module.{key}": value for key, value in state.items()}, "step": 7}, path)
    load_weights(target, path)
    for key, value in state.items():
        assert torch.equal(target.state_dict()[key], value), key

    wrapper = nn.Module()
    wrapper.module = build_student("mobilenetv3_small_lraspp", num_classes=NUM_CLASSES)
    torch.save({"model": state}, path)
    load_weights(wrapper, path)  # loads into the wrapped model, as a DDP checkpoint would
    assert all(torch.equal(wrapper.module.state_dict()[key], value) for key, value in state.items())


def test_load_weights_missing_file_names_it(small_student: SegmentationModel, tmp_path) -> None:
    path = tmp_path / "absent.pt"
    with pytest.raises(InputError, match="absent.pt") as error:
        load_weights(small_student, path)
    assert error.value.path == str(path)


def test_load_weights_garbage_bytes_names_the_file(small_student: SegmentationModel, tmp_path) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"\x00\x01 this is not a checkpoint \xff" * 10)
    with pytest.raises(InputError, match="garbage.pt"):
        load_weights(small_student, path)


def test_load_weights_non_state_dict_names_the_file(small_student: SegmentationModel, tmp_path) -> None:
    path = tmp_path / "not_weights.pt"
    torch.save({"step": 3, "lr": 0.1}, path)
    with pytest.raises(InputError, match="not_weights.pt.*no state_dict"):
        load_weights(small_student, path)


def test_load_weights_wrong_shapes_names_the_file_and_the_key(small_student: SegmentationModel, tmp_path) -> None:
    other = build_student("mobilenetv3_small_lraspp", num_classes=NUM_CLASSES + 2)
    path = tmp_path / "seven_classes.pt"
    torch.save(other.state_dict(), path)
    with pytest.raises(InputError, match=r"seven_classes.pt.*shape mismatch.*classifier"):
        load_weights(small_student, path)
    with pytest.raises(InputError, match="seven_classes.pt"):
        build_student("mobilenetv3_small_lraspp", num_classes=NUM_CLASSES, weights=path)


def test_load_weights_wrong_architecture_names_the_file(small_student: SegmentationModel, tmp_path) -> None:
    path = tmp_path / "other_arch.pt"
    torch.save(nn.Conv2d(3, 4, 1).state_dict(), path)
    with pytest.raises(InputError, match="other_arch.pt.*missing keys"):
        load_weights(small_student, path)


# ---------------------------------------------------------------- EMA teacher


def _tiny_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


class _FakeDDP(nn.Module):
    """Stands in for DistributedDataParallel: the real model is `.module`."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def _float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items() if value.is_floating_point()}


@pytest.mark.parametrize("wrap", [False, True])
def test_ema_matches_closed_form_for_parameters_and_bn_buffers(wrap: bool) -> None:
    torch.manual_seed(0)
    momentum, steps = 0.9, 5
    student = _tiny_net()
    teacher = EMATeacher(_FakeDDP(student) if wrap else student, momentum=momentum)
    initial = _float_state(teacher.module)
    assert "1.running_mean" in initial and "1.running_var" in initial

    student_states = []
    for step in range(1, steps + 1):
        with torch.no_grad():
            for value in list(student.parameters()) + list(student.buffers()):
                if value.is_floating_point():
                    value.copy_(torch.randn_like(value))
            student[1].num_batches_tracked.fill_(10 * step)
        student_states.append(_float_state(student))
        teacher.update(_FakeDDP(student) if wrap else student)

    for key, value in _float_state(teacher.module).items():
        expected = momentum**steps * initial[key]
        for step, state in enumerate(student_states, start=1):
            expected = expected + (1 - momentum) * momentum ** (steps - step) * state[key]
        assert torch.allclose(value, expected, atol=1e-6), key
    assert teacher.module[1].num_batches_tracked.item() == 10 * steps


def test_ema_momentum_override_and_zero_momentum_copies() -> None:
    student = _tiny_net()
    teacher = EMATeacher(student, momentum=0.999)
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(1.0)
    teacher.update(student, momentum=0.0)
    for key, value in student.state_dict().items():
        assert torch.equal(teacher.module.state_dict()[key], value), key


def test_ema_teacher_stays_in_eval_and_has_no_gradients() -> None:
    student = _tiny_net().train()
    teacher = EMATeacher(student)
    assert student.training, "building the teacher must not change the student's mode"
    parent = nn.ModuleDict({"student": student, "teacher": teacher})
    parent.train()
    teacher.train()
    assert not teacher.training and not any(module.training for module in teacher.modules())
    assert not any(parameter.requires_grad for parameter in teacher.parameters())
    assert all(parameter.requires_grad for parameter in student.parameters())
    images = torch.rand(2, 3, 8, 8, requires_grad=False)
    output = teacher(images)
    assert not output.requires_grad
    # eval mode: BN uses running statistics, so one image's output does not depend on the other.
    assert torch.allclose(teacher(images[:1]), output[:1], atol=1e-6)


def test_ema_teacher_delegates_forward_features() -> None:
    student = build_student("mobilenetv3_small_lraspp", num_classes=3)
    teacher = EMATeacher(student)
    assert teacher.num_classes == 3 and teacher.feature_dim == student.feature_dim
    images = torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        logits, features = teacher.forward_features(images)
        expected_logits, expected_features = student.eval().forward_features(images)
    assert torch.equal(logits, expected_logits) and torch.equal(features, expected_features)
    # A teacher checkpoint ("module."-prefixed keys) loads into a bare model.
    assert all(key.startswith("module.") for key in teacher.state_dict())


# ---------------------------------------------------------------- complexity


def test_count_macs_of_a_convolution_matches_the_closed_form() -> None:
    conv = nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1)
    batch, out_height, out_width = 2, (17 + 2 - 3) // 2 + 1, (19 + 2 - 3) // 2 + 1
    assert count_macs(conv, (batch, 3, 17, 19)) == batch * 8 * out_height * out_width * 3 * 3 * 3
    grouped = nn.Conv2d(8, 12, kernel_size=3, groups=4, bias=False)
    assert count_macs(grouped, (1, 8, 10, 10)) == 12 * 8 * 8 * (8 // 4) * 3 * 3
    assert count_parameters(conv) == 8 * 3 * 3 * 3 + 8
    assert next(conv.parameters()).device.type == "cpu", "count_macs must not move the model"


def test_describe_models_lists_every_registered_model() -> None:
    rows = describe_models(input_size=(1, 3, 64, 64))
    assert [(row["kind"], row["name"]) for row in rows] == ALL_MODELS
    small = build_student("mobilenetv3_small_lraspp")
    row = next(row for row in rows if row["name"] == "mobilenetv3_small_lraspp")
    assert row["params"] == count_parameters(small)
    assert row["gmacs"] == pytest.approx(count_macs(small, (1, 3, 64, 64)) / 1e9)
    by_name = {row["name"]: row for row in rows}
    # The point of the project: every student is cheaper than every source model.
    assert max(by_name[n]["gmacs"] for n in STUDENTS.names()) < min(by_name[n]["gmacs"] for n in SOURCE_MODELS.names())
