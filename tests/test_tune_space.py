"""Search spaces are checked before any trial: a knob that is not a config key, a range outside the key's valid
values, a knob the method does not read, each fails naming it; and the unsupervised score's helpers."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from corte_ray.config import load_config
from corte_ray.errors import ConfigError
from corte_ray.tune.space import apply_knobs, load_space
from corte_ray.tune.score import agreement_miou, rank, spearman

REPO = Path(__file__).resolve().parents[1]


def _space(tmp_path, text: str) -> Path:
    p = tmp_path / "space.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("name", ["corte", "stvm", "threshold_st", "tiny"])
def test_shipped_spaces_load(name):
    base = load_config(None, [f"method={name if name != 'tiny' else 'corte'}"])
    space = load_space(REPO / "tune_spaces" / f"{name}.yaml", base)
    assert space.knobs


def test_a_wheel_install_ships_the_spaces_where_space_by_name_finds_them(tmp_path, monkeypatch):
    """`--space corte` on a node that pip-installed the wheel (no checkout): the wheel carries tune_spaces/*.yaml
    as data files under share/corte-ray/tune_spaces, and load_space finds a name there."""

    src = tmp_path / "src"   # a copy: the build writes build/ and *.egg-info beside the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("corte_ray", "tune_spaces"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(src)], check=True, capture_output=True, timeout=300)
    (whl,) = wheels.glob("corte_ray-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    for name in ("corte", "stvm", "threshold_st", "tiny"):
        assert any(n.endswith(f".data/data/share/corte-ray/tune_spaces/{name}.yaml") for n in names), names

    # Installed layout: the data files under sys.prefix, the package elsewhere (no tune_spaces/ beside it).
    prefix = tmp_path / "prefix"
    (prefix / "share" / "corte-ray" / "tune_spaces").mkdir(parents=True)
    (prefix / "share" / "corte-ray" / "tune_spaces" / "only_installed.yaml").write_text(
        "method: corte\nknobs:\n  corte.rc_scale: {uniform: [0.8, 1.2]}\n")
    monkeypatch.setattr(sys, "prefix", str(prefix))
    space = load_space("only_installed", load_config(None, ["method=corte"]))
    assert [k.key for k in space.knobs] == ["corte.rc_scale"]
    with pytest.raises(ConfigError, match=r"does not exist \(shipped spaces, by name: .*only_installed"):
        load_space("no_such_space", load_config(None, ["method=corte"]))


def test_every_knob_of_methods_4_is_in_a_shipped_space():
    keys = set()
    for name in ("corte", "stvm", "threshold_st"):
        keys |= set(load_space(REPO / "tune_spaces" / f"{name}.yaml", load_config(None, [f"method={name}"])).keys)
    assert {"corte.rc_scale", "corte.teacher_scale", "threshold_st.threshold", "ema.momentum", "corte.weak_weight",
            "stvm.metric_weight", "stvm.gamma", "stvm.mocm_power", "train.lr"} <= keys


@pytest.mark.parametrize("text, message", [
    ("knobs:\n  corte.rc_scael: {uniform: [0.5, 1.5]}\n",
     r"knob corte\.rc_scael: unknown config key \(did you mean corte\.rc_scale\?\)"),
    ("knobs:\n  crote.rc_scale: {uniform: [0.5, 1.5]}\n", r"knob crote: unknown config key \(did you mean corte\?\)"),
    ("knobs:\n  ema.momentum: {uniform: [0.9, 1.0]}\n", r"knob ema\.momentum: uniform value 1\.0 is not valid: "
                                                        r"ema\.momentum: must be in \[0\.0, 1\.0\)"),
    ("knobs:\n  threshold_st.threshold: {choice: [0.5, 1.5]}\n", None),   # not read by corte
    ("knobs:\n  stvm.gamma: {uniform: [0.5, 2.0]}\n", r"knob stvm\.gamma: method corte does not read it"),
    ("knobs:\n  train.lr: {loguniform: [0.0, 1.0e-2]}\n", r"knob train\.lr: loguniform needs low > 0"),
    ("knobs:\n  train.lr: {normal: [0.0, 1.0]}\n", r"knob train\.lr: must be one distribution"),
    ("knobs:\n  corte.rc_scale: {uniform: [1.5, 0.5]}\n", r"knob corte\.rc_scale: uniform needs low < high"),
    ("knobs:\n  corte: {uniform: [0.5, 1.5]}\n", r"knob corte: is a section, not a config key"),
    ("method: stvm\nknobs:\n  train.lr: {uniform: [0.001, 0.01]}\n", r"the space is for method 'stvm'"),
    ("knob:\n  train.lr: {uniform: [0.001, 0.01]}\n", r"unknown top-level key 'knob'"),
])
def test_bad_space_fails_naming_the_knob(tmp_path, text, message):
    path = _space(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_space(path, load_config(None, ["method=corte"]))
    assert str(path) in str(exc.value)
    if message:
        import re

        assert re.search(message, str(exc.value)), str(exc.value)


def test_misspelled_knob_fails_before_any_trial(tmp_path, tiny_bench, capsys):
    """Through the CLI: a one-line error naming the knob, exit code 2, no Ray started, no trial directory."""
    import ray

    from corte_ray.cli import main
    from tests.tune_helpers import write_tiny_config

    cfg = write_tiny_config(tmp_path / "cfg.yaml", tiny_bench, "file:/nonexistent/box.pt")
    space = _space(tmp_path, "knobs:\n  train.lr: {loguniform: [1.0e-3, 1.0e-2]}\n  ema.momentun: {choice: [0.9]}\n")
    out = tmp_path / "sweep"
    code = main(["-q", "tune", "--config", str(cfg), "--space", str(space), "--samples", "4", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("corte-ray tune: error:") and "\n" not in err
    assert "knob ema.momentun: unknown config key (did you mean ema.momentum?)" in err
    assert not ray.is_initialized()
    assert not (out / "trials").exists() and not (out / "tune").exists()


def test_integer_keys_get_integer_distributions(tmp_path):
    from ray import tune

    from corte_ray.tune.space import to_param_space

    space = load_space(_space(tmp_path, "knobs:\n  stvm.metric_pixels: {uniform: [64, 512]}\n"),
                       load_config(None, ["method=stvm"]))
    dist = to_param_space(space, "random")["stvm.metric_pixels"]
    assert isinstance(dist, tune.search.sample.Integer)
    with pytest.raises(ConfigError, match="grid is not supported by --search optuna"):
        to_param_space(load_space(REPO / "tune_spaces" / "tiny.yaml", load_config(None, [])), "optuna")


def test_apply_knobs_validates():
    base = load_config(None, []).to_dict()
    assert apply_knobs(base, {"corte.rc_scale": 0.7}).corte.rc_scale == 0.7
    with pytest.raises(ConfigError, match="corte.rc_scale: must be in"):
        apply_knobs(base, {"corte.rc_scale": 7.0})


def test_spearman_and_ranks():
    assert rank(np.array([3.0, 1.0, 2.0, 2.0])).tolist() == [4.0, 1.0, 2.5, 2.5]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # scipy.stats.spearmanr([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) = 0.8
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    assert np.isnan(spearman([1, 2], [1, 2]))


def test_agreement_miou():
    conf = np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]])   # class 2 absent from the reference: not averaged
    assert agreement_miou(conf) == pytest.approx(100 * (3 / 4 + 2 / 3) / 2)


def test_miou_metric_needs_a_val_split(tmp_path, tiny_bench):
    import ray

    from corte_ray.tune.sweep import run_sweep
    from tests.tune_helpers import write_tiny_config

    cfg = write_tiny_config(tmp_path / "cfg.yaml", tiny_bench, "file:/nonexistent/box.pt")
    with pytest.raises(ConfigError, match="--metric miou: the config has no labelled val split"):
        run_sweep(str(cfg), ["data.val_split="], str(REPO / "tune_spaces" / "tiny.yaml"), 2, tmp_path / "s",
                  metric="miou")
    with pytest.raises(ConfigError, match="train.eval_every: a sweep needs several evaluations"):
        run_sweep(str(cfg), ["train.eval_every=0"], str(REPO / "tune_spaces" / "tiny.yaml"), 2, tmp_path / "s2")
    assert not ray.is_initialized()
