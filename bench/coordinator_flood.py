"""Unauthenticated flood: memory and liveness of a real coordinator under oversized bodies.

Starts ``cardiofed coordinator --insecure`` on loopback, reads its resident memory
(``/proc/<pid>/status`` VmRSS, sampled every 10 ms) at idle, then sends 4 concurrent
40 MB POSTs to ``/v1/enrol`` (no credential) with a Content-Length, and 4 more streamed
in chunks without one, while ``/healthz`` is polled. Reports the status codes, the peak
RSS above idle and the slowest ``/healthz`` answer. Target (issue 12): every oversized
body refused with 413, and peak RSS within 100 MB of idle. Loopback only; every request
loop is bounded.

    python bench/coordinator_flood.py
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, write_results  # noqa: E402

BODY_MB = 40
CONCURRENT = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _chunks() -> Iterator[bytes]:
    block = b"x" * (1 << 20)
    for _ in range(BODY_MB):
        yield block


def main() -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cardiofed.cli", "coordinator", "--insecure", "--port",
             str(port), "--database-url", f"sqlite:///{tmp}/c.db", "--admin-key-file",
             f"{tmp}/admin.key"], cwd=tmp, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            for _ in range(300):  # at most 30 s to start
                try:
                    if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            time.sleep(1.0)
            idle = _rss_mb(proc.pid)
            samples: list[float] = []
            health: list[float] = []
            done = threading.Event()

            def sample() -> None:
                while not done.is_set():
                    samples.append(_rss_mb(proc.pid))
                    time.sleep(0.01)

            def probe() -> None:
                while not done.is_set():
                    start = time.perf_counter()
                    httpx.get(f"{url}/healthz", timeout=30)
                    health.append(time.perf_counter() - start)
                    time.sleep(0.05)

            body = b"x" * (BODY_MB << 20)

            def post(streamed: bool) -> int:
                try:
                    content = _chunks() if streamed else body
                    return httpx.post(f"{url}/v1/enrol", content=content, timeout=60,
                                      headers={"Content-Type": "application/json"}).status_code
                except httpx.TransportError:
                    return -1  # the server closed the connection after refusing

            watchers = [threading.Thread(target=f) for f in (sample, probe)]
            for w in watchers:
                w.start()
            started = time.perf_counter()
            with ThreadPoolExecutor(2 * CONCURRENT) as pool:
                declared = list(pool.map(post, [False] * CONCURRENT))
                streamed = list(pool.map(post, [True] * CONCURRENT))
            elapsed = time.perf_counter() - started
            time.sleep(0.5)
            done.set()
            for w in watchers:
                w.join()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    peak = max(samples) if samples else float("nan")
    result = {"body_mb": BODY_MB, "concurrent": CONCURRENT, "idle_rss_mb": idle,
              "peak_rss_mb": peak, "peak_above_idle_mb": peak - idle,
              "statuses_with_length": declared, "statuses_streamed": streamed,
              "flood_seconds": elapsed, "healthz_max_s": max(health) if health else None,
              "healthz_answers": len(health),
              "target_met": all(s in (413, -1) for s in declared + streamed)
              and peak - idle <= 100}
    md = ("## Unauthenticated flood of a real coordinator (loopback)\n\n"
          + markdown_table(
              ["bodies", "statuses (Content-Length)", "statuses (chunked)", "idle RSS (MB)",
               "peak RSS (MB)", "peak above idle (MB)", "slowest /healthz (s)"],
              [[f"{2 * CONCURRENT} x {BODY_MB} MB", " ".join(map(str, declared)),
                " ".join(map(str, streamed)), idle, peak, peak - idle,
                result["healthz_max_s"]]])
          + "\n-1: the server closed the connection after answering 413 before the client "
            "finished sending. Target: 413 for all, peak within 100 MB of idle: "
          + ("met" if result["target_met"] else "NOT met") + ".\n")
    write_results("coordinator_flood", result, md)


if __name__ == "__main__":
    main()
