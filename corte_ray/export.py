"""The model file format: writing a model as TorchScript or ONNX, reading it back, and checking the two agree.

Every model file in corte-ray (the student shipped to the device, a source model hidden behind the local
black box) follows one contract: float32 RGB images in [0, 1], shape (B,3,H,W), in; logits (B,C,H,W) at the
input resolution out; the model normalises internally. Its metadata travels inside the file, so a file alone
is enough to use it: TorchScript keeps it as the extra file "corte_meta.json", ONNX as the metadata_props key
"corte_meta".
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import ConfigError, CorteError, InputError
from .io_utils import write_atomic

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
INPUT_CONTRACT = "float32 RGB [0,1] NCHW"
EXPORT_FORMATS = ("torchscript", "onnx")
META_FILE = "corte_meta.json"  # TorchScript extra file
META_KEY = "corte_meta"        # ONNX metadata_props key
ONNX_OPSET = 18
ONNX_INSTALL_HINT = "pip install corte-ray[onnx]"
# Batch of the example input the model is traced with. Not 1: torch.export specialises dimensions of size 1,
# and a tracer can bake a size-1 batch into reshapes without anyone noticing.
_TRACE_BATCH = 2


def export_model(model: nn.Module, path: str | Path, format: str = "torchscript",
                 example_size: tuple[int, int] = (64, 128), meta: dict | None = None) -> Path:
    """Write `model` as a TorchScript (.pt/.ts) or ONNX (.onnx) file carrying its metadata.

    The model is traced in eval mode on a CPU copy (the caller's model keeps its device and mode) with an
    example of `example_size`; ONNX gets dynamic batch, height and width axes. `meta` adds to the required
    keys (num_classes, arch, class_names, input, format_version); num_classes is read off the model's output.
    The file appears atomically: an existing file is replaced only once the new one is completely written.
    """
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, got {format!r}")
    model = _cpu_eval_copy(model)
    height, width = example_size
    example = torch.rand(_TRACE_BATCH, 3, height, width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(example)
    check_logits(logits, example, f"{type(model).__name__} (the model being exported)")
    full_meta = _complete_meta(meta, model, num_classes=int(logits.shape[1]), example_size=(height, width),
                               format=format)
    meta_json = json.dumps(full_meta)

    if format == "torchscript":
        with torch.no_grad(), _quiet_jit_deprecation():
            # check_trace reruns the trace and compares: it catches data-dependent control flow that a trace
            # silently freezes. The example input is not stored in the file (_store_inputs=False).
            traced = torch.jit.trace(model, example, check_trace=True, _store_inputs=False)

        def write(tmp: Path) -> None:
            with _quiet_jit_deprecation():
                torch.jit.save(traced, str(tmp), _extra_files={META_FILE: meta_json})
    else:
        _require_module("onnx", "exporting ONNX")

        def write(tmp: Path) -> None:
            _export_onnx(model, example, tmp, meta_json)

    return write_atomic(path, write)


def _export_onnx(model: nn.Module, example: Tensor, tmp: Path, meta_json: str) -> None:
    import onnx

    if onnx_exporter() == "dynamo":
        from torch.export import Dim

        dynamic = {0: Dim.DYNAMIC, 2: Dim.DYNAMIC, 3: Dim.DYNAMIC}
        # external_data=False: one self-contained file (students are far below protobuf's 2 GB limit).
        torch.onnx.export(model, (example,), str(tmp), dynamo=True, input_names=["images"],
                          output_names=["logits"], dynamic_shapes=(dynamic,), opset_version=ONNX_OPSET,
                          external_data=False, verbose=False)
    else:
        axes = {0: "batch", 2: "height", 3: "width"}
        with warnings.catch_warnings():
            # The legacy exporter warns that it is deprecated; it is our fallback when onnxscript is absent.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(model, (example,), str(tmp), dynamo=False, input_names=["images"],
                              output_names=["logits"], dynamic_axes={"images": axes, "logits": axes},
                              opset_version=ONNX_OPSET)
    proto = onnx.load(str(tmp))
    props = {p.key: p.value for p in proto.metadata_props}  # keep what the exporter wrote
    props[META_KEY] = meta_json
    del proto.metadata_props[:]
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(tmp))


def onnx_exporter() -> str:
    """Which torch.onnx exporter `export_model` uses: "dynamo" (torch.export, needs onnxscript), the
    supported one, or "torchscript", the legacy one that needs only onnx."""
    return "dynamo" if importlib.util.find_spec("onnxscript") is not None else "torchscript"


def read_model_meta(path: str | Path) -> dict:
    """The corte_meta dict inside a model file, read without building the model."""
    path = _existing(path)
    fmt = _file_format(path)
    if fmt == "torchscript":
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith(f"/extra/{META_FILE}")]
            if not names:
                raise InputError(path, f"TorchScript file has no {META_FILE}; write it with "
                                       "corte_ray.export.export_model")
            raw = archive.read(names[0]).decode()
    elif importlib.util.find_spec("onnx") is not None:
        import onnx

        try:
            proto = onnx.load(str(path), load_external_data=False)
        except Exception as err:  # onnx raises DecodeError and friends; all mean the same to a user
            raise InputError(path, f"not a readable ONNX model ({err})") from None
        raw = next((p.value for p in proto.metadata_props if p.key == META_KEY), "")
    else:
        raw = _onnx_session(path, "cpu").get_modelmeta().custom_metadata_map.get(META_KEY, "")
    return _parse_meta(raw, path)


class ModelFile:
    """A model file loaded once: call it on float32 RGB [0,1] (B,3,H,W) images on `device`, get logits."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu") -> None:
        self.path = _existing(path)
        self.device = torch.device(device)
        self.format = _file_format(self.path)
        if self.format == "torchscript":
            extra = {META_FILE: ""}
            try:
                with _quiet_jit_deprecation():
                    self._module = torch.jit.load(str(self.path), map_location=self.device, _extra_files=extra)
            except Exception as err:  # a corrupt archive raises RuntimeError with a miniz message
                raise InputError(self.path, f"cannot load TorchScript model ({_first_line(err)})") from None
            self._module.eval()
            self.meta = _parse_meta(extra[META_FILE], self.path)
        else:
            self._session = _onnx_session(self.path, self.device)
            self._input_name = self._session.get_inputs()[0].name
            raw = self._session.get_modelmeta().custom_metadata_map.get(META_KEY, "")
            self.meta = _parse_meta(raw, self.path)
        self.num_classes = int(self.meta["num_classes"])

    @property
    def module(self) -> torch.jit.ScriptModule:
        """The loaded TorchScript module (its parameters, or to call it on another device's tensors)."""
        if self.format != "torchscript":
            raise CorteError(f"{self.path}: an {self.format} model file has no TorchScript module")
        return self._module

    def __call__(self, images: Tensor) -> Tensor:
        if self.format == "torchscript":
            return self._module(images)
        # onnxruntime works on host arrays; the copy is small next to the model's own work.
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        logits = self._session.run(None, {self._input_name: array})[0]
        return torch.from_numpy(logits).to(images.device)

    def close(self) -> None:
        self._module = None
        self._session = None


