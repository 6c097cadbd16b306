"""The jobs/ entry points explain themselves and refuse to run without a cluster (no Ray needed; the jobs they
submit run in tests/test_cluster_jobs.py against a real head)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STEPS = ["label", "adapt", "tune", "evaluate"]


def _run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([str(REPO / "jobs" / script), *args], env={**base, **env}, capture_output=True, text=True,
                          timeout=30)


@pytest.mark.parametrize("step", STEPS)
def test_each_step_script_prints_its_usage(step):
    r = _run(f"{step}.sh", "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"jobs/{step}.sh [corte-ray {step} options]")
    assert "RAY_ADDRESS" in r.stdout and f"corte-ray {step} --help" in r.stdout


@pytest.mark.parametrize("step", STEPS)
def test_without_ray_address_a_script_says_how_to_set_it(step):
    r = _run(f"{step}.sh", "--out", "x")
    assert r.returncode == 2 and r.stdout == ""
    assert f"jobs/{step}.sh: RAY_ADDRESS is not set" in r.stderr and "ray dashboard cluster.yaml" in r.stderr


def test_a_dashboard_address_is_refused_by_a_command_run_outside_a_job():
    """RAY_ADDRESS=http://... is what `ray job submit` talks to; a driver run here cannot join it (a fresh
    process: one already connected to Ray keeps its cluster)."""
    import sys

    code = ("from corte_ray.errors import ConfigError\nfrom corte_ray.ray_cluster import connect\n"
            "try:\n    connect(1)\nexcept ConfigError as err:\n    print(err)\n")
    env = {**os.environ, "RAY_ADDRESS": "http://127.0.0.1:8265", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("RAY_ADDRESS=http://127.0.0.1:8265 is a dashboard address"), r.stdout
