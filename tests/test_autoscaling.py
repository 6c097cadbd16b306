"""An adapt job on an autoscaling cluster whose worker type starts at 0: the Train workers ask for a custom
resource ("fake_gpu", standing in for GPUs) that only worker nodes offer, the autoscaler adds 2 nodes, and the
job finishes. check_cluster must not refuse it at start (scaling.wait_for_gpus).

The cluster is Ray's fake multi-node autoscaler, configured as `ray.cluster_utils.AutoscalingCluster` does it
(provider fake_multinode, RAY_FAKE_CLUSTER=1, `ray start --head --autoscaling-config`). AutoscalingCluster itself
is not used: its start() and shutdown() run `ray stop --force`, which ends every Ray instance on the machine
(other jobs' too), and the example.yaml it reads is not shipped in the ray 2.60 wheel. Its head is a
tests/ray_head.RayHead (own ports and temp dir, stopped by process group); the fake worker nodes are started by
the head's autoscaler process and end with it.
"""

from __future__ import annotations

import re
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from .ray_head import BIN, REPO, TINY_ADAPT, RayHead, box_file, client_env, local_store  # noqa: F401 - fixtures

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(1200)]

WORKER_TYPE = "fake_gpu_worker"
FAKE_CLUSTER = {
    "cluster_name": "corte-fake", "max_workers": 2, "upscaling_speed": 1.0, "idle_timeout_minutes": 2,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "available_node_types": {
        # Must match the head's `ray start --num-cpus`: one CPU, for the decode actor; no fake_gpu.
        "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
        WORKER_TYPE: {"resources": {"CPU": 1, "fake_gpu": 1, "object_store_memory": 150 * 1024**2},
                      "node_config": {}, "min_workers": 0, "max_workers": 2},
    },
    "head_node_type": "ray.head.default", "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
    "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [],
    "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
}


def _worker_nodes(head: RayHead) -> int:
    """Alive nodes that offer fake_gpu (the autoscaled ones)."""
    script = ("import ray\nray.init(log_to_driver=False)\n"
              "print('workers:', sum(1 for n in ray.nodes() if n['Alive'] and n['Resources'].get('fake_gpu')))\n")
    r = subprocess.run([str(BIN / "python"), "-c", script], env=client_env(RAY_ADDRESS=head.gcs_address),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return int(re.search(r"^workers: (\d+)$", r.stdout, re.MULTILINE).group(1))


def test_adapt_with_two_workers_scales_the_worker_type_up_from_zero(local_store, tiny_bench, tmp_path):
    with RayHead(num_cpus=1, autoscaling_config=FAKE_CLUSTER) as head:
        assert _worker_nodes(head) == 0
        job_id, run = f"adapt-as-{uuid.uuid4().hex[:8]}", tmp_path / "run"
        env = client_env(RAY_ADDRESS=head.dashboard_url, CORTE_SUBMIT_ARGS=f"--submission-id {job_id}")
        start = time.monotonic()
        r = subprocess.run([str(REPO / "jobs" / "adapt.sh"), "--out", str(run), "--dataset", "synth", "--root",
                            str(tiny_bench), "--label-store", str(local_store), *TINY_ADAPT,
                            "scaling.num_workers=2", "scaling.resources_per_worker={fake_gpu: 1}",
                            "scaling.wait_for_gpus=true"], env=env, cwd=REPO, capture_output=True, text=True,
                           timeout=900)
        seconds = time.monotonic() - start
        assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
        # Both workers needed a fake_gpu node: the autoscaler started two, and they are still up (idle < 2 min).
        assert _worker_nodes(head) == 2
        out = r.stdout + r.stderr
        assert "waiting for the autoscaler (scaling.wait_for_gpus)" in out and '"step": 2' in out
        assert list(Path(run).rglob("checkpoint.pt"))
        print(f"the scaled-up adapt job took {seconds:.0f} s")
