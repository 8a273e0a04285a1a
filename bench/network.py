"""Networked federation on loopback: overhead per round, upload throughput, bytes.

A real coordinator process (``cardiofed coordinator --insecure``, uvicorn, SQLite in WAL
mode with ``synchronous=FULL``) on 127.0.0.1, and N = 4 and N = 50 hospital nodes
(:class:`~cardiofed.node.agent.NodeAgent`, each with its own ``httpx.Client`` and state
directory) that poll it, train and upload exactly as ``cardiofed node run`` does.

* Overhead per round: the coordinator's own record of each training round (``opened_at``
  to ``closed_at`` in its ``rounds`` table) minus the pure compute floor, the same
  rounds of the same plan on the same sites run in-process by
  :func:`cardiofed.simulation.runner.run_federated` (fastest of three runs).
* Bytes: each node's outbound log (what ``cardiofed node audit`` shows) gives the size
  of every update; the coordinator serves the global model the nodes download.
* Upload throughput: 200 enrolled sites post a valid statistics payload for round 0
  from K concurrent clients; each POST returns only after the coordinator has
  validated and committed it, so uploads/s is accepted-and-committed updates per second.

Plan: logistic regression, FedAvg, ``--rounds`` rounds (10), one local epoch, batch 32,
SGD lr 0.05, on the synthetic cohort (``synthetic_federation(n_sites=N, seed=0)``;
``--scale-50`` shrinks the 50 sites so the run stays near a minute on 2 cores).
``--max-in-flight`` optionally caps the nodes' requests in flight (default: no cap;
see ``_CappedTransport``); waiting long-polls hold no coordinator thread or connection.

    python bench/network.py [--rounds 10] [--scale-50 0.1] [--max-in-flight 0]
                            [--upload-sites 200] [--clients 1 8]
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_smoke, markdown_table, write_results  # noqa: E402

HOST = "127.0.0.1"  # loopback only
SETTINGS: dict[str, Any] = dict(model="logistic", algorithm="fedavg", local_epochs=1,
                                batch_size=32, lr=0.05, eval_every=0, seed=0)
STARTUP_S = 60.0        # coordinator start-up limit
STUDY_LIMIT_S = 600.0   # one networked study, all rounds
UPLOAD_LIMIT_S = 300.0  # one upload-throughput run


# ------------------------------------------------------------------ coordinator process

class Coordinator:
    """``cardiofed coordinator`` as a child process on a free loopback port."""

    def __init__(self, workdir: Path, name: str) -> None:
        self.workdir = workdir
        self.db = workdir / f"{name}.db"
        self.key_file = workdir / f"{name}-admin.key"
        self.log = workdir / f"{name}.log"
        with socket.socket() as s:
            s.bind((HOST, 0))
            self.port = s.getsockname()[1]
        self.url = f"http://{HOST}:{self.port}"
        exe = shutil.which("cardiofed")
        if exe is None:
            raise SystemExit("The cardiofed console script is not on PATH (pip install -e .).")
        cmd = [exe, "coordinator", "--insecure", "--host", HOST, "--port", str(self.port),
               "--database-url", f"sqlite:///{self.db}", "--admin-key-file", str(self.key_file)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("CARDIOFED_")}
        env["PYTHONUNBUFFERED"] = "1"
        self._log_fh = open(self.log, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, stdout=self._log_fh, stderr=subprocess.STDOUT,
                                     env=env, cwd=workdir)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        self.admin = self.key_file.read_text().strip()
        self.client = httpx.Client(base_url=self.url, timeout=60,
                                   headers={"Authorization": f"Bearer {self.admin}"})

    def _wait_healthy(self) -> None:
        give_up = time.monotonic() + STARTUP_S
        while time.monotonic() < give_up:
            if self.proc.poll() is not None:
                raise RuntimeError(f"coordinator exited ({self.proc.returncode}): "
                                   f"{self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200 \
                        and self.key_file.exists():
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"coordinator not healthy after {STARTUP_S:.0f} s")

    def create_study(self, study: str, sites: list[str], plan: dict[str, Any],
                     **fields: Any) -> dict[str, str]:
        """A study of the synthetic cohort's columns; `fields` add to (or replace) the
        creation request's."""
        from cardiofed.data.catalog import study_columns

        names, ranges = study_columns("synthetic")
        r = self.client.post("/v1/studies", json={
            "id": study, "plan": plan, "sites": sites, "feature_names": names,
            "feature_ranges": ranges, "min_sites": None, "round_timeout_s": 3600.0,
            **fields})
        if r.status_code != 201:
            raise RuntimeError(f"create study {study}: {r.status_code} {r.text}")
        return dict(r.json()["enrolment_tokens"])

    def status(self, study: str) -> dict[str, Any]:
        return dict(self.client.get(f"/v1/studies/{study}/status").json())

    def rounds(self, study: str) -> list[tuple[int, str, datetime, datetime | None]]:
        """The coordinator's own round records (read-only, straight from its database)."""
        con = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30)
        try:
            rows = con.execute("SELECT number, kind, opened_at, closed_at FROM rounds "
                               "WHERE study_id = ? ORDER BY number", (study,)).fetchall()
        finally:
            con.close()
        return [(n, k, datetime.fromisoformat(o), datetime.fromisoformat(c) if c else None)
                for n, k, o, c in rows]

    def server_errors(self) -> int:
        """HTTP 5xx responses and unhandled exceptions in the coordinator's log."""
        text = self.log.read_bytes()
        return (len(re.findall(rb'HTTP/1\.1" 5\d\d', text))
                + text.count(b"Exception in ASGI application"))

    def stop(self) -> None:
        if getattr(self, "client", None) is not None:
            self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        self._log_fh.close()


