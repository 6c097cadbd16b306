"""Heavier source models: DeepLabV3 on timm ResNets, the black box of the demo and STvM's white-box source.

Also `build_model`, which finds a name among students and source models alike, so that
`build_model(**model.build_kwargs)` rebuilds any model of this package (STvM trains a student of the
source model's own architecture).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import timm
import torch
from torch import Tensor, nn

from ..registry import Registry
from .base import ModelFactory, SegmentationModel, build_from_registry
from .student import STUDENTS, build_student

SOURCE_MODELS: Registry[ModelFactory] = Registry("source model")


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=dilation * (kernel_size // 2), dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (Chen et al. 2017): a 1x1 branch, one 3x3 branch per rate and an
    image-pooling branch, concatenated and projected."""

    def __init__(self, in_channels: int, rates: Sequence[int], out_channels: int = 256) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_bn_relu(in_channels, out_channels, 1)]
            + [_conv_bn_relu(in_channels, out_channels, 3, dilation=rate) for rate in rates]
        )
        # No BatchNorm after the pooled 1x1 map: with one image per worker it would see a single value
        # per channel and fail in train mode; a bias does the same job here.
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, out_channels, 1), nn.ReLU(inplace=True))
        self.project = nn.Sequential(
            _conv_bn_relu((len(rates) + 2) * out_channels, out_channels, 1),
            nn.Dropout(0.5),
        )

    def forward(self, x: Tensor) -> Tensor:
        outputs = [branch(x) for branch in self.branches]
        outputs.append(self.image_pool(x).expand(-1, -1, x.shape[-2], x.shape[-1]))
        return self.project(torch.cat(outputs, dim=1))


class DeepLabV3(SegmentationModel):
    """DeepLabV3 (torchvision's head layout): dilated ResNet -> ASPP -> 3x3 conv -> 1x1 classifier."""

    def __init__(
        self,
        backbone_name: str,
        num_classes: int,
        pretrained: bool = False,
        output_stride: int = 8,
        rates: Sequence[int] = (12, 24, 36),
    ) -> None:
        backbone = timm.create_model(
            backbone_name, pretrained=pretrained, features_only=True, out_indices=(4,), output_stride=output_stride
        )
        feature_dim = backbone.feature_info.channels()[-1]
        super().__init__(num_classes, feature_dim=feature_dim)
        self.backbone = backbone
        self.head = nn.Sequential(
            ASPP(feature_dim, rates),
            _conv_bn_relu(256, 256, 3),
            nn.Conv2d(256, num_classes, 1),
        )

    def segment(self, x: Tensor) -> tuple[Tensor, Tensor]:
        (features,) = self.backbone(x)
        return self.head(features), features


class DeepLabV3Plus(SegmentationModel):
    """DeepLabV3+ (Chen et al. 2018): DeepLabV3's ASPP on a dilated ResNet, plus a decoder that brings back the
    stride-4 features of the first stage, so thin objects (poles, signs, people) keep their shape."""

    def __init__(self, backbone_name: str, num_classes: int, pretrained: bool = False, output_stride: int = 16,
                 rates: Sequence[int] = (6, 12, 18), low_channels: int = 48, decoder_channels: int = 128) -> None:
        backbone = timm.create_model(
            backbone_name, pretrained=pretrained, features_only=True, out_indices=(1, 4), output_stride=output_stride
        )
        low_dim, feature_dim = backbone.feature_info.channels()
        super().__init__(num_classes, feature_dim=feature_dim)
        self.backbone = backbone
        self.aspp = ASPP(feature_dim, rates)
        self.low_project = _conv_bn_relu(low_dim, low_channels, 1)
        self.decoder = _conv_bn_relu(256 + low_channels, decoder_channels, 3)
        self.classifier = nn.Conv2d(decoder_channels, num_classes, 1)

    def segment(self, x: Tensor) -> tuple[Tensor, Tensor]:
        low, features = self.backbone(x)
        high = torch.nn.functional.interpolate(self.aspp(features), size=low.shape[-2:], mode="bilinear",
                                               align_corners=False)
        return self.classifier(self.decoder(torch.cat([high, self.low_project(low)], dim=1))), features


@SOURCE_MODELS.register("deeplabv3_resnet50")
def deeplabv3_resnet50(num_classes: int = 19, pretrained: bool = False) -> SegmentationModel:
    return DeepLabV3("resnet50", num_classes, pretrained, output_stride=8, rates=(12, 24, 36))


@SOURCE_MODELS.register("deeplabv3_resnet18")
def deeplabv3_resnet18(num_classes: int = 19, pretrained: bool = False) -> SegmentationModel:
    # Output stride 16 keeps the demo's black box CPU-friendly (about 4x fewer MACs in layer3/4 and ASPP
    # than stride 8); rates 6/12/18 are DeepLabV3's rates for stride 16 (12/24/36 are for stride 8).
    return DeepLabV3("resnet18", num_classes, pretrained, output_stride=16, rates=(6, 12, 18))


def build_source_model(
    name: str = "deeplabv3_resnet50",
    num_classes: int = 19,
    pretrained: bool = False,
    weights: str | Path | None = None,
) -> SegmentationModel:
    """A registered source model; `pretrained` = ImageNet backbone from timm, `weights` = a checkpoint file."""
    return build_from_registry(SOURCE_MODELS, name, num_classes, pretrained, weights)


def build_model(
    name: str,
    num_classes: int = 19,
    pretrained: bool = False,
    weights: str | Path | None = None,
) -> SegmentationModel:
    """Any registered model, student or source, by name (the names of the two registries are disjoint)."""
    if name in STUDENTS and name in SOURCE_MODELS:
        raise ValueError(f"model name {name!r} is registered both as a student and as a source model")
    if name in SOURCE_MODELS:
        return build_source_model(name, num_classes, pretrained, weights)
    if name in STUDENTS:
        return build_student(name, num_classes, pretrained, weights)
    known = ", ".join(STUDENTS.names() + SOURCE_MODELS.names())
    raise KeyError(f"unknown model {name!r}; known: {known}")


@SOURCE_MODELS.register("deeplabv3plus_resnet18")
def deeplabv3plus_resnet18(num_classes: int = 19, pretrained: bool = False) -> SegmentationModel:
    # The demo's black box: output stride 16 keeps it CPU-friendly, the stride-4 decoder keeps thin classes.
    return DeepLabV3Plus("resnet18", num_classes, pretrained, output_stride=16, rates=(6, 12, 18))
