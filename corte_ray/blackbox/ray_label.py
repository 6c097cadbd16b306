"""The labelling job on Ray Data: query the black box once for every image not yet in the label store.

    keys not in the store -> from_items({key, path}) -> map_batches(decode [+ resize], tasks, fractional CPUs)
        -> map_batches(BoxLabeller, actor pool: box opened once per actor, one atomic Parquet part per batch)
        -> small per-batch stats, streamed to the driver for progress -> thresholds.json

The actors write the parts themselves, so no image's labels travel back to the driver, and a killed job loses
only the batches in flight: every finished batch is one renamed file, and a rerun skips its keys
(`LabelStoreWriter.done_keys`). It is the Ray version of `store.label_dataset_local`, writing the same store.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import storage
from ..errors import ConfigError, CorteError
from .protocol import BlackBox, open_blackbox
from .store import MANIFEST_SUFFIX, LabelStoreWriter, answer_rows, label_store_meta

log = logging.getLogger(__name__)

# Decoding a PNG takes milliseconds next to a model's forward pass: a quarter CPU per read task lets several run
# beside the actors without the actor pool ever waiting for a CPU that read tasks hold.
READ_TASK_CPUS = 0.25
# The last line of a remote traceback of one of our errors, e.g. "corte_ray.errors.InputError: a.png: cannot read".
_REMOTE_ERROR = re.compile(r"^corte_ray\.errors\.(\w+): (.+)$", re.MULTILINE)
# A store of labelled images needs little object store: batches of images in flight and tiny stats rows.
OBJECT_STORE_BYTES = 512 * 1024**2
DEFAULT_TOKEN_ENV = "CORTE_BLACKBOX_TOKEN"  # HttpBlackBox's default token_env


# ------------------------------------------------------------------------------------------ the stages
def make_decoder(reader, resize: tuple[int, int] | None,
                 skip_bad: bool = False) -> Callable[[dict[str, np.ndarray]], dict[str, Any]]:
    """The read task's function: {key, path} rows -> {key, image}, images HxWx3 uint8 (resized to `resize`).

    `reader` is the Dataset with its sample list emptied: its `read_image` is what a format may override (and
    names the file in its errors), and without the list it costs nothing to ship to every task.
    The function is made inside this one so that Ray (cloudpickle) ships it by value: a read worker then
    imports only corte_ray.data (numpy, PIL), not this package, whose __init__ imports torch. On 2 cores
    that halved the time to the first labelled batch (12 s -> 6.5 s), as read workers start beside the actor.
    """

    def decode_batch(batch: dict[str, np.ndarray]) -> dict[str, Any]:
        # Absolute imports: a relative one would import corte_ray.blackbox, and torch with it.
        from corte_ray.data.datasets import Sample
        from corte_ray.data.transforms import resize_image
        from corte_ray.storage import as_path
        from corte_ray.errors import CorteError

        images, keys = [], []
        for key, path in zip(batch["key"], batch["path"]):
            try:
                img = reader.read_image(Sample(str(key), as_path(str(path)), None))
            except CorteError as exc:
                if not skip_bad:
                    raise
                logging.getLogger(__name__).warning("skipped %s", exc)  # the driver counts what is missing
                continue
            keys.append(str(key))
            images.append(resize_image(img, resize) if resize is not None else img)
        if not images:
            return {"key": np.asarray([], dtype=object), "image": np.zeros((0, 1, 1, 3), np.uint8)}
        same_size = all(img.shape == images[0].shape for img in images)
        # One stacked array when the sizes agree (the usual case); a list otherwise, which Ray keeps as a
        # variable-shaped tensor column and BoxLabeller queries size by size.
        return {"key": np.asarray(keys), "image": np.stack(images) if same_size else images}

    return decode_batch


class BoxLabeller:
    """Actor-pool callable for `map_batches`: opens the black box once per actor (a local model is loaded once,
    on the actor's GPU if it has one; an HTTP box keeps one session), queries each batch and writes its rows
    as ONE atomic part of the store. Returns one small stats row per batch."""

    def __init__(self, box_spec: str, answer: str | None, topk: int, device: str, batch_size: int,
                 store_dir: str, meta: dict, threads: int | None = None, box_options: dict | None = None) -> None:
        import torch

        started = time.perf_counter()
        if threads:
            # Ray sets OMP_NUM_THREADS to the actor's CPU count; a benchmark or a host with spare cores may
            # want the box to use more.
            torch.set_num_threads(threads)
        self.box: BlackBox | None = open_blackbox(box_spec, answer=answer, topk=topk, device=device,
                                                  batch_size=batch_size, **(box_options or {}))
        if self.box.answer_kind != meta["box_answer"] or self.box.num_classes != meta["num_classes"]:
            raise CorteError(f"black box {box_spec} answers {self.box.answer_kind} over {self.box.num_classes} "
                             f"classes in this actor but {meta['box_answer']} over {meta['num_classes']} on the "
                             "driver; the store would mix two boxes")
        # The driver wrote meta.json; this writer only checks it and adds parts.
        self.writer = LabelStoreWriter(store_dir, meta)
        self.k = topk
        self._stored: set[str] = set()      # keys in the parts' manifests, read once per manifest
        self._manifests_read: set[str] = set()
        log.info("labelling actor ready in %.1f s: %s on %s", time.perf_counter() - started, self.box.name, device)

    def _stored_keys(self) -> set[str]:
        """Keys already in a part: those of a batch Ray re-runs after an actor died having written its part."""
        for path in storage.listdir(self.writer.parts):
            name = path.name
            if name.endswith(MANIFEST_SUFFIX) and name not in self._manifests_read:
                try:
                    self._stored.update(json.loads(path.read_text())["keys"])
                    self._manifests_read.add(name)
                except (OSError, ValueError, KeyError):
                    continue
        return self._stored

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        keys = [str(k) for k in batch["key"]]
        images = batch["image"]
        retries0, failures0 = backend_counters(self.box)
        start = time.perf_counter()
        rows: list[dict] = []
        stored = self._stored_keys()
        fresh = [i for i, key in enumerate(keys) if key not in stored]
        if len(fresh) < len(keys):
            # Never query (or store) an image twice: a re-run batch costs the missing images only.
            images = [np.asarray(images[i]) for i in fresh]
            images = np.stack(images) if images and all(im.shape == images[0].shape for im in images) else images
        dense = isinstance(images, np.ndarray) and images.dtype != object  # one size: a single group
        keys_in_batch, keys = keys, [keys[i] for i in fresh]
        for idx in _same_size_groups(images) if keys else []:
            group = images if dense else np.stack([np.asarray(images[i]) for i in idx])
            if not group.flags.writeable:  # Ray hands zero-copy read-only views; torch.from_numpy warns on them
                group = group.copy()
            answer = self.box.query(np.ascontiguousarray(group, dtype=np.uint8))
            rows.extend(answer_rows(answer, [keys[i] for i in idx], self.k))
        query_s = time.perf_counter() - start
        part = self.writer.write_part(rows)
        retries1, failures1 = backend_counters(self.box)
        return {
            "keys": np.array(["\n".join(keys_in_batch)]),
            "num_images": np.array([len(keys_in_batch)], dtype=np.int64),
            "queried": np.array([len(keys)], dtype=np.int64),
            "part_bytes": np.array([part.stat().st_size if part else 0], dtype=np.int64),
            "query_seconds": np.array([query_s]),
            "retries": np.array([retries1 - retries0], dtype=np.int64),
            "failures": np.array([failures1 - failures0], dtype=np.int64),
            # Wall-clock time the part was done, for the steady-state rate: the driver receives the small stats
            # rows in bursts, so their arrival times say little about when the work happened.
            "finished_at": np.array([time.time()]),
        }

    def __del__(self) -> None:
        box = getattr(self, "box", None)
        if box is not None:
            box.close()
            self.box = None


def _same_size_groups(images: Any) -> list[list[int]]:
    """Indices of the images of each size, in order: a box is queried with one size per call."""
    if isinstance(images, np.ndarray) and images.dtype != object:
        return [list(range(len(images)))]
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(tuple(np.shape(img)), []).append(i)
    return list(groups.values())


def backend_counters(box: BlackBox) -> tuple[int, int]:
    """(retries, failures) so far, for backends that count them (an HTTP box retrying failed requests).

    A backend reports them as int attributes `retries` / `failures`, or in a dict `stats`; others count 0.
    """
    stats = getattr(box, "stats", None)
    if callable(stats):
        stats = stats()
    source = stats if isinstance(stats, dict) else {}

    def count(name: str) -> int:
        value = source.get(name, getattr(box, name, 0))
        return int(value) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else 0

    return count("retries"), count("failures")


# ------------------------------------------------------------------------------------------ Ray set-up
def ensure_ray(cpus_needed: float, gpus_needed: float) -> bool:
    """Join the Ray cluster the caller set up (RAY_ADDRESS), or start a local one sized for this job.

    Returns True when this call connected (the caller then disconnects at the end): a driver that called
    `ray.init` itself keeps its cluster (ray_cluster.connect).
    """
    from ..ray_cluster import cluster_address, connect

    connected = connect(cpus_needed, OBJECT_STORE_BYTES)
    _check_resources(cpus_needed, gpus_needed, local=connected and not cluster_address())
    return connected


def _check_resources(cpus_needed: float, gpus_needed: float, local: bool) -> None:
    """Fail early where the actor pool can never start (a local cluster without the GPUs asked for hangs
    instead of failing); on a cluster only warn, its autoscaler may add the nodes."""
    import ray

    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    if gpus < gpus_needed:
        msg = (f"the labelling actors need {gpus_needed:g} GPU(s) in all but the Ray cluster has {gpus:g}; "
               "use --gpus-per-actor 0 (label on CPUs) or a cluster with GPU workers")
        if local:
            raise ConfigError(msg)
        log.warning("%s (waiting for the autoscaler)", msg)
    if cpus < cpus_needed:
        log.warning("the labelling job needs %.2f CPUs (actors + read tasks) but the cluster has %g now; it "
                    "waits until the autoscaler adds some", cpus_needed, cpus)


# ------------------------------------------------------------------------------------------ the job
def label_dataset_ray(dataset, box_spec: str, store_dir: str | Path, resize: tuple[int, int] | None = None,
                      answer: str | None = "probs", topk: int = 2, batch_size: int = 8, num_actors: int = 1,
                      num_gpus_per_actor: float = 0.0, cpus_per_actor: float = 1.0, overwrite: bool = False,
                      budget: int | None = None, device: str = "auto", threads_per_actor: int | None = None,
                      log_every_s: float = 5.0, box_options: dict | None = None, skip_bad: bool = False) -> dict:
    """Label every image of `dataset` not yet in the store at `store_dir` with the box `box_spec`, on Ray Data.

    One part per batch of `batch_size` images, written by the actor that queried it; `num_actors` actors,
    each with `cpus_per_actor` CPUs and `num_gpus_per_actor` GPUs (device "auto" = the actor's GPU if it
    has one, else the CPU). `budget` caps the number of images queried in this run (a paid endpoint); the
    rest stay for a rerun. `overwrite` relabels everything. Starts Ray if nobody has (see `ensure_ray`).

    Returns the thresholds document (store.write_thresholds) with the run's statistics under "run":
    labelled (now), skipped (already in the store), remaining (over budget), seconds and images_per_s (call to
    finished store), steady_images_per_s (after the first batch), first_batch_seconds, ray_init_seconds,
    query_seconds (in the box), retries and failures (as the backend counts them), duplicates (batches Ray
    re-ran), bytes_written, store_images, store_bytes and store_bytes_per_image (all parts / images).
    """
    _validate(batch_size, num_actors, num_gpus_per_actor, cpus_per_actor, budget, topk)
    start = time.perf_counter()
    # The store's meta needs the box's identity (answer kind, classes, name) before any actor exists: open it
    # once here on the CPU, without querying it.
    box_options = box_options or {}
    with open_blackbox(box_spec, answer=answer, topk=topk, device="cpu", batch_size=batch_size,
                       **box_options) as probe:
        meta = label_store_meta(probe, dataset, resize, topk)
    writer = LabelStoreWriter(store_dir, meta, overwrite=overwrite)
    done = writer.done_keys()
    todo = [s for s in dataset.samples if s.key not in done]
    skipped = len(dataset.samples) - len(todo)
    remaining = 0
    if budget is not None and len(todo) > budget:
        remaining = len(todo) - budget
        todo = todo[:budget]
    if skipped:
        log.info("label store %s already holds %d of the %d images; labelling the %d missing", store_dir,
                 skipped, len(dataset.samples), len(todo) + remaining)
    run = {"labelled": 0, "skipped": skipped, "remaining": remaining, "skipped_bad": 0,
           "damaged_parts": len(writer.damaged), "retries": 0, "failures": 0, "duplicates": 0,
           "query_seconds": 0.0, "bytes_written": 0, "ray_init_seconds": 0.0, "first_batch_seconds": None,
           "steady_images_per_s": None}
    if todo:
        # A store being added to is not finished: without thresholds.json a reader says "rerun the job"
        # instead of training on statistics that miss the new images.
        (storage.as_path(store_dir) / "thresholds.json").unlink(missing_ok=True)
        actor_device = device
        if device == "auto":
            # An actor that reserved no GPU still sees the node's GPUs (Ray sets CUDA_VISIBLE_DEVICES only for
            # those that did); "auto" must not take one that another job may have reserved.
            actor_device = "cuda" if num_gpus_per_actor > 0 else "cpu"
        elif device.startswith("cuda") and num_gpus_per_actor == 0:
            log.info("device %s: each labelling actor reserves one GPU", device)
            num_gpus_per_actor = 1.0
        t_init = time.perf_counter()
        connected = ensure_ray(num_actors * cpus_per_actor + READ_TASK_CPUS, num_actors * num_gpus_per_actor)
        run["ray_init_seconds"] = time.perf_counter() - t_init
        try:
            _run_pipeline(dataset, todo, box_spec, str(store_dir), meta, resize, answer, topk, batch_size,
                          num_actors, num_gpus_per_actor, cpus_per_actor, actor_device, threads_per_actor,
                          budget, log_every_s, run, box_options, skip_bad)
            if skip_bad:
                run["skipped_bad"] = len(todo) - run["labelled"]
        finally:
            if connected:
                import ray

                ray.shutdown()
    doc = writer.finalize()
    seconds = time.perf_counter() - start
    part_bytes = sum(p.stat().st_size for p in writer.parts.glob("*.parquet"))
    run.update(seconds=seconds, images_per_s=run["labelled"] / seconds if run["labelled"] else 0.0,
               store_images=doc["num_images"], store_bytes=part_bytes,
               store_bytes_per_image=part_bytes / doc["num_images"] if doc["num_images"] else 0.0)
    log.info("labelled %d images (%d already in the store%s) into %s in %.1f s (%.2f img/s); store: %d images, "
             "%.0f bytes/image; %d retries, %d failures", run["labelled"], skipped,
             f", {remaining} left over budget" if remaining else "", store_dir, seconds, run["images_per_s"],
             doc["num_images"], run["store_bytes_per_image"], run["retries"], run["failures"])
    if remaining:
        log.warning("budget of %d images reached: %d images are not labelled yet; rerun to continue", budget,
                    remaining)
    return {**doc, "run": run}


def _run_pipeline(dataset, todo, box_spec: str, store_dir: str, meta: dict, resize, answer, topk: int,
                  batch_size: int, num_actors: int, num_gpus_per_actor: float, cpus_per_actor: float,
                  device: str, threads: int | None, budget: int | None, log_every_s: float, run: dict,
                  box_options: dict, skip_bad: bool) -> None:
    """Build the Ray Data pipeline over `todo` and drain its stats stream, logging progress into `run`."""
    import ray

    items = [{"key": s.key, "path": str(s.image)} for s in todo]
    reader = dataclasses.replace(dataset, samples=[])
    # One block per batch: every read task decodes exactly one batch, and the actor pool sees batches as soon
    # as they are decoded.
    ds = ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / batch_size))
    ds = ds.map_batches(make_decoder(reader, tuple(resize) if resize else None, skip_bad), batch_size=batch_size,
                        batch_format="numpy", num_cpus=READ_TASK_CPUS)
    ds = ds.map_batches(
        BoxLabeller, batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=num_actors),
        num_cpus=cpus_per_actor,
        num_gpus=num_gpus_per_actor if num_gpus_per_actor > 0 else None,
        **_actor_runtime_env(box_spec, box_options),
        fn_constructor_kwargs={"box_spec": box_spec, "answer": answer, "topk": topk, "device": device,
                               "batch_size": batch_size, "store_dir": store_dir, "meta": meta, "threads": threads,
                               "box_options": box_options})
    total = len(items)
    t0 = last_log = time.perf_counter()
    finished: list[tuple[float, int]] = []
    labelled_keys: set[str] = set()
    try:
        for stats in ds.iter_rows():
            batch_keys = [key for key in str(stats["keys"]).split("\n") if key]
            # A key seen twice is a batch Ray re-ran after its actor died: its part is in the store twice,
            # which every reader of the store deduplicates (first part wins); counted, not an error.
            run["duplicates"] += sum(key in labelled_keys for key in batch_keys)
            labelled_keys.update(batch_keys)
            run["labelled"] = len(labelled_keys)
            run["retries"] += int(stats["retries"])
            run["failures"] += int(stats["failures"])
            run["query_seconds"] += float(stats["query_seconds"])
            run["bytes_written"] += int(stats["part_bytes"])
            now = time.perf_counter()
            if not finished:
                run["first_batch_seconds"] = now - t0
            finished.append((float(stats["finished_at"]), int(stats["num_images"])))
            if now - last_log >= log_every_s:
                last_log = now
                left = f", budget left {budget - run['labelled']}" if budget is not None else ""
                log.info("label: %d/%d images (%.0f%%), %.2f img/s, %d retries, %d failures%s", run["labelled"],
                         total, 100.0 * run["labelled"] / total, run["labelled"] / (now - t0), run["retries"],
                         run["failures"], left)
    except Exception as err:
        cause = _user_error(err)
        if cause is None:
            raise
        # The user's error (a corrupt image, a refused request) names what to fix; Ray's traceback buries it.
        raise type(cause)(f"{cause} ({run['labelled']} images labelled before it are kept in the store; "
                          "rerun once this is fixed to label the rest)") from None
    finished.sort()
    if len(finished) > 1 and finished[-1][0] > finished[0][0]:
        # Throughput once the first batch is done: actor start-up and model loading excluded.
        run["steady_images_per_s"] = sum(n for _, n in finished[1:]) / (finished[-1][0] - finished[0][0])


def _actor_runtime_env(box_spec: str, box_options: dict) -> dict:
    """An HTTP box's token for the actors: they may run on nodes whose environment never held it (their workers
    inherit the node's raylet environment, not the driver's). It travels in the actors' runtime env, merged
    into the job's; never in argv, an actor argument or a log line."""
    from ..ray_cluster import secret_env_vars

    if not box_spec.lower().startswith(("http://", "https://")):
        return {}
    token_env = box_options["token_env"] if "token_env" in box_options else DEFAULT_TOKEN_ENV
    secrets = secret_env_vars([token_env])
    return {"runtime_env": {"env_vars": secrets}} if secrets else {}


