"""The reference black-box server: any local model file behind the HTTP wire format of `corte_ray.blackbox.http`.

It lets the demo and the tests run the HTTP path end to end (`corte-ray serve-blackbox MODEL`), and shows a
vendor what the contract looks like. It runs on a maintained stack, an ASGI app (Starlette) under uvicorn, and
treats every request as possibly hostile:
- the bearer token, the method, the Content-Type, the X-Corte-Answer header and the Content-Length are checked
  from the headers alone, before one byte of the body is read;
- a body must arrive within `body_timeout` seconds (a slow client costs a coroutine, never a thread) and be at
  most `max_body_bytes`;
- an image's size is read from its PNG header and checked against `max_pixels` (default 4 Mpx: 2048 x 2048)
  before it is decoded, so a decompression bomb is a 413, not minutes of the model and gigabytes of memory;
- open connections are capped (`max_connections`; uvicorn answers 503 beyond), and a request waits at most
  `queue_timeout` seconds for the model, then gets 503 with Retry-After;
- what it keeps between requests is a handful of counters (GET /v1/stats): no memory grows per request;
- a 5xx body says what failed in one line; the exception and its traceback go to the server's log only.

The model runs one request at a time (a lock), because `LocalBlackBox` promises nothing about concurrent calls.
Fault injection (errors, hangs, drops, latency) for tests and benchmarks is not here: it lives in a subclass,
`corte_ray.blackbox.faults.FaultInjectingServer`.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import logging
import signal
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import __version__
from ..errors import ConfigError
from .http import (ANSWER_HEADER, ANSWER_MEDIA_TYPE, INFO_PATH, SEGMENT_PATH, STATS_PATH, WIRE_VERSION,
                   encode_wire_answer, format_answer_header, is_loopback, parse_answer_header, read_token)
from .local import LocalBlackBox

log = logging.getLogger(__name__)

# Segmentation inputs are at most a few megapixels (Cityscapes is 2 Mpx); 4 Mpx leaves room and keeps one
# request to seconds of CPU and a few hundred MB of probabilities.
DEFAULT_MAX_PIXELS = 2048 * 2048
DEFAULT_MAX_BODY_BYTES = 32 << 20   # a 4 Mpx RGB PNG is at most ~12 MB, even incompressible


class _Refused(Exception):
    """A request refused with an HTTP status and a one-line reason (sent as {"error": reason})."""

    def __init__(self, status: int, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class BlackBoxServer:
    """A model file served over HTTP from a background thread. Bind happens at construction (so `url` is
    known at once, port 0 picking a free port); `start()` serves, `stop()` shuts down; also a context manager.

    max_pixels: the largest image (width x height) answered; larger ones get 413 before decoding.
    max_body_bytes: the largest request body; a larger Content-Length gets 413 before the body is read.
    body_timeout: seconds a client has to send its whole body (408 after).
    queue_timeout: seconds a request waits for the model before a 503 with Retry-After.
    max_connections: open connections at once (uvicorn answers 503 beyond).
    """

    def __init__(self, model_file: str | Path, host: str = "127.0.0.1", port: int = 0,
                 hard_labels_only: bool = False, token_env: str | None = None, device: str = "auto",
                 max_pixels: int = DEFAULT_MAX_PIXELS, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 body_timeout: float = 30.0, queue_timeout: float = 30.0, max_connections: int = 64) -> None:
        for name, value in (("max_pixels", max_pixels), ("max_body_bytes", max_body_bytes),
                            ("body_timeout", body_timeout), ("queue_timeout", queue_timeout),
                            ("max_connections", max_connections)):
            if not value > 0:
                raise ConfigError(f"serve-blackbox: {name} must be > 0, got {value}")
        self.token_env = token_env
        self._token: bytes | None = None
        if token_env:
            token = read_token(token_env)
            if token is None:
                raise ConfigError(f"token_env: the environment variable {token_env} is not set or empty; set it to "
                                  "the token clients must send, or serve without a token")
            self._token = token.encode()
        elif not is_loopback(host):
            log.warning("serving on %s without a token: anyone who can reach it can query the model", host)
        self.hard_labels_only = hard_labels_only
        self.max_pixels = int(max_pixels)
        self.max_body_bytes = int(max_body_bytes)
        self.body_timeout = float(body_timeout)
        self.queue_timeout = float(queue_timeout)
        self.max_connections = int(max_connections)
        self.box = LocalBlackBox(model_file, answer="probs", device=device, batch_size=1)
        self.num_classes = self.box.num_classes
        self.answer_kinds = ["hard"] if hard_labels_only else ["probs", "topk", "hard"]
        self.info = {"num_classes": self.num_classes, "answer_kinds": self.answer_kinds,
                     "model": str(self.box.meta.get("arch", Path(model_file).stem)),
                     "class_names": self.box.meta.get("class_names"), "wire_version": WIRE_VERSION,
                     "server": f"corte-ray-blackbox/{__version__}"}
        self._model_lock = threading.Lock()      # the model itself: one forward pass at a time
        self._model_gate: asyncio.Semaphore | None = None   # made on the server's event loop
        self._stats_lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._stop_requested = threading.Event()   # wait() returns, sleeping faults wake
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._uvicorn = None

        self.app = Starlette(routes=[Route(INFO_PATH, self._info, methods=["GET"]),
                                     Route(STATS_PATH, self._stats, methods=["GET"]),
                                     Route(SEGMENT_PATH, self._segment, methods=["POST"])])
        self.app.add_exception_handler(404, self._not_found)
        self.app.add_exception_handler(405, self._not_allowed)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((host, port))
        except OSError as err:
            self._socket.close()
            self.box.close()
            raise ConfigError(f"serve-blackbox: cannot listen on {host}:{port} ({err.strerror})") from None
        self._socket.listen(128)
        bound_host, bound_port = self._socket.getsockname()[:2]
        self.host, self.port = host, int(bound_port)
        url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.url = f"http://{url_host}:{self.port}"

    # ----------------------------------------------------------------------------------- lifecycle
    def start(self) -> BlackBoxServer:
        import uvicorn

        if self._thread is None:
            config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off",
                                    limit_concurrency=self.max_connections, timeout_keep_alive=15,
                                    timeout_graceful_shutdown=3, server_header=False, date_header=False,
                                    http="h11", loop="asyncio")
            self._uvicorn = uvicorn.Server(config)
            started = threading.Event()

            def run() -> None:
                async def main() -> None:
                    self._model_gate = asyncio.Semaphore(1)
                    started.set()
                    await self._uvicorn.serve(sockets=[self._socket])

                asyncio.run(main())

            # uvicorn installs signal handlers only in the main thread: here it installs none, and `serve()`
            # handles SIGTERM itself (so the final stats line is written).
            self._thread = threading.Thread(target=run, name=f"corte-blackbox-server:{self.port}", daemon=True)
            self._thread.start()
            started.wait(10)
            for _ in range(200):   # until uvicorn accepts connections
                if self._uvicorn.started:
                    break
                time.sleep(0.02)
            log.info("black box server for %s at %s (answers %s, max %d pixels)", self.box.path, self.url,
                     ", ".join(self.answer_kinds), self.max_pixels)
        return self

    def stop(self) -> None:
        """Stop serving and release the model. Safe to call twice; wakes requests sleeping in a fault."""
        self._stop_requested.set()
        if self._stopped:
            return
        self._stopped = True
        if self._thread is not None:
            self._uvicorn.should_exit = True
            self._thread.join(15)
        self._socket.close()
        self.box.close()

    def wait(self) -> None:
        """Block until `stop()` (from another thread, a signal handler, or a KeyboardInterrupt here)."""
        while not self._stop_requested.wait(0.5):
            pass

    def __enter__(self) -> BlackBoxServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --------------------------------------------------------------------------------------- stats
    @property
    def stats(self) -> dict:
        """A snapshot of the counters: requests (all endpoints), segment_requests, answered (200 answers of
        /v1/segment), client_errors (4xx sent), busy (503: the model queue was full), server_errors (500)."""
        with self._stats_lock:
            return {name: self._counts[name] for name in
                    ("requests", "segment_requests", "answered", "client_errors", "busy", "server_errors")}

    def _count(self, name: str, n: int = 1) -> None:
        with self._stats_lock:
            self._counts[name] += n

    def _authorised(self, header: str | None) -> bool:
        if self._token is None:
            return True
        return header is not None and hmac.compare_digest(header.encode("latin-1", "replace"),
                                                          b"Bearer " + self._token)

    # ------------------------------------------------------------------------------------ endpoints
    def _error(self, status: int, message: str, headers: dict | None = None) -> JSONResponse:
        self._count("client_errors" if status < 500 else ("busy" if status == 503 else "server_errors"))
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    async def _not_found(self, request: Request, exc: Exception) -> JSONResponse:
        self._count("requests")
        return self._error(404, f"{request.method} {request.url.path}: no such endpoint")

    async def _not_allowed(self, request: Request, exc: Exception) -> JSONResponse:
        self._count("requests")
        use = "POST" if request.url.path == SEGMENT_PATH else "GET"
        return self._error(405, f"{request.method} {request.url.path}: use {use}")

    def _unauthorised(self) -> JSONResponse:
        return self._error(401, "missing or wrong bearer token", {"WWW-Authenticate": 'Bearer realm="corte-ray"'})

    async def _info(self, request: Request) -> Response:
        self._count("requests")
        if not self._authorised(request.headers.get("authorization")):
            return self._unauthorised()
        await self.before_request(request)
        return JSONResponse(self.info)

    async def _stats(self, request: Request) -> Response:
        self._count("requests")
        if not self._authorised(request.headers.get("authorization")):
            return self._unauthorised()
        return JSONResponse(self.stats)

    async def _segment(self, request: Request) -> Response:
        self._count("requests")
        self._count("segment_requests")
        try:
            # Headers first: nothing of the body is read for a request that is refused anyway.
            if not self._authorised(request.headers.get("authorization")):
                return self._unauthorised()
            kind, k = self._check_headers(request)
            await self.before_request(request)
            body = await self._read_body(request)
            image = await asyncio.to_thread(self.decode_png, body)
            injected = await self.before_answer(request)
            if injected is not None:
                return injected
            kind, k, payload = await self._answer_in_turn(image, kind, k)
        except _Refused as refused:
            return self._error(refused.status, refused.message, refused.headers)
        except ClientDisconnect:
            return Response(status_code=499)   # nobody reads it; the connection is gone
        self._count("answered")
        self.on_answered(image)
        return Response(payload, media_type=ANSWER_MEDIA_TYPE,
                        headers={ANSWER_HEADER: format_answer_header(kind, k)})

    def _check_headers(self, request: Request) -> tuple[str | None, int | None]:
        try:
            kind, k = parse_answer_header(request.headers.get(ANSWER_HEADER))
        except ValueError as err:
            raise _Refused(400, str(err)) from None
        if kind == "topk" and not 2 <= k <= self.num_classes:
            raise _Refused(400, f"topk needs 2 <= k <= num_classes={self.num_classes}, got k={k}")
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "image/png":
            raise _Refused(415, f"send the image as image/png, got Content-Type {media_type or '(none)'!r}")
        length = request.headers.get("content-length", "")
        if not length.strip().isdigit():
            raise _Refused(411, "send the body with a Content-Length")
        if int(length) > self.max_body_bytes:
            raise _Refused(413, f"body of {int(length)} bytes is over the limit of {self.max_body_bytes}")
        return kind, k

    async def _read_body(self, request: Request) -> bytes:
        """The body, read within body_timeout and never beyond max_body_bytes (a lying Content-Length)."""
        chunks: list[bytes] = []
        size = 0

        async def read() -> None:
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_body_bytes:
                    raise _Refused(413, f"body over the limit of {self.max_body_bytes} bytes")
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), self.body_timeout)
        except asyncio.TimeoutError:
            raise _Refused(408, f"the body did not arrive within {self.body_timeout:g} s") from None
        return b"".join(chunks)

    async def _answer_in_turn(self, image: np.ndarray, kind: str | None, k: int | None):
        """Wait (at most queue_timeout) for the model, then answer in a worker thread."""
        try:
            await asyncio.wait_for(self._model_gate.acquire(), self.queue_timeout)
        except asyncio.TimeoutError:
            raise _Refused(503, f"busy: the model queue did not free up within {self.queue_timeout:g} s",
                           {"Retry-After": "1"}) from None
        try:
            return await asyncio.to_thread(self.answer, image, kind, k)
        except Exception:  # a model failure is the server's fault: 500, its traceback in our log only
            log.exception("black box server: the model failed on a %dx%d image", *image.shape[:2])
            raise _Refused(500, f"the model failed on a {image.shape[0]}x{image.shape[1]} image "
                                "(details in the server's log)") from None
        finally:
            self._model_gate.release()

    # ---------------------------------------------------------------------------- subclass hooks
    async def before_request(self, request: Request) -> None:
        """Called once the headers are accepted (a fault-injecting subclass adds latency here)."""

    async def before_answer(self, request: Request) -> Response | None:
        """Called with a decoded image before the model runs; a Response returned here is sent instead."""
        return None

    def on_answered(self, image: np.ndarray) -> None:
        """Called for each 200 answer (a test subclass counts answers per image here)."""

    # ------------------------------------------------------------------------------------- answers
    def decode_png(self, body: bytes) -> np.ndarray:
        """(H,W,3) uint8 RGB from PNG bytes; refuses a non-PNG (400) and, from the header alone, an image
        over max_pixels (413), before decoding any pixel."""
        try:
            image = Image.open(io.BytesIO(body))
        except Image.DecompressionBombError as err:   # Pillow's own, far larger limit: the same answer as ours
            raise _Refused(413, f"image over the limit of {self.max_pixels} pixels ({err})") from None
        except Exception:
            raise _Refused(400, "the body is not an image (send a PNG)") from None
        if image.format != "PNG":
            raise _Refused(400, f"the body is a {image.format} image; send a PNG")
        width, height = image.size
        if width * height > self.max_pixels:
            raise _Refused(413, f"image of {width}x{height} pixels is over the limit of {self.max_pixels}")
        try:
            image.load()
        except Exception as err:
            raise _Refused(400, f"the PNG is truncated or corrupt ({type(err).__name__})") from None
        if image.mode != "RGB":
            image = image.convert("RGB")
        return np.array(image, dtype=np.uint8)  # a writable copy: torch warns about wrapping read-only arrays

    def answer(self, image: np.ndarray, kind: str | None, k: int | None) -> tuple[str, int | None, bytes]:
        """(kind answered, k, npz body) for one (H,W,3) uint8 image asked as (kind, k)."""
        if self.hard_labels_only or kind == "hard":
            kind = "hard"
        elif kind is None:
            kind = "probs"
        with self._model_lock:
            probs = self.box.query(image[None]).probs[0]  # (C,H,W) float32
        if kind == "probs":
            return kind, None, encode_wire_answer("probs", self.num_classes, probs=probs.numpy())
        if kind == "topk":
            # Top-k from the float32 probabilities, before the float16 rounding of the wire.
            top = torch.topk(probs, k, dim=0)
            return kind, k, encode_wire_answer("topk", self.num_classes, topk_ids=top.indices.numpy(),
                                               topk_probs=top.values.numpy())
        return kind, None, encode_wire_answer("hard", self.num_classes, hard=probs.argmax(dim=0).numpy())


def serve(server: BlackBoxServer, ready_callback: Callable[[BlackBoxServer], None] | None = None) -> dict:
    """Serve until Ctrl-C, SIGTERM, or someone calls `.stop()` on the server (which `ready_callback` receives
    once it accepts connections). Prints the URL to stdout and, at the end, one line of final stats to stderr.
    Returns the final stats."""
    stop_signals = (signal.SIGTERM, signal.SIGINT) if hasattr(signal, "SIGTERM") else (signal.SIGINT,)
    previous: dict = {}
    if threading.current_thread() is threading.main_thread():
        # A container runtime or systemd stops us with SIGTERM: shut down cleanly and say what was served.
        for sig in stop_signals:
            previous[sig] = signal.signal(sig, lambda *_: server._stop_requested.set())
    try:
        server.start()
        print(f"serving black box {server.box.path} at {server.url} (Ctrl-C to stop)", flush=True)
        if ready_callback is not None:
            ready_callback(server)
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    stats = server.stats
    import sys

    print(f"black box server at {server.url} stopped: " + ", ".join(f"{k} {v}" for k, v in stats.items()),
          file=sys.stderr, flush=True)
    return stats
