"""The reference black-box server under load: 32 concurrent clients on loopback for a bounded time, 20 % of
their requests failing on the client side, every image answered and stored exactly once.

    python benchmarks/serve.py --clients 32 --seconds 25 --fault-rate 0.2

The server is `corte-ray serve-blackbox` in its own process (so its peak RSS is its own), serving a randomly
initialised student (--arch) exported to TorchScript on the CPU. Each client is an `HttpBlackBox` (one request
in flight) whose /v1/segment requests fail at --fault-rate before they reach the wire (a refused connection)
or after the server answered (the answer is lost: the server made it, the client times out); the client's
retries recover both. The clients take images from one shared queue until --seconds have passed and write
each answer into one label store (one part per image, several writers at once), so afterwards:
  - every image a client took has exactly one row in the store (keys = images taken, rows = keys);
  - the server answered exactly images + lost answers (each lost answer was made once more);
  - the client-side latency of an image (first request to accepted answer, retries included) gives p50/p99;
  - the server's peak RSS (VmHWM) is read from /proc when the load ends, beside its RSS before the load.
Writes benchmarks/results/serve.json and serve.md (or --out-dir) and prints the figures and this command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def rss_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of a process in MiB, from /proc/PID/status (Linux)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def start_server(model_file: Path, env: dict) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "corte_ray.cli", "-q", "serve-blackbox", str(model_file),
                             "--device", "cpu", "--max-connections", "256"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    line = proc.stdout.readline()
    if " at " not in line:
        proc.kill()
        raise SystemExit(f"the server did not start: {line}{proc.stderr.read()}")
    return proc, line.split(" at ")[1].split()[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=25.0, help="how long the clients keep taking new images")
    p.add_argument("--fault-rate", type=float, default=0.2, help="client-side fault rate per request")
    p.add_argument("--size", type=lambda s: tuple(int(v) for v in s.split("x")), default=(64, 128), help="HxW")
    p.add_argument("--arch", default="mobilenetv3_small_lraspp", help="model behind the server")
    p.add_argument("--timeout", type=float, default=30.0, help="client timeout per request (s)")
    p.add_argument("--server-threads", type=int, default=1, help="torch threads of the server process")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    args = p.parse_args()
    os.environ.setdefault("CORTE_NO_PROGRESS", "1")

    from corte_ray.blackbox.faults import inject_client_faults
    from corte_ray.blackbox.http import HttpBlackBox
    from corte_ray.blackbox.store import LabelStore, LabelStoreWriter, answer_rows
    from corte_ray.export import export_model
    from corte_ray.models import build_model

    work = Path(tempfile.mkdtemp(prefix="corte_serve_bench_"))
    torch.manual_seed(0)
    h, w = args.size
    model_file = export_model(build_model(args.arch, 19).eval(), work / "box.pt", example_size=(h, w),
                              meta={"arch": args.arch})
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.server_threads),
           "CORTE_NO_PROGRESS": "1"}
    server, url = start_server(model_file, env)
    rss_before, _ = rss_mb(server.pid)

    store_dir = work / "store"
    meta = {"answer_kind": "topk", "box_answer": "topk", "k": 2, "num_classes": 19, "blackbox": url,
            "dataset": "random", "split": "bench", "resize": None}
    writer = LabelStoreWriter(store_dir, meta)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    counter = iter(range(10**9))
    counter_lock = threading.Lock()
    latencies: list[float] = []
    taken: list[str] = []
    errors: list[str] = []
    injected_total = {"refused": 0, "lost_answer": 0}
    retries = [0]
    lock = threading.Lock()
    deadline = time.perf_counter() + args.seconds
    start = threading.Barrier(args.clients + 1)

    def client(index: int) -> None:
        box = HttpBlackBox(url, answer="topk", topk=2, token_env=None, timeout=args.timeout, max_retries=20,
                           backoff=0.05, max_backoff=1.0, concurrency=1)
        injected = inject_client_faults(box, args.fault_rate, seed=index)
        start.wait()
        try:
            while time.perf_counter() < deadline:
                with counter_lock:
                    i = next(counter)
                image = base.copy()
                image[0, :8, 0] = np.frombuffer(int(i).to_bytes(8, "little"), np.uint8)  # distinct pixels per image
                key = f"img{i:07d}"
                t0 = time.perf_counter()
                answer = box.query(image[None])
                elapsed = time.perf_counter() - t0
                writer.write_part(answer_rows(answer, [key], 2))
                with lock:
                    latencies.append(elapsed)
                    taken.append(key)
        except Exception as err:  # noqa: BLE001 - reported, and the check below fails
            with lock:
                errors.append(f"client {index}: {err}")
        finally:
            with lock:
                for kind, n in injected.items():
                    injected_total[kind] += n
                retries[0] += box.retries
            box.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
    for t in threads:
        t.start()
    start.wait()
    t_load = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t_load
    import requests

    stats = requests.get(url + "/v1/stats", timeout=10).json()
    rss_now, rss_peak = rss_mb(server.pid)
    server.terminate()
    _, final_line = server.communicate(timeout=30)

    store = LabelStore(store_dir)
    images = len(taken)
    checks = {
        "no client error": not errors,
        "every image taken is in the store once": sorted(store.keys()) == sorted(taken) and store.row_count() == images,
        "server answered images + lost answers exactly": stats["answered"] == images + injected_total["lost_answer"],
        "every client fault (and busy 503) retried once": retries[0] == sum(injected_total.values()) + stats["busy"],
    }
    lat = sorted(latencies)
    result = {
        "clients": args.clients, "seconds": seconds, "fault_rate": args.fault_rate, "size": [h, w],
        "arch": args.arch, "server_threads": args.server_threads, "images": images,
        "answers_per_s": images / seconds, "http_requests_per_s": stats["segment_requests"] / seconds,
        "latency_p50_s": statistics.median(lat) if lat else None,
        "latency_p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
        "server_rss_before_mb": rss_before, "server_rss_after_mb": rss_now, "server_peak_rss_mb": rss_peak,
        "injected": injected_total, "retries": retries[0], "server_stats": stats, "checks": checks,
        "errors": errors[:5], "server_final_line": final_line.strip().splitlines()[-1] if final_line.strip() else "",
        "device": f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()}), shared with other jobs",
        "command": "python benchmarks/serve.py " + " ".join(sys.argv[1:]), "torch": torch.__version__,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "serve.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# Reference black-box server under load ({result['device']})", "",
          f"`{result['command']}`", "",
          f"{args.clients} clients on loopback for {seconds:.1f} s, {args.fault_rate:.0%} of requests failing on "
          f"the client side ({injected_total['refused']} refused before sending, {injected_total['lost_answer']} "
          f"answers lost after the server made them), images {h}x{w}, model {args.arch} on "
          f"{args.server_threads} CPU thread(s), top-2 answers.", "",
          "| figure | value |", "|---|---|",
          f"| images answered and stored | {images} |",
          f"| answers/s | {result['answers_per_s']:.1f} |",
          f"| HTTP requests/s (retries included) | {result['http_requests_per_s']:.1f} |",
          f"| latency p50 / p99 (per image, retries included) | {result['latency_p50_s']:.3f} s / "
          f"{result['latency_p99_s']:.3f} s |",
          f"| server RSS before / after / peak | {rss_before:.0f} / {rss_now:.0f} / {rss_peak:.0f} MiB |", "",
          "Checks: " + ", ".join(f"{name}: {'yes' if ok else 'NO'}" for name, ok in checks.items()) + ".", ""]
    (args.out_dir / "serve.md").write_text("\n".join(md))
    print("\n".join(md))
    print(f"wrote {args.out_dir / 'serve.json'} and {args.out_dir / 'serve.md'}")
    if not all(checks.values()):
        raise SystemExit(f"a check failed: {checks} {errors[:3]}")


if __name__ == "__main__":
    main()
