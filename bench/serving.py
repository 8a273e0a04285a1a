"""Risk API latency and throughput on loopback, and offline scoring of 1 million rows.

Setup: the demo's federated model (synthetic cohort, 12 sites, FedAvg) registered and
promoted in a fresh SQLite registry, and an API key with a rate limit far above the
load. ``cardiofed serve`` runs as its own process: one uvicorn worker on 127.0.0.1.

The load generator is ``bench/network_scale.py``'s: raw keep-alive HTTP/1.1 connections
on asyncio, in this process. A Python HTTP client spends more CPU per request than the
server does (httpx about 1.5 ms), and on 2 cores shared with the server that decides the
latency it measures: with 4 httpx client processes the bare endpoint's p99 was 5.83 ms.

* Latency: one connection, one request at a time (``POST /v1/risk`` with all features
  and contributions); p50 and p99 of the round trip after a warm-up.
* Throughput: C connections, each a closed loop (a request, its answer, the next), for a
  fixed time; requests per second answered 200, their latency, and the server's own CPU
  time per request (what one worker sustains per core). A busier worker spends less CPU
  per request (one wake-up serves several): its capacity is judged with the most
  connections, its latency with 4.
* Ceiling: the same runs against a bare FastAPI endpoint on the same uvicorn settings.
* Offline: 1,000,000 rows of a synthetic hospital export (its own column names, units
  and codes) scored by ``cardiofed.serving.offline.predict_file`` with the site's mapping
  file, CSV in and CSV or Parquet out, end to end (read, harmonise, validate, score,
  write); and the scoring core alone (encoded rows -> risks).

    python bench/serving.py [--requests 3000] [--seconds 10] [--clients 1 2 4 16 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_smoke, markdown_table, single_threaded, write_results  # noqa: E402
from network_scale import Connection  # noqa: E402

HOST = "127.0.0.1"
PATIENT = {"features": {"age": 61, "sex": "male", "total_cholesterol": 5.4,
                        "hdl_cholesterol": 1.1, "systolic_bp": 142, "bp_treated": True,
                        "current_smoker": False, "diabetes": False},
           "units": {"total_cholesterol": "mmol/L", "hdl_cholesterol": "mmol/L"}}
OFFLINE_ROWS = 1_000_000


def prepare(workdir: Path) -> tuple[str, str, Any]:
    """Train and register the demo model; returns (database URL, API key, model)."""
    from cardiofed.data.synthetic import synthetic_federation
    from cardiofed.serving import provenance, registry
    from cardiofed.serving.keys import create_key
    from cardiofed.simulation.config import SimulationConfig
    from cardiofed.simulation.experiment import run_experiment
    from cardiofed.store import session_factory

    data = synthetic_federation(seed=0)
    result = run_experiment(data, SimulationConfig.create(rounds=20, eval_every=0),
                            baselines=False)
    model = provenance.from_experiment(result, study="demo", feature_names=data.feature_names,
                                       outcome=data.outcome)
    url = f"sqlite:///{workdir}/registry.db"
    with session_factory(url)() as db:
        registry.register(db, model, promote=True)
        key = create_key(db, "bench", ["score"], rate_limit_per_minute=10**9)
    return url, key, model


def bare_app() -> Any:
    """The stack's ceiling: FastAPI reading the same JSON body and answering a small JSON
    object, with no authentication, validation, scoring or middleware."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/v1/risk")
    async def risk(body: dict[str, Any]) -> dict[str, float]:
        return {"risk": 0.1}

    return app


def serve_bare(port: int) -> None:
    """Run :func:`bare_app` as ``cardiofed serve`` runs the risk API."""
    import uvicorn

    uvicorn.run(bare_app(), host=HOST, port=port, log_config=None, access_log=False)


