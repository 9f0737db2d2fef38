"""Load benchmark of the real server: ``POST /infer/oar`` throughput and latency under concurrent clients.

Usage::

    python benchmarks/bench_load.py [--studies sample-data] [--weights synthetic] [--runs 3]
                                    [--requests 24] [--levels 1,4,8] [--omp-threads N]

Starts the real server (``monailabel start_server --app <copy of apps/radonc> --studies <copy of
--studies> --conf models oar --conf skip_scoring true``) on 127.0.0.1 and a free port, with its
own temporary folders (``TMPDIR`` included), and stops it by its pid (its process group) at the
end. Background uncertainty scoring is off so that it does not take the CPU during the
measurement. ``--weights`` is ``--conf weights`` (default: the default weights);
``--omp-threads N`` starts the server with ``OMP_NUM_THREADS=N`` (default: the environment's).

For each level of concurrency ``c`` in ``--levels``: a warm-up of ``c`` requests (one per client,
not timed), then ``--requests`` requests ``POST /infer/oar?image=<id>`` (as Slicer sends them:
the answer is the multipart params + label map), the datastore's images in turn, shared by ``c``
client threads that each send their next request as soon as their previous one is answered.
Throughput is requests / wall time of the level; latency is per request, p50 and p95 by linear
interpolation. All of it is repeated ``--runs`` times; the table shows the medians over runs.
A request that is not answered 200 counts as an error (and in the latency).

Memory: the server's resident set (RSS, its process only, ``/proc/<pid>/status`` ``VmRSS``) once it
serves and before any request, after each run, and after ``--idle-s`` seconds without requests at
the end (``--conf max_concurrent_infer`` bounds how many inferences hold their volumes at once;
the server hands the C heap's freed pages back after each inference).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

from contourcl.testing import (
    REPO,
    log_tail,
    start_monailabel,
    stop_process,
    wait_until_serving,
)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


class Server:
    """The real server on copies of the app and the studies, in a temporary folder of its own."""

    def __init__(self, studies: Path, weights: str | None, omp_threads: int | None = None):
        self.root = Path(tempfile.mkdtemp(prefix="contourcl-bench-load-"))
        self.studies = self.root / "studies"
        self.app = self.root / "radonc"
        self.tmp = self.root / "server-tmp"
        shutil.copytree(studies, self.studies, ignore=shutil.ignore_patterns("datastore_v2.json", ".lock", ".contourcl"))
        shutil.copytree(REPO / "apps" / "radonc", self.app, ignore=shutil.ignore_patterns("history", "__pycache__", "*.tmp"))
        self.tmp.mkdir()
        self.env = {"TMPDIR": str(self.tmp)}
        if omp_threads:
            self.env["OMP_NUM_THREADS"] = str(omp_threads)
        self.weights = weights
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 300) -> float:
        conf = {"models": "oar", "skip_scoring": "true", **({"weights": self.weights} if self.weights else {})}
        t0 = time.perf_counter()
        self.proc, self.url = start_monailabel(self.app, self.studies, conf, self.root / "server.log", cwd=self.root, env=self.env,
                                               new_session=True)
        wait_until_serving(self.proc, self.url, self.root / "server.log", timeout=timeout)
        return time.perf_counter() - t0

    def log_tail(self, chars: int = 3000) -> str:
        return log_tail(self.root / "server.log", chars)

    def stop(self) -> None:
        """Stop the server and its process group by its PID (SIGTERM, SIGKILL after 20 s); remove its folder."""
        stop_process(self.proc, timeout=20)
        shutil.rmtree(self.root, ignore_errors=True)

    def rss_mb(self) -> float:
        """The server process's resident set now, in MB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def torch_threads(self) -> int:
        """``torch.get_num_threads()`` in the server's environment (the same interpreter and variables)."""
        out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], env={**os.environ, **self.env},
                             capture_output=True, text=True, check=True)
        return int(out.stdout.strip().splitlines()[-1])