def run_nodes(agents: list[Any], timeout_s: float) -> float:
    """Run each node's ``run()`` in its own thread until the study is done; returns the
    wall seconds. Raises if a node failed or was still running after `timeout_s`."""
    errors: list[BaseException] = []

    def work(agent: Any) -> None:
        try:
            agent.run()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(a,), daemon=True) for a in agents]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout_s)
    if errors or any(t.is_alive() for t in threads):
        raise RuntimeError(f"nodes failed or hung: {errors[:1]}")
    return time.perf_counter() - start


class _CappedTransport(httpx.BaseTransport):
    """Lets at most ``len(slots)`` requests of all nodes be in flight: long-polls for a
    task take one kind of slot, every other request (uploads, model downloads, status)
    the other, so an upload never queues behind the long-polls of idle nodes.

    Work-around for the coordinator's connection handling (see the notes): a long-poll
    holds one of its 5 + 10 pooled database connections and one of its 40 worker threads
    for the whole wait, and every other request needs both, so with more requests in
    flight than that they queue behind the long-polls (and, past the pool's 30 s
    timeout, fail with 500).
    """

    def __init__(self, polls: threading.BoundedSemaphore,
                 others: threading.BoundedSemaphore) -> None:
        self._inner = httpx.HTTPTransport()
        self._polls, self._others = polls, others

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        slots = self._polls if request.url.path == "/v1/tasks/next" else self._others
        with slots:
            response = self._inner.handle_request(request)
            try:
                response.read()  # the whole exchange holds the slot
            finally:
                response.close()
            return httpx.Response(response.status_code, headers=response.headers,
                                  content=response.content, extensions=response.extensions)

    def close(self) -> None:
        self._inner.close()