def start_server(command: list[str], workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start `command` (it takes ``--port`` last) on a free loopback port."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    log = open(workdir / "serve.log", "ab")  # noqa: SIM115 (the child keeps it)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([*command, "--port", str(port)], stdout=log,
                            stderr=subprocess.STDOUT, env=env)
    base = f"http://{HOST}:{port}"
    give_up = time.monotonic() + 60
    while time.monotonic() < give_up:
        try:
            httpx.get(f"{base}/healthz", timeout=1)  # any answer: it listens
            return proc, base
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{command} did not start within 60 s")


def measure(command: list[str], workdir: Path, key: str, args: argparse.Namespace
            ) -> dict[str, Any]:
    """Latency and throughput of the server that `command` starts."""
    proc, base = start_server(command, workdir)
    port = int(base.rsplit(":", 1)[1])
    try:
        return {"latency": latency(port, key, args.requests),
                "throughput": [throughput(port, key, c, args.seconds, proc.pid)
                               for c in args.clients]}
    finally:
        proc.terminate()
        proc.wait(timeout=15)


BODY = json.dumps(PATIENT).encode()
WARM_UP = 300


async def _score(connection: Connection, key: str) -> float:
    """One ``POST /v1/risk``: its round trip in ms (anything but a 200 stops the run)."""
    started = time.perf_counter()
    status, body = await connection.post("/v1/risk", BODY, key, "application/json")
    if status != 200:
        raise RuntimeError(f"POST /v1/risk answered {status}: {body[:300]!r}")
    return (time.perf_counter() - started) * 1000


async def _closed_loop(port: int, key: str, seconds: float) -> list[float]:
    """One connection: a warm-up, then requests one after another for `seconds`."""
    connection = Connection(port)
    try:
        for _ in range(WARM_UP):
            await _score(connection, key)
        times = []
        stop = time.perf_counter() + seconds
        while time.perf_counter() < stop:
            times.append(await _score(connection, key))
        return times
    finally:
        connection.close()


def latency(port: int, key: str, n: int) -> dict[str, float]:
    async def run() -> list[float]:
        connection = Connection(port)
        try:
            return [await _score(connection, key) for _ in range(WARM_UP + n)][WARM_UP:]
        finally:
            connection.close()

    times = sorted(asyncio.run(run()))
    return {"requests": n, "p50_ms": statistics.median(times),
            "p90_ms": times[int(0.90 * n)], "p99_ms": times[int(0.99 * n)],
            "mean_ms": statistics.fmean(times)}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def throughput(port: int, key: str, clients: int, seconds: float,
               server_pid: int) -> dict[str, float]:
    """`clients` closed-loop connections for `seconds`: requests answered 200 per second,
    their latency, and the server's CPU time per request."""
    async def run() -> list[list[float]]:
        return await asyncio.gather(*(_closed_loop(port, key, seconds)
                                      for _ in range(clients)))

    cpu_before = _cpu_seconds(server_pid)
    times = sorted(t for loop in asyncio.run(run()) for t in loop)
    server_cpu = _cpu_seconds(server_pid) - cpu_before  # includes the warm-up
    total = len(times)
    return {"clients": clients, "seconds": seconds, "requests_ok": total,
            "requests_per_s": total / seconds, "p50_ms": statistics.median(times),
            "p99_ms": times[int(0.99 * total)], "server_cpu_s": server_cpu,
            "server_requests_per_cpu_s": (total + WARM_UP * clients) / server_cpu}


MALFORMED = 10
PROBLEMS = {"AGE": ("-999", 0.005), "SBP": ("999", 0.003), "SMOKER": ("maybe", 0.002)}


def with_problems(raw: Any, rng: np.random.Generator) -> Any:
    """`raw` with the problems of a real export: per column, a share of the rows holds
    the export's missing-value code, an implausible value or an unknown code
    (:data:`PROBLEMS`); :data:`MALFORMED` lines are appended by the caller."""
    out = raw.copy()
    for column, (value, share) in PROBLEMS.items():
        out.loc[rng.random(len(out)) < share, column] = value
    return out


