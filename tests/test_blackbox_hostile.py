"""The black-box server and client against hostile or broken peers, on loopback: real servers, raw sockets.

Each test feeds one bad input or fault and checks the clear error, the bounded resource (time, memory, a
thread), or the exact answer counts: tokens with stray whitespace or control characters, decompression
bombs, slow and lying clients, a failing model, a full model queue, oversized or lying answers, a timeout
after the server answered, plain http to a remote host, SIGTERM.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from corte_ray.blackbox.faults import FaultInjectingServer, inject_client_faults
from corte_ray.blackbox.http import HttpBlackBox, decode_answer, read_token
from corte_ray.blackbox.server import BlackBoxServer
from corte_ray.errors import ConfigError, CorteError
from corte_ray.export import export_model
from tests.tiny_net import TinySegNet

SECRET = "s3cr3t-t0ken-do-not-leak"
NUM_CLASSES = 6


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("hostile_box") / "box.pt"
    return export_model(TinySegNet().eval(), path, example_size=(16, 24), meta={"arch": "tiny"})


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height (8-bit RGB) with a token IDAT: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def box(url: str, **options) -> HttpBlackBox:
    options = {"timeout": 5.0, "backoff": 0.01, "max_backoff": 0.5, "token_env": None, **options}
    return HttpBlackBox(url, **options)


def post(url: str, body: bytes, **headers) -> requests.Response:
    return requests.post(url + "/v1/segment", data=body, timeout=10, headers={"Content-Type": "image/png", **headers})


# ------------------------------------------------------------------------------------------------ tokens
def test_token_from_a_crlf_file_is_stripped_and_works(model_file, monkeypatch):
    monkeypatch.setenv("CORTE_TEST_TOKEN", SECRET)
    monkeypatch.setenv("CORTE_CLIENT_TOKEN", SECRET + "\r\n")  # what `export T=$(cat token.txt)` gives from CRLF
    with BlackBoxServer(model_file, device="cpu", token_env="CORTE_TEST_TOKEN") as srv:
        with box(srv.url, token_env="CORTE_CLIENT_TOKEN") as client:
            image = np.zeros((1, 8, 8, 3), np.uint8)
            assert client.query(image).kind == "probs"
        assert srv.stats["answered"] == 1


@pytest.mark.parametrize("bad", [SECRET[:6] + "\r" + SECRET[6:], SECRET[:6] + " " + SECRET[6:], SECRET + "\u00e9"])
def test_a_token_that_cannot_be_a_header_is_refused_without_showing_it(model_file, monkeypatch, bad, capsys,
                                                                       tmp_path):
    monkeypatch.setenv("CORTE_BAD_TOKEN", bad)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    for make in (lambda: read_token("CORTE_BAD_TOKEN"),
                 lambda: HttpBlackBox("http://127.0.0.1:9", token_env="CORTE_BAD_TOKEN"),
                 lambda: BlackBoxServer(model_file, device="cpu", token_env="CORTE_BAD_TOKEN")):
        with pytest.raises(ConfigError, match=r"\$CORTE_BAD_TOKEN holds") as err:
            make()
        assert SECRET[:6] not in str(err.value) and SECRET[7:] not in str(err.value)
    # Through the CLI: one line, exit code 2, no traceback, no token.
    from corte_ray.cli import main

    rc = main(["label", "--dataset", "folder", "--root", str(tmp_path), "--out", str(tmp_path / "store"), "--engine", "local", "--blackbox", "http://127.0.0.1:9",
               "blackbox.token_env=CORTE_BAD_TOKEN"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "CORTE_BAD_TOKEN" in err and SECRET[7:] not in err


# ------------------------------------------------------------------------------------ size limits, bombs
def test_a_large_image_is_refused_from_its_header_before_the_model_runs(model_file):
    big = png(np.full((4096, 4096, 3), 7, np.uint8))  # ~50 KB: one colour compresses well
    with BlackBoxServer(model_file, device="cpu") as srv:
        t0 = time.perf_counter()
        answer = post(srv.url, big)
        elapsed = time.perf_counter() - t0
        assert answer.status_code == 413 and "4096x4096" in answer.json()["error"]
        assert elapsed < 2.0, elapsed
        bomb = post(srv.url, png_header_only(20000, 20000))  # Pillow's own bomb error: still a 413
        assert bomb.status_code == 413, bomb.json()
        assert srv.stats["answered"] == 0
    with BlackBoxServer(model_file, device="cpu", max_pixels=64 * 64) as srv:  # the limit is configurable
        assert post(srv.url, png(np.zeros((64, 65, 3), np.uint8))).status_code == 413
        assert post(srv.url, png(np.zeros((64, 64, 3), np.uint8))).status_code == 200


def _raw_request(url: str, headers: dict, body: bytes = b"") -> socket.socket:
    host, port = url.split("//")[1].split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock.sendall(f"POST /v1/segment HTTP/1.1\r\nHost: {host}\r\n{head}\r\n".encode() + body)
    return sock


def _status(sock: socket.socket) -> tuple[int, float]:
    t0 = time.perf_counter()
    first = sock.recv(4096).split(b"\r\n", 1)[0]
    return int(first.split()[1]), time.perf_counter() - t0


def test_the_token_and_size_are_checked_before_the_body_is_read(model_file, monkeypatch):
    monkeypatch.setenv("CORTE_TEST_TOKEN", SECRET)
    with BlackBoxServer(model_file, device="cpu", token_env="CORTE_TEST_TOKEN", body_timeout=30) as srv:
        # Headers promising 10 MB, no body sent: the answer comes at once, without waiting for the body.
        sock = _raw_request(srv.url, {"Content-Type": "image/png", "Content-Length": str(10 << 20),
                                      "Authorization": "Bearer wrong"})
        status, waited = _status(sock)
        sock.close()
        assert status == 401 and waited < 2
        sock = _raw_request(srv.url, {"Content-Type": "image/png", "Content-Length": str(1 << 30),
                                      "Authorization": f"Bearer {SECRET}"})
        status, waited = _status(sock)
        sock.close()
        assert status == 413 and waited < 2


def test_a_slow_client_gets_408_and_does_not_stall_the_others(model_file):
    with BlackBoxServer(model_file, device="cpu", body_timeout=1.0) as srv:
        slow = [_raw_request(srv.url, {"Content-Type": "image/png", "Content-Length": "5000"}, b"\x89PNG")
                for _ in range(8)]  # eight clients that stop after 4 bytes of their body
        t0 = time.perf_counter()
        ok = post(srv.url, png(np.zeros((16, 16, 3), np.uint8)))
        assert ok.status_code == 200 and time.perf_counter() - t0 < 1.0  # served while they dawdle
        for sock in slow:
            status, waited = _status(sock)
            sock.close()
            assert status == 408 and waited < 3
        assert srv.stats["client_errors"] == 8


def test_no_memory_grows_per_request(model_file):
    images = np.random.default_rng(0).integers(0, 256, size=(30, 8, 8, 3), dtype=np.uint8)
    with BlackBoxServer(model_file, device="cpu") as srv, box(srv.url) as client:
        client.query(images[:1])
        first = json.dumps(srv.stats)
        client.query(images[1:])
        after = json.dumps(srv.stats)
        assert srv.stats["answered"] == 30
    # The same counters, only bigger numbers: nothing per image or per request is kept.
    assert len(after) <= len(first) + 3  # requests 2 -> 31, segment_requests and answered 1 -> 30: a digit each
    assert json.loads(first).keys() == json.loads(after).keys()


class FailingModelServer(BlackBoxServer):
    def answer(self, image, kind, k):
        raise RuntimeError("CUDA error at /opt/vendor/secret_weights.bin line 42")


def test_a_5xx_body_says_what_failed_without_internals(model_file, caplog):
    with FailingModelServer(model_file, device="cpu") as srv:
        answer = post(srv.url, png(np.zeros((12, 20, 3), np.uint8)))
        assert answer.status_code == 500
        error = answer.json()["error"]
        assert "the model failed on a 12x20 image" in error and "secret_weights" not in error
        assert "RuntimeError" not in error and srv.stats["server_errors"] == 1
    assert "secret_weights" in caplog.text  # the details are in the server's own log


class SlowModelServer(BlackBoxServer):
    def answer(self, image, kind, k):
        time.sleep(1.0)
        return super().answer(image, kind, k)


def test_a_full_model_queue_answers_503_with_retry_after(model_file):
    with SlowModelServer(model_file, device="cpu", queue_timeout=0.3) as srv:
        results: list[requests.Response] = []
        threads = [threading.Thread(target=lambda: results.append(post(srv.url, png(np.zeros((8, 8, 3), np.uint8)))))
                   for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        statuses = sorted(r.status_code for r in results)
        assert statuses == [200, 503, 503], statuses
        busy = next(r for r in results if r.status_code == 503)
        assert busy.headers["Retry-After"] == "1" and "busy" in busy.json()["error"]
        assert srv.stats["busy"] == 2


# ----------------------------------------------------------------------------------- the client's caps
def _npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def _lying_npz(shape: tuple[int, ...]) -> bytes:
    """An npz whose probs.npy header claims `shape` but holds only a few bytes of data."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f2", "fortran_order": False, "shape": shape})
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("kind.npy", _npy(np.array("probs")))
        archive.writestr("num_classes.npy", _npy(np.array(NUM_CLASSES)))
        archive.writestr("probs.npy", header.getvalue() + b"\0" * 16)
    return buffer.getvalue()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_answer_arrays_are_checked_from_their_headers_before_reading():
    ok = _npz(kind=np.array("probs"), num_classes=np.array(NUM_CLASSES),
              probs=np.full((NUM_CLASSES, 4, 5), 1 / NUM_CLASSES, np.float16))
    assert decode_answer(ok, NUM_CLASSES, (4, 5)).probs.shape == (NUM_CLASSES, 4, 5)
    # A header claiming 6 x 40000 x 40000 (19 GB as float16): refused from the header, nothing allocated.
    with pytest.raises(ValueError, match=r"has shape \(6, 40000, 40000\), expected at most"):
        decode_answer(_lying_npz((NUM_CLASSES, 40000, 40000)), NUM_CLASSES, (4, 5))
    # A header that fits, data that does not: refused, not read past.
    with pytest.raises(ValueError, match="holds 16 bytes of data"):
        decode_answer(_lying_npz((NUM_CLASSES, 4, 5)), NUM_CLASSES, (4, 5))
    # A zip bomb: 200 MB of zeros that compress to ~200 KB.
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("probs.npy", b"\0" * (200 << 20))
    with pytest.raises(ValueError, match="bytes uncompressed, more than an answer"):
        decode_answer(bomb.getvalue(), NUM_CLASSES, (4, 5))


