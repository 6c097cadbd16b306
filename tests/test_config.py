"""Config: YAML + overrides, unknown keys and bad values named, exact round-trip."""

from __future__ import annotations

import pytest

from corte_ray.config import Config, from_dict, load_config, save_config
from corte_ray.errors import ConfigError


def test_defaults_follow_methods_md():
    cfg = Config().validate()
    assert cfg.corte.rc_scale == 1.0 and cfg.ema.momentum == 0.999 and cfg.stvm.temperature_scale == 16.0
    assert cfg.stvm.metric_pixels == 4096 and cfg.threshold_st.threshold == 0.9 and cfg.corte.hard_override_scale == 1.5


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("method: distill\ndata:\n  crop_size: [64, 96]\ncorte:\n  rc_scale: 0.7\n")
    cfg = load_config(f, ["corte.rc_scale=1.25", "train.iterations=10", "data.resize=[100, 200]", "model.weights=null"])
    assert cfg.method == "distill" and cfg.corte.rc_scale == 1.25 and cfg.train.iterations == 10
    assert cfg.data.crop_size == (64, 96) and cfg.data.resize == (100, 200) and cfg.model.weights is None


@pytest.mark.parametrize("override, needle", [
    ("corte.rc_scal=1", "corte.rc_scal: unknown config key (did you mean corte.rc_scale?)"),
    ("nosuch.key=1", "nosuch: unknown config key"),
    ("ema.momentum=1.0", "ema.momentum: must be in [0.0, 1.0)"),
    ("corte.rc_floor=1.5", "corte.rc_floor: must be in [0.0, 1.0], got 1.5"),
    ("corte.set_weight=-1", "corte.set_weight: must be in [0.0, 100.0], got -1"),
    ("corte.contradicted=drop", "corte.contradicted: must be one of ['keep', 'ignore'], got 'drop'"),
    # The Literal keys whose own checks in validate() were unreachable (and are gone): _coerce names them.
    ("corte.fill=x", "corte.fill: must be one of ['confident', 'agree'], got 'x'"),
    ("corte.mix_mask=x", "corte.mix_mask: must be one of ['label', 'box'], got 'x'"),
    ("corte.warmup_labels=x", "corte.warmup_labels: must be one of ['r2cp', 'raw'], got 'x'"),
    ("corte.agree_norm=x", "corte.agree_norm: must be one of ['class', 'pixel'], got 'x'"),
    ("ema.start=x", "ema.start: must be one of ['ramp', 'copy', 'init'], got 'x'"),
    ("stvm.reliability_norm=x", "stvm.reliability_norm: must be one of ['pixel', 'class'], got 'x'"),
    ("train.rounds=0", "train.rounds: must be >= 1, got 0"),
    ("train.round_lr_scale=0", "train.round_lr_scale: must be in (0.0, 10.0], got 0"),
    ("train.round_iterations=-1", "train.round_iterations: must be >= 0 (0 = iterations), got -1"),
    ("train.round_start=cold", "train.round_start: must be one of ['warm', 'fresh'], got 'cold'"),
    ("train.iterations=abc", "train.iterations: must be an integer"),
    ("method=magic", "method: unknown method 'magic'"),
    ("blackbox.answer=soft", "blackbox.answer: must be one of"),
    ("data.crop_size=[8, 8]", "data.crop_size: must be [H, W]"),
    ("scaling.engine=spark", "scaling.engine: must be one of"),
    ("train.amp=maybe", "train.amp: must be true or false"),
    ("corte.rc_scale", "must look like key=value"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert needle in str(info.value)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_round_trip(tmp_path):
    cfg = load_config(None, ["method=stvm", "data.resize=[64, 128]", "stvm.gamma=2"])
    path = save_config(cfg, tmp_path / "config.yaml")
    again = load_config(path)
    assert again == cfg and from_dict(cfg.to_dict()) == cfg


def test_exponent_without_dot_is_a_number(tmp_path):
    # YAML 1.1 parses 2e-3 as a string; users write it in files and on the command line alike.
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  lr: 2e-3\n")
    assert load_config(f).train.lr == 0.002
    assert load_config(None, ["stvm.metric_lr=5e-4"]).stvm.metric_lr == 0.0005
    with pytest.raises(ConfigError, match="train.lr: must be a number"):
        load_config(None, ["train.lr=fast"])


@pytest.mark.parametrize("override, message", [
    ("augment.blur_sigma=[2.0,1.0]", "augment.blur_sigma: must be"),
    ("augment.jitter_p=1.5", "augment.jitter_p"),
    ("corte.strong_rampup=-0.1", "corte.strong_rampup"),
    ("corte.override_scale=-1", "corte.override_scale"),
    ("corte.warmup_labels=all", "corte.warmup_labels"),
    ("corte.mix_mask=teacher", "corte.mix_mask"),
    ("corte.agree_power=-1", "corte.agree_power"),
    ("corte.agree_norm=batch", "corte.agree_norm"),
])
def test_augment_and_ramp_settings_are_checked_by_name(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
