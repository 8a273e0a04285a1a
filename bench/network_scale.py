"""The coordinator scaled out on PostgreSQL: uploads/s and round close with 1, 2 and 4
processes, a 36,000-site round, and one process SIGKILLed in the middle of it.

Separate ``cardiofed coordinator --insecure`` processes on loopback ports share one
PostgreSQL database (what separate hosts behind a load balancer do; ``--workers N``
runs the same app N times on one port). The simulated sites are one asyncio process:
``--in-flight`` requests at a time (a bounded request loop, not one task per site)
on raw keep-alive HTTP/1.1 connections (:class:`Connection`), spread round-robin over
the processes; a request that fails at the transport (the
process died) is retried on the next process, as a node retries its upload. Every
upload is acknowledged only after PostgreSQL committed it (``synchronous_commit=on``).

Each run is one study with its own sites (credentials set in the database directly: a
bench shortcut for 36,000 enrolment requests, which are not what is measured):

* the statistics round: every site's preprocessing statistics, as a private site
  sends them (16 bins per feature), from the rows of the national synthetic federation
  (:func:`cardiofed.data.national.national_federation`: its sizes and risk factors);
* the first training round of logistic regression (the networked default robust rule,
  the weighted median): one delta per site with the right tensors and its
  sample size (random values: validation and aggregation cost do not depend on them).

Measured per round: uploads/s (accepted and committed, first request sent to last
answer), the close (the last upload's arrival to ``closed_at`` in the database: the
last upload folds the round in its own request) and the round's wall time (first
request to closed). The kill run SIGKILLs one of the processes once half of the
training uploads are acknowledged, then checks in the database that every site has
exactly one update and that the published model equals the aggregate, computed here by
the same pure function, of the exact payloads the sites sent (a lost or doubly counted
update would change the median's input and the participants).

Needs a PostgreSQL database it may wipe (every table of the coordinator is dropped):

    python bench/network_scale.py --database-url postgresql+psycopg://u:p@host/db
        [--sites 4000] [--processes 1 2 4] [--national 36000] [--in-flight 32]

(default URL: the environment variable ``CARDIOFED_BENCH_POSTGRES_URL``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_smoke, markdown_table, write_results  # noqa: E402

HOST = "127.0.0.1"
STARTUP_S = 60.0
REQUEST_TIMEOUT_S = 600.0  # the last upload of a round waits for the round's close
PLAN: dict[str, Any] = dict(model="logistic", algorithm="fedavg", rounds=1, local_epochs=1,
                            batch_size=32, lr=0.05, seed=0)


# ------------------------------------------------------------------ database

def reset(url: str) -> None:
    """Drop every table of the store (and its schema revision) and create them again."""
    from sqlalchemy import create_engine, text

    from cardiofed.store import Base, make_engine

    engine = create_engine(url)
    Base.metadata.drop_all(engine)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
    engine.dispose()
    make_engine(url).dispose()


def create_study(url: str, study: str, names: list[str]) -> dict[str, str]:
    """The study and its sites; returns a credential per site (set directly: see above)."""
    from sqlalchemy import update

    from cardiofed.coordinator import administration
    from cardiofed.data.catalog import study_columns
    from cardiofed.simulation.config import SimulationConfig
    from cardiofed.store import Site, hash_secret, make_engine, make_sessionmaker, new_secret

    columns, ranges = study_columns("synthetic")
    engine = make_engine(url)
    with make_sessionmaker(engine)() as db:
        administration.create_study(db, study_id=study, plan=SimulationConfig(**PLAN), sites=names,
                             feature_names=columns, feature_ranges=ranges,
                             round_timeout_s=3600.0)
        credentials = {name: new_secret() for name in names}
        ids = dict(db.execute(Site.__table__.select().with_only_columns(
            Site.name, Site.id).where(Site.study_id == study)).all())
        db.execute(update(Site), [{"id": ids[n], "credential_hash": hash_secret(c),
                                   "enrol_token_hash": None} for n, c in credentials.items()])
        db.commit()
    engine.dispose()
    return credentials


def round_record(url: str, study: str, number: int) -> dict[str, Any]:
    """The coordinator's own record of a round: its updates and when it closed."""
    from sqlalchemy import func, select

    from cardiofed.store import Round, Update, make_engine, make_sessionmaker

    engine = make_engine(url)
    with make_sessionmaker(engine)() as db:
        rnd = db.scalar(select(Round).where(Round.study_id == study, Round.number == number))
        assert rnd is not None
        count, distinct, last = db.execute(select(
            func.count(), func.count(func.distinct(Update.site_id)),
            func.max(Update.received_at)).where(Update.round_id == rnd.id)).one()
        out = {"updates": count, "distinct_sites": distinct, "last_received": last,
               "closed_at": rnd.closed_at, "outcome": rnd.outcome}
    engine.dispose()
    return out