def test_an_oversized_answer_is_refused(model_file):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self._send(json.dumps({"num_classes": NUM_CLASSES, "answer_kinds": ["probs"], "model": "x"}).encode(),
                       "application/json")

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            self._send(b"\0" * (3 << 20), "application/x-corte-answer+npz")

        def _send(self, body, kind):
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        with box(f"http://127.0.0.1:{httpd.server_address[1]}", max_answer_bytes=1 << 20) as client:
            with pytest.raises(CorteError, match=r"answer of 3145728 bytes, over the limit of 1048576"):
                client.query(np.zeros((1, 8, 8, 3), np.uint8))
            assert client.retries == 0 and client.failures == 1
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_plain_http_to_a_remote_host_needs_an_opt_in():
    with pytest.raises(ConfigError, match="plain http to 192.0.2.1 sends the images"):
        HttpBlackBox("http://192.0.2.1:8080", token_env=None)
    # Opted in, the client really tries (and fails to reach a documentation-only address, quickly).
    with pytest.raises(CorteError, match="no answer within|connection failed"):
        HttpBlackBox("http://192.0.2.1:8080", token_env=None, allow_http=True, timeout=0.2, max_retries=0)


# ------------------------------------------------------------------------- a timeout after the answer
def test_a_timeout_after_the_server_answered_counts_once_in_the_budget_and_stores_once(model_file, tmp_path):
    from corte_ray.blackbox.store import LabelStore, label_dataset_local
    from corte_ray.data.datasets import open_dataset

    folder = tmp_path / "images"
    folder.mkdir()
    images = np.random.default_rng(3).integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"img{i}.png")
    dataset = open_dataset("folder", folder, split="train")
    with FaultInjectingServer(model_file, device="cpu", late_answers=1, fault_sleep=1.5) as srv:
        with box(srv.url, timeout=0.5, budget=10) as client:
            label_dataset_local(dataset, client, tmp_path / "store", batch_size=3)
            # One image was answered twice (its first answer arrived after the client gave up on it): both
            # requests are in the budget, each exactly once; the image is sent, and stored, once.
            assert client.requests_sent == 4 and client.budget_left == 6 and client.retries == 1
            assert client.images_sent == 3
        stats = srv.stats
    assert stats["answered"] == 4 and stats["late_sent"] == 1 and sorted(stats["answered_images"].values()) == [1, 1, 2]
    store = LabelStore(tmp_path / "store")
    assert store.keys() == ["img0", "img1", "img2"] and store.row_count() == 3


