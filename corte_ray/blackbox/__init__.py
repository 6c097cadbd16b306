"""Black boxes: the protocol (what a box is asked and may answer) and its backends, looked up by URI scheme.

Importing this package registers the built-in backends in `BACKENDS` ("file": a local TorchScript/ONNX file).
"""

from .local import LocalBlackBox
from .protocol import ANSWER_KINDS, BACKENDS, BlackBox, BoxAnswer, open_blackbox

__all__ = ["ANSWER_KINDS", "BACKENDS", "BlackBox", "BoxAnswer", "LocalBlackBox", "open_blackbox"]
