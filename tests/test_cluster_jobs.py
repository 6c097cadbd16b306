"""corte-ray on a real Ray cluster: a `ray start --head` on 127.0.0.1 (tests/ray_head.py), jobs submitted with the
jobs/ scripts, and the reference HTTP black box (`corte-ray serve-blackbox --token-env`) asking for a token.

- jobs/label.sh + jobs/adapt.sh run a tiny label + adapt end to end on the head; `ray job logs` returns their
  logs; the commands joined the cluster (no private Ray); the token is in no output and no log.
- A driver started by hand on the cluster (RAY_ADDRESS, token in its own environment only): a labelling actor
  created without the token in its runtime env gets 401 (the head's workers never saw the driver's
  environment); `corte-ray label` passes the token through the actors' runtime env and labels everything.
- Train workers asking for every CPU fail at once, naming scaling.data_cpus, instead of hanging.
"""

from __future__ import annotations

import secrets
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from .ray_head import BIN, REPO, TINY_ADAPT, RayHead, box_file, client_env, free_ports, local_store  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.timeout(1200)]
TOKEN = "corte-" + secrets.token_hex(12)


@pytest.fixture(scope="module")
def head():
    with RayHead(num_cpus=2) as h:
        yield h


@pytest.fixture(scope="module")
def box_url(box_file, tmp_path_factory):
    """The reference server in its own process, asking for TOKEN (from its CORTE_TEST_TOKEN)."""
    port = free_ports(1)[0]
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / "corte-ray"), "serve-blackbox", str(box_file), "--port", str(port),
                                 "--token-env", "CORTE_TEST_TOKEN", "--device", "cpu"],
                                env=client_env(CORTE_TEST_TOKEN=TOKEN), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            assert proc.poll() is None, f"the server exited:\n{log.read_text()}"
            try:
                req = urllib.request.Request(url + "/v1/info", headers={"Authorization": f"Bearer {TOKEN}"})
                with urllib.request.urlopen(req, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                assert time.monotonic() < deadline, f"the server did not answer:\n{log.read_text()}"
                time.sleep(0.5)
        with pytest.raises(urllib.error.HTTPError, match="401"):   # it does ask for the token
            urllib.request.urlopen(url + "/v1/info", timeout=5)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def _submit(script: str, args: list[str], head: RayHead, job_id: str, timeout: float = 600, **env):
    cmd = [str(REPO / "jobs" / script), *map(str, args)]
    env = client_env(RAY_ADDRESS=head.dashboard_url, CORTE_SUBMIT_ARGS=f"--submission-id {job_id}", **env)
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _job_logs(head: RayHead, job_id: str) -> str:
    r = subprocess.run([str(BIN / "ray"), "job", "logs", "--address", head.dashboard_url, job_id],
                       env=client_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _store_images(store: Path) -> int:
    from corte_ray.blackbox.store import LabelStore

    return len(LabelStore(store))


def test_jobs_scripts_label_and_adapt_on_the_head(head, box_url, tiny_bench, tmp_path):
    store, run = tmp_path / "store", tmp_path / "run"
    label_id, adapt_id = f"label-{uuid.uuid4().hex[:8]}", f"adapt-{uuid.uuid4().hex[:8]}"
    # The token is in the submitter's environment only; jobs/label.sh hands it to the job's runtime env.
    r = _submit("label.sh", ["--dataset", "synth", "--root", tiny_bench, "--split", "train", "--blackbox", box_url,
                             "--out", store, "blackbox.batch_size=4"], head, label_id, CORTE_BLACKBOX_TOKEN=TOKEN)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "env_vars CORTE_BLACKBOX_TOKEN (values not shown)" in out and TOKEN not in out
    assert _store_images(store) == 12
    log = _job_logs(head, label_id)
    assert f"the store {store} holds 12 images" in log
    assert "joining the Ray cluster at" in log and "Started a local Ray instance" not in log
    assert TOKEN not in log

    r = _submit("adapt.sh", ["--out", run, "--dataset", "synth", "--root", tiny_bench, "--label-store", store,
                             *TINY_ADAPT], head, adapt_id)
    assert r.returncode == 0, r.stdout + r.stderr
    log = _job_logs(head, adapt_id)
    assert '"step": 2' in log and "joining the Ray cluster at" in log and "Started a local Ray instance" not in log
    assert list(run.rglob("checkpoint.pt")) and (run / "metrics.jsonl").exists()
    # The driver's log on the cluster (what `ray job logs` reads) holds no token either.
    assert not any(TOKEN in p.read_text(errors="replace") for p in head.tmp.rglob("job-driver-*.log"))


def test_a_hand_started_driver_hands_the_token_to_its_labelling_actors(head, box_url, tiny_bench, tmp_path):
    env = client_env(RAY_ADDRESS=head.gcs_address, CORTE_BLACKBOX_TOKEN=TOKEN)
    # Without the token in its runtime env, an actor on the cluster does not have it: 401.
    probe = (
        "import ray\n"
        "from corte_ray.blackbox import open_blackbox\n"
        "from corte_ray.blackbox.ray_label import BoxLabeller\n"
        "ray.init()\n"
        f"open_blackbox({box_url!r}, device='cpu').close()\n"
        "print('driver: answered')\n"
        "actor = ray.remote(BoxLabeller).options(num_cpus=0.25, max_restarts=0).remote(\n"
        f"    {box_url!r}, 'probs', 2, 'cpu', 4, {str(tmp_path / 'unused')!r}, {{}})\n"
        "try:\n"
        "    ray.get(actor.__ray_ready__.remote())\n"
        "    print('actor: answered')\n"
        "except Exception as err:\n"
        "    print('actor:', 'HTTP 401' if 'HTTP 401' in str(err) else str(err)[-2000:])\n"
    )
    r = subprocess.run([str(BIN / "python"), "-c", probe], env=env, cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "driver: answered" in r.stdout and "actor: HTTP 401" in r.stdout, r.stdout + r.stderr

    # corte-ray label from the same kind of driver: the actors get the token through their runtime env.
    store = tmp_path / "store"
    r = subprocess.run([str(BIN / "corte-ray"), "label", "--engine", "ray", "--dataset", "synth", "--root",
                        str(tiny_bench), "--split", "train", "--blackbox", box_url, "--out", str(store),
                        "blackbox.batch_size=4"], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "joining the Ray cluster at" in out and TOKEN not in out
    assert _store_images(store) == 12


def test_workers_on_every_cpu_fail_at_once_naming_data_cpus(head, local_store, tiny_bench, tmp_path):
    job_id = f"adapt-full-{uuid.uuid4().hex[:8]}"
    start = time.monotonic()
    # 2 workers x 1 CPU on the 2-CPU head: the decode actors would never get a CPU and training would hang.
    r = _submit("adapt.sh", ["--out", tmp_path / "run", "--dataset", "synth", "--root", tiny_bench,
                             "--label-store", local_store, *TINY_ADAPT, "scaling.num_workers=2",
                             "scaling.cpus_per_worker=1"], head, job_id, timeout=300)
    seconds = time.monotonic() - start
    assert r.returncode == 1, r.stdout + r.stderr          # the job failed (a hang would time out)
    log = _job_logs(head, job_id)
    assert "scaling.data_cpus" in log and "need 2.5 CPUs, the cluster has 2" in log, log[-3000:]
    assert seconds < 180, f"took {seconds:.0f} s to fail"
