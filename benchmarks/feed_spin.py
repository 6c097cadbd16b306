"""Ray Data's scheduling loop beside a slow consumer, with and without train/feed.py's IdleBackoff.

Ray Data 2.60 runs a stream's scheduling loop in the consuming process (for the training feed: the Train worker).
When the consumer is the slow side, finished decode outputs wait behind the output budget, `ray.wait` returns at
once on them and the loop spins. This runs the same actor-pool stream twice (2 MB outputs, a consumer taking
50 ms per block) and prints the loop's steps and this process's CPU seconds for each:

    python benchmarks/feed_spin.py

Measured here (2 cores, 2026-12-02): without the backoff 2755 loop steps and 7.8 CPU-s in 15.2 s; with it 254 steps
and 3.8 CPU-s in 16.2 s. In a 2-trial `corte-ray tune` sweep on 2 cores each trial trained at 2.0-2.5 images/s
without it and 4.0 with it (py-spy showed the loop thread holding the GIL beside the training thread).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class TwoMegabytes:
    def __call__(self, batch):
        return {"x": np.zeros((len(batch["id"]), 2_000_000), np.uint8)}


def run(backoff: bool, blocks: int) -> dict:
    import ray.data
    from ray.data._internal.execution.execution_callback import ExecutionCallback

    from corte_ray.train.feed import _idle_backoff_class

    steps = [0]

    class Count(ExecutionCallback):
        def on_execution_step(self, executor) -> None:
            steps[0] += 1

    ds = ray.data.from_items([{"id": i} for i in range(blocks)], override_num_blocks=blocks).map_batches(
        TwoMegabytes, batch_size=1, num_cpus=0.5, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2))
    ds.context.enable_progress_bars = False
    ds.context.custom_execution_callback_classes = [*ds.context.custom_execution_callback_classes, Count,
                                                    *([_idle_backoff_class()] if backoff else [])]
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in ds.iter_batches(batch_size=None):
        time.sleep(0.05)   # the trainer
    return {"loop_steps": steps[0], "cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - t0}


def main() -> None:
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=2, object_store_memory=150 * 1024**2, include_dashboard=False)
    rows = {"without backoff": run(False, 200), "with backoff": run(True, 200)}
    ray.shutdown()
    print(f"{'':16s} {'loop steps':>10s} {'CPU s':>7s} {'wall s':>7s}")
    for name, r in rows.items():
        print(f"{name:16s} {r['loop_steps']:10d} {r['cpu_s']:7.1f} {r['wall_s']:7.1f}")
    print("command: python benchmarks/feed_spin.py")
    out = REPO / "benchmarks" / "results" / "feed_spin.json"
    out.write_text(json.dumps({"rows": rows, "command": "python benchmarks/feed_spin.py"}, indent=2) + "\n")


if __name__ == "__main__":
    main()