def test_a_retry_beyond_the_budget_fails_the_batch(model_file):
    with FaultInjectingServer(model_file, device="cpu", late_answers=1, fault_sleep=1.0) as srv:
        with box(srv.url, timeout=0.4, budget=1) as client:
            with pytest.raises(CorteError, match="query budget of 1 requests reached while retrying"):
                client.query(np.zeros((1, 8, 8, 3), np.uint8))
            assert client.requests_sent == 1


def test_client_side_faults_are_retried_until_each_image_is_answered_once(model_file):
    images = np.random.default_rng(4).integers(0, 256, size=(24, 8, 8, 3), dtype=np.uint8)
    with FaultInjectingServer(model_file, device="cpu") as srv, box(srv.url) as client:
        injected = inject_client_faults(client, rate=0.3, seed=1)
        got = client.query(images)
        stats = srv.stats
    assert len(got) == 24 and injected["refused"] > 0 and injected["lost_answer"] > 0
    assert client.retries == sum(injected.values()) and client.images_sent == 24
    # a lost answer was made by the server: it answered those images twice, every other image once
    assert stats["answered"] == 24 + injected["lost_answer"]


# ------------------------------------------------------------------------------------------- SIGTERM
def test_sigterm_stops_the_server_with_its_final_stats_line(model_file):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-m", "corte_ray.cli", "serve-blackbox", str(model_file),
                             "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        url = line.split(" at ")[1].split()[0]
        assert post(url, png(np.zeros((8, 8, 3), np.uint8))).status_code == 200
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopped: requests 1, segment_requests 1, answered 1" in err
