"""The reference black-box server: any local model file behind the HTTP wire format of `corte_ray.blackbox.http`.

It lets the demo and the tests run the HTTP path end to end (`corte-ray serve-blackbox MODEL`), and shows a
vendor what the contract looks like in ~300 lines of standard library. For tests it injects faults: a
seeded fraction of /v1/segment requests fails (503 with Retry-After: 0, 500, a hang longer than the
client's timeout, or a dropped connection), every request can be slowed down, and the server can be
restricted to hard labels. GET /v1/stats reports what happened, including how often each image (by the
sha1 of its decoded RGB pixels) was answered, so a test can check that every image was answered once.

Built on `http.server.ThreadingHTTPServer` (one thread per connection, HTTP/1.1 keep-alive): enough for a
reference and for tests, not a production server. The model runs one request at a time (a lock), because
`LocalBlackBox` promises nothing about concurrent calls; latency and faults do not hold the lock.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import os
import random
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from .. import __version__
from ..errors import ConfigError
from .http import (ANSWER_HEADER, ANSWER_MEDIA_TYPE, INFO_PATH, SEGMENT_PATH, STATS_PATH, WIRE_VERSION,
                   encode_answer, format_answer_header, is_loopback, parse_answer_header)
from .local import LocalBlackBox

log = logging.getLogger(__name__)

FAULT_KINDS = ("unavailable_503", "error_500", "hang", "drop")  # equally likely among injected faults
MAX_BODY_BYTES = 64 << 20
MAX_PIXELS = 64 << 20


class BlackBoxServer:
    """A model file served over HTTP from a background thread. Bind happens at construction (so `url` is
    known at once, port 0 picking a free port); `start()` serves, `stop()` shuts down; also a context manager.

    error_rate: fraction of /v1/segment requests that fail, split evenly over FAULT_KINDS by a RNG seeded
    with `seed` (half are HTTP 5xx, half a timeout-like hang or a dropped connection). A hang sleeps
    `fault_sleep` seconds (set it above the client's timeout) and then closes the connection unanswered.
    latency: seconds added to every /v1/info and /v1/segment request.
    """

    def __init__(self, model_file: str | Path, host: str = "127.0.0.1", port: int = 0, error_rate: float = 0.0,
                 latency: float = 0.0, hard_labels_only: bool = False, token_env: str | None = None,
                 device: str = "auto", seed: int = 0, fault_sleep: float = 5.0) -> None:
        if not 0.0 <= error_rate <= 1.0:
            raise ConfigError(f"error_rate must be in [0, 1], got {error_rate}")
        if latency < 0 or fault_sleep < 0:
            raise ConfigError(f"latency and fault_sleep must be >= 0, got {latency} and {fault_sleep}")
        self.token_env = token_env
        self._token: bytes | None = None
        if token_env:
            token = os.environ.get(token_env, "")
            if not token:
                raise ConfigError(f"token_env: the environment variable {token_env} is not set or empty; set it to "
                                  "the token clients must send, or serve without a token")
            self._token = token.encode()
        elif not is_loopback(host):
            log.warning("serving on %s without a token: anyone who can reach it can query the model", host)
        self.error_rate = error_rate
        self.latency = latency
        self.hard_labels_only = hard_labels_only
        self.fault_sleep = fault_sleep
        self.box = LocalBlackBox(model_file, answer="probs", device=device)
        self.num_classes = self.box.num_classes
        self.answer_kinds = ["hard"] if hard_labels_only else ["probs", "topk", "hard"]
        self.info = {"num_classes": self.num_classes, "answer_kinds": self.answer_kinds,
                     "model": str(self.box.meta.get("arch", Path(model_file).stem)),
                     "class_names": self.box.meta.get("class_names"), "wire_version": WIRE_VERSION,
                     "server": f"corte-ray-blackbox/{__version__}"}
        self._rng = random.Random(seed)
        self._model_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._faults: Counter[str] = Counter({kind: 0 for kind in FAULT_KINDS})
        self._answered_images: Counter[str] = Counter()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

        server_class = _IPv6Server if ":" in host else _Server
        self._httpd = server_class((host, port), _Handler)
        self._httpd.app = self
        bound_host, bound_port = self._httpd.server_address[:2]
        self.host, self.port = host, int(bound_port)
        url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.url = f"http://{url_host}:{self.port}"

    # ----------------------------------------------------------------------------------- lifecycle
    def start(self) -> BlackBoxServer:
        if self._thread is None:
            self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                            name=f"corte-blackbox-server:{self.port}", daemon=True)
            self._thread.start()
            log.info("black box server for %s at %s (answers %s, error_rate %g, latency %g s)", self.box.path,
                     self.url, ", ".join(self.answer_kinds), self.error_rate, self.latency)
        return self

    def stop(self) -> None:
        """Stop serving and release the model. Safe to call twice; wakes requests sleeping in a fault."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()
        self.box.close()

    def wait(self) -> None:
        """Block until `stop()` (from another thread, or a KeyboardInterrupt here)."""
        while not self._stopping.wait(0.5):
            pass

    def __enter__(self) -> BlackBoxServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --------------------------------------------------------------------------------------- stats
    @property
    def stats(self) -> dict:
        """A snapshot: requests (all endpoints), answered (successful /v1/segment answers), injected faults by
        kind and in total, client_errors (4xx sent), server_errors (500s not injected), and answered_images:
        sha1 of each answered image's RGB bytes (H*W*3, row-major) -> how often it was answered."""
        with self._stats_lock:
            return {"requests": self._counts["requests"], "segment_requests": self._counts["segment_requests"],
                    "answered": self._counts["answered"], "injected": dict(self._faults),
                    "injected_total": sum(self._faults.values()), "client_errors": self._counts["client_errors"],
                    "server_errors": self._counts["server_errors"],
                    "answered_images": dict(self._answered_images)}

    def _count(self, name: str) -> None:
        with self._stats_lock:
            self._counts[name] += 1

    def _record_answer(self, image: np.ndarray) -> str:
        digest = hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()
        with self._stats_lock:
            self._counts["answered"] += 1
            self._answered_images[digest] += 1
        return digest

    def _unrecord_answer(self, digest: str) -> None:
        with self._stats_lock:
            self._counts["answered"] -= 1
            self._answered_images[digest] -= 1
            if self._answered_images[digest] == 0:
                del self._answered_images[digest]

    def _draw_fault(self) -> str | None:
        # One draw per request from one seeded stream: the number of faults over a run is reproducible even
        # though which image meets which fault depends on thread timing.
        with self._stats_lock:
            u = self._rng.random()
            if u >= self.error_rate:
                return None
            kind = FAULT_KINDS[min(int(u / self.error_rate * len(FAULT_KINDS)), len(FAULT_KINDS) - 1)]
            self._faults[kind] += 1
            return kind

    def _authorised(self, header: str | None) -> bool:
        if self._token is None:
            return True
        return header is not None and hmac.compare_digest(header.encode(), b"Bearer " + self._token)

    # ------------------------------------------------------------------------------------- answers
    def answer(self, image: np.ndarray, kind: str | None, k: int | None) -> tuple[str, int | None, bytes]:
        """(kind answered, k, npz body) for one (H,W,3) uint8 image asked as (kind, k)."""
        if self.hard_labels_only or kind == "hard":
            kind = "hard"
        elif kind is None:
            kind = "probs"
        with self._model_lock:
            probs = self.box.query(image[None]).probs[0]  # (C,H,W) float32
        if kind == "probs":
            return kind, None, encode_answer("probs", self.num_classes, probs=probs.numpy())
        if kind == "topk":
            # Top-k from the float32 probabilities, before the float16 rounding of the wire.
            top = torch.topk(probs, k, dim=0)
            return kind, k, encode_answer("topk", self.num_classes, topk_ids=top.indices.numpy(),
                                          topk_probs=top.values.numpy())
        return kind, None, encode_answer("hard", self.num_classes, hard=probs.argmax(dim=0).numpy())


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a hung fault or an idle keep-alive connection must not block shutdown
    app: BlackBoxServer


class _IPv6Server(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the client's connection pool reuses connections
    server_version = f"corte-ray-blackbox/{__version__}"
    timeout = 60  # idle keep-alive connections are closed after this many seconds
    server: _Server

    # ------------------------------------------------------------------------------------- routing
    def do_GET(self) -> None:
        app = self.server.app
        app._count("requests")
        path = self.path.split("?", 1)[0]
        if path not in (INFO_PATH, STATS_PATH):
            status = 405 if path == SEGMENT_PATH else 404
            return self._send_error(status, f"GET {path}: " + ("use POST" if status == 405 else "no such endpoint"))
        if not app._authorised(self.headers.get("Authorization")):
            return self._send_unauthorised()
        if path == INFO_PATH:
            self._sleep(app.latency)
            return self._send_json(200, app.info)
        return self._send_json(200, app.stats)

    def do_POST(self) -> None:
        app = self.server.app
        app._count("requests")
        path = self.path.split("?", 1)[0]
        body = self._read_body()
        if body is None:
            return
        if path != SEGMENT_PATH:
            status = 405 if path in (INFO_PATH, STATS_PATH) else 404
            return self._send_error(status, f"POST {path}: " + ("use GET" if status == 405 else "no such endpoint"))
        app._count("segment_requests")
        if not app._authorised(self.headers.get("Authorization")):
            return self._send_unauthorised()
        self._sleep(app.latency)
        try:
            kind, k = parse_answer_header(self.headers.get(ANSWER_HEADER))
        except ValueError as err:
            return self._send_error(400, str(err))
        if kind == "topk" and not 2 <= k <= app.num_classes:
            return self._send_error(400, f"topk needs 2 <= k <= num_classes={app.num_classes}, got k={k}")
        media_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if media_type != "image/png":
            return self._send_error(415, f"send the image as image/png, got Content-Type {media_type or '(none)'!r}")

        fault = app._draw_fault()
        if fault == "hang":  # a timeout as the client sees it; then the connection closes unanswered
            self._sleep(app.fault_sleep)
            self.close_connection = True
            return
        if fault == "drop":  # the connection closes without a response
            self.close_connection = True
            return
        if fault == "unavailable_503":
            return self._send_json(503, {"error": "injected fault: temporarily unavailable"}, {"Retry-After": "0"})
        if fault == "error_500":
            return self._send_json(500, {"error": "injected fault: internal error"})

        try:
            image = _decode_png(body)
        except ValueError as err:
            return self._send_error(400, str(err))
        except _TooLarge as err:
            return self._send_error(413, str(err))
        try:
            kind, k, payload = app.answer(image, kind, k)
        except Exception as err:  # a model failure is the server's fault: 500, logged with its traceback
            log.exception("black box server: the model failed on a %dx%d image", *image.shape[:2])
            app._count("server_errors")
            return self._send_json(500, {"error": f"the model failed: {type(err).__name__}: {err}"})
        # Counted before sending, so a client that has its answer also finds it in /v1/stats; taken back when
        # the client has gone (it timed out and will ask again).
        digest = app._record_answer(image)
        if not self._send(200, payload, ANSWER_MEDIA_TYPE, {ANSWER_HEADER: format_answer_header(kind, k)}):
            app._unrecord_answer(digest)

    # ------------------------------------------------------------------------------------- helpers
    def _read_body(self) -> bytes | None:
        """The request body; None (after answering) when it is missing or too large. Read before any other
        check, so an early error leaves the keep-alive connection clean and the client reads our answer."""
        length = self.headers.get("Content-Length")
        if length is None or not length.strip().isdigit():
            self._send_error(411, "send the body with a Content-Length", close=True)
            return None
        if int(length) > MAX_BODY_BYTES:
            self._send_error(413, f"body of {int(length)} bytes is over the limit of {MAX_BODY_BYTES}", close=True)
            return None
        try:
            return self.rfile.read(int(length))
        except OSError:
            self.close_connection = True
            return None

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            self.server.app._stopping.wait(seconds)

    def _send_unauthorised(self) -> None:
        self._send_error(401, "missing or wrong bearer token", {"WWW-Authenticate": 'Bearer realm="corte-ray"'})

    def _send_error(self, status: int, message: str, headers: dict | None = None, close: bool = False) -> None:
        self.server.app._count("client_errors")
        self._send_json(status, {"error": message}, headers, close=close)

    def _send_json(self, status: int, obj: object, headers: dict | None = None, close: bool = False) -> bool:
        return self._send(status, json.dumps(obj).encode(), "application/json", headers, close)

    def _send(self, status: int, body: bytes, content_type: str, headers: dict | None = None,
              close: bool = False) -> bool:
        """Write a whole response; False when the client has gone (its answer then does not count)."""
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
            return True
        except OSError:  # broken pipe / reset: the client timed out or went away
            self.close_connection = True
            return False

    def log_message(self, format: str, *args: object) -> None:
        # Request lines only (never headers, so never the token), at debug level: a busy labelling job would
        # otherwise print a line per image.
        log.debug("%s %s", self.address_string(), format % args)


class _TooLarge(Exception):
    pass


def _decode_png(body: bytes) -> np.ndarray:
    """(H,W,3) uint8 RGB from PNG bytes; ValueError when it is not a PNG, _TooLarge over MAX_PIXELS."""
    try:
        image = Image.open(io.BytesIO(body))
    except Exception:
        raise ValueError("the body is not an image (send a PNG)") from None
    if image.format != "PNG":
        raise ValueError(f"the body is a {image.format} image; send a PNG")
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise _TooLarge(f"image of {width}x{height} pixels is over the limit of {MAX_PIXELS}")
    try:
        image.load()
    except Exception as err:
        raise ValueError(f"the PNG is truncated or corrupt ({err})") from None
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.array(image, dtype=np.uint8)  # a writable copy: torch warns about wrapping read-only arrays


def serve(model_file: str | Path, host: str = "127.0.0.1", port: int = 0, error_rate: float = 0.0,
          latency: float = 0.0, hard_labels_only: bool = False, token_env: str | None = None, device: str = "auto",
          seed: int = 0, ready_callback: Callable[[BlackBoxServer], None] | None = None,
          fault_sleep: float = 5.0) -> None:
    """Serve `model_file` until interrupted (Ctrl-C) or until someone calls `.stop()` on the server that
    `ready_callback` receives once it is accepting connections. Prints the URL to stdout."""
    server = BlackBoxServer(model_file, host=host, port=port, error_rate=error_rate, latency=latency,
                            hard_labels_only=hard_labels_only, token_env=token_env, device=device, seed=seed,
                            fault_sleep=fault_sleep)
    try:
        server.start()
        print(f"serving black box {model_file} at {server.url} (Ctrl-C to stop)", flush=True)
        if ready_callback is not None:
            ready_callback(server)
        server.wait()
    except KeyboardInterrupt:
        log.info("black box server at %s: interrupted", server.url)
    finally:
        server.stop()
        log.info("black box server at %s stopped: %s", server.url,
                 {k: v for k, v in server.stats.items() if k != "answered_images"})
