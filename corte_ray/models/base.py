"""What every segmentation model of corte-ray shares: the input contract, weight loading, the builder.

Input contract (students, source models, the black-box file and exports alike): images are float32 in
[0, 1], shape (B, 3, H, W), RGB. The model subtracts the ImageNet mean and divides by the std itself,
so an exported file needs no preprocessing code beside it, and logits always come back at the input
resolution.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError
from ..registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Prefixes that wrappers put in front of every state_dict key: DDP ("module.") and torch.compile
# ("_orig_mod."). A checkpoint saved from a wrapped model must load into a bare one.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Where a training checkpoint keeps the model's state_dict, most specific first.
_STATE_DICT_KEYS = ("model", "student", "state_dict")

ModelFactory = Callable[..., "SegmentationModel"]


class SegmentationModel(nn.Module):
    """Base class: subclasses implement `segment`, this class normalises the input and upsamples.

    Attributes: num_classes (int), feature_dim (channels of the feature map of forward_features),
    arch (registered name), build_kwargs (dict: `build_model(**build_kwargs)` rebuilds the architecture).
    They are not declared as class annotations because TorchScript would then try to compile them
    (and fails on the dict); the exporter scripts these models.
    """

    def __init__(self, num_classes: int, feature_dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.arch = type(self).__name__
        # Filled by the builder, so that `build_model(**model.build_kwargs)` rebuilds this architecture.
        self.build_kwargs: dict[str, Any] = {}
        # Non-persistent: a constant of the architecture, not a weight, so it stays out of state_dicts
        # (checkpoints load across versions) but still moves with .to(device) and is baked into exports.
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def segment(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised images -> (logits at the decoder's resolution, deepest encoder feature map)."""
        raise NotImplementedError

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Images in [0, 1] -> (logits (B, C, H, W) at the input resolution, features (B, feature_dim, h, w))."""
        logits, features = self.segment((x - self.pixel_mean) / self.pixel_std)
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits, features

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_features(x)[0]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DDP (or any wrapper exposing `.module`), else the model itself."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def _strip_wrapper_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, dict) and all(isinstance(value, Tensor) for value in obj.values())


def _find_state_dict(checkpoint: object) -> dict[str, Tensor] | None:
    if _is_state_dict(checkpoint):
        return checkpoint  # type: ignore[return-value]
    if isinstance(checkpoint, dict):
        for key in _STATE_DICT_KEYS:
            if _is_state_dict(checkpoint.get(key)):
                return checkpoint[key]
    return None


def _first_names(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a checkpoint file into `model` (strict). Every failure is an InputError naming the file.

    Accepts a raw state_dict or a dict holding one under "model", "student" or "state_dict"; strips
    DDP / torch.compile key prefixes. Loads with weights_only=True: a checkpoint is data, never code.
    """
    from .. import storage

    path = storage.as_path(path)   # a local file or an s3:// / gs:// object
    if not path.is_file():
        raise InputError(path, "no such weights file")
    try:
        checkpoint = storage.load_torch(path, map_location="cpu")
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(path, f"cannot be read as a PyTorch checkpoint ({first_line})") from error
    state_dict = _find_state_dict(checkpoint)
    if state_dict is None:
        raise InputError(path, "holds no state_dict (expected a raw one, or one under 'model' or 'student')")
    state_dict = {_strip_wrapper_prefixes(key): value for key, value in state_dict.items()}

    target = unwrap_model(model)
    expected = target.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key} {tuple(state_dict[key].shape)} vs {tuple(expected[key].shape)}"
        for key in expected
        if key in state_dict and state_dict[key].shape != expected[key].shape
    ]
    if missing or unexpected or mismatched:
        arch = getattr(target, "arch", type(target).__name__)
        problems = []
        if mismatched:
            problems.append(f"shape mismatch (checkpoint vs model): {_first_names(mismatched)}")
        if missing:
            problems.append(f"missing keys: {_first_names(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_first_names(unexpected)}")
        raise InputError(path, f"does not fit model {arch!r}: " + "; ".join(problems))
    target.load_state_dict(state_dict, strict=True)


def build_from_registry(
    registry: Registry[ModelFactory],
    name: str,
    num_classes: int,
    pretrained: bool,
    weights: str | Path | None,
) -> SegmentationModel:
    """Shared body of build_student / build_source_model: construct, stamp rebuild info, load weights."""
    model = registry.get(name)(num_classes=num_classes, pretrained=pretrained)
    model.arch = name
    # `pretrained` and `weights` are left out on purpose: a rebuild is followed by loading a state_dict.
    model.build_kwargs = {"name": name, "num_classes": num_classes}
    if weights is not None:
        load_weights(model, weights)
    return model
