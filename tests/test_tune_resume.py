"""A sweep whose driver is killed (SIGKILL) midway continues with `corte-ray tune --resume` and finishes, without
rerunning the trials that had finished: each trial logs every start of its driver (trials/ID/starts.log), and a
finished trial's files must be untouched by the resumed sweep."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.tune_helpers import label_tiny_store, write_tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]


def _tune(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", CORTE_NO_PROGRESS="1")
    env.pop("RAY_ADDRESS", None)
    # Its own session: the driver and every Ray process it starts form one process group this test can end.
    return subprocess.Popen([sys.executable, "-m", "corte_ray.cli", "tune", *args], cwd=REPO, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _end_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_killed_sweep_resumes_without_rerunning_finished_trials(tiny_bench, tmp_path):
    store = label_tiny_store(tmp_path, tiny_bench)
    cfg = write_tiny_config(tmp_path / "cfg.yaml", tiny_bench, "", iterations=8, eval_every=2)
    space = tmp_path / "space.yaml"
    space.write_text("knobs:\n  corte.rc_scale: {uniform: [0.8, 1.2]}\n")
    out = tmp_path / "sweep"
    args = ["--config", str(cfg), "--space", str(space), "--samples", "3", "--scheduler", "none",
            "--max-concurrent", "1", "--out", str(out), f"blackbox.label_store={store}"]

    proc = _tune(args, tmp_path / "first.log")
    try:
        # Kill once one trial has finished and the next one is running.
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            done = list(out.glob("trials/*/done.json"))
            started = list(out.glob("trials/*/metrics.jsonl"))
            if done and len(started) > len(done):
                break
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.5)
        else:
            pytest.fail("the sweep did not get one trial done and the next one going in 300 s")
        os.kill(proc.pid, signal.SIGKILL)   # the driver, hard
        proc.wait(timeout=30)
    finally:
        time.sleep(2)
        _end_group(proc)                    # and whatever of its Ray instance outlived it
    finished = {p.parent.name: {"done": p.read_bytes(), "metrics": (p.parent / "metrics.jsonl").read_bytes()}
                for p in out.glob("trials/*/done.json")}
    assert finished and len(finished) < 3

    proc = _tune(["--out", str(out), "--resume"], tmp_path / "second.log")
    try:
        assert proc.wait(timeout=600) == 0, (tmp_path / "second.log").read_text()[-3000:]
    finally:
        _end_group(proc)
    log = (tmp_path / "second.log").read_text()
    trials = sorted(p.name for p in (out / "trials").iterdir())
    assert len(trials) == 3, trials
    for t in trials:
        run = out / "trials" / t
        starts = (run / "starts.log").read_text().splitlines()
        assert (run / "done.json").exists(), f"{t} did not finish after --resume:\n{log[-3000:]}"
        assert json.loads((run / "done.json").read_text())["step"] == 8
        if t in finished:
            # Not rerun: started once, and its files are byte for byte what they were before the kill.
            assert len(starts) == 1, f"finished trial {t} was started again: {starts}"
            assert (run / "done.json").read_bytes() == finished[t]["done"]
            assert (run / "metrics.jsonl").read_bytes() == finished[t]["metrics"]
    rows = (out / "leaderboard.csv").read_text().splitlines()
    assert len(rows) == 4 and (out / "best.yaml").exists()