def published_model(url: str, study: str, version: int) -> tuple[dict[str, np.ndarray], int]:
    from cardiofed.coordinator import models
    from cardiofed.store import make_engine, make_sessionmaker
    from cardiofed.wire import decode_arrays

    engine = make_engine(url)
    with make_sessionmaker(engine)() as db:
        blob = models.model_blob(db, study, version)
        weights, participants = decode_arrays(blob.weights)[0], len(blob.participants)
    engine.dispose()
    return weights, participants


# ------------------------------------------------------------------ processes

class Coordinators:
    """`n` coordinator processes on free loopback ports, one database."""

    def __init__(self, workdir: Path, url: str, n: int, command: Any = None,
                 health: str = "/healthz") -> None:
        """`command(port)`: another server's command line (default: the coordinator's),
        up once `health` answers 200."""
        exe = shutil.which("cardiofed")
        if exe is None:
            raise SystemExit("The cardiofed console script is not on PATH (pip install -e .).")
        if command is None:
            def command(port: int) -> list[str]:
                return [exe, "coordinator", "--insecure", "--host", HOST, "--port", str(port),
                        "--database-url", url, "--admin-key-file", str(workdir / "admin.key")]
        env = {k: v for k, v in os.environ.items() if not k.startswith("CARDIOFED_")}
        env["PYTHONUNBUFFERED"] = "1"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ports: list[int] = []
        self.logs: list[Path] = []
        for i in range(n):
            with socket.socket() as s:
                s.bind((HOST, 0))
                port = s.getsockname()[1]
            log = workdir / f"coordinator-{n}-{i}.log"
            self.logs.append(log)
            with open(log, "wb") as fh:
                self.procs.append(subprocess.Popen(
                    command(port), stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=workdir))
            self.ports.append(port)
        give_up = time.monotonic() + STARTUP_S
        for proc, port, log in zip(self.procs, self.ports, self.logs, strict=True):
            base = f"http://{HOST}:{port}"
            while True:
                if proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"coordinator exited: {log.read_text()[-2000:]}")
                try:
                    if httpx.get(f"{base}{health}", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > give_up:
                    self.stop()
                    raise RuntimeError(f"coordinator {base} not healthy after {STARTUP_S} s")
                time.sleep(0.2)

    def kill(self, i: int) -> None:
        self.procs[i].send_signal(signal.SIGKILL)
        self.procs[i].wait(timeout=30)

    def server_errors(self) -> int:
        return sum(log.read_bytes().count(b"Exception in ASGI application")
                   + log.read_bytes().count(b'HTTP/1.1" 50') for log in self.logs)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)


# ------------------------------------------------------------------ payloads

def statistics_payloads(study: str, names: list[str], x: list[np.ndarray]) -> list[bytes]:
    from cardiofed.data.catalog import study_columns
    from cardiofed.data.preprocessing import PRIVATE_BINS, bin_edges, site_statistics
    from cardiofed.wire import encode_arrays

    edges = bin_edges(study_columns("synthetic")[1], PRIVATE_BINS)
    return [encode_arrays(site_statistics(rows, edges).to_arrays(), {
        "study": study, "round": "0", "model_version": "0", "site": name})
        for name, rows in zip(names, x, strict=True)]


def train_updates(names: list[str], sizes: list[int], shapes: dict[str, tuple[int, ...]],
                  rng: np.random.Generator) -> list[Any]:
    from cardiofed.algorithms import ClientUpdate

    return [ClientUpdate(site=name, num_samples=n, num_steps=1, train_loss=0.5, delta={
        k: rng.normal(0.0, 0.01, shape).astype(np.float32) for k, shape in shapes.items()})
        for name, n in zip(names, sizes, strict=True)]


def train_payload(study: str, update: Any) -> bytes:
    from cardiofed.simulation.runner import update_manifest
    from cardiofed.wire import encode_arrays

    return encode_arrays(update.delta, {"study": study, "round": "1", "model_version": "0",
                                        "site": update.site, **update_manifest(update)})


# ------------------------------------------------------------------ sites

