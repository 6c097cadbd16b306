"""Model export: TorchScript / ONNX files that match the model at other sizes, carry their metadata, and
appear atomically."""

from __future__ import annotations

import importlib.util
import json
import zipfile

import pytest
import torch
import torch.nn.functional as F

from corte_ray import export as export_module
from corte_ray.errors import ConfigError, CorteError, InputError
from corte_ray.export import check_parity, export_model, load_model_file, read_model_meta
from tests.tiny_net import TinySegNet as SharedTinySegNet

HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))
HAS_ONNXSCRIPT = importlib.util.find_spec("onnxscript") is not None
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason="onnx / onnxruntime not installed")
TOL = 1e-4


class TinySegNet(SharedTinySegNet):
    """Five classes, logits unscaled, random BN statistics (eval vs train mode must show in exports)."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__(num_classes, logit_scale=1.0, random_bn_stats=True)


class FrozenSizeNet(TinySegNet):
    """Upsamples to a size read as Python ints: a trace freezes it, so it only works at the trace size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(F.relu(self.bn(self.stem(x))))
        return F.interpolate(h, size=(int(x.shape[2]), int(x.shape[3])), mode="bilinear", align_corners=False)


class HalfResNet(TinySegNet):
    """Breaks the contract: logits at half the input resolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.bn(self.stem(x))))


@pytest.fixture
def model() -> TinySegNet:
    torch.manual_seed(0)
    return TinySegNet().eval()


def _onnx_params() -> list:
    params = [pytest.param("torchscript", id="onnx-legacy", marks=needs_onnx)]
    params.append(pytest.param("dynamo", id="onnx-dynamo", marks=[needs_onnx, pytest.mark.skipif(
        not HAS_ONNXSCRIPT, reason="onnxscript not installed")]))
    return params


def test_torchscript_parity_at_another_size(model, tmp_path):
    path = export_model(model, tmp_path / "m.pt", example_size=(32, 48))
    assert check_parity(model, path, size=(40, 72), batch=3) < TOL
    # the default size equals the trace size here, so the check moves to another size by itself
    assert check_parity(model, path, size=(32, 48)) < TOL


@pytest.mark.parametrize("exporter", _onnx_params())
def test_onnx_parity_at_another_size(model, tmp_path, monkeypatch, exporter):
    monkeypatch.setattr(export_module, "onnx_exporter", lambda: exporter)
    path = export_model(model, tmp_path / "m.onnx", format="onnx", example_size=(32, 48))
    assert check_parity(model, path, size=(40, 72), batch=3) < TOL
    assert load_model_file(path).format == "onnx"


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the frozen size is the point of this test
def test_parity_is_measured_at_a_size_other_than_the_trace(tmp_path):
    torch.manual_seed(0)
    frozen = FrozenSizeNet().eval()
    path = export_model(frozen, tmp_path / "frozen.pt", example_size=(32, 48))
    # At its own size the frozen trace is right; check_parity must not be fooled by asking at that size.
    exported = load_model_file(path)
    x = torch.rand(2, 3, 32, 48)
    assert (exported(x) - frozen(x)).abs().max() < TOL
    with pytest.raises(CorteError, match="froze the input size"):
        check_parity(frozen, path, size=(32, 48))


def test_parity_detects_a_different_model(model, tmp_path):
    path = export_model(model, tmp_path / "m.pt", example_size=(32, 48))
    torch.manual_seed(1)
    assert check_parity(TinySegNet().eval(), path, size=(40, 72)) > 1e-2


def test_export_uses_eval_mode_and_leaves_the_caller_model_alone(model, tmp_path):
    model.train()
    path = export_model(model, tmp_path / "m.pt", example_size=(32, 48))
    assert model.training  # still in train mode after export
    x = torch.rand(2, 3, 40, 56)
    model.eval()
    with torch.no_grad():
        assert (load_model_file(path)(x) - model(x)).abs().max() < TOL  # BN running stats were used


@pytest.mark.parametrize("fmt", ["torchscript", pytest.param("onnx", marks=needs_onnx)])
def test_metadata_round_trip(model, tmp_path, fmt):
    suffix = ".pt" if fmt == "torchscript" else ".onnx"
    names = ["road", "sky", "car", "person", "tree"]
    path = export_model(model, tmp_path / f"m{suffix}", format=fmt, example_size=(32, 48),
                        meta={"arch": "tiny", "class_names": names, "label_space": "synth", "extra": {"a": [1, 2]}})
    meta = read_model_meta(path)
    assert meta["num_classes"] == 5 and meta["arch"] == "tiny" and meta["class_names"] == names
    assert meta["input"] == "float32 RGB [0,1] NCHW" and meta["format_version"] == 1
    assert meta["label_space"] == "synth" and meta["extra"] == {"a": [1, 2]}
    assert meta["trace_size"] == [32, 48] and meta["format"] == fmt
    assert load_model_file(path).meta == meta


def test_metadata_is_stored_where_the_contract_says(model, tmp_path):
    path = export_model(model, tmp_path / "m.pt", example_size=(32, 48))
    with zipfile.ZipFile(path) as archive:
        raw = next(archive.read(n) for n in archive.namelist() if n.endswith("/extra/corte_meta.json"))
        assert not any("traced_inputs" in n for n in archive.namelist())  # the example is not shipped
    assert json.loads(raw)["num_classes"] == 5
    assert read_model_meta(path)["arch"] == "TinySegNet"  # default arch: the class name
    assert read_model_meta(path)["class_names"] == [f"class_{i}" for i in range(5)]


@needs_onnx
def test_onnx_metadata_props(model, tmp_path):
    import onnx

    path = export_model(model, tmp_path / "m.onnx", format="onnx", example_size=(32, 48))
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(props["corte_meta"])["num_classes"] == 5
    assert onnx.load(str(path)).opset_import[0].version >= 17


def test_meta_that_disagrees_with_the_model_is_refused(model, tmp_path):
    with pytest.raises(ConfigError, match="num_classes"):
        export_model(model, tmp_path / "m.pt", meta={"num_classes": 19})
    with pytest.raises(ConfigError, match="class_names"):
        export_model(model, tmp_path / "m.pt", meta={"class_names": ["a", "b"]})
    with pytest.raises(ConfigError, match="format"):
        export_model(model, tmp_path / "m.pt", format="tflite")
    assert list(tmp_path.iterdir()) == []


def test_model_breaking_the_contract_is_refused(tmp_path):
    with pytest.raises(CorteError, match="input resolution"):
        export_model(HalfResNet().eval(), tmp_path / "m.pt", example_size=(32, 48))


def test_written_atomically_no_temp_file_left(model, tmp_path):
    path = export_model(model, tmp_path / "out" / "m.pt", example_size=(32, 48))
    assert [p.name for p in path.parent.iterdir()] == ["m.pt"]
    # exporting again replaces the file in place
    export_model(model, path, example_size=(16, 16))
    assert [p.name for p in path.parent.iterdir()] == ["m.pt"]
    assert read_model_meta(path)["trace_size"] == [16, 16]


def test_existing_file_survives_a_failed_write(model, tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    path.write_bytes(b"previous model")

    def broken_save(module, f, _extra_files=None):
        with open(f, "wb") as out:  # half a file, then the job dies
            out.write(b"PK\x03\x04partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch.jit, "save", broken_save)
    with pytest.raises(InputError, match=r"m\.pt: cannot write here \(disk full\)"):  # one line naming it
        export_model(model, path, example_size=(32, 48))
    assert path.read_bytes() == b"previous model"
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_reading_missing_or_garbage_files_names_them(tmp_path):
    with pytest.raises(InputError, match="nothing.pt.*not found"):
        read_model_meta(tmp_path / "nothing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a model" * 20)
    with pytest.raises(InputError, match="garbage.pt"):
        read_model_meta(garbage)
    with pytest.raises(InputError, match="garbage.pt"):
        load_model_file(garbage)


@needs_onnx
def test_garbage_onnx_file_names_it(tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not a model" * 20)
    with pytest.raises(InputError, match="garbage.onnx"):
        read_model_meta(garbage)
    with pytest.raises(InputError, match="garbage.onnx"):
        load_model_file(garbage)


@pytest.mark.filterwarnings("ignore:.*torch.jit.* is deprecated:FutureWarning")
def test_torchscript_without_metadata_is_refused(model, tmp_path):
    path = tmp_path / "plain.pt"
    torch.jit.save(torch.jit.trace(model, torch.rand(1, 3, 16, 16)), str(path))
    with pytest.raises(InputError, match="plain.pt.*corte_meta"):
        read_model_meta(path)
    with pytest.raises(InputError, match="plain.pt.*corte_meta"):
        load_model_file(path)


def test_torchscript_module_loads_without_a_deprecation_warning(model, tmp_path):
    # The demo's report takes the box's parameters from ModelFile.module: a user sees no torch.jit FutureWarning.
    import warnings

    path = export_model(model, tmp_path / "m.pt", example_size=(32, 48))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = load_model_file(path).module
    assert not [w for w in caught if issubclass(w.category, FutureWarning)]
    assert sum(p.numel() for p in module.parameters()) == sum(p.numel() for p in model.parameters())
