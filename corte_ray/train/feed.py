"""The Ray engine's training input: each rank's batches in `sample_order`, decoded by an autoscaling actor pool.

Every Train worker builds its own stream when the loop asks for batches (`rank_stream`), starting at the step
it resumed from, so a restart (a new worker group after a lost node, or `--resume`) reads exactly the batches
an uninterrupted run reads, and nothing is decoded twice. The stream is a `ray.data.from_items` of *block*
ids: a decode actor turns block j into the `steps_per_block` x batch_size images of steps
start + j*steps_per_block ... (the order of `sample_order`, computed there, never materialised on the driver),
reads their box answers from the label store part by part, and tags every row with its step. The pool grows
from one actor per rank up to `scaling.data_workers` while the trainer waits for data, so decoding scales with
the workers and with the nodes they run on; no ordering is asked of Ray Data (`preserve_order` stays off):
`ordered_batches` puts rows back in step order on the worker, holding at most the blocks in flight.
"""

from __future__ import annotations

import itertools
import logging
from typing import Iterable, Iterator

import numpy as np
import torch

from ..errors import ConfigError

log = logging.getLogger(__name__)
STEP = "step"                 # the column that tags every row with the training step it belongs to
SLOT = "slot"                 # ... and with its place in that step's batch
IMAGES_PER_BLOCK = 64         # a block is about this many images: decode work per actor call


def steps_per_block(batch_size: int, images: int = IMAGES_PER_BLOCK) -> int:
    return max(1, images // max(1, batch_size))


def block_steps(block: int, start_step: int, iterations: int, per_block: int) -> range:
    """The training steps of block `block` of a stream that starts at `start_step`."""
    first = start_step + block * per_block
    return range(first, min(first + per_block, iterations))


class DecodeBlock:
    """Ray Data callable (one actor of the pool): block ids -> the decoded rows of their steps, tagged by step.

    Holds the training set (a loop.TargetTrainSet: the dataset plus the open label store) for its lifetime;
    the rows' order is `sample_order(n, batch_size, seed, rank, step)`, the local engine's order for that rank."""

    def __init__(self, data, batch_size: int, seed: int, rank: int, start_step: int, iterations: int,
                 per_block: int) -> None:
        self.data, self.b, self.seed, self.rank = data, batch_size, seed, rank
        self.start, self.iterations, self.per_block = start_step, iterations, per_block

    def indices(self, block: int) -> tuple[list[int], list[int]]:
        """(image indices, their steps) of one block."""
        from .data import sample_order

        steps = block_steps(block, self.start, self.iterations, self.per_block)
        if not steps:
            return [], []
        order = sample_order(len(self.data), self.b, self.seed, self.rank, steps.start)
        idx = list(itertools.islice(iter(order), len(steps) * self.b))
        return idx, [s for s in steps for _ in range(self.b)]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        idx, steps = [], []
        for block in batch["id"]:
            i, s = self.indices(int(block))
            idx += i
            steps += s
        store = getattr(self.data, "store", None)
        if store is not None:   # the block's box answers, read part by part (one read per part, not per image)
            store.prefetch([self.data.dataset.samples[i].key for i in idx])
        items = [self.data[i] for i in idx]
        shapes = {it["image"].shape for it in items}
        if len(shapes) > 1:
            raise ConfigError(f"data.resize: images of different sizes {sorted(shapes)} in one stream; "
                              f"set data.resize=[H, W]")
        out = {k: np.stack([it[k] for it in items]) for k in items[0]}
        out[STEP] = np.asarray(steps, dtype=np.int64)
        out[SLOT] = np.arange(len(steps), dtype=np.int64) % self.b
        return out


def _idle_backoff_class():
    """A Ray Data ExecutionCallback that pauses the stream's scheduling loop while it has nothing to do.

    Ray Data 2.60's StreamingExecutor runs its loop in the consuming process (here: the Train worker) and only
    blocks in `ray.wait` while a task is running. When the trainer is the slow side (always: decoding a block is
    ~70x faster than training on it, benchmarks/train.py) the decoded blocks wait, held back by the output budget,
    `ray.wait` returns at once on them, and the loop spins: measured at ~45 % of a core per worker, holding the GIL against the training thread, which
    made two sweep trials on 2 cores train at 2.5 images/s each against 9 on the local engine. A loop step after
    which nothing moved (no task started or finished, no output made or taken) is followed by a 50 ms pause: it
    delays the next dispatch by at most that, against seconds of training per block."""
    import time

    from ray.data._internal.execution.execution_callback import ExecutionCallback

    class IdleBackoff(ExecutionCallback):
        def __init__(self) -> None:
            self._last = None

        def on_execution_step(self, executor) -> None:
            topology = getattr(executor, "_topology", None)
            if not topology:
                return
            try:   # what moved since the last step: tasks started or finished, outputs made or taken
                now = tuple((m.num_tasks_submitted, m.num_tasks_finished, m.num_task_outputs_generated,
                             m.num_outputs_taken) for m in (op.metrics for op in topology))
            except AttributeError:   # another Ray Data: leave its loop alone
                return
            if now == self._last:
                time.sleep(IDLE_PAUSE_S)
            self._last = now

    return IdleBackoff


IDLE_PAUSE_S = 0.05


def rank_stream(data, cfg, rank: int, start_step: int):
    """The Ray Data stream of one rank's training rows from `start_step` to `train.iterations`."""
    import ray.data

    per_block = steps_per_block(cfg.data.batch_size)
    blocks = -(-max(0, cfg.train.iterations - start_step) // per_block)
    # Block ids as in-memory items, one per Ray Data block: no read task, which would want a whole CPU that the
    # Train workers and decode actors may already hold (a 2-CPU node with 2 x 0.5 + 2 x 0.5 would hang).
    ids = [{"id": j} for j in range(max(blocks, 1))]
    ds = ray.data.from_items(ids, override_num_blocks=len(ids))
    s = cfg.scaling
    ds = ds.map_batches(
        DecodeBlock, batch_size=1, num_cpus=s.data_cpus,
        fn_constructor_args=(data, cfg.data.batch_size, cfg.train.seed, rank, start_step, cfg.train.iterations,
                             per_block),
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, s.data_workers)))
    ds.context.enable_progress_bars = False   # one log line per progress window is ours (ProgressReporter)
    # This stream's own context (not the global one): no busy scheduling loop beside the trainer.
    ds.context.custom_execution_callback_classes = [*ds.context.custom_execution_callback_classes,
                                                    _idle_backoff_class()]
    return ds


