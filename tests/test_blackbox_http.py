"""The HTTP black box and the reference server, on loopback: answers equal the local box's, faults are retried
until every image is answered exactly once, and the client's error paths (429, 4xx, budget, refused
connections) behave as the wire format says, without ever showing the token."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from corte_ray.blackbox import LocalBlackBox, open_blackbox
from corte_ray.blackbox.http import HttpBlackBox, parse_answer_header, parse_retry_after
from corte_ray.blackbox.faults import FAULT_KINDS, FaultInjectingServer
from corte_ray.blackbox.server import BlackBoxServer, serve
from corte_ray.errors import ConfigError, CorteError
from corte_ray.export import export_model
from tests.tiny_net import TinySegNet

NUM_CLASSES = 6
SECRET = "s3cr3t-t0ken-do-not-leak"


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("http_box") / "box.pt"
    return export_model(TinySegNet().eval(), path, example_size=(16, 24), meta={"arch": "tiny"})


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(6, 32, 48, 3), dtype=np.uint8)


@pytest.fixture
def server(model_file):
    with BlackBoxServer(model_file, device="cpu") as srv:
        yield srv


def fast_box(url: str, **options) -> HttpBlackBox:
    """A client with test-sized timeouts and backoff, no token."""
    options = {"timeout": 5.0, "backoff": 0.01, "max_backoff": 1.0, "token_env": None, **options}
    return HttpBlackBox(url, **options)


def sha1(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


# --------------------------------------------------------------------------- reference server vs local box
@pytest.mark.parametrize("answer", ["probs", "topk", "hard"])
def test_http_answers_equal_local_answers(server, model_file, images, answer):
    local = LocalBlackBox(model_file, answer=answer, topk=3, device="cpu").query(images)
    with fast_box(server.url, answer=answer, topk=3) as box:
        got = box.query(images)
        assert box.answer_kind == answer and box.num_classes == NUM_CLASSES and box.name == server.url
        assert box.images_sent == 6 and box.retries == 0 and box.failures == 0
    assert got.kind == answer and len(got) == 6
    if answer == "probs":
        assert got.probs.dtype == torch.float32 and got.probs.shape == local.probs.shape
        # float16 on the wire: absolute error <= 2**-12 for probabilities in [0, 1]
        torch.testing.assert_close(got.probs, local.probs, atol=2.5e-4, rtol=0)
        assert (got.top1() == local.top1()).float().mean() > 0.999  # only float16 near-ties may flip
    elif answer == "topk":
        assert got.k == 3 and torch.equal(got.topk_ids, local.topk_ids)
        torch.testing.assert_close(got.topk_probs, local.topk_probs, atol=2.5e-4, rtol=0)
    else:
        assert got.hard.dtype == torch.long and torch.equal(got.hard, local.hard)
    assert server.stats["answered"] == 6


def test_hard_labels_only_server(model_file, images, caplog):
    with BlackBoxServer(model_file, device="cpu", hard_labels_only=True) as srv:
        info = requests.get(srv.url + "/v1/info", timeout=5).json()
        assert info["answer_kinds"] == ["hard"]
        with caplog.at_level(logging.WARNING, logger="corte_ray"), fast_box(srv.url, answer="probs") as box:
            assert box.answer_kind == "hard"  # known from /v1/info before any query
            got = box.query(images)
        # Asked for top-k anyway (a client that ignores /v1/info), the server still answers hard labels.
        raw = requests.post(srv.url + "/v1/segment", data=_png(images[0]), timeout=5,
                            headers={"Content-Type": "image/png", "X-Corte-Answer": "topk;k=2"})
        with np.load(io.BytesIO(raw.content)) as npz:
            assert str(npz["kind"]) == "hard" and set(npz.files) == {"kind", "num_classes", "hard"}
    assert "offers only hard" in caplog.text
    assert got.kind == "hard"
    assert torch.equal(got.hard, LocalBlackBox(model_file, answer="hard", device="cpu").query(images).hard)


def test_info_stats_and_request_errors(server, images):
    info = requests.get(server.url + "/v1/info", timeout=5).json()
    assert info["num_classes"] == NUM_CLASSES and info["model"] == "tiny"
    assert info["answer_kinds"] == ["probs", "topk", "hard"] and info["wire_version"] == 1

    def post(body: bytes, **headers) -> requests.Response:
        return requests.post(server.url + "/v1/segment", data=body, timeout=5,
                             headers={"Content-Type": "image/png", **headers})

    png = _png(images[0])
    assert post(png, **{"X-Corte-Answer": "topk"}).status_code == 400  # k missing
    assert post(png, **{"X-Corte-Answer": "topk;k=9"}).status_code == 400  # k > num_classes
    bad = post(b"not a png")
    assert bad.status_code == 400 and "PNG" in bad.json()["error"]
    assert post(png, **{"Content-Type": "image/jpeg"}).status_code == 415
    assert requests.get(server.url + "/v1/segment", timeout=5).status_code == 405
    assert requests.get(server.url + "/v2/nothing", timeout=5).status_code == 404
    ok = post(png, **{"X-Corte-Answer": "topk;k=2"})
    assert ok.status_code == 200 and ok.headers["Content-Type"] == "application/x-corte-answer+npz"
    with np.load(io.BytesIO(ok.content), allow_pickle=False) as npz:
        assert str(npz["kind"]) == "topk" and int(npz["num_classes"]) == NUM_CLASSES
        assert npz["topk_ids"].dtype == np.uint8 and npz["topk_ids"].shape == (2, 32, 48)
        assert npz["topk_probs"].dtype == np.float16
    stats = requests.get(server.url + "/v1/stats", timeout=5).json()
    assert stats["answered"] == 1 and stats["client_errors"] == 6 and stats["server_errors"] == 0
    assert "answered_images" not in stats  # the reference server keeps no memory per image


# ---------------------------------------------------------------------------------------- fault injection
def test_every_image_answered_exactly_once_under_faults(model_file):
    images = np.random.default_rng(1).integers(0, 256, size=(40, 32, 48, 3), dtype=np.uint8)
    # seed 2 injects every fault kind in the first 40 answers (the fault stream is one seeded draw per request)
    with FaultInjectingServer(model_file, device="cpu", error_rate=0.2, seed=2, fault_sleep=0.8) as srv:
        t0 = time.perf_counter()
        with fast_box(srv.url, timeout=0.5, backoff=0.02) as box:
            got = box.query(images)
        elapsed = time.perf_counter() - t0
        stats = srv.stats
    assert elapsed < 20
    assert stats["answered"] == 40
    assert stats["answered_images"] == {sha1(image): 1 for image in images}  # each image once, no other
    assert all(stats["injected"][kind] >= 1 for kind in FAULT_KINDS), stats["injected"]
    # every injected fault cost the client exactly one retry, and nothing else did
    assert box.retries == stats["injected_total"] > 0
    assert box.failures == 0 and box.images_sent == 40
    local = LocalBlackBox(model_file, device="cpu").query(images)
    torch.testing.assert_close(got.probs, local.probs, atol=2.5e-4, rtol=0)


# ---------------------------------------------------------------------- a scripted vendor, written by hand
C_STUB = 4
WEIGHTS = np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32)  # p((label + j) % C) = WEIGHTS[j]


def stub_label(image: np.ndarray) -> np.ndarray:
    return (image[..., 0] % C_STUB).astype(np.int64)


def stub_probs(image: np.ndarray) -> np.ndarray:
    label = stub_label(image)
    probs = np.zeros((C_STUB, *label.shape), np.float32)
    for j, w in enumerate(WEIGHTS):
        np.put_along_axis(probs, ((label + j) % C_STUB)[None], w, axis=0)
    return probs


class StubVendor:
    """A vendor endpoint written independently of corte_ray.blackbox.server: answers made with np.savez by
    hand (hard = red channel mod 4, probs = fixed weights rotated by that label), scripted error responses
    for the first requests, and a log of what it received."""

    def __init__(self, answer_kinds=("probs", "topk", "hard"), script=(), reply=None) -> None:
        self.info = {"num_classes": C_STUB, "answer_kinds": list(answer_kinds), "model": "stub"}
        self.script = list(script)  # (status, headers, json body) for the next /v1/segment requests
        self.reply = reply or (lambda image, ask: "probs")  # which kind to answer this image with
        self.received: list[dict] = []
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self._send(200, "application/json", json.dumps(stub.info).encode())

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                image = np.array(Image.open(io.BytesIO(body)))
                with stub.lock:
                    stub.received.append({"auth": self.headers.get("Authorization"),
                                          "ask": self.headers.get("X-Corte-Answer"), "image": image})
                    scripted = stub.script.pop(0) if stub.script else None
                if scripted is not None:
                    status, headers, doc = scripted
                    text = json.dumps(doc).replace("{auth}", str(self.headers.get("Authorization")))
                    return self._send(status, "application/json", text.encode(), headers)
                kind = stub.reply(image, self.headers.get("X-Corte-Answer"))
                arrays = {"kind": np.array(kind), "num_classes": np.array(C_STUB)}
                if kind == "probs":
                    arrays["probs"] = stub_probs(image).astype(np.float16)
                elif kind.startswith("topk"):
                    k = int(kind.split("=")[1])
                    ids = (stub_label(image)[None] + np.arange(k)[:, None, None]) % C_STUB
                    arrays.update(kind=np.array("topk"), topk_ids=ids.astype(np.uint8),
                                  topk_probs=np.broadcast_to(WEIGHTS[:k, None, None], ids.shape).astype(np.float16))
                else:
                    arrays["hard"] = stub_label(image).astype(np.uint8)
                buffer = io.BytesIO()
                np.savez_compressed(buffer, **arrays)
                self._send(200, "application/x-corte-answer+npz", buffer.getvalue())

            def _send(self, status, content_type, body, headers=None):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def stub_images() -> np.ndarray:
    return np.random.default_rng(2).integers(0, 256, size=(4, 8, 12, 3), dtype=np.uint8)


def test_client_decodes_a_hand_written_vendor(stub_images):
    with StubVendor() as stub, fast_box(stub.url + "/") as box:
        assert box.name == stub.url  # trailing slash dropped
        got = box.query(stub_images)
    assert stub.received[0]["ask"] == "probs" and stub.received[0]["auth"] is None
    # the PNGs decode to the exact pixels sent (the requests run concurrently, so compare as sets)
    assert sorted(sha1(r["image"]) for r in stub.received) == sorted(sha1(img) for img in stub_images)
    assert got.kind == "probs"
    expected = torch.from_numpy(np.stack([stub_probs(img) for img in stub_images]))
    torch.testing.assert_close(got.probs, expected, atol=1e-3, rtol=0)
    assert torch.equal(got.top1(), torch.from_numpy(np.stack([stub_label(img) for img in stub_images])))


def test_topk_made_client_side_from_a_probs_only_vendor(stub_images):
    with StubVendor(answer_kinds=["probs"]) as stub, fast_box(stub.url, answer="topk", topk=3) as box:
        assert box.answer_kind == "topk"
        got = box.query(stub_images)
    assert stub.received[0]["ask"] == "probs"  # the vendor cannot do top-k: ask for what reduces to it
    labels = np.stack([stub_label(img) for img in stub_images])
    expected_ids = (labels[:, None] + np.arange(3)[None, :, None, None]) % C_STUB
    assert got.kind == "topk" and torch.equal(got.topk_ids, torch.from_numpy(expected_ids))
    torch.testing.assert_close(got.topk_probs, torch.from_numpy(np.broadcast_to(
        WEIGHTS[None, :3, None, None], expected_ids.shape).copy()), atol=1e-3, rtol=0)


@pytest.mark.parametrize("weak, expected_kind", [("hard", "hard"), ("topk;k=2", "topk")])
def test_weaker_answer_downgrades_the_whole_batch(stub_images, caplog, weak, expected_kind):
    # Images whose first pixel has an even red value get the weak answer, the others full probabilities.
    reply = lambda image, ask: weak if image[0, 0, 0] % 2 == 0 else "probs"  # noqa: E731
    images = stub_images.copy()
    images[:, 0, 0, 0] = [0, 1, 3, 5]  # exactly one weak answer in the batch
    with StubVendor(reply=reply) as stub, fast_box(stub.url) as box, caplog.at_level(logging.WARNING):
        got = box.query(images)
    assert got.kind == expected_kind and len(got) == 4
    labels = torch.from_numpy(np.stack([stub_label(img) for img in images]))
    assert torch.equal(got.top1(), labels)
    if expected_kind == "topk":
        assert got.k == 2
        torch.testing.assert_close(got.relative_confidence(), torch.full(labels.shape, 0.2), atol=1e-3, rtol=0)
    assert "downgraded" in caplog.text


def test_429_retry_after_is_honoured_and_capped(stub_images):
    script = [(429, {"Retry-After": "1"}, {"error": "slow down"})]
    with StubVendor(script=script) as stub, fast_box(stub.url, backoff=0.001) as box:
        t0 = time.perf_counter()
        got = box.query(stub_images[:1])
        waited = time.perf_counter() - t0
    assert 0.9 <= waited < 4 and box.retries == 1 and len(stub.received) == 2 and got.kind == "probs"

    script = [(429, {"Retry-After": "60"}, {"error": "slow down"})]
    with StubVendor(script=script) as stub, fast_box(stub.url, max_backoff=0.2) as box:
        t0 = time.perf_counter()
        box.query(stub_images[:1])
        assert time.perf_counter() - t0 < 3 and box.retries == 1  # waited max_backoff, not a minute


def test_5xx_retried_then_clear_error(stub_images):
    script = [(503, {"Retry-After": "0"}, {"error": "down for maintenance"})] * 10
    with StubVendor(script=script) as stub, fast_box(stub.url, max_retries=3) as box:
        with pytest.raises(CorteError, match=r"failed after 3 retries: HTTP 503: down for maintenance") as err:
            box.query(stub_images[:1])
    assert f"{stub.url}/v1/segment" in str(err.value)
    assert len(stub.received) == 4 and box.retries == 3 and box.failures == 1


@pytest.mark.parametrize("status", [400, 401, 404, 413])
def test_4xx_fails_at_once(stub_images, status):
    script = [(status, {}, {"error": "image too small for this model"})]
    with StubVendor(script=script) as stub, fast_box(stub.url) as box:
        with pytest.raises(CorteError, match=rf"HTTP {status}: image too small for this model") as err:
            box.query(stub_images[:1])
    assert f"{stub.url}/v1/segment" in str(err.value)
    assert len(stub.received) == 1 and box.retries == 0 and box.failures == 1


def test_token_is_sent_but_never_shown(model_file, stub_images, monkeypatch, caplog):
    monkeypatch.setenv("CORTE_TEST_TOKEN", SECRET)
    monkeypatch.setenv("CORTE_WRONG_TOKEN", SECRET + "-wrong")
    shown: list[str] = []
    with caplog.at_level(logging.DEBUG):
        with BlackBoxServer(model_file, device="cpu", token_env="CORTE_TEST_TOKEN") as srv:
            assert requests.get(srv.url + "/v1/info", timeout=5).status_code == 401
            with fast_box(srv.url, token_env="CORTE_TEST_TOKEN") as box:  # the right token works
                assert box.query(stub_images[:2]).kind == "probs"
                shown.append(repr(box))
            for env in ("CORTE_WRONG_TOKEN", None):  # a wrong token, then none: 401 at once, no retries
                before = srv.stats["requests"]
                with pytest.raises(CorteError, match="HTTP 401") as err:
                    fast_box(srv.url, token_env=env)
                assert srv.stats["requests"] == before + 1
                shown.append(str(err.value))
            assert "$CORTE_WRONG_TOKEN, which is set" in shown[1] and "token_env is unset" in shown[2]
        # A vendor that echoes the Authorization header back in its error text.
        with StubVendor(script=[(400, {}, {"error": "bad request from {auth}"})]) as stub:
            with fast_box(stub.url, token_env="CORTE_TEST_TOKEN") as box:
                with pytest.raises(CorteError, match="bad request from Bearer <token>") as err:
                    box.query(stub_images[:1])
                shown += [str(err.value), repr(box)]
        assert stub.received[0]["auth"] == f"Bearer {SECRET}"
        # Refused connection with a token set: the error names the URL, not the token.
        with pytest.raises(CorteError) as err:
            fast_box(f"http://127.0.0.1:{_free_port()}", token_env="CORTE_TEST_TOKEN", max_retries=1)
        shown.append(str(err.value))
    shown.append(caplog.text)
    assert "urllib3" in caplog.text  # debug logging was really captured
    for text in shown:
        assert SECRET not in text


def test_budget_stops_before_sending(server, images):
    with fast_box(server.url, budget=5) as box:
        assert box.budget_left == 5
        box.query(images[:3])
        with pytest.raises(CorteError, match="query budget of 5 requests reached"):
            box.query(images[:3])
        assert server.stats["segment_requests"] == 3 and box.budget_left == 2 and box.images_sent == 3
        box.query(images[3:5])
        assert box.budget_left == 0
        with pytest.raises(CorteError, match="query budget of 5 requests reached"):
            box.query(images[:1])
    assert server.stats["segment_requests"] == 5


def test_connection_refused_is_a_clear_error_after_retries():
    url = f"http://127.0.0.1:{_free_port()}"
    t0 = time.perf_counter()
    with pytest.raises(CorteError, match=r"failed after 2 retries: connection failed") as err:
        fast_box(url, max_retries=2)
    assert f"{url}/v1/info" in str(err.value) and time.perf_counter() - t0 < 5


def test_open_blackbox_and_url_checks(server, images):
    with open_blackbox(server.url + "/", answer="topk", topk=4, device="cpu", batch_size=2) as box:
        assert isinstance(box, HttpBlackBox) and box.answer_kind == "topk" and box.topk == 4
        assert box.name == server.url and box.query(images[:1]).k == 4
    with pytest.raises(ConfigError, match="credentials") as err:
        HttpBlackBox("https://user:hunter2@example.invalid/")
    assert "hunter2" not in str(err.value)
    with pytest.raises(ConfigError, match="query"):
        HttpBlackBox("https://example.invalid/api?key=abc")
    with pytest.raises(ConfigError, match="topk"):
        fast_box(server.url, answer="topk", topk=NUM_CLASSES + 1)


def test_serve_runs_until_stopped(model_file, capsys):
    ready: list[BlackBoxServer] = []
    thread = threading.Thread(target=serve, args=(BlackBoxServer(model_file, device="cpu"),), daemon=True,
                              kwargs={"ready_callback": ready.append})
    thread.start()
    for _ in range(200):
        if ready:
            break
        time.sleep(0.05)
    assert ready, "serve() never became ready"
    assert requests.get(ready[0].url + "/v1/info", timeout=5).json()["num_classes"] == NUM_CLASSES
    ready[0].stop()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert ready[0].url in capsys.readouterr().out


def test_wire_header_helpers():
    assert parse_answer_header("topk; k=3") == ("topk", 3)
    assert parse_answer_header(" HARD ") == ("hard", None) and parse_answer_header(None) == (None, None)
    with pytest.raises(ValueError):
        parse_answer_header("logits")
    assert parse_retry_after("2.5") == 2.5 and parse_retry_after("-3") == 0.0 and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: retry now


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _free_port() -> int:
    """A port nobody listens on (bound, read, released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
