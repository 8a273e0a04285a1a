"""The floor under the coordinator's upload rate on this machine: what the chosen stack
(uvicorn + FastAPI + SQLAlchemy + psycopg + PostgreSQL) serves when an upload does
nothing but the irreducible part, against the real coordinator on the same load.

Three servers, each on 1, 2 and 4 processes, the same load generator as
``bench/network_scale.py`` (its raw keep-alive connections, ``--in-flight`` requests at
a time, the same training payloads and bearer credentials):

* ``http``: a FastAPI endpoint that reads the body and answers, no database: the
  HTTP stack's ceiling;
* ``insert``: the same, plus one SQLAlchemy Core ``INSERT`` of the payload and its
  ``COMMIT`` on PostgreSQL (``synchronous_commit=on``: acknowledged only once durable),
  in the thread pool like the coordinator's upload: the ceiling of any coordinator that
  commits each upload before acknowledging it, with no authentication, no validation and
  no round bookkeeping;
* ``coordinator``: ``cardiofed coordinator``, the real upload of a training round
  (authentication, payload checks, the round's shared lock, tally, completeness check).

If ``insert`` is below the target, no coordinator written on this stack reaches it on
this machine; the gap between ``insert`` and ``coordinator`` is what the coordinator's
own work costs.

Needs a PostgreSQL database it may wipe (default URL: ``CARDIOFED_BENCH_POSTGRES_URL``):

    python bench/upload_floor.py [--database-url URL] [--uploads 3000] [--processes 1 2 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Request  # module level: the endpoint's annotations are resolved here

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_smoke, markdown_table, write_results  # noqa: E402
from network_scale import (  # noqa: E402
    HOST,
    Coordinators,
    run_study,
    train_payload,
    train_updates,
    upload_round,
)

TARGET = 500.0


def floor_table() -> Any:
    from sqlalchemy import Column, Integer, LargeBinary, MetaData, String, Table

    return Table("floor_updates", MetaData(), Column("id", Integer, primary_key=True),
                 Column("path", String(200)), Column("payload", LargeBinary))


def floor_app(url: str | None) -> Any:
    """The minimal upload endpoint: read the body; with `url`, insert it and commit."""
    from fastapi import FastAPI
    from fastapi.concurrency import run_in_threadpool
    from sqlalchemy import create_engine

    app = FastAPI()
    table = floor_table()
    engine = create_engine(url, pool_size=20) if url else None

    def store(path: str, payload: bytes) -> None:
        assert engine is not None
        with engine.begin() as conn:
            conn.execute(table.insert(), {"path": path, "payload": payload})

    @app.post("/v1/studies/{study}/rounds/{number}/updates")
    async def upload(study: str, number: int, request: Request) -> dict[str, str]:
        payload = await request.body()
        if engine is not None:
            await run_in_threadpool(store, request.url.path, payload)
        return {"status": "accepted"}

    return app


def floor_servers(workdir: Path, url: str | None, n: int) -> Coordinators:
    """`n` uvicorn processes of :func:`floor_app` on free loopback ports."""
    return Coordinators(workdir, url or "", n, health="/docs", command=lambda port: (
        [sys.executable, __file__, "--serve", str(port)]
        + (["--database-url", url] if url else ["--no-database"])))


def serve(port: int, url: str | None) -> None:
    import uvicorn

    uvicorn.run(floor_app(url), host=HOST, port=port, log_level="warning")


def run(workdir: Path, url: str, server: str, processes: int, n: int, in_flight: int,
        names: list[str], credentials: dict[str, str], payloads: dict[str, bytes],
        study: str) -> dict[str, Any]:
    if server == "coordinator":  # network_scale's study: its training round is measured
        from sqlalchemy import create_engine

        engine = create_engine(url)  # the store refuses a database with foreign tables
        floor_table().drop(engine, checkfirst=True)
        engine.dispose()
        out = run_study(workdir, url, processes, n, in_flight)["train"]
    else:
        from sqlalchemy import create_engine

        engine = create_engine(url)
        table = floor_table()
        table.drop(engine, checkfirst=True)
        table.create(engine)
        engine.dispose()
        servers = floor_servers(workdir, url if server == "insert" else None, processes)
        try:
            out = asyncio.run(upload_round(servers.ports, study, 1, payloads, credentials,
                                           in_flight))
        finally:
            servers.stop()
    return {"server": server, "processes": processes, "uploads": n, **out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default=os.environ.get("CARDIOFED_BENCH_POSTGRES_URL"))
    parser.add_argument("--uploads", type=int, default=3000)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--in-flight", type=int, default=32)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--no-database", action="store_true", help=argparse.SUPPRESS)
    add_smoke(parser)
    args = parser.parse_args()
    if args.smoke:
        args.uploads, args.processes, args.in_flight = 20, [1], 2
    if args.serve:
        serve(args.serve, None if args.no_database else args.database_url)
        return
    if not args.database_url or not args.database_url.startswith("postgresql"):
        parser.error("--database-url (or CARDIOFED_BENCH_POSTGRES_URL) must name a PostgreSQL "
                     "database this bench may wipe")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from cardiofed.store import new_secret

    study = "floor"
    names = [f"site{i:05d}" for i in range(args.uploads)]
    credentials = {name: new_secret() for name in names}
    from cardiofed.data.catalog import study_columns

    shapes = {"linear.weight": (1, len(study_columns("synthetic")[0])), "linear.bias": (1,)}
    updates = train_updates(names, [100] * len(names), shapes, np.random.default_rng(1))
    payloads = {u.site: train_payload(study, u) for u in updates}
    runs = []
    with tempfile.TemporaryDirectory(prefix="cardiofed-floor-") as tmp:
        for server in ("http", "insert", "coordinator"):
            for p in args.processes:
                runs.append(run(Path(tmp), args.database_url, server, p, args.uploads,
                                args.in_flight, names, credentials, payloads, study))
                print({k: runs[-1][k] for k in ("server", "processes", "uploads_per_s")},
                      flush=True)
    write_results("upload_floor", {"runs": runs}, report(runs))


def report(runs: list[dict[str, Any]]) -> str:
    rows = [[r["server"], r["processes"], r["uploads"], r["payload_bytes"], r["uploads_per_s"],
             r["latency_ms_p50"], r["latency_ms_p99"],
             r["outcome"].get("accepted", 0)] for r in runs]
    best = {s: max(r["uploads_per_s"] for r in runs if r["server"] == s)
            for s in dict.fromkeys(r["server"] for r in runs)}
    lines = [f"Best {s}: {v:.0f} uploads/s ({'at or over' if v >= TARGET else 'under'} the "
             f"{TARGET:.0f}/s target)." for s, v in best.items()]
    return ("## The upload rate's floor on this machine\n\n"
            + markdown_table(["server", "processes", "uploads", "payload bytes", "uploads/s",
                              "p50 ms", "p99 ms", "accepted"], rows, 1)
            + "\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
