"""check_cluster counts everything a training job places (Train workers' CPUs, GPUs and custom resources plus
each worker's decode actor, scaling.data_cpus) and refuses at once what would otherwise hang; with scaling.wait_for_gpus
(an autoscaling cluster) it waits instead. No Ray instance: the cluster's resources are given."""

from __future__ import annotations

import logging

import pytest

from corte_ray.config import load_config
from corte_ray.errors import ConfigError
from corte_ray.train.ray_engine import check_cluster, job_needs


def _cfg(*overrides):
    return load_config(None, ["scaling.engine=ray", *overrides])


def test_workers_on_every_cpu_fail_at_once_naming_data_cpus():
    # 2 workers x 1 CPU on a 2-CPU cluster: the workers fit, but their decode actors never get a CPU.
    cfg = _cfg("scaling.num_workers=2", "scaling.cpus_per_worker=1", "scaling.data_cpus=0.5")
    assert job_needs(cfg) == {"CPU": 3.0}
    with pytest.raises(ConfigError, match=r"scaling\.data_cpus\)\) need 3 CPUs, the cluster has 2") as err:
        check_cluster(cfg, {"CPU": 2.0})
    assert "never starts" in str(err.value) and "scaling.cpus_per_worker" in str(err.value)
    check_cluster(_cfg("scaling.num_workers=2", "scaling.cpus_per_worker=0.5", "scaling.data_cpus=0.5"),
                  {"CPU": 2.0})                                      # 2 x (0.5 + 0.5) fits exactly


def test_gpus_are_counted_per_worker():
    cfg = _cfg("scaling.num_workers=2", "scaling.use_gpu=true", "scaling.cpus_per_worker=1")
    assert job_needs(cfg) == {"CPU": 3.0, "GPU": 2.0}
    with pytest.raises(ConfigError, match="scaling.use_gpu: the Ray cluster has 1 GPUs, scaling.num_workers=2"):
        check_cluster(cfg, {"CPU": 8.0, "GPU": 1.0})
    with pytest.raises(ConfigError, match="scaling.use_gpu: the Ray cluster has no GPUs"):
        check_cluster(cfg, {"CPU": 8.0})
    check_cluster(cfg, {"CPU": 8.0, "GPU": 2.0})


def test_custom_resources_per_worker_are_counted_and_can_be_waited_for(caplog):
    cfg = _cfg("scaling.num_workers=2", "scaling.cpus_per_worker=0.5", "scaling.resources_per_worker={fake_gpu: 1}")
    assert job_needs(cfg) == {"CPU": 2.0, "fake_gpu": 2.0}
    with pytest.raises(ConfigError, match=r"scaling.resources_per_worker.fake_gpu: 2 workers x 1 need 2, the "
                                          r"cluster has 1"):
        check_cluster(cfg, {"CPU": 4.0, "fake_gpu": 1.0})
    check_cluster(cfg, {"CPU": 4.0, "fake_gpu": 2.0})
    # An autoscaling cluster that starts with no worker node: nothing is there yet, and that is not an error.
    waiting = _cfg("scaling.num_workers=2", "scaling.cpus_per_worker=0.5",
                   "scaling.resources_per_worker={fake_gpu: 1}", "scaling.wait_for_gpus=true")
    with caplog.at_level(logging.WARNING, logger="corte_ray.train.ray_engine"):
        check_cluster(waiting, {"CPU": 1.0})
    assert "waiting for the autoscaler" in caplog.text and "resources_per_worker.fake_gpu" in caplog.text


def test_resources_per_worker_rejects_cpu_gpu_and_non_positive_amounts():
    with pytest.raises(ConfigError, match="scaling.resources_per_worker.GPU: set CPUs with"):
        _cfg("scaling.resources_per_worker={GPU: 1}")
    with pytest.raises(ConfigError, match="scaling.resources_per_worker.x: must be > 0"):
        _cfg("scaling.resources_per_worker={x: 0}")
    with pytest.raises(ConfigError, match="scaling.resources_per_worker: must be a mapping"):
        _cfg("scaling.resources_per_worker=2")


def test_a_sweep_counts_every_concurrent_trial_and_can_wait_for_the_autoscaler(caplog):
    from corte_ray.tune.sweep import _check_resources

    cfg = _cfg("scaling.num_workers=1", "scaling.use_gpu=true", "scaling.cpus_per_worker=1")
    assert _check_resources(cfg, 2, {"CPU": 8.0, "GPU": 2.0}) == pytest.approx(1.51)   # 1 + 0.5 + the driver's
    with pytest.raises(ConfigError, match=r"--max-concurrent: 2 trials x 1 GPU \(scaling.use_gpu\) do not fit the "
                                          r"cluster's 1"):
        _check_resources(cfg, 2, {"CPU": 8.0, "GPU": 1.0})
    with pytest.raises(ConfigError, match=r"2 trials x 1.51 CPUs .* need 3.02 CPUs, the cluster has 3"):
        _check_resources(cfg, 2, {"CPU": 3.0, "GPU": 2.0})
    waiting = _cfg("scaling.num_workers=1", "scaling.use_gpu=true", "scaling.wait_for_gpus=true")
    with caplog.at_level(logging.WARNING, logger="corte_ray.tune.sweep"):
        _check_resources(waiting, 4, {"CPU": 1.0})                   # GPU nodes start at 0: not refused
    assert "waiting for the autoscaler" in caplog.text and "trials x 1 GPU" in caplog.text
