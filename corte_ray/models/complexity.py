"""Model size and cost: parameter counts and multiply-accumulates, for the student/source comparison table.

MACs come from torch's own FlopCounterMode (FLOPs / 2), run on a copy of the model on the meta device:
no memory, no compute, the same count for any device the model lives on.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .source import SOURCE_MODELS, build_source_model
from .student import STUDENTS, build_student


def count_parameters(model: nn.Module) -> int:
    """All parameters, trainable or not (shared ones once)."""
    return sum(parameter.numel() for parameter in model.parameters())


def count_macs(model: nn.Module, input_size: tuple[int, int, int, int]) -> int:
    """Multiply-accumulates of one eval-mode forward pass on an input of `input_size` (B, C, H, W).

    Counts what FlopCounterMode counts (convolutions, matmuls, ...); bilinear upsampling, activations
    and normalisation are not MACs and are left out, as in the papers' MAdds.
    """
    meta_model = copy.deepcopy(model).to("meta").eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        meta_model(torch.empty(input_size, device="meta"))
    return counter.get_total_flops() // 2


def describe_models(input_size: tuple[int, int, int, int] = (1, 3, 512, 1024)) -> list[dict]:
    """One row per registered student and source model: name, kind, params, gmacs (MACs / 1e9)."""
    rows = []
    for kind, registry, build in (("student", STUDENTS, build_student), ("source", SOURCE_MODELS, build_source_model)):
        for name in registry.names():
            # Built on the meta device: describing a ResNet-50 costs neither memory nor init time.
            with torch.device("meta"):
                model = build(name)
            rows.append(
                {
                    "name": name,
                    "kind": kind,
                    "params": count_parameters(model),
                    "gmacs": count_macs(model, input_size) / 1e9,
                }
            )
    return rows
