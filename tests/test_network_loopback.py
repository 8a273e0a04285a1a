"""The networked federation as real processes over loopback: ``cardiofed coordinator``,
``cardiofed admin create-study`` and one ``cardiofed node run`` per site, talking HTTP(S)
on 127.0.0.1 only. Faults: the coordinator or a node killed with SIGKILL mid-study.

Every wait is bounded, and every child process is killed in fixture teardown.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import httpx
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cardiofed.data.paths import data_dir
from cardiofed.data.preprocessing import Preprocessor
from cardiofed.data.synthetic import synthetic_federation
from cardiofed.simulation.config import SimulationConfig
from cardiofed.simulation.experiment import FEDERATED, POOLED_TEST, run_experiment, score
from cardiofed.wire import decode_arrays

HOST = "127.0.0.1"  # the only address these tests ever connect to
STARTUP_S = 60.0    # a process importing torch on a busy 2-core machine
STUDY_S = 90.0      # a whole (small) study
UCI_FILES = tuple(f"processed.{c}.data" for c in ("cleveland", "hungarian", "switzerland", "va"))
UCI_SITES = ["cleveland", "hungarian", "switzerland", "va"]
UCI_PLAN = {"rounds": 5, "local_steps": 20, "batch_size": 4, "lr": 0.01, "seed": 3}
SYN_SITES = ["tier3_01", "tier2_01", "community_01"]
SYN_PLAN = {"rounds": 10, "local_steps": 20, "batch_size": 16, "lr": 0.05, "seed": 7}

T = TypeVar("T")


def _cli() -> list[str]:
    exe = shutil.which("cardiofed")
    return [exe] if exe else [sys.executable, "-m", "cardiofed.cli"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Callable[[], T | None], timeout: float, what: str,
             interval: float = 0.05, describe: Callable[[], str] = lambda: "") -> T:
    """Poll `condition` until it returns something truthy, at most `timeout` seconds."""
    give_up = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= give_up:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n"
                                 f"{describe()}")
        time.sleep(interval)


def _toml(values: dict[str, object]) -> str:
    lines, tables = [], []
    for key, value in values.items():
        if isinstance(value, dict):
            tables.append(f"\n[{key}]\n" + _toml(value))
        else:
            lines.append(f"{key} = {json.dumps(value)}")  # JSON scalars are TOML scalars
    return "\n".join(lines) + "\n" + "".join(tables)


class Processes:
    """Child processes of one test, each logging to its own file; all killed at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {**os.environ, "CARDIOFED_DATA_DIR": str(data_dir()),
                    "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                    "NO_COLOR": "1", "COLUMNS": "200"}

    def start(self, name: str, *args: str | Path) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - closed with the child
        try:
            proc = subprocess.Popen([*_cli(), *map(str, args)], stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.env, cwd=self.root)
        finally:
            log.close()  # the child holds its own descriptor
        self.children[name] = proc
        return proc

    def run(self, *args: str | Path, timeout: float = STARTUP_S
            ) -> subprocess.CompletedProcess[str]:
        """A short command to completion (bounded)."""
        return subprocess.run([*_cli(), *map(str, args)], capture_output=True, text=True,
                              env=self.env, cwd=self.root, timeout=timeout, check=False)

    def kill(self, name: str) -> None:
        proc = self.children[name]
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def wait(self, names: list[str], timeout: float) -> dict[str, int]:
        """Exit codes of the named children, waiting at most `timeout` for all of them."""
        give_up = time.monotonic() + timeout
        codes = {}
        for name in names:
            try:
                codes[name] = self.children[name].wait(
                    timeout=max(0.1, give_up - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{name} still running after {timeout:.0f} s\n"
                                     f"{self.tails()}") from None
        return codes

    def tails(self, chars: int = 1500) -> str:
        out = []
        for path in sorted(self.logs.glob("*.log")):
            text = path.read_text(errors="replace")
            out.append(f"--- {path.name} (last {chars} chars)\n{text[-chars:]}")
        return "\n".join(out)

    def kill_all(self) -> None:
        for proc in self.children.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
        for proc in self.children.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not ignorable
                pass


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    registry = Processes(tmp_path)
    try:
        yield registry
    finally:
        registry.kill_all()


class Coordinator:
    """``cardiofed coordinator`` on a free loopback port, with its own SQLite database."""

    def __init__(self, procs: Processes, name: str = "coordinator",
                 tls: tuple[Path, Path] | None = None) -> None:
        self.procs, self.name, self.tls = procs, name, tls
        self.port = free_port()
        self.db_path = procs.root / f"{name}.db"
        self.key_file = procs.root / f"{name}-admin.key"
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://{HOST}:{self.port}"
        self.restarts = 0
        self.start()

    @property
    def verify(self) -> ssl.SSLContext | bool:
        return ssl.create_default_context(cafile=str(self.tls[0])) if self.tls else False

    def start(self) -> None:
        transport = (["--certfile", self.tls[0], "--keyfile", self.tls[1]] if self.tls
                     else ["--insecure"])
        label = self.name if not self.restarts else f"{self.name}-{self.restarts}"
        self.proc = self.procs.start(label, "coordinator", *transport, "--host", HOST,
                                     "--port", str(self.port),
                                     "--database-url", f"sqlite:///{self.db_path}",
                                     "--admin-key-file", self.key_file)
        self.restarts += 1

        def healthy() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"coordinator exited with {self.proc.returncode}\n"
                                     f"{self.procs.tails()}")
            try:
                r = httpx.get(f"{self.url}/healthz", verify=self.verify, timeout=2)
            except httpx.TransportError:
                return False
            return r.status_code == 200 and r.json() == {"status": "ok"}

        wait_for(healthy, STARTUP_S, "the coordinator's /healthz", interval=0.1,
                 describe=self.procs.tails)

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def client(self) -> httpx.Client:
        key = self.key_file.read_text().strip()
        return httpx.Client(base_url=self.url, verify=self.verify, timeout=30,
                            headers={"Authorization": f"Bearer {key}"})

    def status(self, study: str) -> dict[str, object]:
        with self.client() as client:
            r = client.get(f"/v1/studies/{study}/status")
        assert r.status_code == 200, r.text
        return dict(r.json())

    def create_study(self, study: str, dataset: str, sites: list[str],
                     plan: dict[str, object]) -> dict[str, str]:
        """``cardiofed admin create-study --json``; the one-time token of each site."""
        plan_file = self.procs.root / f"{study}-plan.toml"
        plan_file.write_text(_toml(plan))
        tls = ["--ca-file", str(self.tls[0])] if self.tls else []
        result = self.procs.run("admin", "create-study", "--url", self.url,
                                "--admin-key-file", self.key_file, "--study", study,
                                "--dataset", dataset, *[a for s in sites for a in ("--site", s)],
                                "--config", plan_file, "--json", *tls)
        assert result.returncode == 0, result.stdout + result.stderr
        tokens = json.loads(result.stdout)
        assert list(tokens) == sites
        return dict(tokens)

    def final_model(self, study: str) -> tuple[dict[str, object], dict[str, np.ndarray]]:
        """The last model version's info (with the sites' metrics) and its weights."""
        with self.client() as client:
            models = client.get(f"/v1/studies/{study}/models").json()
            final = models[-1]
            blob = client.get(f"/v1/studies/{study}/models/{final['version']}")
        assert blob.status_code == 200
        assert hashlib.sha256(blob.content).hexdigest() == blob.headers["X-SHA256"]
        return final, decode_arrays(blob.content)[0]


def node_config(procs: Processes, coordinator: Coordinator, site: str, token: str,
                dataset: str, ca_file: str | None = None) -> Path:
    folder = procs.root / "nodes" / site
    folder.mkdir(parents=True, exist_ok=True)
    values: dict[str, object] = {"coordinator_url": coordinator.url, "state_dir": "state",
                                 "enrolment_token": token, "poll_wait_s": 1}
    if ca_file is not None:
        values["ca_file"] = ca_file
    values["data"] = {"dataset": dataset, "site": site}
    path = folder / "node.toml"
    path.write_text(_toml(values))
    return path


def start_nodes(procs: Processes, coordinator: Coordinator, tokens: dict[str, str],
                dataset: str) -> dict[str, Path]:
    configs = {site: node_config(procs, coordinator, site, token, dataset)
               for site, token in tokens.items()}
    for site, config in configs.items():
        procs.start(f"node-{site}", "node", "run", "--config", config)
    return configs


def wait_for_round(coordinator: Coordinator, study: str, at_least: int) -> dict[str, object]:
    def reached() -> dict[str, object] | None:
        state = coordinator.status(study)
        return state if int(str(state["round"])) >= at_least else None

    state = wait_for(reached, STUDY_S, f"round {at_least} of study {study}",
                     describe=coordinator.procs.tails)
    assert state["phase"] == "train", f"the study ran past training before the fault: {state}"
    return state


def assert_finished(procs: Processes, nodes: list[str], coordinator: Coordinator,
                    study: str) -> None:
    codes = procs.wait([f"node-{s}" for s in nodes], STUDY_S)
    assert set(codes.values()) == {0}, f"{codes}\n{procs.tails()}"
    assert coordinator.status(study)["phase"] == "done"


@pytest.fixture(scope="module")
def synthetic_reference() -> dict[str, float]:
    """The simulator's final per-site AUCs for SYN_SITES under SYN_PLAN."""
    data = synthetic_federation(seed=0)  # what a node's data.dataset = "synthetic" loads
    sub = type(data)(name=data.name, feature_names=data.feature_names,
                     feature_ranges=data.feature_ranges,
                     sites=[data.site(s) for s in SYN_SITES], outcome=data.outcome)
    sim = run_experiment(sub, SimulationConfig.create(**SYN_PLAN), baselines=False)
    return {s: sim.metrics[s][FEDERATED]["auc"] for s in SYN_SITES}


def assert_matches_simulator(final: dict[str, object], reference: dict[str, float]) -> None:
    metrics = final["metrics"]
    assert isinstance(metrics, dict)
    assert final["participants"] == SYN_SITES
    for site, auc in reference.items():
        assert metrics[site]["auc"] == pytest.approx(auc, abs=1e-6), site


# ----------------------------------------------------------------------------- tests

def test_uci_federation_over_loopback_equals_the_simulator(procs: Processes) -> None:
    folder = data_dir() / "uci_heart"
    missing = [f for f in UCI_FILES if not (folder / f).exists()]
    if missing:
        pytest.skip(f"UCI reference data not found in {folder} ({', '.join(missing)}); "
                    f"set CARDIOFED_DATA_DIR")
    from cardiofed.data.uci_heart import load_uci_heart

    coordinator = Coordinator(procs)
    tokens = coordinator.create_study("uci", "uci-heart", UCI_SITES, UCI_PLAN)
    configs = start_nodes(procs, coordinator, tokens, "uci-heart")
    data = load_uci_heart()
    sim = run_experiment(data, SimulationConfig.create(**UCI_PLAN), baselines=False)

    assert_finished(procs, UCI_SITES, coordinator, "uci")

    final, weights = coordinator.final_model("uci")
    assert final["version"] == UCI_PLAN["rounds"] and final["participants"] == UCI_SITES
    with coordinator.client() as client:
        arrays, _ = decode_arrays(client.get("/v1/studies/uci/preprocessor").content)
    pre = Preprocessor(fill=arrays["fill"], mean=arrays["mean"], std=arrays["std"])
    y = np.concatenate([s.y_test for s in data.sites])
    p = np.concatenate([score("logistic", weights, pre.transform(s.x_test))
                        for s in data.sites])
    networked_auc = float(roc_auc_score(y, p))
    simulated_auc = sim.metrics[POOLED_TEST][FEDERATED]["auc"]
    print(f"pooled-test AUC: networked {networked_auc:.6f}, simulator {simulated_auc:.6f}")
    assert networked_auc == pytest.approx(simulated_auc, abs=0.005)
    assert np.allclose(weights["linear.weight"], sim.federated.weights["linear.weight"],
                       atol=1e-6)
    metrics = final["metrics"]
    assert isinstance(metrics, dict)
    for site in UCI_SITES:  # what each site reported from its own test split
        assert metrics[site]["auc"] == pytest.approx(sim.metrics[site][FEDERATED]["auc"],
                                                     abs=1e-6)

    for site, config in configs.items():
        audit = procs.run("node", "audit", "--config", config)
        assert audit.returncode == 0, audit.stderr
        cells = [[c.strip() for c in line.split("│")[1:-1]] for line in audit.stdout.splitlines()]
        payloads = {row[0]: int(row[1]) for row in cells if len(row) == 3 and row[1].isdigit()}
        assert payloads == {"statistics": 1, "train": UCI_PLAN["rounds"], "evaluate": 1}, (
            site, audit.stdout)


def _updates(db: Path) -> set[tuple[int, int, str]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        rows = conn.execute("SELECT round_id, site_id, sha256 FROM updates").fetchall()
        (count,) = conn.execute("SELECT count(*) FROM updates").fetchone()
    conn.close()
    assert count == len(rows)
    return {(int(r), int(s), str(h)) for r, s, h in rows}


def test_coordinator_sigkill_mid_training_loses_nothing(
        procs: Processes, synthetic_reference: dict[str, float]) -> None:
    coordinator = Coordinator(procs)
    tokens = coordinator.create_study("crash", "synthetic", SYN_SITES, SYN_PLAN)
    start_nodes(procs, coordinator, tokens, "synthetic")
    wait_for_round(coordinator, "crash", 3)

    coordinator.kill()
    before = _updates(coordinator.db_path)
    print(f"accepted updates when the coordinator was killed: {len(before)}")
    assert len(before) >= 1 + 2 * len(SYN_SITES)  # statistics and rounds 1-2 at least
    coordinator.start()  # same port, same database
    after = _updates(coordinator.db_path)

    assert len(after) >= len(before)
    assert before <= after  # every accepted update survived, byte for byte (sha256)
    assert_finished(procs, SYN_SITES, coordinator, "crash")
    final, _ = coordinator.final_model("crash")
    assert final["version"] == SYN_PLAN["rounds"]
    assert_matches_simulator(final, synthetic_reference)


def test_node_sigkill_and_restart_resends_the_same_bytes(
        procs: Processes, synthetic_reference: dict[str, float]) -> None:
    coordinator = Coordinator(procs)
    tokens = coordinator.create_study("restart", "synthetic", SYN_SITES, SYN_PLAN)
    configs = start_nodes(procs, coordinator, tokens, "synthetic")
    victim = SYN_SITES[1]
    wait_for_round(coordinator, "restart", 3)

    procs.kill(f"node-{victim}")
    procs.start(f"node-{victim}", "node", "run", "--config", configs[victim])

    assert_finished(procs, SYN_SITES, coordinator, "restart")
    final, _ = coordinator.final_model("restart")
    assert_matches_simulator(final, synthetic_reference)
    log = [json.loads(line) for line in
           (configs[victim].parent / "state" / "outbound.jsonl").read_text().splitlines()]
    by_round: dict[str, set[str]] = {}
    for entry in log:
        by_round.setdefault(entry["destination"], set()).add(entry["sha256"])
    assert len(by_round) == SYN_PLAN["rounds"] + 2  # statistics, training, evaluation
    assert all(len(digests) == 1 for digests in by_round.values()), by_round


def test_coordinator_refuses_plain_http_without_insecure(procs: Processes) -> None:
    result = procs.run("coordinator", "--port", str(free_port()),
                       "--database-url", f"sqlite:///{procs.root}/refused.db",
                       "--admin-key-file", procs.root / "refused.key")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--insecure" in result.stderr
    assert not (procs.root / "refused.key").exists()


def test_tls_federation_with_a_self_signed_certificate(
        procs: Processes, synthetic_reference: dict[str, float]) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not on PATH: cannot make a test certificate")
    cert, key = procs.root / "cert.pem", procs.root / "key.pem"
    made = subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                           "-keyout", str(key), "-out", str(cert), "-days", "1",
                           "-subj", f"/CN={HOST}", "-addext", f"subjectAltName=IP:{HOST}"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert made.returncode == 0, made.stderr
    coordinator = Coordinator(procs, tls=(cert, key))
    with pytest.raises(httpx.ConnectError):  # the system CAs do not trust it
        httpx.get(f"{coordinator.url}/healthz", timeout=5)
    site = SYN_SITES[0]
    plan = {**SYN_PLAN, "rounds": 2}
    tokens = coordinator.create_study("tls", "synthetic", [site], plan)
    config = node_config(procs, coordinator, site, tokens[site], "synthetic", ca_file="ca.pem")
    shutil.copy(cert, config.parent / "ca.pem")  # relative to the node config's folder
    procs.start(f"node-{site}", "node", "run", "--config", config)

    assert_finished(procs, [site], coordinator, "tls")
    final, _ = coordinator.final_model("tls")
    assert final["version"] == 2 and final["participants"] == [site]