def _user_error(err: BaseException) -> CorteError | None:
    """The CorteError (InputError, ConfigError...) a Ray task raised, rebuilt from Ray's error.

    Ray Data hands the driver a UserCodeException that carries the remote traceback only as text (the original
    exception object does not come back), and the last "corte_ray.errors.X: message" line in it is what the
    user needs: the message names the file or setting to fix.
    """
    from ray.exceptions import RayError

    if isinstance(err, CorteError) and not isinstance(err, RayError):
        return err
    matches = _REMOTE_ERROR.findall(str(err))
    if not matches:
        return None
    kind, message = matches[-1]
    return (ConfigError if kind == "ConfigError" else CorteError)(message)


def _validate(batch_size: int, num_actors: int, num_gpus_per_actor: float, cpus_per_actor: float,
              budget: int | None, topk: int) -> None:
    if batch_size < 1:
        raise ConfigError(f"blackbox.batch_size must be >= 1, got {batch_size}")
    if num_actors < 1:
        raise ConfigError(f"the labelling job needs at least one actor, got num_actors={num_actors}")
    if num_gpus_per_actor < 0 or cpus_per_actor <= 0:
        raise ConfigError(f"an actor needs > 0 CPUs and >= 0 GPUs, got cpus={cpus_per_actor}, "
                          f"gpus={num_gpus_per_actor}")
    if budget is not None and budget < 0:
        raise ConfigError(f"the query budget must be >= 0 images, got {budget}")
    if topk < 2:
        raise ConfigError(f"blackbox.topk must be >= 2 (relative confidence needs two classes), got {topk}")
