"""The black-box protocol: what a black box is asked (images) and what it may answer (METHODS.md section 0).

A box answers, best first, dense probabilities, the top-k classes with their probabilities, or a hard label
map. `BoxAnswer` holds one of the three and gives everything downstream needs from any of them (`top1`,
`relative_confidence`), so the labelling job and the methods never branch on how the box was built.
Backends register under a URI scheme in `BACKENDS`; `open_blackbox("file:model.pt")` picks one.
"""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, CorteError
from ..registry import Registry

ANSWER_KINDS = ("probs", "topk", "hard")  # best first


@dataclass
class BoxAnswer:
    """What a black box returned for a batch of B images of one size H x W."""

    kind: str                         # "probs" | "topk" | "hard"
    num_classes: int
    probs: Tensor | None = None       # (B,C,H,W) float
    topk_ids: Tensor | None = None    # (B,k,H,W) long, sorted by probability, highest first
    topk_probs: Tensor | None = None  # (B,k,H,W) float
    hard: Tensor | None = None        # (B,H,W) long

    def __post_init__(self) -> None:
        # A malformed answer caught here names the missing piece; caught later it is a shape error deep
        # inside a training step.
        if self.kind not in ANSWER_KINDS:
            raise ValueError(f"answer kind must be one of {ANSWER_KINDS}, got {self.kind!r}")
        if self.kind == "probs":
            if self.probs is None or self.probs.dim() != 4 or self.probs.shape[1] != self.num_classes:
                raise ValueError(f"a 'probs' answer needs probs of shape (B,{self.num_classes},H,W), "
                                 f"got {_shape(self.probs)}")
        elif self.kind == "topk":
            if self.topk_ids is None or self.topk_probs is None:
                raise ValueError("a 'topk' answer needs both topk_ids and topk_probs")
            if self.topk_ids.dim() != 4 or self.topk_ids.shape != self.topk_probs.shape:
                raise ValueError(f"topk_ids {_shape(self.topk_ids)} and topk_probs {_shape(self.topk_probs)} "
                                 "must both be (B,k,H,W)")
            if self.topk_ids.shape[1] < 2:
                # k >= 2 is what makes the relative confidence p(1) - p(2) computable (METHODS 0).
                raise ValueError(f"a 'topk' answer needs k >= 2, got k={self.topk_ids.shape[1]}")
        elif self.hard is None or self.hard.dim() != 3:
            raise ValueError(f"a 'hard' answer needs a (B,H,W) label map, got {_shape(self.hard)}")

    @property
    def k(self) -> int | None:
        """How many classes per pixel a 'topk' answer carries (None for the other kinds)."""
        return None if self.topk_ids is None else int(self.topk_ids.shape[1])

    def top1(self) -> Tensor:
        """The most probable class per pixel, (B,H,W) long, whatever the kind."""
        if self.kind == "probs":
            return self.probs.argmax(dim=1)
        if self.kind == "topk":
            return self.topk_ids[:, 0].long()
        return self.hard.long()

    def relative_confidence(self) -> Tensor | None:
        """rc = p(1) - p(2) per pixel, (B,H,W); None for a hard-label box, whose confidence is unknown."""
        if self.kind == "probs":
            top2 = torch.topk(self.probs, 2, dim=1).values
            return top2[:, 0] - top2[:, 1]
        if self.kind == "topk":
            return self.topk_probs[:, 0] - self.topk_probs[:, 1]
        return None

    def to_topk(self, k: int) -> BoxAnswer:
        """The same answer reduced to its k most probable classes (what the label store keeps)."""
        if self.kind == "hard":
            raise CorteError("a hard-label answer has no probabilities to take the top-k of")
        if not 2 <= k <= self.num_classes:
            raise ValueError(f"k must be in [2, num_classes={self.num_classes}], got {k}")
        if self.kind == "topk":
            if k > self.k:
                raise CorteError(f"this answer holds only the top-{self.k} classes, cannot give the top-{k}")
            return BoxAnswer("topk", self.num_classes, topk_ids=self.topk_ids[:, :k],
                             topk_probs=self.topk_probs[:, :k])
        top = torch.topk(self.probs, k, dim=1)  # sorted=True: highest probability first
        return BoxAnswer("topk", self.num_classes, topk_ids=top.indices, topk_probs=top.values)

    def __len__(self) -> int:
        present = next(t for t in (self.probs, self.topk_ids, self.hard) if t is not None)
        return int(present.shape[0])

    def select(self, i: int) -> BoxAnswer:
        """Image i alone, keeping a batch dimension of 1."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"image {i} out of range for a batch of {len(self)}")
        i = i % len(self)

        def one(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[i:i + 1]

        return BoxAnswer(self.kind, self.num_classes, probs=one(self.probs), topk_ids=one(self.topk_ids),
                         topk_probs=one(self.topk_probs), hard=one(self.hard))


def _shape(t: Tensor | None) -> str:
    return "None" if t is None else str(tuple(t.shape))


class BlackBox(abc.ABC):
    """A segmentation model we may only query: images in, a `BoxAnswer` out."""

    answer_kind: str  # the best kind this box returns: "probs" | "topk" | "hard"
    num_classes: int
    name: str         # a human-readable identity, recorded in the label store's meta

    @abc.abstractmethod
    def query(self, images: np.ndarray) -> BoxAnswer:
        """images: (B,H,W,3) uint8 RGB, all of one size. Returns the answer on the CPU."""

    @classmethod
    def from_spec(cls, spec: str, **options: Any) -> BlackBox:
        """Build the box from the part of an `open_blackbox` spec after "scheme:".

        A backend whose target is a whole URL (http://host/...) overrides this to keep the scheme.
        """
        return cls(spec.split(":", 1)[1], **options)

    def close(self) -> None:
        """Release what the box holds (model weights, connections). Safe to call twice."""

    def __enter__(self) -> BlackBox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_images(images: np.ndarray) -> None:
    """Refuse anything but a (B,H,W,3) uint8 batch: a float image in [0,255] would silently saturate."""
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        got = f"{type(images).__name__} {getattr(images, 'dtype', '')} {getattr(images, 'shape', '')}"
        raise CorteError(f"a black box takes a (B,H,W,3) uint8 RGB array, got {got}")
    if images.shape[0] == 0:
        raise CorteError("a black box was asked about an empty batch")


BACKENDS: Registry[type[BlackBox]] = Registry("black-box backend")

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


# Options only a remote backend takes (HttpBlackBox): passed to http(s) specs, dropped for a local file.
REMOTE_OPTIONS = ("token_env", "timeout", "max_retries", "allow_http", "budget")


def open_blackbox(spec: str, answer: str | None = None, topk: int = 2, device: str = "auto",
                  batch_size: int = 8, **remote: Any) -> BlackBox:
    """Open the box a spec names: "file:PATH" (or a bare path) for a local model file, "http://..." etc.

    answer=None lets the backend return the best it can; a kind restricts it (to simulate a vendor box that
    gives less). The backends are looked up in `BACKENDS` by the spec's scheme. `remote` takes the options of
    REMOTE_OPTIONS (None = the backend's default), given to remote backends only.
    """
    unknown = set(remote) - set(REMOTE_OPTIONS)
    if unknown:
        raise TypeError(f"open_blackbox: unknown options {sorted(unknown)}")
    if answer is not None and answer not in ANSWER_KINDS:
        raise ConfigError(f"blackbox answer must be one of {', '.join(ANSWER_KINDS)}, got {answer!r}")
    options: dict[str, Any] = {"topk": topk, "device": device, "batch_size": batch_size}
    if answer is not None:  # unset means the backend's own default wins (timm's create_model convention)
        options["answer"] = answer
    match = _SCHEME.match(spec)
    # A bare path is a local file, also a Windows one ("C:\\m.pt") whose drive letter looks like a scheme.
    if match is None or Path(spec).exists():
        return BACKENDS.get("file").from_spec(f"file:{spec}", **options)
    scheme = match.group(1).lower()
    if scheme in ("http", "https"):
        options.update({name: value for name, value in remote.items() if value is not None})
    if scheme not in BACKENDS:
        known = ", ".join(f"{name}:" for name in BACKENDS.names()) or "(none)"
        raise CorteError(f"unknown black-box scheme {scheme!r} in {spec!r}; known schemes: {known}")
    return BACKENDS.get(scheme).from_spec(spec, **options)
