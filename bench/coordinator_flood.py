"""Unauthenticated flood: memory and liveness of a real coordinator under oversized bodies.

Starts ``cardiofed coordinator --insecure`` on loopback, reads its resident memory
(``/proc/<pid>/status`` VmRSS, sampled every 10 ms) at idle, then, for each target,
sends 4 concurrent POSTs (no credential) with a Content-Length and 4 more streamed in
chunks without one, while ``/healthz`` is polled: 40 MB to ``/v1/enrol`` (64 KiB limit),
16 MiB to ``/v1/studies`` (4 MiB) and 16 MiB to a site's upload route (which takes 16 MiB
from a site, and checks the credential before it reads a byte). Reports the status
codes, the peak RSS above idle and the slowest ``/healthz`` answer. Targets (issues 12
and 29): every body refused (413, or 401 on the upload route), peak RSS within 100 MB of
idle, ``/healthz`` under 0.5 s. Loopback only; every request loop is bounded.

    python bench/coordinator_flood.py
"""

from __future__ import annotations

import argparse
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
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_smoke, markdown_table, proc_status_mb, write_results  # noqa: E402

CONCURRENT = 4
# path, body size in MB, the refusals expected (-1: the connection closed on a refusal)
TARGETS = (("/v1/enrol", 40, {413, -1}), ("/v1/studies", 16, {413, -1}),
           ("/v1/studies/s1/rounds/0/updates", 16, {401, -1}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _chunks(mb: int) -> Iterator[bytes]:
    block = b"x" * (1 << 20)
    for _ in range(mb):
        yield block


def flood(url: str, pid: int, path: str, mb: int, expected: set[int]) -> dict[str, Any]:
    """One target's flood, with memory and /healthz watched."""
    idle = proc_status_mb(pid, "VmRSS")
    samples: list[float] = []
    health: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(proc_status_mb(pid, "VmRSS"))
            time.sleep(0.01)

    def probe() -> None:
        while not done.is_set():
            start = time.perf_counter()
            httpx.get(f"{url}/healthz", timeout=30)
            health.append(time.perf_counter() - start)
            time.sleep(0.05)

    body = b"x" * (mb << 20)

    def post(streamed: bool) -> int:
        try:
            return httpx.post(f"{url}{path}", content=_chunks(mb) if streamed else body,
                              timeout=60, headers={"Content-Type": "application/json"}
                              ).status_code
        except httpx.TransportError:
            return -1  # the server closed the connection after refusing

    watchers = [threading.Thread(target=f) for f in (sample, probe)]
    for w in watchers:
        w.start()
    with ThreadPoolExecutor(2 * CONCURRENT) as pool:
        declared = list(pool.map(post, [False] * CONCURRENT))
        streamed = list(pool.map(post, [True] * CONCURRENT))
    time.sleep(0.5)
    done.set()
    for w in watchers:
        w.join()
    peak = max(samples) if samples else float("nan")
    slowest = max(health) if health else float("nan")
    return {"path": path, "body_mb": mb, "idle_rss_mb": idle, "peak_rss_mb": peak,
            "peak_above_idle_mb": peak - idle, "statuses_with_length": declared,
            "statuses_streamed": streamed, "healthz_max_s": slowest,
            "healthz_answers": len(health),
            "target_met": set(declared + streamed) <= expected and peak - idle <= 100
            and slowest < 0.5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_smoke(parser)
    args = parser.parse_args()
    targets = ((TARGETS[0][0], 1, TARGETS[0][2]),) if args.smoke else TARGETS
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
            rows = [flood(url, proc.pid, path, mb, expected) for path, mb, expected in targets]
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    result = {"concurrent": CONCURRENT, "targets": rows,
              "target_met": all(r["target_met"] for r in rows)}
    md = ("## Unauthenticated flood of a real coordinator (loopback)\n\n"
          + markdown_table(
              ["route", "bodies", "statuses (Content-Length)", "statuses (chunked)",
               "idle RSS (MB)", "peak RSS (MB)", "peak above idle (MB)",
               "slowest /healthz (s)"],
              [[r["path"], f"{2 * CONCURRENT} x {r['body_mb']} MB",
                " ".join(map(str, r["statuses_with_length"])),
                " ".join(map(str, r["statuses_streamed"])), r["idle_rss_mb"],
                r["peak_rss_mb"], r["peak_above_idle_mb"], r["healthz_max_s"]]
               for r in rows])
          + "\n-1: the server closed the connection after refusing, before the client "
            "finished sending. Targets: every body refused, peak within 100 MB of idle, "
            "/healthz under 0.5 s: " + ("met" if result["target_met"] else "NOT met")
          + ".\n")
    write_results("coordinator_flood", result, md)


if __name__ == "__main__":
    main()