def load_model_file(path: str | Path, device: str | torch.device = "cpu") -> ModelFile:
    return ModelFile(path, device)


def check_parity(model: nn.Module, path: str | Path, size: tuple[int, int] = (64, 128), batch: int = 2,
                 seed: int = 0) -> float:
    """max |model(x) - exported(x)| on random images, both on the CPU in float32.

    When `size` is the size the file was traced at, the check runs 32 pixels larger in both directions
    instead: a trace that froze the input size must fail here, not on the device.
    """
    meta = read_model_meta(path)
    height, width = size
    if [height, width] == list(meta.get("trace_size", [])):
        height, width = height + 32, width + 32
    images = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))
    reference = _cpu_eval_copy(model)
    exported = load_model_file(path, "cpu")
    with torch.inference_mode():
        expected = reference(images)
        got = exported(images)
    if got.shape != expected.shape:
        raise CorteError(f"{path}: exported model returned {tuple(got.shape)} for a {height}x{width} input where "
                         f"the model returns {tuple(expected.shape)}; the trace froze the input size")
    return float((expected.float() - got.float()).abs().max())


def check_logits(logits: Any, images: Tensor, source: str, num_classes: int | None = None) -> None:
    """Refuse output that breaks the contract: logits (B,C,H,W) at the input resolution."""
    b, _, h, w = images.shape
    if not isinstance(logits, Tensor) or logits.dim() != 4:
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise CorteError(f"{source} must return logits (B,C,H,W), got {got}")
    c = logits.shape[1] if num_classes is None else num_classes
    if tuple(logits.shape) != (b, c, h, w):
        raise CorteError(f"{source} returned {tuple(logits.shape)} for a {tuple(images.shape)} input; expected "
                         f"logits {(b, c, h, w)} at the input resolution")


