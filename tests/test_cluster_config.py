"""cluster.yaml (AWS) and jobs/cluster-gcp.yaml validate against the autoscaler schema of the installed Ray
(offline: `ray up` has no dry run), and their images run the Ray that pyproject.toml pins and this venv has."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

import ray
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = [REPO / "cluster.yaml", REPO / "jobs" / "cluster-gcp.yaml"]


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_cluster_config_validates_against_the_autoscaler_schema(path):
    config = _load(path)
    validate_config(prepare_config(copy.deepcopy(config)))
    # The GPU workers scale from zero, and idle ones go away.
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert len(workers) == 1 and workers[0]["min_workers"] == 0 and workers[0]["max_workers"] >= 2
    assert config["idle_timeout_minutes"] > 0
    assert any("pip install" in c and "corte-ray" in c for c in config["setup_commands"])
    # The schema really is applied: a misspelt key fails.
    broken = copy.deepcopy(config)
    broken["available_node_types"][config["head_node_type"]]["min_wrkers"] = 0
    with pytest.raises(Exception, match="min_wrkers"):
        validate_config(prepare_config(broken))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_cluster_images_run_the_installed_and_pinned_ray(path):
    docker = _load(path)["docker"]
    images = [docker["image"], docker.get("head_image", docker["image"])]
    for image in images:
        match = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py311-(gpu|cpu)", image)
        assert match, f"{path.name}: {image} is not a rayproject/ray:<version>-py311-<gpu|cpu> image"
        assert match.group(1) == ray.__version__, f"{path.name}: {image} runs another Ray than {ray.__version__}"
    assert docker["image"].endswith("-gpu")
    pin = re.search(r'"ray\[[a-z,]+\]==([0-9.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert pin == ray.__version__


def test_every_cluster_config_key_is_commented():
    """A first-time user reads what each key does: every top-level key has a comment right above it."""
    for path in CONFIGS:
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if re.match(r"^[a-z_]+:", line):
                above = lines[i - 1].strip() if i else ""
                assert above.startswith("#"), f"{path.name}:{i + 1}: {line.split(':')[0]} has no comment above it"
