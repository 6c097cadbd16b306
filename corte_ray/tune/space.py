"""Search spaces: tune_spaces/*.yaml -> checked knobs -> a Ray Tune `param_space`.

A space file maps config keys (the dotted names of config.py, as on the command line) to one distribution each:

    method: corte                       # optional: the method the space is for (checked against the config)
    knobs:
      corte.rc_scale:  {uniform: [0.6, 1.4]}
      train.lr:        {loguniform: [3.0e-3, 3.0e-2]}
      ema.momentum:    {choice: [0.9, 0.99, 0.995]}
      corte.weak_weight: {grid: [0.5, 1.0]}

Everything is checked before any trial starts, by the config's own validation: a knob that is not a config key
fails with its name (and a suggestion), a range end or a choice the key does not accept fails naming the key and
its valid range, a knob the method never reads fails too (a sweep over it would only measure noise).
Integer keys take uniform / loguniform as integer distributions. No Ray import at module level: the CLI checks a
space without starting Ray.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config import Config, from_dict
from ..errors import ConfigError

DISTRIBUTIONS = ("uniform", "loguniform", "choice", "grid")


@dataclass(frozen=True)
class Knob:
    key: str                  # dotted config key, e.g. corte.rc_scale
    kind: str                 # one of DISTRIBUTIONS
    values: tuple             # (low, high) for uniform/loguniform, the candidates for choice/grid
    integer: bool = False     # the key is an int: uniform -> randint, loguniform -> lograndint

    def describe(self) -> str:
        return f"{self.kind}{list(self.values)}"


@dataclass(frozen=True)
class Space:
    path: Path
    knobs: tuple[Knob, ...]
    method: str | None = None

    @property
    def keys(self) -> list[str]:
        return [k.key for k in self.knobs]

    def grid_size(self) -> int:
        return math.prod(len(k.values) for k in self.knobs if k.kind == "grid")


def _with(base: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A deep copy of the config dict `base` with the dotted `key` set to `value`."""
    import copy

    out = copy.deepcopy(base)
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value
    return out


def _key_type(cfg: Config, key: str) -> type:
    node: Any = cfg
    for p in key.split("."):
        node = getattr(node, p)
    return type(node)


def _relevant(method: str, key: str) -> bool:
    """Does `method` read this knob? (The method-specific sections; train.* and everything else: yes.)"""
    from ..methods.steps import METHODS, Corte

    cls = METHODS.get(method)
    section = key.split(".", 1)[0]
    if section == "stvm":
        return cls.uses_metric
    if section == "ema":
        return cls.uses_teacher
    if section == "threshold_st":
        return method == "threshold_st"
    if section == "corte":
        return issubclass(cls, Corte) or (key == "corte.rc_scale" and cls.needs_box_labels)
    return True


def shipped_space_dirs() -> list[Path]:
    """Where `--space NAME` finds NAME.yaml: the checkout's tune_spaces/ (a source or editable install), then the
    copy a wheel install puts in <prefix>/share/corte-ray/tune_spaces (pyproject's data-files)."""
    return [Path(__file__).resolve().parents[2] / "tune_spaces", Path(sys.prefix) / "share" / "corte-ray" / "tune_spaces"]


