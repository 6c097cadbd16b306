"""corte-ray: turn a black-box segmentation model plus unlabelled target images into a small, fast student."""

__version__ = "0.1.0"
