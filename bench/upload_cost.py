"""CPU cost of one accepted upload in the coordinator's own code, without HTTP.

One process, one thread: for each of ``--uploads`` sites of a fresh study, a session
authenticates the site and reads its round, and another one
(:func:`cardiofed.coordinator.uploads.submit`) validates and commits its statistics
payload (as ``bench/network_scale.py`` sends them), on PostgreSQL.
Measured: CPU milliseconds of this Python process per upload (``time.process_time``;
PostgreSQL's own work is in another process) and wall milliseconds, after
``--warm-up`` uploads. The floor this sets on the HTTP service: a core spending this
much per upload serves at most ``1000 / cpu_ms`` uploads/s before HTTP is counted.

Needs a PostgreSQL database it may wipe (default URL: ``CARDIOFED_BENCH_POSTGRES_URL``):

    python bench/upload_cost.py [--database-url URL] [--uploads 500] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_smoke, markdown_table, write_results  # noqa: E402
from network_scale import create_study, reset, statistics_payloads  # noqa: E402


def measure(url: str, uploads: int, warm_up: int) -> dict[str, float]:
    from cardiofed.coordinator import enrolment
    from cardiofed.coordinator.uploads import submit
    from cardiofed.data.catalog import study_columns
    from cardiofed.store import make_engine, make_sessionmaker

    reset(url)
    names = [f"site{i:05d}" for i in range(warm_up + uploads + 1)]  # the round stays open
    credentials = create_study(url, "cost", names)
    ranges = study_columns("synthetic")[1]
    rng = np.random.default_rng(0)
    rows = [rng.uniform([lo for lo, _ in ranges], [hi for _, hi in ranges], (100, len(ranges)))
            for _ in names]
    payloads = statistics_payloads("cost", names, rows)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)

    def upload(i: int) -> None:  # as the endpoint does: one session for each step
        with sessions() as db:
            target = enrolment.authenticate_upload(db, credentials[names[i]], "cost", 0)
            db.expunge_all()
        with sessions() as db:
            submit(db, target, payload=payloads[i], max_bytes=1 << 24)

    for i in range(warm_up):
        upload(i)
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(warm_up, warm_up + uploads):
        upload(i)
    out = {"cpu_ms": (time.process_time() - cpu) / uploads * 1000,
           "wall_ms": (time.perf_counter() - wall) / uploads * 1000}
    engine.dispose()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database-url", default=os.environ.get("CARDIOFED_BENCH_POSTGRES_URL"))
    parser.add_argument("--uploads", type=int, default=500)
    parser.add_argument("--warm-up", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    add_smoke(parser)
    args = parser.parse_args()
    if args.smoke:
        args.uploads, args.warm_up, args.repeats = 5, 1, 1
    if not args.database_url:
        raise SystemExit("Give --database-url (a PostgreSQL database this bench may wipe) or "
                         "set CARDIOFED_BENCH_POSTGRES_URL.")
    runs = [measure(args.database_url, args.uploads, args.warm_up) for _ in range(args.repeats)]
    results: dict[str, Any] = {
        "uploads": args.uploads, "runs": runs,
        "cpu_ms_median": statistics.median(r["cpu_ms"] for r in runs),
        "wall_ms_median": statistics.median(r["wall_ms"] for r in runs)}
    table = markdown_table(["uploads per run", "runs", "CPU ms / upload (median)",
                            "wall ms / upload (median)", "uploads/s per core, at most"],
                           [[args.uploads, len(runs), results["cpu_ms_median"],
                             results["wall_ms_median"], 1000 / results["cpu_ms_median"]]])
    write_results("upload_cost", results, table)
    print(table)


if __name__ == "__main__":
    main()