class Connection:
    """One keep-alive HTTP/1.1 connection of the load generator: raw asyncio streams.

    httpx (the node's client) spends about 1.5 ms of CPU per request: on these 2 cores,
    shared with the coordinators and PostgreSQL, it capped even ``/healthz`` near 550
    requests/s. These few lines cost a tenth of that, so the cores go to the server."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, path: str, body: bytes, credential: str,
                   content_type: str = "application/octet-stream") -> tuple[int, bytes]:
        if self.streams is None:
            self.streams = await asyncio.open_connection(HOST, self.port)
        reader, writer = self.streams
        try:
            writer.write(f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\n"
                         f"Authorization: Bearer {credential}\r\n"
                         f"Content-Type: {content_type}\r\n"
                         f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
            lines = head.decode("latin-1").split("\r\n")
            fields = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
            length = int({k.lower(): v for k, v in fields.items()}["content-length"])
            return int(lines[0].split()[1]), await reader.readexactly(length)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


async def upload_round(ports: list[int], study: str, number: int,
                       payloads: dict[str, bytes], credentials: dict[str, str],
                       in_flight: int, on_half: Any = None) -> dict[str, Any]:
    """POST every site's payload once from `in_flight` request loops (retrying on
    another process when one fails); returns counts, wall time and latencies."""
    order = list(payloads)
    random.Random(number).shuffle(order)  # sites report in no particular order
    pending = iter(order)
    outcome: Counter[str] = Counter()
    latencies: list[float] = []
    dead: set[int] = set()
    half = len(order) // 2
    path = f"/v1/studies/{study}/rounds/{number}/updates"

    async def request_loop(k: int) -> None:
        connections = [Connection(p) for p in ports]
        for name in pending:
            for attempt in range(20):
                live = [i for i in range(len(ports)) if i not in dead]
                i = live[(k + attempt) % len(live)]
                t0 = time.perf_counter()
                try:
                    code, body = await connections[i].post(path, payloads[name],
                                                           credentials[name])
                except (OSError, asyncio.IncompleteReadError):
                    dead.add(i)  # the process is gone: the next attempt goes elsewhere
                    outcome["transport_retries"] += 1
                    continue
                if code >= 500:
                    outcome["server_error_retries"] += 1
                    await asyncio.sleep(0.1 * (attempt + 1))
                    continue
                latencies.append(time.perf_counter() - t0)
                outcome[json.loads(body)["status"] if code == 200 else f"http_{code}"] += 1
                if on_half is not None and outcome["accepted"] == half:
                    on_half()
                break
            else:
                outcome["gave_up"] += 1
        for c in connections:
            c.close()

    start = time.perf_counter()
    await asyncio.gather(*(request_loop(k) for k in range(in_flight)))
    wall = time.perf_counter() - start
    lat = np.array(latencies)
    acknowledged = outcome["accepted"] + outcome["already accepted"]
    return {"sites": len(order), "outcome": dict(outcome), "wall_s": wall,
            "uploads_per_s": acknowledged / wall,
            "latency_ms_p50": float(np.percentile(lat, 50) * 1e3),
            "latency_ms_p99": float(np.percentile(lat, 99) * 1e3),
            "payload_bytes": int(np.mean([len(p) for p in payloads.values()]))}


def run_study(workdir: Path, url: str, processes: int, n_sites: int, in_flight: int, *,
              kill: bool = False) -> dict[str, Any]:
    """One study of `n_sites` over `processes` coordinators: both rounds measured."""
    from cardiofed.coordinator.studies import network_plan
    from cardiofed.data.national import national_federation
    from cardiofed.simulation.config import SimulationConfig

    study = f"scale-p{processes}-n{n_sites}" + ("-kill" if kill else "")
    data = national_federation(n_sites, seed=0)
    names = [s.name for s in data.sites]
    reset(url)
    credentials = create_study(url, study, names)
    stats = dict(zip(names, statistics_payloads(study, names, [s.x_train for s in data.sites]),
                     strict=True))
    coordinators = Coordinators(workdir, url, processes)
    try:
        out: dict[str, Any] = {"processes": processes, "sites": n_sites,
                               "in_flight": in_flight}
        t0 = time.time()
        out["statistics"] = asyncio.run(upload_round(coordinators.ports, study, 0, stats,
                                                     credentials, in_flight))
        out["statistics"] |= _closing(url, study, 0, t0)

        weights0, _ = published_model(url, study, 0)
        updates = train_updates(names, [len(s.y_train) for s in data.sites],
                                {k: v.shape for k, v in weights0.items()},
                                np.random.default_rng(1))
        payloads = {u.site: train_payload(study, u) for u in updates}
        victim = processes - 1 if kill else None
        t0 = time.time()
        out["train"] = asyncio.run(upload_round(
            coordinators.ports, study, 1, payloads, credentials, in_flight,
            on_half=(lambda: coordinators.kill(victim)) if victim is not None else None))
        out["train"] |= _closing(url, study, 1, t0)
        out["killed_process"] = victim
        out["coordinator_5xx"] = coordinators.server_errors()
    finally:
        coordinators.stop()

    # The published model against the same aggregation of exactly the payloads sent.
    plan = network_plan(SimulationConfig(**PLAN), len(updates))  # what the study runs
    algorithm = plan.make_algorithm()
    expected, _, _ = algorithm.server_update_with_report(
        weights0, updates, algorithm.init_server(weights0))
    got, participants = published_model(url, study, 1)
    out["participants"] = participants
    out["max_abs_model_difference"] = max(float(np.max(np.abs(got[k] - expected[k])))
                                          for k in expected)
    return out


def _closing(url: str, study: str, number: int, started: float) -> dict[str, Any]:
    """The round's record: updates in the database, the close, the round's wall time
    (`started`: Unix time of the round's first request)."""
    rec = round_record(url, study, number)
    out = {"closed": rec["closed_at"] is not None, "updates_in_db": rec["updates"],
           "distinct_sites_in_db": rec["distinct_sites"], "round_outcome": rec["outcome"]}
    if out["closed"]:
        closed = _epoch(rec["closed_at"])
        out |= {"close_s": closed - _epoch(rec["last_received"]),
                "round_wall_s": closed - started}
    return out


def _epoch(naive_utc: Any) -> float:
    """Unix time of the database's naive UTC timestamps."""
    from datetime import UTC

    return float(naive_utc.replace(tzinfo=UTC).timestamp())


# ------------------------------------------------------------------ main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default=os.environ.get("CARDIOFED_BENCH_POSTGRES_URL"))
    parser.add_argument("--sites", type=int, default=4000)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--national", type=int, default=36_000,
                        help="sites of the national run (with the SIGKILL); 0 skips it")
    parser.add_argument("--national-processes", type=int, default=4)
    parser.add_argument("--in-flight", type=int, default=32)
    add_smoke(parser)
    args = parser.parse_args()
    if args.smoke:
        args.sites, args.processes, args.national, args.in_flight = 20, [1], 0, 4
    if not args.database_url or not args.database_url.startswith("postgresql"):
        parser.error("--database-url (or CARDIOFED_BENCH_POSTGRES_URL) must name a PostgreSQL "
                     "database this bench may wipe")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    runs = []
    with tempfile.TemporaryDirectory(prefix="cardiofed-scale-") as tmp:
        for p in args.processes:
            runs.append(run_study(Path(tmp), args.database_url, p, args.sites, args.in_flight))
            print(runs[-1], flush=True)
        if args.national:
            runs.append(run_study(Path(tmp), args.database_url, args.national_processes,
                                  args.national, args.in_flight, kill=True))
            print(runs[-1], flush=True)
    write_results("network_scale", {"runs": runs}, report(runs))


