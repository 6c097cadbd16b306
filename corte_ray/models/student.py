"""Lightweight students: a timm backbone (`features_only`) plus a light decoder, registered by name.

These are what corte-ray ships to the device, so every choice here trades accuracy for MACs:
LR-ASPP on MobileNetV3 (Howard et al. 2019) and a SegFormer-style all-MLP head on EfficientNet-B0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import Registry
from .base import ModelFactory, SegmentationModel, build_from_registry

STUDENTS: Registry[ModelFactory] = Registry("student")


class LRASPPHead(nn.Module):
    """Lite R-ASPP: a 1x1 conv of the high-level features gated by their global context (SE-like),
    upsampled onto the stride-8 low-level features, each side with its own classifier."""

    def __init__(self, low_channels: int, high_channels: int, num_classes: int, inter_channels: int = 128) -> None:
        super().__init__()
        self.high_project = nn.Sequential(
            nn.Conv2d(high_channels, inter_channels, 1, bias=False),
            nn.BatchNorm2d(inter_channels),
            nn.ReLU(inplace=True),
        )
        # Global pooling instead of the paper's 49x49 average pool with stride (16, 20): same idea
        # (image-level context as a channel gate) and it works at any input size (as torchvision does).
        self.high_gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(high_channels, inter_channels, 1, bias=False),
            nn.Sigmoid(),
        )
        self.low_classifier = nn.Conv2d(low_channels, num_classes, 1)
        self.high_classifier = nn.Conv2d(inter_channels, num_classes, 1)

    def forward(self, low: Tensor, high: Tensor) -> Tensor:
        gated = self.high_project(high) * self.high_gate(high)
        gated = F.interpolate(gated, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.low_classifier(low) + self.high_classifier(gated)


class MobileNetV3LRASPP(SegmentationModel):
    """MobileNetV3 at output stride 16 (dilated last stage, as in the paper) with an LR-ASPP head."""

    def __init__(self, backbone_name: str, num_classes: int, pretrained: bool = False, low_index: int = 2) -> None:
        # out_indices (2, 4) = the stride-8 stage and the last stage, for both mobilenetv3_large_100
        # and mobilenetv3_small_100 in timm 1.0 (feature_info reductions [2, 4, 8, 16, 32]); low_index 1 takes
        # the low-level branch from stride 4 instead (small images: thin objects are sub-pixel at stride 8).
        backbone = timm.create_model(
            backbone_name, pretrained=pretrained, features_only=True, out_indices=(low_index, 4), output_stride=16
        )
        low_channels, high_channels = backbone.feature_info.channels()
        super().__init__(num_classes, feature_dim=high_channels)
        self.backbone = backbone
        self.head = LRASPPHead(low_channels, high_channels, num_classes)

    def segment(self, x: Tensor) -> tuple[Tensor, Tensor]:
        low, high = self.backbone(x)
        return self.head(low, high), high


class AllMLPHead(nn.Module):
    """SegFormer's decoder: per-stage linear projection (1x1 conv), upsample to the finest stage,
    concatenate, fuse with a 1x1 conv + BN + ReLU, classify."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, embed_dim: int = 128, dropout: float = 0.1) -> None:
        super().__init__()
        self.project = nn.ModuleList(nn.Conv2d(channels, embed_dim, 1) for channels in in_channels)
        self.fuse = nn.Sequential(
            nn.Conv2d(len(in_channels) * embed_dim, embed_dim, 1, bias=False),
            nn.BatchNorm2d(embed_dim),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(embed_dim, num_classes, 1)

    def forward(self, features: list[Tensor]) -> Tensor:  # list, not Sequence: TorchScript
        size = features[0].shape[-2:]
        projected = []
        # Indexing `features` while iterating the ModuleList: the loop form TorchScript can unroll.
        for index, project in enumerate(self.project):
            feature = project(features[index])
            if feature.shape[-2:] != size:
                feature = F.interpolate(feature, size=size, mode="bilinear", align_corners=False)
            projected.append(feature)
        return self.classifier(self.dropout(self.fuse(torch.cat(projected, dim=1))))


class EfficientNetMLP(SegmentationModel):
    """EfficientNet stages at strides 4, 8, 16, 32 into an all-MLP head."""

    def __init__(self, backbone_name: str, num_classes: int, pretrained: bool = False, embed_dim: int = 128) -> None:
        backbone = timm.create_model(backbone_name, pretrained=pretrained, features_only=True, out_indices=(1, 2, 3, 4))
        channels = backbone.feature_info.channels()
        super().__init__(num_classes, feature_dim=channels[-1])
        self.backbone = backbone
        self.head = AllMLPHead(channels, num_classes, embed_dim=embed_dim)

    def segment(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.backbone(x)
        return self.head(features), features[-1]


@STUDENTS.register("mobilenetv3_lraspp")
def mobilenetv3_lraspp(num_classes: int = 19, pretrained: bool = False) -> SegmentationModel:
    return MobileNetV3LRASPP("mobilenetv3_large_100", num_classes, pretrained)


@STUDENTS.register("mobilenetv3_lraspp_s4")
def mobilenetv3_lraspp_s4(num_classes: int = 19, pretrained: bool = False) -> SegmentationModel:
    return MobileNetV3LRASPP("mobilenetv3_large_100", num_classes, pretrained, low_index=1)


@STUDENTS.register("mobilenetv3_small_lraspp")
def mobilenetv3_small_lraspp(num_classes: int = 19, pretrained: bool = False) -> SegmentationModel:
    return MobileNetV3LRASPP("mobilenetv3_small_100", num_classes, pretrained)


@STUDENTS.register("efficientnet_b0_mlp")
def efficientnet_b0_mlp(num_classes: int = 19, pretrained: bool = False) -> SegmentationModel:
    # 128 decoder channels, the low end of SegFormer's 128-256: at stride 4 the fuse conv dominates
    # the head's MACs and grows with the square of this width.
    return EfficientNetMLP("efficientnet_b0", num_classes, pretrained, embed_dim=128)


def build_student(
    name: str = "mobilenetv3_lraspp",
    num_classes: int = 19,
    pretrained: bool = False,
    weights: str | Path | None = None,
) -> SegmentationModel:
    """A registered student; `pretrained` = ImageNet backbone from timm, `weights` = a checkpoint file."""
    return build_from_registry(STUDENTS, name, num_classes, pretrained, weights)
