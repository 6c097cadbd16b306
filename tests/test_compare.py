"""Rows side by side (corte_ray/compare.py): two tiny runs in a local process pool, their results, the progress
line, and a rerun that finds them finished and trains nothing."""

from __future__ import annotations

import json

import pytest

from corte_ray.compare import Row, RowPool


def _rows(tiny_bench, work):
    common = ["data.dataset=synth", f"data.root={tiny_bench}", "data.batch_size=4", "data.crop_size=[48,64]",
              "model.student=mobilenetv3_small_lraspp", "train.device=cpu", "train.iterations=4", "train.lr_warmup=1",
              "train.eval_every=2", "train.checkpoint_every=2", "scaling.engine=local", "train.progress_every_s=0.01"]
    return [Row(f"oracle{i}", str(work / f"oracle{i}"), config=None,
                overrides=common + ["method=oracle", f"train.seed={i}"]) for i in range(2)]


def _run(rows: list[Row], lines: list[str]) -> dict:
    pool = RowPool(2, engine="local", progress_every_s=0.0, printer=lines.append)
    try:
        for row in rows:
            pool.submit(row)
        return pool.wait()
    finally:
        pool.close()


def test_rows_run_side_by_side_and_a_rerun_skips_them(tiny_bench, tmp_path):
    lines: list[str] = []
    results = _run(_rows(tiny_bench, tmp_path), lines)
    assert set(results) == {"oracle0", "oracle1"}
    for name, r in results.items():
        assert r["step"] == 4 and 0 <= r["miou"] <= 100
        assert [s for s, _ in r["curve"]] == [2, 4]
        assert r["checkpoint"].endswith("step_0000004/checkpoint.pt")
        assert json.loads((tmp_path / name / "done.json").read_text())["miou"] == r["miou"]
    assert results["oracle0"]["miou"] != results["oracle1"]["miou"]       # two seeds, two runs
    assert any(line.startswith("  done oracle") for line in lines)

    # A rerun: done.json is the result, nothing trains (no new metrics lines).
    before = {n: (tmp_path / n / "metrics.jsonl").read_text() for n in results}
    again = _run(_rows(tiny_bench, tmp_path), lines)
    assert {n: r["miou"] for n, r in again.items()} == {n: r["miou"] for n, r in results.items()}
    assert {n: (tmp_path / n / "metrics.jsonl").read_text() for n in results} == before


def test_a_failing_row_raises_with_its_error(tiny_bench, tmp_path):
    pool = RowPool(1, engine="local", printer=lambda s: None)
    try:
        pool.submit(Row("bad", str(tmp_path / "bad"), config=None, overrides=["method=corte", "data.dataset=synth",
                                                                               f"data.root={tmp_path / 'nowhere'}"]))
        with pytest.raises(Exception, match="nowhere|label"):
            pool.wait()
    finally:
        pool.close()


def _box_free_work(n: int) -> dict:
    import torch

    return {"threads": torch.get_num_threads(), "sum": sum(range(n))}


def test_a_task_runs_in_a_lane_beside_rows(tiny_bench, tmp_path):
    """`submit_task`: independent work (the demo's box evaluation) queued behind the rows, on one thread, its
    result returned by `wait` under its name with the seconds it took."""
    lines: list[str] = []
    pool = RowPool(2, engine="local", progress_every_s=0.0, printer=lines.append)
    try:
        pool.submit(_rows(tiny_bench, tmp_path)[0])
        pool.submit_task("box evaluation", _box_free_work, n=10)
        results = pool.wait()
    finally:
        pool.close()
    assert results["box evaluation"]["sum"] == 45 and results["box evaluation"]["threads"] == 1
    assert results["box evaluation"]["seconds"] >= 0
    assert results["oracle0"]["step"] == 4
    assert "  done box evaluation in 0 s" in lines


def _report_pid_then_sleep(path: str, seconds: float) -> dict:
    import os
    import time
    from pathlib import Path

    Path(path).write_text(str(os.getpid()))
    time.sleep(seconds)
    return {}


def test_rows_die_with_a_killed_driver(tmp_path):
    """SIGKILL of the driver (the demo, the quality study) must not leave its rows training on, orphaned: the
    next run would find the cores taken."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    pid_file = tmp_path / "worker.pid"
    driver = ("from corte_ray.compare import RowPool\n"
              "from tests.test_compare import _report_pid_then_sleep\n"
              "pool = RowPool(1, engine='local', printer=lambda s: None)\n"
              f"pool.submit_task('sleeper', _report_pid_then_sleep, path={str(pid_file)!r}, seconds=120)\n"
              "pool.wait()\n")
    proc = subprocess.Popen([sys.executable, "-c", driver], cwd=Path(__file__).parent.parent)
    try:
        deadline = time.monotonic() + 180          # a spawned worker imports torch: slow on a loaded machine
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert pid_file.exists(), "the worker never started"
        worker = int(pid_file.read_text())
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.kill(worker, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
        os.kill(worker, signal.SIGKILL)
        raise AssertionError("the row's process outlived its driver by 15 s")
    finally:
        proc.kill()
