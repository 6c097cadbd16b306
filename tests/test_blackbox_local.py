"""The black-box protocol and the local backend: answers of every kind agree with the model's own logits."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from torch import nn

from corte_ray.blackbox import BACKENDS, BlackBox, BoxAnswer, LocalBlackBox, open_blackbox
from corte_ray.errors import ConfigError, CorteError, InputError
from corte_ray.export import export_model
from tests.tiny_net import TinySegNet

HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))
NUM_CLASSES = 6


@pytest.fixture(scope="module")
def model() -> TinySegNet:
    torch.manual_seed(0)
    return TinySegNet().eval()


@pytest.fixture(scope="module", params=["torchscript", pytest.param("onnx", marks=pytest.mark.skipif(
    not HAS_ONNX, reason="onnx / onnxruntime not installed"))])
def model_file(request, model, tmp_path_factory):
    suffix = ".pt" if request.param == "torchscript" else ".onnx"
    path = tmp_path_factory.mktemp(request.param) / f"box{suffix}"
    return export_model(model, path, format=request.param, example_size=(16, 24),
                        meta={"arch": "tiny", "class_names": list("abcdef")})


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(5, 20, 28, 3), dtype=np.uint8)


def reference_logits(model: nn.Module, images: np.ndarray) -> torch.Tensor:
    """The model run by hand on the same images: uint8 HWC -> float [0,1] CHW."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        return model(x)


def test_probs_answer(model, model_file, images):
    box = LocalBlackBox(model_file, answer="probs", device="cpu")
    answer = box.query(images)
    logits = reference_logits(model, images)
    assert answer.kind == "probs" and box.answer_kind == "probs" and len(answer) == 5
    assert answer.probs.shape == (5, NUM_CLASSES, 20, 28) and answer.probs.dtype == torch.float32
    torch.testing.assert_close(answer.probs, logits.softmax(1), atol=1e-5, rtol=0)
    assert torch.equal(answer.top1(), logits.argmax(1))
    # rc = p(1) - p(2) from an independent sort in numpy
    p_sorted = np.sort(logits.softmax(1).numpy(), axis=1)
    np.testing.assert_allclose(answer.relative_confidence().numpy(), p_sorted[:, -1] - p_sorted[:, -2], atol=1e-5)


def test_topk_answer(model, model_file, images):
    box = LocalBlackBox(model_file, answer="topk", topk=3, device="cpu")
    answer = box.query(images)
    probs = reference_logits(model, images).softmax(1)
    expected = torch.topk(probs, 3, dim=1)
    assert answer.kind == "topk" and answer.k == 3 and answer.probs is None
    assert answer.topk_ids.dtype == torch.long and answer.topk_ids.shape == (5, 3, 20, 28)
    assert torch.equal(answer.topk_ids, expected.indices)
    torch.testing.assert_close(answer.topk_probs, expected.values, atol=1e-5, rtol=0)
    assert (answer.topk_probs[:, :-1] >= answer.topk_probs[:, 1:]).all()  # sorted, highest first
    assert torch.equal(answer.top1(), probs.argmax(1))
    torch.testing.assert_close(answer.relative_confidence(), expected.values[:, 0] - expected.values[:, 1])


def test_hard_answer(model, model_file, images):
    box = open_blackbox(f"file:{model_file}", answer="hard", device="cpu")
    answer = box.query(images)
    assert answer.kind == "hard" and box.answer_kind == "hard"
    assert answer.probs is None and answer.topk_ids is None and answer.hard.dtype == torch.long
    assert torch.equal(answer.top1(), reference_logits(model, images).argmax(1))
    assert answer.relative_confidence() is None
    with pytest.raises(CorteError, match="hard"):
        answer.to_topk(2)


@pytest.mark.parametrize("answer", ["probs", "topk", "hard"])
def test_chunking_gives_the_same_answer(model_file, images, answer):
    whole = LocalBlackBox(model_file, answer=answer, device="cpu", batch_size=8).query(images)
    chunked = LocalBlackBox(model_file, answer=answer, device="cpu", batch_size=2).query(images)
    for name in ("probs", "topk_ids", "topk_probs", "hard"):
        a, b = getattr(whole, name), getattr(chunked, name)
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_box_knows_its_model(model_file):
    box = LocalBlackBox(model_file, device="cpu")
    assert box.num_classes == NUM_CLASSES and box.meta["arch"] == "tiny"
    assert box.meta["class_names"] == list("abcdef") and box.name == f"file:{model_file}"
    assert isinstance(box, BlackBox)
    box.close()
    box.close()  # twice is fine
    with pytest.raises(RuntimeError, match="closed"):
        box.query(np.zeros((1, 8, 8, 3), np.uint8))


def test_open_blackbox_specs(model_file, images):
    assert "file" in BACKENDS
    for spec in (f"file:{model_file}", str(model_file), f"file://{model_file.resolve()}"):
        with open_blackbox(spec, device="cpu") as box:
            assert isinstance(box, LocalBlackBox) and box.answer_kind == "probs"  # backend default
    box = open_blackbox(str(model_file), answer="topk", topk=4, device="cpu", batch_size=3)
    assert box.topk == 4 and box.batch_size == 3 and box.query(images[:1]).k == 4


