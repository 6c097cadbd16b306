"""A few-parameter segmentation net honouring the model-file contract ([0,1] RGB in, logits at the input size out),
shared by the black-box, export, HTTP and labelling tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinySegNet(nn.Module):
    """conv(stride 2) -> BN -> ReLU -> conv -> bilinear upsample to the input size."""

    def __init__(self, num_classes: int = 6, logit_scale: float = 3.0, random_bn_stats: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, num_classes, 1)
        # A spread of logits keeps the softmax far from uniform, so top-k orders are well separated.
        self.logit_scale = logit_scale
        if random_bn_stats:
            with torch.no_grad():  # non-trivial BN statistics, so eval vs train mode would show
                self.bn.running_mean.uniform_(-0.2, 0.2)
                self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(F.relu(self.bn(self.stem((x - 0.45) / 0.25))))  # the model normalises internally
        return self.logit_scale * F.interpolate(h, size=x.shape[-2:], mode="bilinear", align_corners=False)
