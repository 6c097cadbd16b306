"""Black boxes: the protocol (what a box is asked and may answer) and its backends, looked up by URI scheme.

Importing this package registers the built-in backends in `BACKENDS`: "file" (a local TorchScript/ONNX file) and
"http"/"https" (an endpoint speaking the wire format documented in http.py).
"""

from .http import HttpBlackBox
from .local import LocalBlackBox
from .protocol import ANSWER_KINDS, BACKENDS, BlackBox, BoxAnswer, open_blackbox

__all__ = ["ANSWER_KINDS", "BACKENDS", "BlackBox", "BoxAnswer", "HttpBlackBox", "LocalBlackBox", "open_blackbox"]