def offline(workdir: Path, model: Any, n_rows: int = OFFLINE_ROWS) -> dict[str, Any]:
    """Offline scoring of `n_rows` lines of a synthetic site's export with missing and
    invalid values and malformed lines, as real exports have (:func:`with_problems`):
    the rows it scores and those it rejects are counted."""
    import pandas as pd

    from cardiofed.data.mapping import encode, harmonise
    from cardiofed.data.synthetic import default_profiles, generate_exports
    from cardiofed.serving.offline import predict_file

    export = generate_exports(default_profiles(1), seed=0)[0]
    reps = -(-n_rows // len(export.raw))
    clean = pd.concat([export.raw] * reps, ignore_index=True).iloc[:n_rows - MALFORMED]
    big = with_problems(clean, np.random.default_rng(0))
    csv = workdir / "patients.csv"
    big.to_csv(csv, index=False)
    with csv.open("a") as fh:  # lines that are no record: one field too many
        fh.writelines(",".join(["1"] * (big.shape[1] + 1)) + "\n" for _ in range(MALFORMED))
    out: dict[str, Any] = {"rows": n_rows, "input_mb": csv.stat().st_size / 1e6}
    for suffix in (".csv", ".parquet"):
        started = time.perf_counter()
        done = predict_file(model, csv, workdir / f"risks{suffix}", mapping=export.mapping,
                            max_rejected=1.0)
        seconds = time.perf_counter() - started
        if done.scored + done.rejected != n_rows or not done.scored \
                or done.rejected < MALFORMED:
            raise RuntimeError(f"offline scoring read {n_rows} rows but scored {done.scored} "
                               f"and rejected {done.rejected}")
        out.update(scored=done.scored, rejected=done.rejected)
        out[f"end_to_end{suffix}_s"] = seconds
        out[f"end_to_end{suffix}_rows_per_s"] = n_rows / seconds
    started = time.perf_counter()
    predict_file(model, csv, workdir / "contrib.parquet", mapping=export.mapping,
                 contributions=True, max_rejected=1.0)
    out["end_to_end_contributions.parquet_s"] = time.perf_counter() - started
    x = encode(harmonise(clean, export.mapping, labels=False).frame, model.card.features)
    started = time.perf_counter()
    risk = model.risk(x)
    out["score_only_s"] = time.perf_counter() - started
    out["score_only_rows_per_s"] = len(risk) / out["score_only_s"]
    return out


TARGET_PER_CPU_S, TARGET_P99_MS, TARGET_CLIENTS = 4000.0, 5.0, 4


def _verdict(api: list[dict[str, Any]], bare: list[dict[str, Any]]) -> str:
    """Issue 34's targets: the requests a worker answers per CPU-second where it is
    busiest (the most clients: its capacity, as the issue's ceiling of about 8,000 was
    measured with 32 requests in flight), and the p99 with :data:`TARGET_CLIENTS`."""
    by_clients = {t["clients"]: t for t in api}
    busiest, at = by_clients[max(by_clients)], by_clients.get(TARGET_CLIENTS)
    if at is None:
        return f"(No run with {TARGET_CLIENTS} clients: the targets are not judged.)"
    ceiling = {t["clients"]: t for t in bare}[busiest["clients"]]["server_requests_per_cpu_s"]
    per_cpu, p99 = busiest["server_requests_per_cpu_s"], at["p99_ms"]
    met = per_cpu >= TARGET_PER_CPU_S and p99 < TARGET_P99_MS
    return (f"With {busiest['clients']} clients: {per_cpu:,.0f} requests per server "
            f"CPU-second (target {TARGET_PER_CPU_S:,.0f}; the bare endpoint's ceiling "
            f"{ceiling:,.0f}, so {per_cpu / ceiling:.0%} of it); with {TARGET_CLIENTS} "
            f"clients {at['server_requests_per_cpu_s']:,.0f}, p99 {p99:.2f} ms (target "
            f"under {TARGET_P99_MS:g} ms): {'met' if met else 'not met'}.")


def main() -> None:
    single_threaded()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 16, 32])
    parser.add_argument("--serve-bare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    add_smoke(parser)
    args = parser.parse_args()
    if args.serve_bare:
        serve_bare(args.port)
        return
    n_rows = OFFLINE_ROWS
    if args.smoke:
        args.requests, args.seconds, args.clients, n_rows = 20, 0.5, [1], 2_000
    with tempfile.TemporaryDirectory(prefix="cardiofed-serving-") as tmp:
        workdir = Path(tmp)
        url, key, model = prepare(workdir)
        # Offline first: on 2 cores the HTTP runs' client and server processes are still
        # winding down afterwards (the CSV path took 3.4 s after them, 2.5 s alone).
        off = offline(workdir, model, n_rows)
        exe = shutil.which("cardiofed")
        if exe is None:
            raise SystemExit("The cardiofed console script is not on PATH (pip install -e .).")
        api = measure([exe, "serve", "--host", HOST, "--db", url], workdir, key, args)
        bare = measure([sys.executable, __file__, "--serve-bare"], workdir, key, args)
    lat, thr = api["latency"], api["throughput"]
    results = {"load_generator": "raw asyncio keep-alive connections (bench/network_scale.py)",
               "latency": lat, "throughput": thr, "bare_endpoint": bare, "offline": off}
    md = ["# Risk API on loopback (one uvicorn worker) and offline scoring\n",
          markdown_table(["requests", "p50 ms", "p90 ms", "p99 ms", "mean ms"],
                         [[lat["requests"], lat["p50_ms"], lat["p90_ms"], lat["p99_ms"],
                           lat["mean_ms"]]], digits=2),
          "\nThroughput (closed-loop keep-alive connections from one raw asyncio load "
          "generator on the same 2 cores; the server's own CPU time gives what one worker "
          "sustains per core):\n",
          markdown_table(["clients", "seconds", "requests OK", "requests/s", "p50 ms",
                          "p99 ms", "server CPU s", "requests per server CPU s"],
                         [[t["clients"], t["seconds"], t["requests_ok"], t["requests_per_s"],
                           t["p50_ms"], t["p99_ms"], t["server_cpu_s"],
                           t["server_requests_per_cpu_s"]] for t in thr], digits=2),
          "\nThe stack's ceiling, measured the same way: a bare FastAPI endpoint on the same "
          "uvicorn settings reading the same JSON body and answering a constant (no "
          "authentication, validation, scoring, logging or other middleware):\n",
          markdown_table(["clients", "requests/s", "p50 ms", "p99 ms",
                          "requests per server CPU s"],
                         [[t["clients"], t["requests_per_s"], t["p50_ms"], t["p99_ms"],
                           t["server_requests_per_cpu_s"]] for t in bare["throughput"]],
                         digits=2),
          "\n" + _verdict(thr, bare["throughput"]) + "\n",
          f"\nOffline, {off['rows']:,} rows ({off['input_mb']:.0f} MB CSV, site mapping; "
          f"{off['scored']:,} scored, {off['rejected']:,} rejected: missing, implausible "
          f"or unknown values and malformed lines, each listed with its reasons; rows/s "
          f"counts lines read):\n",
          markdown_table(["path", "seconds", "rows/s"], [
              ["CSV -> CSV", off["end_to_end.csv_s"], off["end_to_end.csv_rows_per_s"]],
              ["CSV -> Parquet", off["end_to_end.parquet_s"],
               off["end_to_end.parquet_rows_per_s"]],
              ["CSV -> Parquet with contributions", off["end_to_end_contributions.parquet_s"],
               off["rows"] / off["end_to_end_contributions.parquet_s"]],
              ["scoring only (encoded rows -> risk)", off["score_only_s"],
               off["score_only_rows_per_s"]]], digits=2)]
    write_results("serving", results, "\n".join(md))


if __name__ == "__main__":
    main()
