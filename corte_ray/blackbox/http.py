"""The HTTP black box: a segmentation model behind a web endpoint ("http://host:port", "https://host/path").

This is the backend for the usual CoRTe case: a vendor API or another team's endpoint that we may query but
not look inside. The wire format below is the contract such an endpoint implements; the reference
implementation is `corte_ray.blackbox.server` (`corte-ray serve-blackbox`), which also offers GET
BASE/v1/stats (request and fault counters for tests; not part of the contract).

Wire format, version 1
======================
BASE is the URL the user gives (scheme, host, port and an optional path prefix; no query, no credentials).
One request carries one image. Every endpoint may require `Authorization: Bearer <token>`; the client sends
it when the environment variable named by `token_env` (default CORTE_BLACKBOX_TOKEN) is set and non-empty.
The token is read with surrounding whitespace stripped (a token file with a CRLF ending is common) and must then
be printable ASCII without spaces (RFC 6750 token68 characters, a little wider); anything else is refused in one
line that names the variable, never the token.

GET BASE/v1/info
    200, Content-Type application/json, an object with at least
        num_classes   int >= 1
        answer_kinds  list, a non-empty subset of ["probs", "topk", "hard"]: what the server can answer
        model         str, a name for the model (recorded in the label store's metadata)
    and optionally anything else (class_names, wire_version = 1, ...).

POST BASE/v1/segment
    Request body: the image as a PNG, 8-bit RGB (Content-Type: image/png).
    Request headers:
        X-Corte-Answer: probs | topk;k=K | hard     what the client wants (K >= 2; absent: the server's
                                                    best). The server may answer another kind: a weaker
                                                    one (probs > topk > hard, or a smaller K) when that is
                                                    all it has, or a stronger one, which the client reduces.
        Accept: application/x-corte-answer+npz
    200 answer: Content-Type application/x-corte-answer+npz; the body is a numpy `.npz` archive
    (`np.savez_compressed`, read with allow_pickle=False, so no object arrays) holding
        kind          0-d str array: "probs" | "topk" | "hard"
        num_classes   0-d integer array, equal to /v1/info's
        and, by kind, for an image of H x W pixels:
        probs         float16 (C,H,W): per-pixel class probabilities (a softmax; each pixel sums to ~1)
        topk_ids      uint8 (k,H,W) class ids (uint16 when C > 256), sorted by probability, highest first
        topk_probs    float16 (k,H,W) their probabilities, non-increasing along k
        hard          uint8 (H,W) class ids (uint16 when C > 256); 255 may mark "no label" when C < 256
    The server may echo what it answered in an `X-Corte-Answer` response header (informative only).

Errors: any non-200 status with a JSON body {"error": "<what went wrong>"}.
    429 (rate limited), 408 and 5xx are transient: the client retries them. 429 and 503 may carry
    `Retry-After: <seconds>` (an HTTP date is accepted too), which the client honours up to its max_backoff.
    Other 4xx (400 bad image or header, 401/403 bad or missing token, 404, 413 image too large, 415 not a
    PNG) are the caller's fault and fail at once, without retries. Redirects are not followed.

Why npz and not JSON or PNG: float16 probabilities are what the label store needs (it quantises to 1/255),
an npz keeps dtype and shape with the data, it is readable without numpy too (a zip of .npy files, a
documented format), and one format covers all three kinds. A hard map as a PNG would be smaller but would
need a second format beside the other two kinds.

Client limits: an answer larger than `max_answer_bytes` (default 64 MiB) is refused without being read whole,
and every array of the npz is checked from its .npy header (shape, dtype, size) against the image asked about
before any of it is read, so a hostile or broken server cannot make the client allocate more than the answer
for that image. Plain http to a host that is not loopback is refused unless `allow_http=True`
(blackbox.allow_http): images and the token would cross the network unencrypted.

Client behaviour: `HttpBlackBox.query` sends the B images of a batch concurrently (a pool of `concurrency`
threads over one keep-alive connection pool), retries timeouts, dropped connections, 408, 429 and 5xx with
exponential backoff and full jitter (sleep ~ U(0, min(max_backoff, backoff * 2**attempt))), and returns one
`BoxAnswer` in input order. If the server answers a weaker kind than asked for some image, the whole batch is
downgraded to the weakest kind received (probs -> top-k is done client-side; any hard answer makes the batch
hard). A query budget counts requests sent, retries included (a retried request may well have been answered,
and paid for, before its answer was lost): a batch is refused before it starts when the budget cannot cover one
request per image, and a retry that would go over the budget fails the batch instead. The token is never logged, put in an error message or shown in a repr.
"""

