"""A real S3-compatible server on 127.0.0.1 for the storage tests: moto's, in a thread of the test process.

`s3_env(server)` gives the environment a process (this one, a CLI subprocess, Ray workers started from it)
needs to reach it: the standard AWS variables, with AWS_ENDPOINT_URL pointing at the server."""

from __future__ import annotations

import os
import socket
import uuid

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server():
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)   # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server, f"http://127.0.0.1:{port}"


def s3_env(endpoint: str) -> dict[str, str]:
    # moto accepts any credentials; real ones are never needed or read here.
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def make_bucket(name: str) -> None:
    """Create a bucket through pyarrow (the client the package uses), with the current environment."""
    import pyarrow.fs as pafs

    import os
    from urllib.parse import urlparse

    # The package's own filesystem never creates buckets (a typo in a URI would make one); the test's does.
    url = urlparse(os.environ["AWS_ENDPOINT_URL"])
    pafs.S3FileSystem(endpoint_override=url.netloc, scheme=url.scheme, region="us-east-1",
                      allow_bucket_creation=True).create_dir(name)


@pytest.fixture(scope="module")
def s3_server():
    """A moto server for the module, with this process's environment pointed at it (restored afterwards)."""
    server, endpoint = start_server()
    saved = {k: os.environ.get(k) for k in s3_env(endpoint)}
    os.environ.update(s3_env(endpoint))
    yield endpoint
    restore_env(saved)
    server.stop()


def restore_env(saved: dict[str, str | None]) -> None:
    """Put back the environment variables `saved` holds (None: it was not set)."""
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def bucket(s3_server) -> str:
    """A fresh bucket's name."""
    name = f"b-{uuid.uuid4().hex[:12]}"
    make_bucket(name)
    return name