def load_space(path: str | Path, base: Config) -> Space:
    """Read and check a space file against the base config (the one every trial starts from)."""
    path = Path(path)
    if not path.exists() and not path.suffix:
        for folder in shipped_space_dirs():
            if (folder / f"{path}.yaml").exists():
                path = folder / f"{path}.yaml"
                break
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        shipped = sorted({f.stem for d in shipped_space_dirs() if d.is_dir() for f in d.glob("*.yaml")})
        hint = f" (shipped spaces, by name: {', '.join(shipped)})" if shipped and not path.suffix else ""
        raise ConfigError(f"space file {path} does not exist{hint}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"space file {path} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: must hold a mapping with a `knobs:` section")
    unknown = set(doc) - {"method", "knobs"}
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key {sorted(unknown)[0]!r} (allowed: method, knobs)")
    method = doc.get("method")
    if method is not None and method != base.method:
        raise ConfigError(f"{path}: the space is for method {method!r}, the config runs method {base.method!r} "
                          f"(set method={method} or choose the space of {base.method})")
    raw = doc.get("knobs")
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"{path}: `knobs:` must map at least one config key to a distribution")
    base_dict = base.to_dict()
    knobs = []
    for key, spec in raw.items():
        key = str(key)
        where = f"{path}: knob {key}"
        # Is it a config key at all? The config's own loader names the key and suggests the closest one.
        try:
            from_dict(_with(base_dict, key, _key_value(base, key)))
        except ConfigError as exc:
            raise ConfigError(f"{path}: knob {exc}") from None
        except AttributeError:
            raise ConfigError(f"{where}: not a config key") from None
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
            raise ConfigError(f"{where}: must be one distribution, e.g. {{uniform: [0.5, 1.5]}}; one of "
                              f"{list(DISTRIBUTIONS)}, got {spec!r}")
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: {kind} needs a list of values, got {values!r}")
        tp = _key_type(base, key)
        if kind in ("uniform", "loguniform"):
            if len(values) != 2:
                raise ConfigError(f"{where}: {kind} needs [low, high], got {values}")
            try:
                lo, hi = (float(v) for v in values)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: {kind} bounds must be numbers, got {values}") from None
            if tp not in (int, float):
                raise ConfigError(f"{where}: {kind} needs a numeric key; {key} is {tp.__name__} (use choice)")
            if not lo < hi:
                raise ConfigError(f"{where}: {kind} needs low < high, got {values}")
            if kind == "loguniform" and lo <= 0:
                raise ConfigError(f"{where}: loguniform needs low > 0, got {lo}")
            if tp is int:
                if lo != int(lo) or hi != int(hi):
                    raise ConfigError(f"{where}: {key} is an integer; bounds must be integers, got {values}")
                lo, hi = int(lo), int(hi)
            values = [lo, hi]
        elif kind in ("choice", "grid") and len(set(map(repr, values))) != len(values):
            raise ConfigError(f"{where}: {kind} lists a value twice: {values}")
        # Every value the distribution can produce is inside the key's valid range: check the ends / each value.
        for v in values:
            try:
                from_dict(_with(base_dict, key, v))
            except ConfigError as exc:
                raise ConfigError(f"{path}: knob {key}: {kind} value {v!r} is not valid: {exc}") from None
        if not _relevant(base.method, key):
            raise ConfigError(f"{where}: method {base.method} does not read it; drop the knob or sweep a method "
                              f"that uses it")
        knobs.append(Knob(key, kind, tuple(values), integer=tp is int))
    return Space(path=path, knobs=tuple(knobs), method=method)


def _key_value(cfg: Config, key: str) -> Any:
    """The base config's value of `key` (as a plain value); an unknown key raises the config's own error."""
    node: Any = cfg.to_dict()
    parts = key.split(".")
    for i, p in enumerate(parts):
        if not isinstance(node, dict) or p not in node:
            # Let the config loader produce its message (with "did you mean").
            bogus = _with({}, ".".join(parts[: i + 1]), 0)
            from_dict(bogus)
            raise ConfigError(f"{key}: not a config key")
        node = node[p]
    if isinstance(node, dict):
        raise ConfigError(f"{key}: is a section, not a config key")
    return node


def to_param_space(space: Space, search: str) -> dict[str, Any]:
    """{dotted key: a Tune distribution}: flat keys (Tune nests on dicts only, so dots stay in the names)."""
    from ray import tune

    out: dict[str, Any] = {}
    for k in space.knobs:
        lo_hi = k.values
        if k.kind == "uniform":
            out[k.key] = tune.randint(lo_hi[0], lo_hi[1] + 1) if k.integer else tune.uniform(*lo_hi)
        elif k.kind == "loguniform":
            out[k.key] = tune.lograndint(lo_hi[0], lo_hi[1] + 1) if k.integer else tune.loguniform(*lo_hi)
        elif k.kind == "choice":
            out[k.key] = tune.choice(list(k.values))
        else:
            if search == "optuna":
                raise ConfigError(f"{space.path}: knob {k.key}: grid is not supported by --search optuna "
                                  f"(Optuna samples); use choice, or --search random")
            out[k.key] = tune.grid_search(list(k.values))
    return out


def apply_knobs(base: dict[str, Any], knobs: dict[str, Any]) -> Config:
    """The trial's config: the base config dict with each dotted knob set, validated."""
    data = base
    for key, value in knobs.items():
        data = _with(data, key, value)
    return from_dict(data)
