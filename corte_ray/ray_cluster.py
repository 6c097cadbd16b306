"""One way into Ray for every command: join the cluster named by RAY_ADDRESS, or start a small local instance.

Under `ray job submit` the entrypoint's environment carries RAY_ADDRESS, so every command joins the cluster it
was submitted to and never starts a private Ray beside it (a private instance on a cluster's head would take
that node's CPUs twice and never see the GPU workers). Without RAY_ADDRESS a local instance starts with the
CPUs the job asks for and a small object store (Ray's defaults take 30 % of RAM). It is started with
`address="local"`: a plain `ray.init()` would join whatever `ray start` head happens to run on this machine
(another user's, or a stale one) and then refuse the explicit CPUs.

Secrets (the HTTP black box token) reach Ray workers through runtime environments, never through argv or logs:
`secret_env_vars` collects the ones set in this process for an actor's `runtime_env={"env_vars": ...}`.
"""

from __future__ import annotations

import logging
import os
from typing import Iterable

log = logging.getLogger(__name__)

# A local instance's object store: batches of images in flight and small stats rows need little.
OBJECT_STORE_BYTES = 512 * 1024**2


def cluster_address() -> str | None:
    """The cluster this process must join (RAY_ADDRESS), or None for a local instance."""
    return os.environ.get("RAY_ADDRESS") or None


def connect(num_cpus: float, object_store_bytes: int = OBJECT_STORE_BYTES, include_dashboard: bool = False,
            resources: dict[str, float] | None = None, **init_kwargs) -> bool:
    """Make sure this process is connected to Ray; True when this call connected (the caller may shut it down).

    A process already connected keeps its cluster. With RAY_ADDRESS set, join that cluster (its size is the
    cluster's: `num_cpus`, `resources` and the object store apply to a local instance only). Otherwise start a
    local instance with max(this machine's cores, `num_cpus`) logical CPUs. `init_kwargs` (log_to_driver,
    runtime_env, ...) go to `ray.init` either way.
    """
    import math

    import ray

    if ray.is_initialized():
        return False
    address = cluster_address()
    if address and address.lower().startswith(("http://", "https://")):
        from .errors import ConfigError

        raise ConfigError(f"RAY_ADDRESS={address} is a dashboard address (what `ray job submit` talks to), not one a "
                          "driver can join: submit the command with jobs/<step>.sh, or unset RAY_ADDRESS to run here")
    if address:
        log.info("joining the Ray cluster at %s (RAY_ADDRESS)", address)
        ray.init(address=address, **init_kwargs)
        return True
    cpus = max(os.cpu_count() or 1, math.ceil(num_cpus))
    ray.init(address="local", num_cpus=cpus, object_store_memory=object_store_bytes,
             include_dashboard=include_dashboard, resources=resources or None, **init_kwargs)
    return True


def secret_env_vars(names: Iterable[str | None]) -> dict[str, str]:
    """{name: value} for the environment variables among `names` that are set and non-empty here, for a Ray
    actor's runtime_env. Under `ray job submit` they come from the job's runtime env (jobs/submit.sh); a driver
    started by hand on a cluster passes its own on to the actors on other nodes this way."""
    return {name: os.environ[name] for name in dict.fromkeys(n for n in names if n) if os.environ.get(name)}