def report(runs: list[dict[str, Any]]) -> str:
    rows = []
    for r in runs:
        for kind in ("statistics", "train"):
            x = r[kind]
            rows.append([r["sites"], r["processes"], kind, x["payload_bytes"],
                         x["uploads_per_s"], x["latency_ms_p50"], x["latency_ms_p99"],
                         x.get("close_s", float("nan")), x.get("round_wall_s", float("nan")),
                         f"{x['updates_in_db']}/{x['distinct_sites_in_db']}",
                         "yes" if r["killed_process"] is not None and kind == "train" else ""])
    best = max(r[k]["uploads_per_s"] for r in runs for k in ("statistics", "train"))
    lines = [f"Best: {best:.0f} accepted uploads/s (target >= 500: "
             f"{'met' if best >= 500 else 'missed'})."]
    for r in runs:
        if r["killed_process"] is None:
            continue
        wall = r["train"].get("round_wall_s", float("inf"))
        exact = (r["train"]["updates_in_db"] == r["train"]["distinct_sites_in_db"] == r["sites"]
                 == r["participants"] and r["max_abs_model_difference"] == 0.0)
        lines.append(f"{r['sites']:,}-update round with a process SIGKILLed: {wall:.0f} s "
                     f"(target < 120 s: {'met' if wall < 120 else 'missed'}); "
                     f"{r['train']['updates_in_db']:,} updates from as many distinct sites, "
                     f"published model {'equal to' if exact else 'DIFFERENT from'} the "
                     f"aggregate of the payloads sent ({'no' if exact else 'some'} update "
                     f"lost or counted twice).")
    return ("## The coordinator scaled out on PostgreSQL\n\n"
            + markdown_table(["sites", "processes", "round", "payload bytes", "uploads/s",
                              "p50 ms", "p99 ms", "close s", "round wall s",
                              "updates / distinct sites in DB", "SIGKILL mid-round"], rows, 1)
            + "\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