class _Warnings(logging.Handler):
    """Counts the nodes' retry warnings (coordinator unreachable or 5xx)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.count = 0
        self.samples: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        if len(self.samples) < 5:
            self.samples.append(record.getMessage())


# ------------------------------------------------------------------ rounds over the network

def _in_process_per_round(data: Any, plan: dict[str, Any],
                          repeats: int = 3) -> tuple[float, dict[str, np.ndarray]]:
    """Seconds per round of the in-process run (fastest of `repeats`) and its model."""
    from cardiofed.simulation.config import SimulationConfig
    from cardiofed.simulation.prepare import prepare_federation
    from cardiofed.simulation.runner import run_federated

    sites = prepare_federation(data, "global")
    config = SimulationConfig.create(**plan)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run = run_federated(sites, config)
        times.append(time.perf_counter() - start)
    return min(times) / config.rounds, {k: np.asarray(v) for k, v in run.weights.items()}


def _seconds(a: datetime, b: datetime | None) -> float:
    return float("nan") if b is None else (b - a).total_seconds()


def networked_study(workdir: Path, n_sites: int, size_scale: float, rounds: int,
                    poll_wait_s: float, max_in_flight: int) -> dict[str, Any]:
    from cardiofed.data.synthetic import synthetic_federation
    from cardiofed.node.agent import NodeAgent
    from cardiofed.node.config import NodeConfig
    from cardiofed.wire import decode_arrays

    plan = {**SETTINGS, "rounds": rounds}
    data = synthetic_federation(n_sites=n_sites, seed=0, size_scale=size_scale)
    names = [s.name for s in data.sites]
    floor, floor_weights = _in_process_per_round(data, plan)

    coordinator = Coordinator(workdir, f"coordinator-{n_sites}")
    warnings = _Warnings()
    node_log = logging.getLogger("cardiofed.node")
    node_log.addHandler(warnings)
    agents: list[NodeAgent] = []
    try:
        study = f"bench-{n_sites}"
        tokens = coordinator.create_study(study, names, plan)
        polls = threading.BoundedSemaphore(max(1, max_in_flight // 2))
        others = threading.BoundedSemaphore(max(1, max_in_flight - max_in_flight // 2))
        for name in names:
            config = NodeConfig.create(
                coordinator_url=coordinator.url, state_dir=str(workdir / study / name),
                enrolment_token=tokens[name], poll_wait_s=poll_wait_s, privacy="off",
                data={"dataset": "synthetic", "site": name, "seed": 0})
            client = None
            if max_in_flight:
                client = httpx.Client(base_url=coordinator.url, timeout=poll_wait_s + 30,
                                      transport=_CappedTransport(polls, others))
            agent = NodeAgent(config, client=client)
            # The nodes' rows, loaded once: load_site_data would rebuild the synthetic
            # federation per node, and with 12 sites (load_dataset's fixed n_sites)
            # rather than this run's n_sites.
            agent._site = data.site(name)
            agents.append(agent)
        errors: list[BaseException] = []
        tasks_run = [0] * len(agents)

        def work(k: int) -> None:
            try:  # statistics, `rounds` training rounds, evaluation: bounded task count
                tasks_run[k] = agents[k].run(max_tasks=rounds + 2)
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(k,), daemon=True,
                                    name=f"node-{names[k]}") for k in range(len(agents))]
        start = time.perf_counter()
        for t in threads:
            t.start()
        give_up = time.monotonic() + STUDY_LIMIT_S
        for t in threads:
            t.join(timeout=max(0.0, give_up - time.monotonic()))
        wall = time.perf_counter() - start
        if any(t.is_alive() for t in threads):
            raise RuntimeError(f"N={n_sites}: study not done after {STUDY_LIMIT_S:.0f} s: "
                               f"{coordinator.status(study)}")
        if errors:
            raise RuntimeError(f"N={n_sites}: node failed: {errors[0]!r}")
        state = coordinator.status(study)
        if state["phase"] != "done":
            raise RuntimeError(f"N={n_sites}: study ended in phase {state['phase']}")

        records = coordinator.rounds(study)
        train = [_seconds(o, c) for _, kind, o, c in records if kind == "train"]
        stats_s = [_seconds(o, c) for _, kind, o, c in records if kind == "statistics"][0]
        eval_s = [_seconds(o, c) for _, kind, o, c in records if kind == "evaluate"][0]
        model_bytes = len(coordinator.client.get(f"/v1/studies/{study}/models/1").content)
        final, _ = decode_arrays(
            coordinator.client.get(f"/v1/studies/{study}/models/{rounds}").content)
        model_diff = max(float(np.abs(final[k] - floor_weights[k]).max()) for k in final)
        pre_bytes = len(coordinator.client.get(f"/v1/studies/{study}/preprocessor").content)
        summaries = [a.outbound.summary() for a in agents]
        update_bytes = [int(str(e["bytes"])) for a in agents for e in a.outbound.entries()
                        if e["kind"] == "train"]
        train_payloads = sum(s["train"]["payloads"] for s in summaries)
        train_total = sum(s["train"]["bytes"] for s in summaries)
        networked = statistics.fmean(train)
        return {
            "n_sites": n_sites, "size_scale": size_scale, "rounds": rounds,
            "max_in_flight": max_in_flight or None,
            "train_rows": int(sum(s.n_train for s in data.sites)),
            "in_process_s_per_round": floor,
            "networked_s_per_round": networked,
            "networked_s_per_round_median": statistics.median(train),
            "overhead_s_per_round": networked - floor,
            "final_model_max_abs_diff_vs_in_process": model_diff,
            "train_round_s": train, "statistics_round_s": stats_s, "evaluate_round_s": eval_s,
            "study_wall_s": wall,
            "bytes_per_update": train_total / train_payloads,
            "bytes_per_update_min_max": [min(update_bytes), max(update_bytes)],
            "upload_bytes_per_round": train_total / rounds,
            "model_bytes": model_bytes,
            "download_bytes_per_round": model_bytes * n_sites,
            "preprocessor_bytes": pre_bytes,
            "statistics_bytes_per_site": statistics.fmean(
                s["statistics"]["bytes"] for s in summaries),
            "evaluate_bytes_per_site": statistics.fmean(
                s["evaluate"]["bytes"] for s in summaries),
            "tasks_per_node": sorted(set(tasks_run)),
            "node_retry_warnings": warnings.count, "node_retry_samples": warnings.samples,
            "coordinator_5xx": coordinator.server_errors(),
        }
    finally:
        node_log.removeHandler(warnings)
        for a in agents:
            a.client.close()
        coordinator.stop()


# ------------------------------------------------------------------ upload throughput

def _post_concurrently(url: str, study: str, payloads: list[tuple[str, bytes]],
                       credentials: dict[str, str], k: int) -> dict[str, Any]:
    """POST every payload once, from `k` clients at once; wall time and latencies."""
    next_index = iter(range(len(payloads)))
    lock = threading.Lock()
    latencies: list[float] = []
    statuses: list[int] = []
    barrier = threading.Barrier(k + 1)

    def post_all() -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            barrier.wait(timeout=60)
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                site, body = payloads[i]
                t0 = time.perf_counter()
                try:
                    r = client.post(f"/v1/studies/{study}/rounds/0/updates", content=body,
                                    headers={"Authorization": f"Bearer {credentials[site]}"})
                    code = r.status_code
                    if code == 200 and r.json()["status"] != "accepted":
                        code = 299  # acknowledged as a retry: not a new upload
                except httpx.HTTPError:
                    code = 0
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    statuses.append(code)

    threads = [threading.Thread(target=post_all, daemon=True) for _ in range(k)]
    for t in threads:
        t.start()
    barrier.wait(timeout=60)
    start = time.perf_counter()
    give_up = time.monotonic() + UPLOAD_LIMIT_S
    for t in threads:
        t.join(timeout=max(0.0, give_up - time.monotonic()))
    wall = time.perf_counter() - start
    if any(t.is_alive() for t in threads):
        raise RuntimeError(f"upload run K={k} not done after {UPLOAD_LIMIT_S:.0f} s")
    accepted = statuses.count(200)
    lat = np.array(latencies)
    return {"clients": k, "accepted": accepted, "failed": len(statuses) - accepted,
            "wall_s": wall, "uploads_per_s": accepted / wall,
            "latency_ms_p50": float(np.percentile(lat, 50) * 1e3),
            "latency_ms_p95": float(np.percentile(lat, 95) * 1e3),
            "payload_bytes": len(payloads[0][1])}


def upload_throughput(workdir: Path, n_sites: int, clients: list[int]) -> dict[str, Any]:
    from cardiofed.data.catalog import study_columns
    from cardiofed.data.preprocessing import bin_edges, site_statistics
    from cardiofed.wire import encode_arrays

    names, ranges = study_columns("synthetic")
    lo, hi = np.array(ranges).T
    edges = bin_edges([(float(a), float(b)) for a, b in ranges])
    rng = np.random.default_rng(0)
    sites = [f"site{i:03d}" for i in range(n_sites)]
    coordinator = Coordinator(workdir, "coordinator-upload")
    out: dict[str, Any] = {"sites": n_sites, "runs": {}}
    try:
        for k in clients:
            study = f"upload-k{k}"
            tokens = coordinator.create_study(study, sites, {**SETTINGS, "rounds": 1})
            credentials = {}
            with httpx.Client(base_url=coordinator.url, timeout=60) as enrol:
                for site in sites:
                    r = enrol.post("/v1/enrol", json={"token": tokens[site]})
                    r.raise_for_status()
                    credentials[site] = r.json()["credential"]
            payloads = []
            for site in sites:
                stats = site_statistics(rng.uniform(lo, hi, size=(100, len(names))), edges)
                payloads.append((site, encode_arrays(stats.to_arrays(), {
                    "study": study, "round": "0", "model_version": "0", "site": site})))
            run = _post_concurrently(coordinator.url, study, payloads, credentials, k)
            run["round_0_closed"] = coordinator.status(study)["round"] == 1
            out["runs"][str(k)] = run
        out["coordinator_5xx"] = coordinator.server_errors()
    finally:
        coordinator.stop()
    return out


# ------------------------------------------------------------------ main

def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--scale-50", type=float, default=0.1,
                        help="size_scale of the 50-site federation")
    parser.add_argument("--poll-wait", type=float, default=1.0, help="nodes' long-poll seconds")
    parser.add_argument("--max-in-flight", type=int, default=0,
                        help="requests of all nodes in flight at once, half of them "
                             "long-polls (0: no cap)")
    parser.add_argument("--upload-sites", type=int, default=200)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    add_smoke(parser)
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.scale_50, args.upload_sites, args.clients = 1, 0.3, 4, [1]
        args.poll_wait = 0.2
    if max(args.clients) > 10:
        parser.error("--clients above 10 exceed what the coordinator's connection pool "
                     "serves without stalling (see the notes)")
    # One intra-op thread for the floor and the nodes alike: tiny logistic-regression steps
    # gain nothing from more, and on 2 busy cores OpenMP spinning made them several times
    # slower and the floor erratic.
    torch.set_num_threads(1)
    # SIGTERM (e.g. from `timeout`) unwinds like Ctrl-C, so the coordinator is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    with tempfile.TemporaryDirectory(prefix="cardiofed-bench-") as tmp:
        workdir = Path(tmp)
        studies = [networked_study(workdir, n, scale, args.rounds, args.poll_wait,
                                   args.max_in_flight)
                   for n, scale in ((4, 0.3 if args.smoke else 1.0),
                                    (5 if args.smoke else 50, args.scale_50))]
        uploads = upload_throughput(workdir, args.upload_sites, args.clients)

    rows = [[r["n_sites"], r["train_rows"], r["in_process_s_per_round"],
             r["networked_s_per_round"], r["overhead_s_per_round"],
             round(r["bytes_per_update"]), round(r["upload_bytes_per_round"]),
             r["download_bytes_per_round"]] for r in studies]
    upload_rows = [[u["clients"], u["accepted"], u["wall_s"], u["uploads_per_s"],
                    u["latency_ms_p50"], u["latency_ms_p95"], u["payload_bytes"]]
                   for u in uploads["runs"].values()]
    notes = [
        f"Logistic regression, FedAvg, {args.rounds} rounds, 1 local epoch, batch 32, "
        "synthetic cohort (N=4: full size; "
        f"N=50: size_scale {args.scale_50}). Networked s/round: mean of the coordinator's "
        "training rounds, opened_at to closed_at; in-process s/round: run_federated on the "
        "same sites and plan (fastest of 3). Overhead = networked - in-process. Both ran "
        "the same rounds: the final networked model differs from the in-process one by at "
        f"most {studies[0]['final_model_max_abs_diff_vs_in_process']:.1e} (N=4) and "
        f"{studies[1]['final_model_max_abs_diff_vs_in_process']:.1e} (N=50) per weight.",
        "Bytes per round: uploads = N updates (from the nodes' outbound logs); downloads = "
        f"N x the global model ({studies[0]['model_bytes']} bytes). HTTP headers not counted. "
        f"The statistics round sends {studies[0]['statistics_bytes_per_site']:.0f} bytes "
        "per site once.",
        "Environment: coordinator = `cardiofed coordinator --insecure` (uvicorn, one "
        "process) on 127.0.0.1, SQLite in WAL mode with synchronous=FULL (every accepted "
        "update fsynced before it is acknowledged). The N nodes are NodeAgent objects in "
        "threads of one process (50 node processes do not fit 2 cores and their memory), "
        "each with its own httpx.Client, state directory and outbound log, long-polling "
        f"with wait={args.poll_wait:g} s; node and coordinator share the same 2 cores, "
        "and node threads share one GIL; PyTorch runs one intra-op thread (floor and "
        "nodes alike). Node data is loaded once and handed to the agents "
        "(agent._site) instead of every node regenerating the synthetic federation.",
        (f"The nodes' requests pass through a shared cap of {args.max_in_flight} in flight "
         f"({args.max_in_flight // 2} long-polls + "
         f"{args.max_in_flight - args.max_in_flight // 2} others)." if args.max_in_flight else
         "No cap on the nodes' requests in flight: a waiting long-poll holds no coordinator "
         "worker thread or database connection."),
        f"Retries the nodes logged: N=4 {studies[0]['node_retry_warnings']}, "
        f"N=50 {studies[1]['node_retry_warnings']}; coordinator 5xx responses: "
        f"{studies[0]['coordinator_5xx']}, {studies[1]['coordinator_5xx']}, "
        f"upload phase {uploads['coordinator_5xx']}.",
    ]
    md = ("## Networked federation on loopback: overhead per round and bytes\n\n"
          + markdown_table(["N nodes", "train rows", "in-process s/round",
                            "networked s/round", "overhead s/round", "bytes per update",
                            "upload bytes/round", "download bytes/round"], rows)
          + f"\n### Upload throughput: {args.upload_sites} sites post statistics for "
            "round 0\n\n"
          + markdown_table(["concurrent clients", "accepted", "wall s", "uploads/s",
                            "p50 ms", "p95 ms", "payload bytes"], upload_rows, digits=1)
          + "\nEach upload is acknowledged only after it is validated and committed; the "
            "last one also closes the round (merging all statistics).\n\n"
          + "\n\n".join(notes) + "\n")
    write_results("network", {"settings": {**SETTINGS, "rounds": args.rounds,
                                           "poll_wait_s": args.poll_wait,
                                           "scale_50": args.scale_50},
                              "studies": {str(r["n_sites"]): r for r in studies},
                              "upload_throughput": uploads, "notes": notes}, md)


if __name__ == "__main__":
    main()