from __future__ import annotations

import io
import ipaddress
import zipfile
import logging
import math
import os
import random
import re
import threading
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import requests
import torch
from PIL import Image
from requests.adapters import HTTPAdapter

from ..data.labels import IGNORE
from ..errors import ConfigError, CorteError
from .protocol import ANSWER_KINDS, BACKENDS, BlackBox, BoxAnswer, check_images

log = logging.getLogger(__name__)

WIRE_VERSION = 1
INFO_PATH = "/v1/info"
SEGMENT_PATH = "/v1/segment"
STATS_PATH = "/v1/stats"  # reference server only: request and fault counters for tests
ANSWER_MEDIA_TYPE = "application/x-corte-answer+npz"
ANSWER_HEADER = "X-Corte-Answer"
# Transient statuses: the same request may well succeed later. 408 is the server giving up on a slow
# request body, as transient as a client-side timeout.
RETRY_STATUSES = frozenset({408, 429} | set(range(500, 600)))
_KIND_RANK = {kind: rank for rank, kind in enumerate(ANSWER_KINDS)}  # 0 = best
# numpy parses .npy headers with ast.literal_eval, and CPython 3.11's AST constructor keeps its recursion
# depth in interpreter-wide state: two threads parsing at once can fail with "SystemError: AST constructor
# recursion depth mismatch" (python/cpython#106905, seen here under concurrent queries). Decoding is ~1 ms;
# one at a time costs nothing next to the network.
_NPY_HEADER_LOCK = threading.Lock()


# ------------------------------------------------------------------------------------- wire helpers
def format_answer_header(kind: str, k: int | None = None) -> str:
    """The X-Corte-Answer value asking for `kind` (with k for "topk")."""
    return f"topk;k={k}" if kind == "topk" else kind


def parse_answer_header(value: str | None) -> tuple[str | None, int | None]:
    """(kind, k) from an X-Corte-Answer value; (None, None) when absent. Raises ValueError when malformed."""
    if value is None or not value.strip():
        return None, None
    kind, _, params = value.strip().partition(";")
    kind = kind.strip().lower()
    if kind not in ANSWER_KINDS:
        raise ValueError(f"{ANSWER_HEADER} must be probs, topk;k=K or hard, got {value!r}")
    if kind != "topk":
        return kind, None
    match = re.fullmatch(r"\s*k\s*=\s*(\d+)\s*", params)
    if match is None:
        raise ValueError(f"{ANSWER_HEADER}: topk needs k, as in 'topk;k=2', got {value!r}")
    return kind, int(match.group(1))


def encode_png(image: np.ndarray) -> bytes:
    """One (H,W,3) uint8 RGB image as PNG bytes. Level 1: the network, not zlib, should be the bottleneck."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image), mode="RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def id_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.uint8 if num_classes <= 256 else np.uint16)


def encode_wire_answer(kind: str, num_classes: int, probs: np.ndarray | None = None, topk_ids: np.ndarray | None = None,
                  topk_probs: np.ndarray | None = None, hard: np.ndarray | None = None) -> bytes:
    """The npz body of a 200 answer for one image (what a server sends). The label store's row encoder is
    `store.encode_store_row`."""
    arrays: dict[str, np.ndarray] = {"kind": np.array(kind), "num_classes": np.array(num_classes, dtype=np.int32)}
    if kind == "probs":
        arrays["probs"] = np.asarray(probs, dtype=np.float16)
    elif kind == "topk":
        arrays["topk_ids"] = np.asarray(topk_ids).astype(id_dtype(num_classes))
        arrays["topk_probs"] = np.asarray(topk_probs, dtype=np.float16)
    elif kind == "hard":
        arrays["hard"] = np.asarray(hard).astype(id_dtype(num_classes))
    else:
        raise ValueError(f"answer kind must be one of {ANSWER_KINDS}, got {kind!r}")
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


@dataclass
class ImageAnswer:
    """One image's decoded answer: numpy arrays as the wire carried them (no batch dimension)."""

    kind: str
    probs: np.ndarray | None = None       # (C,H,W) float
    topk_ids: np.ndarray | None = None    # (k,H,W) int
    topk_probs: np.ndarray | None = None  # (k,H,W) float
    hard: np.ndarray | None = None        # (H,W) int

    @property
    def k(self) -> int | None:
        return None if self.topk_ids is None else int(self.topk_ids.shape[0])