def _infer(url: str, image_id: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    try:
        r = requests.post(f"{url}/infer/oar", params={"image": image_id}, timeout=600)
        status = r.status_code
        ok = status == 200 and len(r.content) > 100
    except requests.RequestException:
        status, ok = -1, False
    return time.perf_counter() - t0, (200 if ok else status)


def run_level(url: str, images: list[str], clients: int, n_requests: int) -> dict:
    """Warm-up (``clients`` requests at once), then ``n_requests`` requests shared by ``clients`` threads."""
    warm = [threading.Thread(target=_infer, args=(url, images[k % len(images)])) for k in range(clients)]
    for t in warm:
        t.start()
    for t in warm:
        t.join()

    lock = threading.Lock()
    counter = iter(range(n_requests))
    results: list[tuple[float, int]] = []

    def client():
        while True:
            with lock:
                k = next(counter, None)
            if k is None:
                return
            res = _infer(url, images[k % len(images)])
            with lock:
                results.append(res)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    latencies = np.array([r[0] for r in results])
    return {
        "clients": clients, "requests": len(results), "wall_s": wall, "throughput": len(results) / wall,
        "p50": float(np.percentile(latencies, 50)), "p95": float(np.percentile(latencies, 95)),
        "errors": sum(1 for r in results if r[1] != 200),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=Path, default=REPO / "sample-data", help="datastore to copy and serve (default: sample-data)")
    parser.add_argument("--weights", default=None, help="--conf weights of the server (e.g. synthetic); default: the default weights")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=24, help="timed requests per level and run")
    parser.add_argument("--levels", default="1,4,8", help="concurrent clients, comma-separated")
    parser.add_argument("--omp-threads", type=int, default=None, help="OMP_NUM_THREADS of the server (default: inherited)")
    parser.add_argument("--json", type=Path, default=None, help="also write every run's figures here")
    parser.add_argument("--idle-s", type=float, default=30, help="seconds without requests before the last memory reading")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",") if x.strip()]

    server = Server(args.studies.resolve(), args.weights, args.omp_threads)
    try:
        startup = server.start()
        images = sorted(p.name.removesuffix(".nii.gz") for p in server.studies.glob("*.nii.gz"))
        if not images:
            raise SystemExit(f"no *.nii.gz image in {args.studies}")
        threads = server.torch_threads()
        load_before = os.getloadavg()
        rss = {"serving, before any request": server.rss_mb()}
        runs: list[list[dict]] = []
        for run in range(args.runs):
            rows = []
            for c in levels:
                r = run_level(server.url, images, c, args.requests)
                print(f"run {run + 1}/{args.runs}, {c} client(s): {r['throughput']:.3f} req/s, p50 {r['p50']:.2f} s, "
                      f"p95 {r['p95']:.2f} s, errors {r['errors']}", flush=True)
                rows.append(r)
            runs.append(rows)
            rss[f"after run {run + 1}"] = server.rss_mb()
        time.sleep(args.idle_s)
        rss[f"idle {args.idle_s:g} s after the last run"] = server.rss_mb()
        load_after = os.getloadavg()
        temp_left = sorted(str(p.relative_to(server.tmp)) for p in server.tmp.rglob("*"))
    finally:
        server.stop()

    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "levels": levels, "requests": args.requests, "rss_mb": rss}, indent=1))
    print()
    print(f"Machine: {os.cpu_count()} CPUs ({_cpu_model()}), torch threads in the server's environment: {threads}, "
          f"server OMP_NUM_THREADS={server.env.get('OMP_NUM_THREADS', 'unset')}; load average (1 min) {load_before[0]:.1f} before, "
          f"{load_after[0]:.1f} after")
    print(f"Server: oar model, weights {args.weights or 'default'}, {len(images)} images of {args.studies}, "
          f"started in {startup:.1f} s; its TMPDIR after the benchmark: {temp_left or 'empty'}")
    print(f"Medians over {args.runs} run(s) of {args.requests} timed requests per level (after a warm-up of one request per client):\n")
    print("| concurrent clients | throughput (req/s) | latency p50 (s) | latency p95 (s) | errors |")
    print("| --- | --- | --- | --- | --- |")
    for i, c in enumerate(levels):
        per = [rows[i] for rows in runs]
        print(f"| {c} | {statistics.median(r['throughput'] for r in per):.3f} | {statistics.median(r['p50'] for r in per):.2f} | "
              f"{statistics.median(r['p95'] for r in per):.2f} | {sum(r['errors'] for r in per)} |")
    print("\nServer memory (RSS, MB): " + "; ".join(f"{k} {v:.0f}" for k, v in rss.items()))


if __name__ == "__main__":
    main()