def ordered_batches(chunks: Iterable[dict[str, np.ndarray]], batch_size: int, start_step: int,
                    iterations: int) -> Iterator[dict[str, torch.Tensor]]:
    """Training batches in step order from step-tagged rows arriving in any order (Ray Data does not keep order
    unless asked, and asking serialises the pool). Rows of steps before `start_step` are dropped."""
    pending: dict[int, list[dict[str, np.ndarray]]] = {}
    have: dict[int, int] = {}
    nxt = start_step

    def ready() -> Iterator[dict[str, torch.Tensor]]:
        nonlocal nxt
        while have.get(nxt, 0) >= batch_size:
            parts = pending.pop(nxt)
            del have[nxt]
            rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
            order = np.argsort(rows[SLOT], kind="stable")   # a step's rows may come in several chunks
            yield {k: torch.from_numpy(np.ascontiguousarray(v[order])) for k, v in rows.items()
                   if k not in (STEP, SLOT)}
            nxt += 1

    for chunk in chunks:
        steps = np.asarray(chunk[STEP])
        for s in np.unique(steps):
            s = int(s)
            if s < nxt:
                continue
            sel = steps == s
            pending.setdefault(s, []).append({k: np.asarray(v)[sel] for k, v in chunk.items()})
            have[s] = have.get(s, 0) + int(sel.sum())
        yield from ready()
    if nxt < iterations:
        raise RuntimeError(f"the training stream ended at step {nxt} of {iterations} "
                           f"({len(pending)} incomplete steps buffered)")