def _complete_meta(meta: dict | None, model: nn.Module, num_classes: int, example_size: tuple[int, int],
                   format: str) -> dict:
    meta = dict(meta or {})
    if "num_classes" in meta and int(meta["num_classes"]) != num_classes:
        raise ConfigError(f"meta num_classes={meta['num_classes']} but the model returns {num_classes} classes")
    class_names = list(meta.get("class_names") or [f"class_{i}" for i in range(num_classes)])
    if len(class_names) != num_classes:
        raise ConfigError(f"meta class_names has {len(class_names)} names for {num_classes} classes")
    meta.update(num_classes=num_classes, class_names=class_names, input=INPUT_CONTRACT,
                format_version=FORMAT_VERSION, trace_size=list(example_size), format=format)
    meta.setdefault("arch", type(model).__name__)
    try:
        json.dumps(meta)
    except TypeError as err:
        raise ConfigError(f"export meta must be JSON-serialisable: {err}") from None
    return meta


def _parse_meta(raw: str | bytes, path: Path) -> dict:
    if not raw:
        raise InputError(path, f"model file carries no {META_KEY} metadata; write it with "
                               "corte_ray.export.export_model")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise InputError(path, f"{META_KEY} metadata is not valid JSON ({err})") from None
    num_classes = meta.get("num_classes") if isinstance(meta, dict) else None
    if not isinstance(num_classes, int) or num_classes < 1:
        raise InputError(path, f"{META_KEY} metadata needs a positive integer num_classes, got {num_classes!r}")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise InputError(path, f"model file format_version {meta['format_version']} is newer than this "
                               f"corte-ray reads ({FORMAT_VERSION}); upgrade corte-ray")
    return meta


def _file_format(path: Path) -> str:
    """TorchScript files are zip archives; everything else we take for ONNX (and fail clearly if it is not)."""
    if path.suffix.lower() == ".onnx":
        return "onnx"
    if zipfile.is_zipfile(path):
        return "torchscript"
    if path.suffix.lower() in (".pt", ".ts", ".pth"):
        raise InputError(path, "not a TorchScript file (not a zip archive); is it corrupt or truncated?")
    return "onnx"


def _onnx_session(path: Path, device: str | torch.device) -> Any:
    ort = _require_module("onnxruntime", f"running the ONNX model {path}")
    providers = ["CPUExecutionProvider"]
    if torch.device(device).type == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        else:  # onnxruntime (CPU build) cannot use the GPU; say so rather than run 50x slower unexplained
            log.warning("%s: onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu); running on "
                        "the CPU", path)
    try:
        return ort.InferenceSession(str(path), providers=providers)
    except Exception as err:  # onnxruntime raises its own Fail/InvalidProtobuf classes
        raise InputError(path, f"cannot load ONNX model ({_first_line(err)})") from None


def _require_module(name: str, purpose: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        raise CorteError(f"{purpose} needs the '{name}' package: {ONNX_INSTALL_HINT}") from None


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "model file not found" if not path.exists() else "not a file")
    return path


def _cpu_eval_copy(model: nn.Module) -> nn.Module:
    """A float32 CPU copy in eval mode: exporting must not move or switch the caller's model."""
    return copy.deepcopy(model).float().cpu().eval()


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class _quiet_jit_deprecation(warnings.catch_warnings):
    """Recent torch flags torch.jit as deprecated on every call; TorchScript is still our device format,
    so the warning tells a user nothing they can act on."""

    def __enter__(self) -> Any:
        result = super().__enter__()
        warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated", category=FutureWarning)
        return result
