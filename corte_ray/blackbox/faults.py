"""Fault injection for tests, benchmarks and demos of a flaky vendor: not part of the reference server.

`FaultInjectingServer` is the reference server (server.py) with, on /v1/segment, a seeded fraction of requests
failing (503 with Retry-After: 0, 500, a hang longer than the client's timeout, or a connection dropped
mid-answer), optional latency on every request, and answers that can be held back past the client's timeout
after they were made (`late_answers`: the server answered, the client never saw it). It also counts how often
each image (the sha1 of its decoded RGB pixels) was answered, so a test can check that every image was answered
once: memory that grows per image, which is why it is here and not in the server.

`inject_client_faults(box, ...)` makes the same kinds of faults on the client's side of the wire: a connection
that fails before the request is sent, and an answer lost after the server made it (the server counts it, the
client sees a timeout).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import threading
from collections import Counter

import numpy as np
import requests
from requests.adapters import HTTPAdapter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..errors import ConfigError
from .server import BlackBoxServer

FAULT_KINDS = ("unavailable_503", "error_500", "hang", "drop")  # equally likely among injected faults
CLIENT_FAULT_KINDS = ("refused", "lost_answer")


class _QuietDroppedConnections(logging.Filter):
    """uvicorn logs an error for a response we cut off on purpose; these are the injected drops, not bugs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "injected drop" not in str(record.exc_info[1] if record.exc_info else "")


logging.getLogger("uvicorn.error").addFilter(_QuietDroppedConnections())


class _InjectedDrop(Exception):
    pass


class _DroppedResponse(Response):
    """Starts a 200 answer, sends a few bytes of it, and breaks the connection (uvicorn closes it)."""

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/x-corte-answer+npz"), (b"content-length", b"1000")]})
        await send({"type": "http.response.body", "body": b"PK\x03\x04", "more_body": True})
        raise _InjectedDrop("injected drop")


class FaultInjectingServer(BlackBoxServer):
    """The reference server with injected faults (see the module docstring).

    error_rate: fraction of /v1/segment requests that fail, split evenly over FAULT_KINDS by a RNG seeded with
    `seed`. A hang sleeps `fault_sleep` seconds (set it above the client's timeout), then drops the connection.
    latency: seconds added to every /v1/info and /v1/segment request.
    late_answers: the first N answers are made (and counted) but sent only after `fault_sleep` seconds.
    """

    def __init__(self, model_file, error_rate: float = 0.0, latency: float = 0.0, seed: int = 0,
                 fault_sleep: float = 5.0, late_answers: int = 0, **options) -> None:
        if not 0.0 <= error_rate <= 1.0:
            raise ConfigError(f"error_rate must be in [0, 1], got {error_rate}")
        if latency < 0 or fault_sleep < 0 or late_answers < 0:
            raise ConfigError(f"latency, fault_sleep and late_answers must be >= 0, got {latency}, {fault_sleep} "
                              f"and {late_answers}")
        super().__init__(model_file, **options)
        self.error_rate, self.latency, self.fault_sleep = error_rate, latency, fault_sleep
        self._late_left = late_answers
        self._rng = random.Random(seed)
        self._fault_lock = threading.Lock()
        self._faults: Counter[str] = Counter({kind: 0 for kind in FAULT_KINDS})
        self._answered_images: Counter[str] = Counter()
        self.late_sent = 0

    @property
    def stats(self) -> dict:
        """The server's counters, plus injected faults by kind and in total, and answered_images: sha1 of each
        answered image's RGB bytes (H*W*3, row-major) -> how often it was answered."""
        with self._fault_lock:
            return {**super().stats, "injected": dict(self._faults), "injected_total": sum(self._faults.values()),
                    "late_sent": self.late_sent, "answered_images": dict(self._answered_images)}

    async def _sleep(self, seconds: float) -> None:
        # In short steps, so that stop() wakes a request sleeping in a fault.
        end = asyncio.get_running_loop().time() + seconds
        while not self._stop_requested.is_set():
            left = end - asyncio.get_running_loop().time()
            if left <= 0:
                return
            await asyncio.sleep(min(left, 0.05))

    def _draw_fault(self) -> str | None:
        # One draw per request from one seeded stream: the number of faults over a run is reproducible even
        # though which image meets which fault depends on timing.
        with self._fault_lock:
            u = self._rng.random()
            if u >= self.error_rate:
                return None
            kind = FAULT_KINDS[min(int(u / self.error_rate * len(FAULT_KINDS)), len(FAULT_KINDS) - 1)]
            self._faults[kind] += 1
            return kind

    async def before_request(self, request: Request) -> None:
        if self.latency > 0:
            await self._sleep(self.latency)

    async def before_answer(self, request: Request) -> Response | None:
        fault = self._draw_fault()
        if fault == "hang":  # a timeout as the client sees it; then the connection closes unanswered
            await self._sleep(self.fault_sleep)
            return _DroppedResponse()
        if fault == "drop":
            return _DroppedResponse()
        if fault == "unavailable_503":
            return JSONResponse({"error": "injected fault: temporarily unavailable"}, status_code=503,
                                headers={"Retry-After": "0"})
        if fault == "error_500":
            return JSONResponse({"error": "injected fault: internal error"}, status_code=500)
        return None

    def on_answered(self, image: np.ndarray) -> None:
        digest = hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()
        with self._fault_lock:
            self._answered_images[digest] += 1

    async def _segment(self, request: Request) -> Response:
        response = await super()._segment(request)
        late = False
        if response.status_code == 200:
            with self._fault_lock:
                if self._late_left > 0:
                    self._late_left -= 1
                    self.late_sent += 1
                    late = True
        if late:  # answered and counted; the client has timed out when it would arrive
            await self._sleep(self.fault_sleep)
        return response


class _FaultyAdapter(HTTPAdapter):
    """An HTTPAdapter whose /v1/segment requests fail at a seeded rate, on the client's side of the wire."""

    def __init__(self, rate: float, seed: int, **options) -> None:
        super().__init__(**options)
        self.rate = rate
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.injected: Counter[str] = Counter({kind: 0 for kind in CLIENT_FAULT_KINDS})

    def send(self, request, **kwargs):
        kind = None
        if request.url.endswith("/v1/segment"):
            with self._lock:
                u = self._rng.random()
                if u < self.rate:
                    kind = CLIENT_FAULT_KINDS[min(int(u / self.rate * 2), 1)]
                    self.injected[kind] += 1
        if kind == "refused":
            raise requests.ConnectionError("injected fault: connection refused before sending")
        response = super().send(request, **kwargs)
        if kind == "lost_answer":
            response.content  # noqa: B018 - the server made and sent the answer; the client loses it
            response.close()
            raise requests.ReadTimeout("injected fault: the answer was lost after the server sent it")
        return response


def inject_client_faults(box, rate: float, seed: int = 0) -> Counter:
    """Make a fraction `rate` of `box`'s (an HttpBlackBox) /v1/segment requests fail on the client side.
    Returns the live counter of injected faults by kind."""
    adapter = _FaultyAdapter(rate, seed, pool_connections=1, pool_maxsize=box.concurrency, max_retries=0)
    box._session.mount("http://", adapter)
    box._session.mount("https://", adapter)
    return adapter.injected
