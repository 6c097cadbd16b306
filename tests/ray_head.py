"""A real Ray head for tests, started with `ray start --head --block` on 127.0.0.1 beside whatever other Ray
instances this machine runs (RAY_NOTES "Jobs and clusters"): its own ports (GCS, dashboard and its agent, metrics,
runtime env agent, Ray client, node manager, object manager, worker range), its own short temp dir, token auth
off on loopback (RAY_AUTH_MODE=disabled, for the head and every client), and stopped by its process group,
never by `ray stop` (which would stop every instance on the machine).

The head's environment holds no RAY_ADDRESS and no secrets: a driver or job that needs the black box token must
bring it, as on a real cluster whose nodes never saw the submitter's shell.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent           # the venv's ray, corte-ray and python
SECRET_NAMES = ("CORTE_BLACKBOX_TOKEN", "CORTE_TEST_TOKEN")
# A tiny adapt run: 2 steps of batch 2 on 48x64 crops, one evaluation on 2 images.
TINY_ADAPT = ["--method", "distill", "--student", "mobilenetv3_small_lraspp", "data.batch_size=2",
              "data.crop_size=[48,64]", "data.val_max_images=2", "train.cpu_threads=1", "train.iterations=2",
              "train.eval_every=2", "train.checkpoint_every=2", "train.lr_warmup=1", "scaling.cpus_per_worker=0.5",
              "scaling.data_cpus=0.25"]


def free_ports(n: int) -> list[int]:
    """n ports free on 127.0.0.1 now (held open together, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def client_env(**extra: str) -> dict[str, str]:
    """The environment of a process talking to the test head: the venv first on PATH, this checkout on
    PYTHONPATH, token auth off, no RAY_ADDRESS or secret unless given."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and k not in SECRET_NAMES}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(REPO), RAY_AUTH_MODE="disabled",
               CORTE_NO_PROGRESS="1")
    env.update(extra)
    return env


class RayHead:
    """`ray start --head` in its own process group; `gcs_address` for drivers, `dashboard_url` for jobs."""

    def __init__(self, num_cpus: int = 2, resources: dict | None = None, autoscaling_config: dict | None = None,
                 env: dict | None = None, args: tuple[str, ...] = ()) -> None:
        self.num_cpus, self.resources, self.args = num_cpus, resources, tuple(args)
        self.autoscaling_config, self.extra_env = autoscaling_config, env or {}
        self.tmp = Path(tempfile.mkdtemp(prefix="crh", dir="/tmp"))  # short: Ray's socket paths must stay < 108
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> "RayHead":
        gcs, dash, agent, agent_grpc, metrics, rt_agent, client, node_mgr, obj_mgr = free_ports(9)
        low = random.randrange(30000, 59000, 100)
        self.gcs_address = f"127.0.0.1:{gcs}"
        self.dashboard_url = f"http://127.0.0.1:{dash}"
        cmd = [str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
               "--node-ip-address=127.0.0.1", f"--port={gcs}", "--include-dashboard=true",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}",
               f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
               f"--runtime-env-agent-port={rt_agent}", f"--ray-client-server-port={client}",
               f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
               f"--min-worker-port={low}", f"--max-worker-port={low + 99}",
               f"--temp-dir={self.tmp}", f"--num-cpus={self.num_cpus}", f"--object-store-memory={200 * 1024**2}"]
        cmd += self.args
        if self.resources:
            cmd.append(f"--resources={json.dumps(self.resources)}")
        env = client_env(**self.extra_env)
        if self.autoscaling_config is not None:
            config = dict(self.autoscaling_config)
            config["provider"] = {**config["provider"], "gcs_address": self.gcs_address}
            path = self.tmp / "autoscaling.json"
            path.write_text(json.dumps(config))
            cmd.append(f"--autoscaling-config={path}")
            env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
        self.log = self.tmp / "head.log"
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:   # the job API answers once the dashboard and its agent are up
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.dashboard_url}/api/jobs/", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the Ray head did not come up within {timeout:.0f} s:\n{self.log.read_text()}")
            time.sleep(1.0)
        return self

    def stop(self) -> None:
        """End the head's process group, then any process of this head that left it (by pid), and its files."""
        if self.proc is not None and self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self.proc is not None:
            try:  # children still in the group after `ray start` itself ended
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in self.stray_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)

    def stray_pids(self) -> list[int]:
        """Processes whose command line names this head's temp dir (raylets and workers of its nodes)."""
        mine = str(self.tmp).encode()
        pids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if mine in (entry / "cmdline").read_bytes():
                        pids.append(int(entry.name))
                except OSError:
                    continue
        return pids

    def __enter__(self) -> "RayHead":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------------- fixtures of the cluster tests
@pytest.fixture(scope="module")
def box_file(tmp_path_factory) -> Path:
    from .tune_helpers import export_tiny_box

    return export_tiny_box(tmp_path_factory.mktemp("box") / "box.pt")


@pytest.fixture(scope="module")
def local_store(box_file, tiny_bench, tmp_path_factory) -> Path:
    """A label store made in-process (no Ray), for the adapt-only tests."""
    from corte_ray.blackbox import open_blackbox
    from corte_ray.blackbox.store import label_dataset_local
    from corte_ray.data.datasets import open_dataset

    out = tmp_path_factory.mktemp("labels") / "store"
    label_dataset_local(open_dataset("synth", tiny_bench, split="train"), open_blackbox(f"file:{box_file}",
                                                                                        device="cpu"), out)
    return out
