"""benchmarks/quality.py --source-set: the boxes of a work folder are never mixed with boxes trained otherwise."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quality(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), *args],
                          capture_output=True, text=True, timeout=120)


def test_source_set_needs_key_value(tmp_path):
    r = _quality("--work", str(tmp_path / "w"), "--out", str(tmp_path / "q.json"), "--source-set", "nonsense")
    assert r.returncode != 0
    assert "--source-set: expected KEY=VALUE" in r.stderr
    assert not (tmp_path / "w").exists()


def test_source_set_refuses_a_folder_of_other_boxes(tmp_path):
    work = tmp_path / "w"
    (work / "seed0" / "source").mkdir(parents=True)  # boxes of an older study, made without --source-set
    r = _quality("--work", str(work), "--out", str(tmp_path / "q.json"), "--source-set", "train.class_balance=true")
    assert r.returncode != 0
    assert "trained without --source-set" in r.stderr and str(work) in r.stderr

    (work / "source_set.json").write_text(json.dumps(["train.class_balance=true"]))
    r = _quality("--work", str(work), "--out", str(tmp_path / "q.json"))
    assert r.returncode != 0
    assert "['train.class_balance=true']" in r.stderr and "not (none)" in r.stderr
    assert not (tmp_path / "q.json").exists()