def test_unknown_scheme_lists_the_known_ones():
    with pytest.raises(CorteError, match=r"unknown black-box scheme 's3'.*file:"):
        open_blackbox("s3://bucket/model.pt")


def test_bad_options_are_refused(model_file):
    with pytest.raises(ConfigError, match="answer"):
        open_blackbox(str(model_file), answer="logits")
    with pytest.raises(ConfigError, match="topk"):
        LocalBlackBox(model_file, answer="topk", topk=NUM_CLASSES + 1, device="cpu")
    with pytest.raises(ConfigError, match="batch_size"):
        LocalBlackBox(model_file, batch_size=0, device="cpu")


def test_images_must_be_uint8_bhw3(model_file):
    box = LocalBlackBox(model_file, device="cpu")
    for bad in (np.zeros((1, 8, 8, 3), np.float32), np.zeros((8, 8, 3), np.uint8), np.zeros((1, 3, 8, 8), np.uint8)):
        with pytest.raises(CorteError, match="uint8"):
            box.query(bad)


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "no_such_model.pt"
    with pytest.raises(InputError, match="no_such_model.pt"):
        LocalBlackBox(missing, device="cpu")
    with pytest.raises(InputError, match="no_such_model.pt"):
        open_blackbox(str(missing))
    with pytest.raises(InputError, match="no_such_model.pt"):
        open_blackbox(f"file:{missing}")


@pytest.mark.parametrize("name", ["garbage.pt", pytest.param("garbage.onnx", marks=pytest.mark.skipif(
    not HAS_ONNX, reason="onnx / onnxruntime not installed"))])
def test_garbage_file_is_named(tmp_path, name):
    garbage = tmp_path / name
    garbage.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(InputError, match=name):
        LocalBlackBox(garbage, device="cpu")


def test_truncated_torchscript_is_named(model, tmp_path):
    whole = export_model(model, tmp_path / "whole.pt", example_size=(16, 24))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(whole.read_bytes()[:-200])
    with pytest.raises(InputError, match="truncated.pt"):
        LocalBlackBox(truncated, device="cpu")


# BoxAnswer on hand-made tensors, independent of any model.

def _probs() -> torch.Tensor:
    # batch 2, 3 classes, 1x2 pixels
    p = torch.tensor([[[0.7, 0.2], [0.2, 0.5], [0.1, 0.3]],
                      [[0.1, 0.45], [0.3, 0.35], [0.6, 0.2]]])
    return p.unsqueeze(2)  # (2,3,1,2)


def test_box_answer_from_probs_by_hand():
    answer = BoxAnswer("probs", 3, probs=_probs())
    assert len(answer) == 2
    assert answer.top1().tolist() == [[[0, 1]], [[2, 0]]]
    torch.testing.assert_close(answer.relative_confidence(), torch.tensor([[[0.5, 0.2]], [[0.3, 0.1]]]))
    top2 = answer.to_topk(2)
    assert top2.kind == "topk" and top2.topk_ids[0, :, 0, 0].tolist() == [0, 1]
    torch.testing.assert_close(top2.topk_probs[0, :, 0, 1], torch.tensor([0.5, 0.3]))
    torch.testing.assert_close(top2.relative_confidence(), answer.relative_confidence())
    one = answer.select(1)
    assert len(one) == 1 and torch.equal(one.probs, _probs()[1:2])
    assert torch.equal(answer.select(-1).probs, one.probs)
    with pytest.raises(IndexError):
        answer.select(2)


def test_box_answer_topk_slicing_and_limits():
    top3 = BoxAnswer("probs", 3, probs=_probs()).to_topk(3)
    top2 = top3.to_topk(2)
    assert top2.k == 2 and torch.equal(top2.topk_ids, top3.topk_ids[:, :2])
    with pytest.raises(CorteError, match="top-2"):
        top2.to_topk(3)
    hard = BoxAnswer("hard", 3, hard=torch.zeros(2, 1, 2, dtype=torch.long))
    assert len(hard) == 2 and hard.relative_confidence() is None and hard.select(0).hard.shape == (1, 1, 2)


def test_box_answer_validates_its_fields():
    with pytest.raises(ValueError, match="kind"):
        BoxAnswer("logits", 3, probs=_probs())
    with pytest.raises(ValueError, match="probs"):
        BoxAnswer("probs", 4, probs=_probs())  # 3 channels for 4 classes
    with pytest.raises(ValueError, match="topk"):
        BoxAnswer("topk", 3, topk_ids=torch.zeros(2, 2, 1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="k >= 2"):
        BoxAnswer("topk", 3, topk_ids=torch.zeros(2, 1, 1, 2, dtype=torch.long), topk_probs=torch.ones(2, 1, 1, 2))
    with pytest.raises(ValueError, match="hard"):
        BoxAnswer("hard", 3)
