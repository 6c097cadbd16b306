"""The local black box: a TorchScript or ONNX model file queried like a vendor endpoint ("file:PATH").

It is how the demo hides its source model, and how a user runs a model they may query but not ship. The
`answer` option cuts what it returns down to top-k or a hard label map, to simulate a more restricted box.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
import torch

from .. import storage
from ..errors import ConfigError
from ..export import ModelFile, check_logits
from ..train.context import resolve_device
from .protocol import ANSWER_KINDS, BACKENDS, BlackBox, BoxAnswer, check_images

log = logging.getLogger(__name__)


@BACKENDS.register("file")
class LocalBlackBox(BlackBox):
    """A model file on this machine, loaded once, queried in chunks of `batch_size` images."""

    def __init__(self, path: str | Path, answer: str = "probs", topk: int = 2, device: str = "auto",
                 batch_size: int = 8, amp: bool = True) -> None:
        if answer not in ANSWER_KINDS:
            raise ConfigError(f"blackbox answer must be one of {', '.join(ANSWER_KINDS)}, got {answer!r}")
        if batch_size < 1:
            raise ConfigError(f"blackbox batch_size must be >= 1, got {batch_size}")
        self.path = storage.as_path(path)
        self.device = resolve_device(device, key="blackbox device")
        # A model file on object storage is downloaded once per process (TorchScript and ONNX Runtime load files).
        self._model = ModelFile(self._local_file(), self.device)
        self.meta: dict = self._model.meta
        self.num_classes = int(self.meta["num_classes"])
        if answer == "topk" and not 2 <= topk <= self.num_classes:
            raise ConfigError(f"blackbox topk must be in [2, num_classes={self.num_classes}], got {topk}")
        self.answer_kind = answer
        self.topk = topk
        self.batch_size = batch_size
        # bf16 autocast halves the GPU time of a big source model; on a CPU it is slower, and ONNX Runtime
        # runs the graph it was given.
        self.amp = amp and self.device.type == "cuda" and self._model.format == "torchscript"
        self.name = f"file:{self.path}"
        log.info("black box %s: %s, %d classes, answers %s, on %s", self.name, self.meta.get("arch", "?"),
                 self.num_classes, answer, self.device)

    def _local_file(self) -> Path:
        from ..errors import InputError

        if not storage.is_remote(self.path):
            return self.path
        try:
            return storage.local_copy(self.path)
        except FileNotFoundError:
            raise InputError(self.path, "black-box model file not found") from None

    @classmethod
    def from_spec(cls, spec: str, **options) -> LocalBlackBox:
        target = spec.split(":", 1)[1]
        if target.startswith("//"):  # the URL form file:///abs/path
            target = target[2:]
        return cls(target, **options)

    def query(self, images: np.ndarray) -> BoxAnswer:
        check_images(images)
        if self._model is None:
            raise RuntimeError(f"black box {self.name} was closed")
        parts = [self._query_chunk(images[start:start + self.batch_size])
                 for start in range(0, len(images), self.batch_size)]
        if self.answer_kind == "probs":
            return BoxAnswer("probs", self.num_classes, probs=torch.cat([p[0] for p in parts]))
        if self.answer_kind == "topk":
            return BoxAnswer("topk", self.num_classes, topk_ids=torch.cat([p[0] for p in parts]),
                             topk_probs=torch.cat([p[1] for p in parts]))
        return BoxAnswer("hard", self.num_classes, hard=torch.cat([p[0] for p in parts]))

    @torch.inference_mode()
    def _query_chunk(self, images: np.ndarray) -> tuple[torch.Tensor, ...]:
        """One forward pass; returns the CPU tensors of the answer kind for these images."""
        batch = torch.from_numpy(np.ascontiguousarray(images)).to(self.device, non_blocking=True)
        batch = batch.permute(0, 3, 1, 2).float().div_(255.0)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.amp else contextlib.nullcontext())
        with autocast:
            logits = self._model(batch)
        check_logits(logits, batch, f"model file {self.path}", self.num_classes)
        # Softmax in float32: bf16 keeps ~3 significant digits, too coarse for p(1) - p(2) near a threshold.
        logits = logits.float()
        if self.answer_kind == "hard":
            return (logits.argmax(dim=1).cpu(),)
        probs = logits.softmax(dim=1)
        if self.answer_kind == "probs":
            return (probs.cpu(),)
        top = torch.topk(probs, self.topk, dim=1)  # sorted: highest probability first
        return top.indices.cpu(), top.values.cpu()

    def close(self) -> None:
        if self._model is not None:
            self._model.close()
            self._model = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
