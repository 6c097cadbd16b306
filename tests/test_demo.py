"""`corte-ray demo --quick` end to end through the installed console script (slow: about 3 minutes on 2 cores).

It checks what the README promises: the results table and OUT/results.json with the three rows, the corte student
above the distill student, the prediction grid, TensorBoard logs, and that a rerun resumes (skips every stage)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _corte_ray() -> list[str]:
    exe = shutil.which("corte-ray") or str(Path(sys.executable).parent / "corte-ray")
    return [exe]


def test_quick_demo(tmp_path):
    out = tmp_path / "demo"
    t0 = time.perf_counter()
    res = subprocess.run(_corte_ray() + ["demo", "--quick", "--out", str(out)], capture_output=True, text=True,
                         timeout=900)
    elapsed = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert set(rows) == {"blackbox", "distill", "corte"}
    for r in rows.values():
        assert 0 <= r["miou"] <= 100 and r["params"] > 0 and r["cpu_images_per_s"] > 0
    assert rows["corte"]["params"] < rows["blackbox"]["params"] / 3        # a lightweight student
    assert rows["corte"]["miou"] > rows["distill"]["miou"], rows            # the point of CoRTe
    assert "target-val mIoU" in res.stdout and "corte" in res.stdout
    assert (out / "predictions.png").stat().st_size > 0
    assert list((out / "runs" / "corte").rglob("events.out.tfevents.*"))
    print(f"quick demo took {elapsed:.0f} s: {rows}")

    # A rerun resumes: every stage is found finished, nothing is trained again.
    t0 = time.perf_counter()
    res = subprocess.run(_corte_ray() + ["demo", "--quick", "--out", str(out)], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    again = json.loads((out / "results.json").read_text())["rows"]
    assert {k: v["miou"] for k, v in again.items()} == {k: v["miou"] for k, v in rows.items()}
    assert time.perf_counter() - t0 < elapsed / 2


def test_quick_demo_on_ray_engine(tmp_path):
    """The same pipeline with labelling as a Ray Data job and adaptation on Ray Train."""
    out = tmp_path / "demo"
    res = subprocess.run(_corte_ray() + ["demo", "--quick", "--engine", "ray", "--out", str(out)],
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["engine"] == "ray"
    rows = results["rows"]
    assert rows["corte"]["miou"] > rows["distill"]["miou"], rows
    assert list((out / "runs" / "corte").glob("step_*/checkpoint.pt"))            # written by Ray Train
    assert (out / "runs" / "corte" / "checkpoint_manager_snapshot.json").exists()