def _expected_shapes(num_classes: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
    """The largest shape each array of an answer for an H x W image may have (k <= C for top-k)."""
    return {"kind": (), "num_classes": (), "probs": (num_classes, height, width),
            "topk_ids": (num_classes, height, width), "topk_probs": (num_classes, height, width),
            "hard": (height, width)}


def _read_npz_checked(body: bytes, num_classes: int, height: int, width: int) -> dict[str, np.ndarray]:
    """The arrays of an answer archive, each checked from its .npy header (shape, dtype, declared and
    uncompressed size) before its data is read: a server cannot make us allocate more than the answer for
    this image. Members not in the wire format are skipped unread."""
    limits = _expected_shapes(num_classes, height, width)
    arrays: dict[str, np.ndarray] = {}
    try:
        archive = zipfile.ZipFile(io.BytesIO(body))
    except zipfile.BadZipFile as err:
        raise ValueError(f"the body is not a readable npz archive ({err})") from None
    with archive:
        for info in archive.infolist():
            name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
            if name not in limits:
                continue
            limit = limits[name]
            # 8 bytes per element is the widest dtype we accept; the header is at most a few hundred bytes.
            most_bytes = 8 * int(np.prod(limit, dtype=np.int64)) + 4096
            if info.file_size > most_bytes:
                raise ValueError(f"'{name}' is {info.file_size} bytes uncompressed, more than an answer for a "
                                 f"{height}x{width} image can be")
            try:
                with archive.open(info) as member, _NPY_HEADER_LOCK:
                    version = np.lib.format.read_magic(member)
                    if version == (1, 0):
                        shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
                    else:
                        shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
                    if dtype.hasobject:
                        raise ValueError(f"'{name}' holds Python objects")
                    if len(shape) != len(limit) or any(n > m for n, m in zip(shape, limit)):
                        raise ValueError(f"'{name}' has shape {shape}, expected at most {limit} for a "
                                         f"{height}x{width} image")
                    if dtype.itemsize > (64 if name == "kind" else 8):   # "kind" is a short string
                        raise ValueError(f"'{name}' has dtype {dtype}")
                    count = int(np.prod(shape, dtype=np.int64))
                    data = member.read(count * dtype.itemsize + 1)
                if len(data) != count * dtype.itemsize:
                    raise ValueError(f"'{name}' holds {len(data)} bytes of data, its header says "
                                     f"{count * dtype.itemsize}")
                array = np.frombuffer(data, dtype=dtype, count=count)
                arrays[name] = array.reshape(shape, order="F" if fortran else "C")
            except ValueError:
                raise
            except Exception as err:  # zlib, header parsing: the archive is damaged
                raise ValueError(f"the npz member '{name}' is unreadable ({type(err).__name__}: {err})") from None
    return arrays


def decode_answer(body: bytes, num_classes: int, size: tuple[int, int]) -> ImageAnswer:
    """Read and check one 200 answer for an image of `size` (H, W). Raises ValueError saying what is wrong."""
    height, width = size
    arrays = _read_npz_checked(body, num_classes, height, width)
    if "kind" not in arrays:
        raise ValueError(f"the archive has no 'kind' (it holds {sorted(arrays)})")
    raw_kind = arrays["kind"]
    kind = raw_kind.item().decode() if raw_kind.dtype.kind == "S" else str(raw_kind.item())
    if kind not in ANSWER_KINDS:
        raise ValueError(f"kind must be one of {ANSWER_KINDS}, got {kind!r}")
    if "num_classes" in arrays and int(arrays["num_classes"]) != num_classes:
        raise ValueError(f"num_classes={int(arrays['num_classes'])} but /v1/info said {num_classes}")

    def get(name: str, ndim: int, dtype_kinds: str) -> np.ndarray:
        if name not in arrays:
            raise ValueError(f"a '{kind}' answer needs '{name}' (the archive holds {sorted(arrays)})")
        array = arrays[name]
        if array.ndim != ndim or tuple(array.shape[-2:]) != (height, width):
            raise ValueError(f"'{name}' has shape {array.shape}, expected {ndim} dimensions ending in "
                             f"({height}, {width}) for a {height}x{width} image")
        if array.dtype.kind not in dtype_kinds:
            raise ValueError(f"'{name}' has dtype {array.dtype}")
        return array

    def check_ids(ids: np.ndarray, name: str, allow_ignore: bool) -> None:
        bad = ids >= num_classes
        if allow_ignore:
            bad &= ids != IGNORE
        if bad.any():
            raise ValueError(f"'{name}' holds class id {int(ids[bad].max())} >= num_classes={num_classes}")

    if kind == "probs":
        probs = get("probs", 3, "f")
        if probs.shape[0] != num_classes:
            raise ValueError(f"'probs' has {probs.shape[0]} classes, expected {num_classes}")
        if not np.isfinite(probs).all():
            raise ValueError("'probs' holds NaN or infinite values")
        return ImageAnswer("probs", probs=probs)
    if kind == "topk":
        ids, probs = get("topk_ids", 3, "ui"), get("topk_probs", 3, "f")
        if ids.shape != probs.shape or ids.shape[0] < 1:
            raise ValueError(f"topk_ids {ids.shape} and topk_probs {probs.shape} must both be (k,H,W), k >= 1")
        check_ids(ids, "topk_ids", allow_ignore=False)
        if not np.isfinite(probs).all():
            raise ValueError("'topk_probs' holds NaN or infinite values")
        return ImageAnswer("topk", topk_ids=ids, topk_probs=probs)
    hard = get("hard", 2, "ui")
    check_ids(hard, "hard", allow_ignore=True)
    return ImageAnswer("hard", hard=hard)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None when absent or bad."""
    if value is None or not value.strip():
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def read_token(env: str | None) -> str | None:
    """The bearer token in the environment variable `env`, stripped; None when unset or empty. Refuses a token
    that cannot go in an HTTP header, in a message that names the variable and never shows the token."""
    if not env:
        return None
    token = os.environ.get(env, "").strip()
    if not token:
        return None
    bad = [c for c in token if not 0x21 <= ord(c) <= 0x7E]
    if bad:
        what = "a space" if " " in bad else ("a control character" if any(ord(c) < 0x20 or ord(c) == 0x7F
                                                                         for c in bad) else "a non-ASCII character")
        raise ConfigError(f"token_env: ${env} holds {what} inside the token ({len(token)} characters after "
                          "stripping); a bearer token is printable ASCII without spaces: check the token file")
    return token


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses: where a token over plain http stays on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _describe(err: BaseException) -> str:
    """A short reason for a requests exception: its OS-level cause when there is one, not urllib3's essay."""
    text = str(err)
    match = re.search(r"\[Errno -?\d+\] [^'\")]+", text)
    if match:
        return match.group(0).strip()
    for hint in ("RemoteDisconnected", "Connection aborted", "Connection reset", "IncompleteRead", "timed out"):
        if hint in text:
            return hint
    return type(err).__name__


class _BrokenOff(Exception):
    """The connection failed while an answer's body was being read (transient, like a dropped connection)."""


class _Aborted(Exception):
    """A sibling request of the same batch failed for good; this one stops retrying."""


class _BearerAuth(requests.auth.AuthBase):
    """Sets the bearer token on each request. An auth object (not a plain header) also stops requests from
    replacing it with ~/.netrc credentials, and its repr keeps the token out of debug dumps."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token}"
        return request

    def __repr__(self) -> str:
        return "_BearerAuth(<hidden>)"


# ------------------------------------------------------------------------------------------ client
@BACKENDS.register("https")
@BACKENDS.register("http")
class HttpBlackBox(BlackBox):
    """A black box behind the HTTP wire format above: one request per image, several in flight at once.

    Counters (read them, do not set them): `images_sent` (images for which a request went out, each counted
    once however often it was retried), `requests_sent` (/v1/segment requests that went out, retries included:
    what the budget counts), `retries` (retried attempts), `failures` (requests that failed for good: after all
    retries, or at once for a non-transient error), `budget_left` (None without a budget).
    `device` and `batch_size` are accepted for the options `open_blackbox` passes every backend; the wire
    carries one image per request, so they change nothing here.
    """

    def __init__(self, url: str, answer: str = "probs", topk: int = 2, token_env: str | None = "CORTE_BLACKBOX_TOKEN",
                 timeout: float = 30.0, max_retries: int = 8, backoff: float = 0.5, max_backoff: float = 30.0,
                 concurrency: int = 4, budget: int | None = None, batch_size: int = 8, device: str = "auto",
                 allow_http: bool = False, max_answer_bytes: int = 64 << 20) -> None:
        if answer not in ANSWER_KINDS:
            raise ConfigError(f"blackbox answer must be one of {', '.join(ANSWER_KINDS)}, got {answer!r}")
        for name, value, ok in (("topk", topk, topk >= 2), ("timeout", timeout, timeout > 0),
                                ("max_retries", max_retries, max_retries >= 0), ("backoff", backoff, backoff >= 0),
                                ("max_backoff", max_backoff, max_backoff >= 0),
                                ("concurrency", concurrency, concurrency >= 1),
                                ("budget", budget, budget is None or budget >= 0),
                                ("batch_size", batch_size, batch_size >= 1),
                                ("max_answer_bytes", max_answer_bytes, max_answer_bytes >= 1024)):
            if not ok:
                raise ConfigError(f"http black box: {name}={value!r} is out of range")
        self.base_url = _base_url(url)
        self.name = self.base_url
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.concurrency = int(concurrency)
        self.budget = budget
        self.batch_size = batch_size
        self.max_answer_bytes = int(max_answer_bytes)
        self.token_env = token_env
        host = urlsplit(self.base_url).hostname or ""
        if self.base_url.startswith("http://") and not is_loopback(host):
            if not allow_http:
                raise ConfigError(f"http black box: plain http to {host} sends the images (and any token) "
                                  "unencrypted over the network; use https, or set blackbox.allow_http=true if "
                                  "that network is trusted")
            log.warning("black box %s: plain http to a remote host (allow_http is set); use https", self.name)
        self._token = read_token(token_env)
        self._auth = _BearerAuth(self._token) if self._token else None

        self.images_sent = 0
        self.requests_sent = 0
        self.retries = 0
        self.failures = 0
        self._reserved = 0  # images of batches in flight that are not sent yet: the budget holds them back
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._rng = random.Random()  # jitter only; unseeded so that many clients do not retry in lockstep
        self._warned_downgrades: set[str] = set()
        # One Session shared by the worker threads: its connection pool (urllib3) is thread-safe, and we use no
        # cookies, the one part of a Session that is not.
        self._session = requests.Session()
        # One keep-alive connection per worker thread; retries are ours (urllib3's would not honour our budget
        # of attempts, nor count them).
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=self.concurrency, max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="corte-http-box")

        try:
            self.meta = self._fetch_info()
        except BaseException:
            self.close()
            raise
        self.num_classes = int(self.meta["num_classes"])
        offered = [kind for kind in ANSWER_KINDS if kind in self.meta["answer_kinds"]]
        self.answer_kind, self._ask = _choose_answer(answer, topk, offered)
        if self.answer_kind == "topk" and not 2 <= topk <= self.num_classes:
            self.close()
            raise ConfigError(f"blackbox topk must be in [2, num_classes={self.num_classes}], got {topk}")
        self.topk = topk
        if self.answer_kind != answer:
            log.warning("black box %s offers only %s; asked for %s, it will answer %s", self.name,
                        ", ".join(offered), answer, self.answer_kind)
        log.info("black box %s: model %s, %d classes, answers %s", self.name, self.meta.get("model", "?"),
                 self.num_classes, self.answer_kind)

    @classmethod
    def from_spec(cls, spec: str, **options: Any) -> HttpBlackBox:
        return cls(spec, **options)  # the whole URL, scheme included

    @property
    def budget_left(self) -> int | None:
        return None if self.budget is None else max(0, self.budget - self.requests_sent)

    def __repr__(self) -> str:
        return (f"HttpBlackBox({self.name!r}, answer={getattr(self, 'answer_kind', '?')!r}, "
                f"token_env={self.token_env!r})")

    # ------------------------------------------------------------------------------------ queries
    def query(self, images: np.ndarray) -> BoxAnswer:
        check_images(images)
        if self._closed.is_set():
            raise RuntimeError(f"black box {self.name} was closed")
        count, height, width = images.shape[:3]
        self._reserve(count)
        started = [False] * count
        abort = threading.Event()
        try:
            futures = [self._pool.submit(self._segment_one, images[i], i, started, abort) for i in range(count)]
            wait(futures, return_when=FIRST_EXCEPTION)
            if any(_failed(f) for f in futures):
                # Stop the rest of the batch: a batch is answered whole or not at all, so work on it is wasted.
                abort.set()
                for future in futures:
                    future.cancel()
                wait(futures)
                errors = [f.exception() for f in futures if _failed(f) and not isinstance(f.exception(), _Aborted)]
                raise errors[0]
            parts = [f.result() for f in futures]
        finally:
            # Also on Ctrl-C: images not yet started never will be, so their share of the budget comes back.
            with self._lock:
                abort.set()
                self._reserved -= count - sum(started)
        return self._combine(parts, height, width)

    def _reserve(self, count: int) -> None:
        """Refuse a batch the budget cannot cover (one request per image) before any of it is sent."""
        with self._lock:
            if self.budget is not None and self.requests_sent + self._reserved + count > self.budget:
                raise CorteError(f"query budget of {self.budget} requests reached: {self.requests_sent} sent "
                                 f"(retries included), this batch needs {count} more (black box {self.name})")
            self._reserved += count

    def _take_retry_budget(self, url: str) -> None:
        """A retry is one more request: it needs budget beyond what the batch reserved."""
        with self._lock:
            if self.budget is not None and self.requests_sent + self._reserved + 1 > self.budget:
                self.failures += 1
                raise CorteError(f"query budget of {self.budget} requests reached while retrying {url} "
                                 f"({self.requests_sent} sent, retries included; black box {self.name})")

    def _segment_one(self, image: np.ndarray, index: int, started: list[bool], abort: threading.Event) -> ImageAnswer:
        body = encode_png(image)
        with self._lock:  # the abort check and the start are one step, so `query` knows what never went out
            if abort.is_set():
                raise _Aborted()
            self.images_sent += 1
            self.requests_sent += 1
            self._reserved -= 1
            started[index] = True
        headers = {"Content-Type": "image/png", "Accept": ANSWER_MEDIA_TYPE, ANSWER_HEADER: self._ask}
        response = self._request("POST", SEGMENT_PATH, data=body, headers=headers, abort=abort)
        url = self.base_url + SEGMENT_PATH
        media_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if media_type != ANSWER_MEDIA_TYPE:
            self._count_failure()
            raise CorteError(f"black box {url} answered Content-Type {media_type or '(none)'!r}, expected "
                             f"{ANSWER_MEDIA_TYPE}: {self._server_text(response)}")
        try:
            return decode_answer(response.content, self.num_classes, image.shape[:2])
        except ValueError as err:
            self._count_failure()
            raise CorteError(f"black box {url} sent a malformed answer: {err}") from None

    def _combine(self, parts: list[ImageAnswer], height: int, width: int) -> BoxAnswer:
        """One BoxAnswer of one kind for the batch: the weakest kind asked for or received."""
        def effective(part: ImageAnswer) -> str:  # a top-1 "top-k" has no second class: it is a hard label
            return "hard" if part.kind == "topk" and part.k < 2 else part.kind

        kind = max([self.answer_kind, *(effective(p) for p in parts)], key=_KIND_RANK.__getitem__)
        if _KIND_RANK[kind] > _KIND_RANK[self.answer_kind] and kind not in self._warned_downgrades:
            self._warned_downgrades.add(kind)
            log.warning("black box %s answered %s where /v1/info promised %s; batches with such answers are "
                        "downgraded to %s", self.name, kind, self.answer_kind, kind)
        if kind == "probs":
            probs = torch.from_numpy(np.stack([p.probs for p in parts]).astype(np.float32))
            return BoxAnswer("probs", self.num_classes, probs=probs)
        if kind == "topk":
            k = min([self.topk if self.answer_kind == "topk" else self.num_classes,
                     *(p.k for p in parts if p.kind == "topk")])
            ids, probs = [], []
            for part in parts:
                if part.kind == "probs":  # the server's float16 probabilities, reduced here
                    top = torch.topk(torch.from_numpy(part.probs.astype(np.float32)), k, dim=0)
                    ids.append(top.indices)
                    probs.append(top.values)
                else:
                    ids.append(torch.from_numpy(part.topk_ids[:k].astype(np.int64)))
                    probs.append(torch.from_numpy(part.topk_probs[:k].astype(np.float32)))
            return BoxAnswer("topk", self.num_classes, topk_ids=torch.stack(ids), topk_probs=torch.stack(probs))
        hard = []
        for part in parts:
            if part.kind == "probs":
                hard.append(torch.from_numpy(part.probs.astype(np.float32)).argmax(dim=0))
            elif part.kind == "topk":
                hard.append(torch.from_numpy(part.topk_ids[0].astype(np.int64)))
            else:
                hard.append(torch.from_numpy(part.hard.astype(np.int64)))
        return BoxAnswer("hard", self.num_classes, hard=torch.stack(hard))

    # ---------------------------------------------------------------------------------- transport
    def _fetch_info(self) -> dict:
        url = self.base_url + INFO_PATH
        response = self._request("GET", INFO_PATH, headers={"Accept": "application/json"})
        try:
            info = response.json()
        except ValueError:
            raise CorteError(f"black box {url} did not answer JSON: {self._server_text(response)}") from None
        if not isinstance(info, dict):
            raise CorteError(f"black box {url} must answer a JSON object, got {type(info).__name__}")
        num_classes = info.get("num_classes")
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise CorteError(f"black box {url}: num_classes must be a positive integer, got {num_classes!r}")
        kinds = info.get("answer_kinds")
        if not isinstance(kinds, list) or not any(kind in ANSWER_KINDS for kind in kinds):
            raise CorteError(f"black box {url}: answer_kinds must list some of {list(ANSWER_KINDS)}, got {kinds!r}")
        return info

    def _request(self, method: str, path: str, data: bytes | None = None, headers: dict | None = None,
                 abort: threading.Event | None = None) -> requests.Response:
        """One request with retries; returns a 200 response or raises CorteError (or _Aborted)."""
        url = self.base_url + path
        attempt = 0
        while True:
            retry_after = None
            try:
                response = self._session.request(method, url, data=data, headers=headers, auth=self._auth,
                                                 timeout=self.timeout, allow_redirects=False, stream=True)
            except requests.Timeout:
                reason = f"no answer within {self.timeout:g} s"
            except requests.exceptions.SSLError as err:  # a certificate problem does not heal in a minute
                self._count_failure()
                raise CorteError(f"black box {method} {url}: TLS failed ({_describe(err)}); check the certificate "
                                 "or set REQUESTS_CA_BUNDLE to your CA file") from None
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as err:
                reason = f"connection failed ({_describe(err)})"
            except requests.RequestException as err:  # invalid URL, TLS setup and the like: retrying will not help
                self._count_failure()
                raise CorteError(f"black box {method} {url} failed: {self._redact(str(err))}") from None
            else:
                if response.status_code == 200:
                    try:
                        # Read here, inside the retries: an answer that breaks off is a dropped connection.
                        response._content = self._read_capped(response, url,
                                                               limit=(1 << 20) if method == "GET" else None)
                        return response
                    except _BrokenOff as err:
                        reason = f"connection failed while reading the answer ({err})"
                else:
                    reason = None
            if reason is None:
                text = self._server_text(response)
                response.close()
                if response.status_code not in RETRY_STATUSES:
                    self._count_failure()
                    raise CorteError(f"black box {method} {url} answered HTTP {response.status_code}: {text}"
                                     f"{self._hint(response.status_code)}")
                reason = f"HTTP {response.status_code}: {text}"
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
            if attempt >= self.max_retries:
                self._count_failure()
                raise CorteError(f"black box {method} {url} failed after {attempt} retries: {reason}")
            if retry_after is not None:
                delay = min(retry_after, self.max_backoff)
            else:  # full jitter: spreads the retries of many clients hit by the same outage
                delay = self._rng.uniform(0.0, min(self.max_backoff, self.backoff * 2.0 ** attempt))
            if path == SEGMENT_PATH:
                self._take_retry_budget(url)
            attempt += 1
            with self._lock:
                self.retries += 1
                if path == SEGMENT_PATH:
                    self.requests_sent += 1
            # Per-retry lines are debug noise on a flaky endpoint, but a long wait should not look like a hang.
            log.log(logging.WARNING if delay >= 5 else logging.DEBUG, "black box %s %s: %s; retry %d/%d in %.2f s",
                    method, url, reason, attempt, self.max_retries, delay)
            stop = abort if abort is not None else self._closed
            if stop.wait(delay) or self._closed.is_set():
                raise _Aborted()

    def _read_capped(self, response: requests.Response, url: str, limit: int | None = None) -> bytes:
        """The body of a 200 answer, refused (without reading it all) when over `limit` bytes."""
        limit = self.max_answer_bytes if limit is None else limit
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            response.close()
            self._count_failure()
            raise CorteError(f"black box {url} sent an answer of {int(declared)} bytes, over the limit of {limit} "
                             "(blackbox max_answer_bytes)")
        chunks, size = [], 0
        try:
            for chunk in response.iter_content(1 << 16):
                size += len(chunk)
                if size > limit:
                    response.close()
                    self._count_failure()
                    raise CorteError(f"black box {url} sent an answer of more than {limit} bytes "
                                     "(blackbox max_answer_bytes)")
                chunks.append(chunk)
        except requests.RequestException as err:
            response.close()
            raise _BrokenOff(_describe(err)) from None
        return b"".join(chunks)

    def _server_text(self, response: requests.Response) -> str:
        """The server's error text (its JSON "error" when there is one), short and with no token in it."""
        try:
            # An error body is read whole only up to 64 KiB: a hostile server cannot flood us through it.
            raw = next(response.iter_content(64 << 10), b"") if response._content is False else response.content
            response._content = raw
            body = response.json()
            text = str(body.get("error", body)) if isinstance(body, dict) else str(body)
        except ValueError:
            text = response.text.strip() or response.reason or "(no body)"
        text = " ".join(text.split())
        return self._redact(text[:500] + ("..." if len(text) > 500 else ""))

    def _redact(self, text: str) -> str:
        # A server that echoes the Authorization header in its error must not leak the token through us.
        return text.replace(self._token, "<token>") if self._token else text

    def _hint(self, status: int) -> str:
        if status in (401, 403):
            where = f"${self.token_env}" if self.token_env else "a token (token_env is unset)"
            state = "is set" if self._token else "is not set"
            return f" (the bearer token comes from {where}, which {state})"
        if status == 404:
            return " (is the base URL right? give it without the /v1/... part)"
        if 300 <= status < 400:
            return " (redirects are not followed; give the final URL)"
        return ""

    def _count_failure(self) -> None:
        with self._lock:
            self.failures += 1

    def close(self) -> None:
        self._closed.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._session.close()


def _failed(future: Future) -> bool:
    return future.done() and not future.cancelled() and future.exception() is not None


def _base_url(url: str) -> str:
    """The URL as the base of every endpoint: checked, without a trailing slash. Never echoes credentials."""
    parts = urlsplit(url.strip())
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"http black box: expected a URL like http://host:port or https://host/prefix, "
                          f"got {url if '@' not in url else '(a URL with credentials)'!r}")
    if parts.username is not None or parts.password is not None:
        raise ConfigError("http black box: the URL carries credentials (user:password@); put the token in the "
                          "environment variable named by token_env (default CORTE_BLACKBOX_TOKEN) instead")
    if parts.query or parts.fragment:
        raise ConfigError(f"http black box: the base URL {url!r} must have no ?query or #fragment")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as err:
        raise ConfigError(f"http black box: {err} in {url!r}") from None
    return urlunsplit((parts.scheme.lower(), parts.netloc, parts.path.rstrip("/"), "", ""))


def _choose_answer(asked: str, topk: int, offered: list[str]) -> tuple[str, str]:
    """(the kind this box will answer, the X-Corte-Answer to send) given what the server offers.

    top-k can be made client-side from probabilities and a hard label from either, so a server offering
    probs serves every kind; otherwise the box answers the best kind it can that is no better than asked.
    """
    achievable = {"probs": "probs" in offered, "topk": bool({"probs", "topk"} & set(offered)), "hard": True}
    kind = next(k for k in ANSWER_KINDS[_KIND_RANK[asked]:] if achievable[k])
    if kind in offered:
        return kind, format_answer_header(kind, topk if kind == "topk" else None)
    # Ask for the best the server has that can be reduced client-side to `kind`.
    if kind == "hard" and "topk" in offered:
        return kind, format_answer_header("topk", 2)
    return kind, format_answer_header("probs")
