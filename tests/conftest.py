"""Shared test set-up: one intra-op thread (OpenMP threads spin, and on a shared 2-core machine two of them
next to another busy process make convolutions 10-20x slower), no progress bars in captured output."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("CORTE_NO_PROGRESS", "1")
torch.set_num_threads(1)


def require_reference(module: str):
    """Import an independent reference library of the dev extra, or fail loudly: a comparison against a
    reference that silently skips when the reference is missing checks nothing."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pytest.fail(f"{module} is missing ({exc}); the independent-reference tests need the dev extra: "
                    "pip install -e '.[dev]'", pytrace=False)


@pytest.fixture(scope="session")
def tiny_bench(tmp_path_factory):
    """A tiny synthetic benchmark (rendered once per session)."""
    from corte_ray.data.synth import render_benchmark

    root = tmp_path_factory.mktemp("bench")
    render_benchmark(root, seed=0, n_source=12, n_target=12, n_val=4, size=(64, 96))
    return root


@pytest.fixture(autouse=True)
def _drop_stale_log_handlers():
    """`corte-ray` commands run in-process (main([...])) point logging at the stderr of their test, which
    capsys closes afterwards; later tests would log into that closed stream ("--- Logging error ---")."""
    import logging

    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.StreamHandler) and getattr(handler.stream, "closed", False):
            root.removeHandler(handler)
    yield
