"""Models of corte-ray, pure PyTorch: students, source models, the EMA teacher, STvM's metric network.

`build_student` / `build_source_model` / `build_model` construct registered architectures; every model
takes images in [0, 1] and returns logits at the input resolution (see base.SegmentationModel).
"""

from .base import IMAGENET_MEAN, IMAGENET_STD, SegmentationModel, load_weights, unwrap_model
from .complexity import count_macs, count_parameters, describe_models
from .ema import EMATeacher
from .metric import ClassProxies, MetricHead, class_balanced_pixel_sample, pixel_reliability, proxy_anchor_loss
from .source import SOURCE_MODELS, build_model, build_source_model
from .student import STUDENTS, build_student

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SOURCE_MODELS",
    "STUDENTS",
    "ClassProxies",
    "EMATeacher",
    "MetricHead",
    "SegmentationModel",
    "build_model",
    "build_source_model",
    "build_student",
    "class_balanced_pixel_sample",
    "count_macs",
    "count_parameters",
    "describe_models",
    "load_weights",
    "pixel_reliability",
    "proxy_anchor_loss",
    "unwrap_model",
]
