"""The networked federation as real processes over loopback: ``cardiofed coordinator``
and one ``cardiofed node run`` per site, talking HTTP(S) on 127.0.0.1 only; studies are
created with ``cardiofed admin create-study``. Faults: the coordinator or a node killed
with SIGKILL mid-study.

Every wait is bounded, and every child process is killed in fixture teardown. Each
``cardiofed`` process spends seconds importing torch, so short commands (study
creation after the first, audits, refusals) run in this process through typer's test
runner, and the tests that kill no node run their nodes in threads
(:meth:`Federation.run_here`), all over the same loopback HTTP.
"""

from __future__ import annotations

import contextlib
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
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar

import httpx
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cardiofed.coordinator.studies import network_plan
from cardiofed.data.dataset import FederatedDataset
from cardiofed.data.paths import data_dir
from cardiofed.data.preprocessing import Preprocessor
from cardiofed.data.synthetic import synthetic_federation
from cardiofed.models.networks import score
from cardiofed.node.agent import NodeAgent
from cardiofed.node.config import NodeConfig
from cardiofed.simulation.config import SimulationConfig
from cardiofed.simulation.experiment import (
    FEDERATED,
    POOLED_TEST,
    ExperimentResult,
    run_experiment,
)
from cardiofed.wire import decode_arrays

HOST = "127.0.0.1"  # the only address these tests ever connect to
STARTUP_S = 60.0    # a process importing torch on a busy 2-core machine
STUDY_S = 120.0     # a whole (small) study, node start-up included
UCI_SITES = ["cleveland", "hungarian", "switzerland", "va"]
UCI_PLAN = {"rounds": 3, "local_steps": 20, "batch_size": 4, "lr": 0.01, "seed": 3}
SYN_SITES = ["tier3_01", "tier2_01", "community_01"]
SYN_PLAN = {"rounds": 8, "local_steps": 20, "batch_size": 16, "lr": 0.05, "seed": 7}

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
            lines.append(f"{key} = {json.dumps(value)}")  # these JSON scalars are TOML too
    return "\n".join(lines) + "\n" + "".join(tables)


def in_process(*args: str) -> subprocess.CompletedProcess[str]:
    """A ``cardiofed`` command run in this process (typer's test runner)."""
    from typer.testing import CliRunner

    from cardiofed.cli import app

    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200", "NO_COLOR": "1"})
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout,
                                       result.stderr)


class Processes:
    """Child processes, each logging to its own file; all killed by :meth:`kill_all`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.env = {**os.environ, "CARDIOFED_DATA_DIR": str(data_dir()),
                    "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                    "NO_COLOR": "1", "COLUMNS": "200"}

    def start(self, name: str, *args: str | Path) -> subprocess.Popen[bytes]:
        with open(self.logs / f"{name}.log", "ab") as log:  # the child keeps its own copy
            proc = subprocess.Popen([*_cli(), *map(str, args)], stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.env, cwd=self.root)
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

    def wait(self, names: list[str], timeout: float,
             describe: Callable[[], str] | None = None) -> dict[str, int]:
        """Exit codes of the named children, waiting at most `timeout` for all of them."""
        give_up = time.monotonic() + timeout
        codes = {}
        for name in names:
            try:
                codes[name] = self.children[name].wait(
                    timeout=max(0.1, give_up - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{name} still running after {timeout:.0f} s\n"
                                     f"{(describe or self.tails)()}") from None
        return codes

    def tails(self, chars: int = 1500) -> str:
        out = []
        for path in sorted(self.logs.glob("*.log")):
            text = path.read_text(errors="replace")
            out.append(f"--- {path} (last {chars} chars)\n{text[-chars:]}")
        return "\n".join(out)

    def kill_all(self) -> None:
        for proc in self.children.values():
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
        for proc in self.children.values():
            with contextlib.suppress(subprocess.TimeoutExpired):  # SIGKILL is not ignorable
                proc.wait(timeout=10)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    """This test's child processes (nodes, and any coordinator it starts itself)."""
    registry = Processes(tmp_path)
    try:
        yield registry
    finally:
        registry.kill_all()


class Coordinator:
    """``cardiofed coordinator`` on a free loopback port, with its own SQLite database
    unless given a `database_url` (and the `key_file` of a coordinator sharing it)."""

    def __init__(self, procs: Processes, name: str = "coordinator",
                 tls: tuple[Path, Path] | None = None, database_url: str | None = None,
                 key_file: Path | None = None) -> None:
        self.procs, self.name, self.tls = procs, name, tls
        self.port = free_port()
        self.db_path = procs.root / f"{name}.db"
        self.database_url = database_url or f"sqlite:///{self.db_path}"
        self.key_file = key_file or procs.root / f"{name}-admin.key"
        self.url = f"{'https' if tls else 'http'}://{HOST}:{self.port}"
        self.starts = 0
        self.launch()

    @property
    def verify(self) -> ssl.SSLContext | bool:
        return ssl.create_default_context(cafile=str(self.tls[0])) if self.tls else False

    def start(self) -> None:
        self.launch()
        self.ready()

    def launch(self) -> None:
        """Start the process; :meth:`ready` waits until it serves."""
        transport = (["--certfile", self.tls[0], "--keyfile", self.tls[1]] if self.tls
                     else ["--insecure"])
        label = self.name if not self.starts else f"{self.name}-restart{self.starts}"
        self.proc = self.procs.start(label, "coordinator", *transport, "--host", HOST,
                                     "--port", str(self.port),
                                     "--database-url", self.database_url,
                                     "--admin-key-file", self.key_file)
        self.starts += 1

    def ready(self) -> Coordinator:
        def healthy() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"coordinator exited with {self.proc.returncode}\n"
                                     f"{self.procs.tails()}")
            try:
                r = httpx.get(f"{self.url}/healthz", verify=self.verify, timeout=2)
            except httpx.TransportError:
                return False
            return r.status_code == 200 and r.json() == {"status": "ok"}

        wait_for(healthy, STARTUP_S, f"the {self.name} coordinator's /healthz",
                 interval=0.1, describe=self.procs.tails)
        return self

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
                     plan: Mapping[str, object], *, subprocess: bool = False,
                     min_sites: int | None = None) -> dict[str, str]:
        """``cardiofed admin create-study --json``: the one-time token of each site.

        As a child process with `subprocess`, else in this process."""
        plan_file = self.procs.root / f"{study}-plan.toml"
        plan_file.write_text(_toml(dict(plan)))
        tls = ["--ca-file", str(self.tls[0])] if self.tls else []
        args = ["admin", "create-study", "--url", self.url, "--admin-key-file",
                str(self.key_file), "--study", study, "--dataset", dataset,
                *[a for s in sites for a in ("--site", s)], "--config", str(plan_file),
                "--json", *tls, *(["--min-sites", str(min_sites)] if min_sites else [])]
        result = self.procs.run(*args) if subprocess else in_process(*args)
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


def self_signed_certificate(folder: Path) -> tuple[Path, Path] | None:
    """A certificate for 127.0.0.1 (subjectAltName IP) and its key; None without openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    cert, key = folder / "cert.pem", folder / "key.pem"
    made = subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                           "-keyout", str(key), "-out", str(cert), "-days", "1",
                           "-subj", f"/CN={HOST}", "-addext", f"subjectAltName=IP:{HOST}"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert made.returncode == 0, made.stderr
    return cert, key


@pytest.fixture(scope="module")
def coordinators(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Coordinator]]:
    """The module's coordinators, launched together so that their start-ups overlap:
    "shared" (plain HTTP, one study per test, never killed), "crash" (the test that
    kills it owns it) and, where openssl exists, "tls" (HTTPS, self-signed)."""
    registry = Processes(tmp_path_factory.mktemp("coordinators"))
    try:
        servers = {name: Coordinator(registry, name) for name in ("shared", "crash")}
        tls = self_signed_certificate(registry.root)
        if tls is not None:
            servers["tls"] = Coordinator(registry, "tls", tls=tls)
        yield servers
    finally:
        registry.kill_all()


@pytest.fixture
def shared(coordinators: dict[str, Coordinator]) -> Coordinator:
    return coordinators["shared"].ready()


class Federation:
    """A study on a coordinator and its nodes, as child processes of one test."""

    def __init__(self, procs: Processes, coordinator: Coordinator, study: str, dataset: str,
                 sites: list[str], plan: Mapping[str, object], *, subprocess: bool = False,
                 ca_file: str | None = None,
                 node_settings: Mapping[str, Mapping[str, object]] | None = None,
                 min_sites: int | None = None) -> None:
        self.procs, self.coordinator, self.study = procs, coordinator, study
        self.sites, self.dataset, self.ca_file = sites, dataset, ca_file
        self.node_settings = node_settings or {}
        tokens = coordinator.create_study(study, dataset, sites, plan, subprocess=subprocess,
                                          min_sites=min_sites)
        self.configs = {site: self._config(site, tokens[site]) for site in sites}

    def _config(self, site: str, token: str) -> Path:
        folder = self.procs.root / self.study / site
        folder.mkdir(parents=True, exist_ok=True)
        values: dict[str, object] = {"coordinator_url": self.coordinator.url,
                                     "state_dir": "state", "enrolment_token": token,
                                     "poll_wait_s": 1, "retry_max_delay_s": 1,
                                     "privacy": "off"}
        if self.ca_file is not None:
            values["ca_file"] = self.ca_file
        values.update(self.node_settings.get(site, {}))
        values["data"] = {"dataset": self.dataset, "site": site}
        path = folder / "node.toml"
        path.write_text(_toml(values))
        return path

    def start(self, *sites: str) -> None:
        for site in sites or self.sites:
            self.procs.start(f"{self.study}-{site}", "node", "run", "--config",
                             self.configs[site])

    def run_here(self) -> list[NodeAgent]:
        """Run the nodes in this process (threads), over the same loopback HTTP, until
        the study is done: the tests that need no node process spare its start-up."""
        agents = [NodeAgent(NodeConfig.from_toml(self.configs[s])) for s in self.sites]
        threads = [threading.Thread(target=a.run, daemon=True) for a in agents]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=STUDY_S)
        assert self.coordinator.status(self.study)["phase"] == "done", self.tails()
        return agents

    def kill(self, site: str) -> None:
        self.procs.kill(f"{self.study}-{site}")

    def tails(self) -> str:
        return self.procs.tails() + "\n" + self.coordinator.procs.tails()

    def wait_for_round(self, at_least: int) -> dict[str, object]:
        def reached() -> dict[str, object] | None:
            state = self.coordinator.status(self.study)
            return state if int(str(state["round"])) >= at_least else None

        state = wait_for(reached, STUDY_S, f"round {at_least} of study {self.study}",
                         describe=self.tails)
        assert state["phase"] == "train", f"the study ran past training before the fault: {state}"
        return state

    def finish(self) -> None:
        codes = self.procs.wait([f"{self.study}-{s}" for s in self.sites], STUDY_S, self.tails)
        assert set(codes.values()) == {0}, f"{codes}\n{self.tails()}"
        assert self.coordinator.status(self.study)["phase"] == "done"

    def outbound(self, site: str) -> list[dict[str, object]]:
        log = self.configs[site].parent / "state" / "outbound.jsonl"
        return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.fixture(scope="module")
def synthetic_reference() -> ExperimentResult:
    """The simulator's run of SYN_SITES under SYN_PLAN."""
    data = synthetic_federation(seed=0)  # what a node's data.dataset = "synthetic" loads
    sub = type(data)(name=data.name, feature_names=data.feature_names,
                     feature_ranges=data.feature_ranges,
                     sites=[data.site(s) for s in SYN_SITES], outcome=data.outcome)
    # A networked study aggregates robustly by default; the simulator, when asked.
    # Nodes train one site each: the simulator's per-site backend is the exact twin.
    plan = network_plan(SimulationConfig.create(**SYN_PLAN, backend="loop"), len(SYN_SITES))
    return run_experiment(sub, plan, baselines=False)


def assert_matches_simulator(coordinator: Coordinator, study: str,
                             reference: ExperimentResult) -> None:
    """Same code, same seeds, the same bytes aggregated: the simulator's model exactly."""
    final, weights = coordinator.final_model(study)
    metrics = final["metrics"]
    assert isinstance(metrics, dict)
    assert final["participants"] == SYN_SITES
    assert final["version"] == SYN_PLAN["rounds"]
    for site in SYN_SITES:
        assert metrics[site]["auc"] == pytest.approx(
            reference.metrics[site][FEDERATED]["auc"], abs=1e-6), site
    for name, value in reference.federated.weights.items():
        np.testing.assert_array_equal(weights[name], value)


# ----------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def uci_data() -> FederatedDataset:
    """The four UCI hospitals (the data folder's files, else the packaged copy)."""
    from cardiofed.data.uci_heart import load_uci_heart

    return load_uci_heart()


def test_uci_federation_over_loopback_equals_the_simulator(
        uci_data: FederatedDataset, procs: Processes, shared: Coordinator) -> None:
    data = uci_data
    # FLamby's batch of 4: below a non-private node's floor, so each site opts in.
    fed = Federation(procs, shared, "uci", "uci-heart", UCI_SITES, UCI_PLAN, subprocess=True,
                     node_settings={s: {"opt_in": ["small_batches"]} for s in UCI_SITES})
    fed.start()
    plan = network_plan(SimulationConfig.create(**UCI_PLAN, backend="loop"), len(UCI_SITES))
    sim = run_experiment(data, plan, baselines=False)

    fed.finish()

    final, weights = shared.final_model("uci")
    assert final["version"] == UCI_PLAN["rounds"] and final["participants"] == UCI_SITES
    with shared.client() as client:
        arrays, _ = decode_arrays(client.get("/v1/studies/uci/preprocessor").content)
    pre = Preprocessor(fill=arrays["fill"], mean=arrays["mean"], std=arrays["std"])
    y = np.concatenate([s.y_test for s in data.sites])
    p = np.concatenate([score("logistic", weights, pre.transform(s.x_test))
                        for s in data.sites])
    networked_auc = float(roc_auc_score(y, p))
    simulated_auc = sim.metrics[POOLED_TEST][FEDERATED]["auc"]
    print(f"\npooled-test AUC on UCI: networked {networked_auc:.6f}, "
          f"simulator {simulated_auc:.6f}")
    assert networked_auc == pytest.approx(simulated_auc, abs=0.005)
    for name, value in sim.federated.weights.items():  # in fact the very same model
        np.testing.assert_array_equal(weights[name], value)
    metrics = final["metrics"]
    assert isinstance(metrics, dict)
    for site in UCI_SITES:  # what each site reported from its own test split
        assert metrics[site]["auc"] == pytest.approx(sim.metrics[site][FEDERATED]["auc"],
                                                     abs=1e-6)

    for site, config in fed.configs.items():
        audit = in_process("node", "audit", "--config", str(config))
        assert audit.returncode == 0, audit.stdout + audit.stderr
        cells = [[c.strip() for c in line.split("│")[1:-1]] for line in audit.stdout.splitlines()]
        payloads = {row[0]: int(row[1]) for row in cells if len(row) == 3 and row[1].isdigit()}
        assert payloads == {"statistics": 1, "train": UCI_PLAN["rounds"], "evaluate": 1}, (
            site, audit.stdout)


def _updates(db: Path) -> set[tuple[int, int, str]]:
    """Accepted updates, read from the SQLite file directly: (round id, site id, sha256)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        rows = conn.execute("SELECT round_id, site_id, sha256 FROM updates").fetchall()
        (count,) = conn.execute("SELECT count(*) FROM updates").fetchone()
    finally:
        conn.close()
    assert count == len(rows)
    return {(int(r), int(s), str(h)) for r, s, h in rows}


def _study_row(db: Path, study: str) -> tuple[str, int]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        phase, current = conn.execute("SELECT phase, current_round FROM studies WHERE id = ?",
                                      (study,)).fetchone()
    finally:
        conn.close()
    return str(phase), int(current)


def test_async_study_over_loopback_does_not_wait_for_a_slow_node(
        procs: Processes, shared: Coordinator) -> None:
    """Buffered asynchronous aggregation (K = 2) with one node 12 s slower per update:
    the other two publish every version; the slow node's late update is refused as
    stale, the node carries on, and every node evaluates the final model."""
    plan = {**SYN_PLAN, "aggregation": "async", "buffer_size": 2, "rounds": 4,
            "robust_byzantine": 0}  # versions of 2 updates: f = 0
    slow = SYN_SITES[2]
    fed = Federation(procs, shared, "async", "synthetic", SYN_SITES, plan,
                     node_settings={slow: {"train_delay_s": 12.0}})
    fed.start()

    fed.finish()

    state = shared.status("async")
    assert state["aggregation"] == "async"
    assert state["update_share"] == {SYN_SITES[0]: 0.5, SYN_SITES[1]: 0.5, slow: 0.0}
    final, _ = shared.final_model("async")
    assert final["version"] == 4 and set(final["metrics"]) == set(SYN_SITES)
    assert "update refused as stale" in (procs.logs / f"async-{slow}.log").read_text()
    # The slow node trained once (version 0); the others once per version.
    trained = {site: sum(e["kind"] == "train" for e in fed.outbound(site)) for site in SYN_SITES}
    assert trained == {SYN_SITES[0]: 4, SYN_SITES[1]: 4, slow: 1}


def test_attribution_study_over_loopback_equals_the_simulator(
        procs: Processes, shared: Coordinator) -> None:
    """``cardiofed admin create-study`` with an [attribution] plan, three nodes over
    loopback HTTP: the analysis's estimates are the simulator's exactly, the nodes sent
    the steps' sums only, and ``cardiofed admin attribution-report`` writes the report."""
    from cardiofed.causal.combine import run_attribution
    from cardiofed.causal.design import TREATMENT
    from cardiofed.causal.sources import synthetic_sites

    covariates = ["age", "sex", "total_cholesterol", "hdl_cholesterol", "systolic_bp",
                  "bp_treated", "current_smoker", "diabetes"]
    fed = Federation(procs, shared, "att", "synthetic", SYN_SITES, {"attribution": {
        "treatment": TREATMENT, "covariates": covariates, "estimand": "ATT"}},
        node_settings={s: {"opt_in": ["exact_attribution"]} for s in SYN_SITES})
    agents = fed.run_here()

    with shared.client() as client:
        result = client.get("/v1/studies/att/attribution").json()
    rows, columns = synthetic_sites(12, seed=0)
    by_name = {s.name: s for s in rows}
    expected = run_attribution([by_name[s] for s in SYN_SITES], columns, estimand="ATT")
    for method, effect in expected.effects.items():
        assert result["estimate"][method]["risk_difference"] == effect.risk_difference
        assert result["estimate"][method]["rr_high"] == effect.rr_high
    kinds = [e["kind"] for e in agents[0].outbound.entries()]
    assert kinds[0] == "moments" and kinds[-2:] == ["estimate", "sandwich"]
    assert set(kinds[1:-2]) == {"newton"}
    report = procs.root / "att-report"
    done = in_process("admin", "attribution-report", "--url", shared.url, "--admin-key-file",
                      str(shared.key_file), "--study", "att", "--out", str(report))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "lipid_lowering on cvd_10y" in (report / "attribution.html").read_text()


def test_survival_study_over_loopback_equals_the_in_process_fit(
        procs: Processes, shared: Coordinator) -> None:
    """``cardiofed admin create-study`` with a [survival] plan, three nodes over loopback
    HTTP: the federated Cox model is fit_cox's on the nodes' training rows, the nodes sent
    sums only, then each its figures on its held-out rows (evaluate = true), and
    ``cardiofed admin survival-report`` writes the model and prints both."""
    import numpy as np

    from cardiofed.data.dataset import feature_ranges_for
    from cardiofed.node.config import DataSource
    from cardiofed.node.work import survival_rows
    from cardiofed.schema import CATALOGUE, encoded_feature_names
    from cardiofed.survival.cox import fit_cox, site_cox_sums
    from cardiofed.survival.study import SurvivalPlan, start

    plan = {"covariates": ["age", "sex", "systolic_bp", "current_smoker"],
            "grid_step_years": 0.5, "max_years": 16.0, "evaluate": True}
    fed = Federation(procs, shared, "cox", "synthetic", SYN_SITES, {"survival": plan},
                     node_settings={s: {"opt_in": ["exact_survival"]} for s in SYN_SITES})
    agents = fed.run_here()

    with shared.client() as client:
        result = client.get("/v1/studies/cox/survival").json()
    columns = encoded_feature_names(plan["covariates"], CATALOGUE)  # type: ignore[arg-type]
    ranges = feature_ranges_for(columns)
    low, high = np.array(ranges).T
    rows = [survival_rows(DataSource(dataset="synthetic", site=s, seed=0), columns,
                          "cvd_10y", part="train") for s in SYN_SITES]
    survival = SurvivalPlan(**plan)  # type: ignore[arg-type]
    center = start(survival, columns, ranges)["inputs"]["center"]
    expected = fit_cox(lambda beta: [site_cox_sums(t, e, np.clip(x, low, high), beta,
                                                   survival.grid, center=center)
                                     for t, e, x in rows], len(columns))
    got = [result["coefficients"][c]["coefficient"] for c in columns]
    np.testing.assert_allclose(got, expected.beta, rtol=0, atol=1e-9)
    kinds = [e["kind"] for e in agents[0].outbound.entries()]
    assert kinds[0] == "km" and set(kinds[1:-1]) == {"cox"} and kinds[-1] == "assess"
    assert list(result["evaluation"]) == SYN_SITES
    report = procs.root / "cox-report"
    done = in_process("admin", "survival-report", "--url", shared.url, "--admin-key-file",
                      str(shared.key_file), "--study", "cox", "--out", str(report))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "hazard ratio" in done.stdout and "current_smoker" in done.stdout
    printed = " ".join(done.stdout.split())  # (the table's cells wrap with the width)
    assert "Kaplan-Meier risk by 10 years, all sites pooled:" in printed
    assert "Each site's held-out rows, by 10 years" in printed
    written = json.loads((report / "survival.json").read_text())
    assert written["study"] == "cox" and written["evaluation"] == result["evaluation"]


def test_coordinator_sigkill_mid_training_loses_nothing(
        procs: Processes, coordinators: dict[str, Coordinator],
        synthetic_reference: ExperimentResult) -> None:
    coordinator = coordinators["crash"].ready()
    fed = Federation(procs, coordinator, "crash", "synthetic", SYN_SITES, SYN_PLAN)
    fed.start()
    fed.wait_for_round(3)

    coordinator.kill()
    before = _updates(coordinator.db_path)
    phase, current = _study_row(coordinator.db_path, "crash")
    print(f"\ncoordinator killed in round {current} ({phase}) with {len(before)} accepted "
          f"updates")
    assert phase == "train"  # really mid-training
    assert len(before) >= 1 + 2 * len(SYN_SITES)  # statistics and rounds 1-2 at least
    coordinator.start()  # same port, same database; the nodes retry meanwhile
    after = _updates(coordinator.db_path)

    assert len(after) >= len(before)
    assert before <= after  # every accepted update survived, with the same sha256
    fed.finish()
    assert_matches_simulator(coordinator, "crash", synthetic_reference)


def test_node_sigkill_and_restart_resends_the_same_bytes(
        procs: Processes, shared: Coordinator, synthetic_reference: ExperimentResult) -> None:
    fed = Federation(procs, shared, "restart", "synthetic", SYN_SITES, SYN_PLAN)
    victim = SYN_SITES[1]
    fed.start()
    fed.wait_for_round(3)
    outbound = fed.configs[victim].parent / "state" / "outbound.jsonl"
    sent = len(outbound.read_text().splitlines())
    # Kill it at the worst moment: its payload is cached and logged, the upload under way.
    wait_for(lambda: len(outbound.read_text().splitlines()) > sent, STUDY_S,
             f"{victim}'s next upload", interval=0.002, describe=fed.tails)
    fed.kill(victim)
    assert shared.status("restart")["phase"] != "done"  # it cannot finish without the victim
    fed.start(victim)  # same config, same state folder

    fed.finish()
    assert_matches_simulator(shared, "restart", synthetic_reference)
    digests: dict[str, set[object]] = {}
    for entry in fed.outbound(victim):
        digests.setdefault(str(entry["destination"]), set()).add(entry["sha256"])
    assert len(digests) == SYN_PLAN["rounds"] + 2  # statistics, training, evaluation
    assert all(len(d) == 1 for d in digests.values()), digests  # same round, same bytes
    resent = len(fed.outbound(victim)) - len(digests)
    print(f"\n{victim} killed mid-upload; payloads re-sent after its restart: {resent}")


def test_two_coordinator_processes_on_postgresql_serve_one_study(
        procs: Processes, postgres_url: str) -> None:
    """Scale-out: nodes split across two coordinator processes on one database, one of
    them SIGKILLed mid-training and restarted; rounds close once, nothing is lost."""
    first = Coordinator(procs, "pg-a", database_url=postgres_url).ready()
    # The second starts while the nodes do (its nodes retry until it serves).
    second = Coordinator(procs, "pg-b", database_url=postgres_url, key_file=first.key_file)
    to_second = {site: {"coordinator_url": second.url} for site in SYN_SITES[1:]}
    plan = {**SYN_PLAN, "rounds": 3}
    fed = Federation(procs, first, "scaled", "synthetic", SYN_SITES, plan,
                     node_settings=to_second)
    fed.start()
    second.ready()
    fed.wait_for_round(2)

    second.kill()  # its nodes retry until it is back; the other process goes on
    second.launch()

    fed.finish()
    second.ready()
    final, weights = first.final_model("scaled")
    _, same = second.final_model("scaled")  # one shared state
    assert final["version"] == plan["rounds"] and final["participants"] == SYN_SITES
    for name, value in weights.items():
        np.testing.assert_array_equal(same[name], value)
    with first.client() as client:
        models = client.get("/v1/studies/scaled/models").json()
    assert [m["version"] for m in models] == list(range(plan["rounds"] + 1))
    assert all(m["participants"] == SYN_SITES for m in models[1:])  # each update once


def test_coordinator_workers_need_postgresql(procs: Processes) -> None:
    result = in_process("coordinator", "--insecure", "--host", HOST, "--port",
                        str(free_port()), "--workers", "2",
                        "--database-url", f"sqlite:///{procs.root}/workers.db",
                        "--admin-key-file", str(procs.root / "workers.key"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--workers 2 needs a PostgreSQL --database-url" in result.stderr
    assert not (procs.root / "workers.key").exists()


def test_coordinator_refuses_plain_http_without_insecure(procs: Processes) -> None:
    result = in_process("coordinator", "--host", HOST, "--port", str(free_port()),
                        "--database-url", f"sqlite:///{procs.root}/refused.db",
                        "--admin-key-file", str(procs.root / "refused.key"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--insecure" in result.stderr
    assert not (procs.root / "refused.key").exists()


def test_tls_federation_with_a_self_signed_certificate(
        procs: Processes, coordinators: dict[str, Coordinator]) -> None:
    if "tls" not in coordinators:
        pytest.skip("openssl is not on PATH: cannot make a test certificate")
    coordinator = coordinators["tls"].ready()
    with pytest.raises(httpx.ConnectError):  # the system's CAs do not vouch for it
        httpx.get(f"{coordinator.url}/healthz", timeout=5)
    assert coordinator.tls is not None
    site = SYN_SITES[2]
    # ca_file relative to the node config's folder (the node runs from another folder)
    fed = Federation(procs, coordinator, "tls", "synthetic", [site], {**SYN_PLAN, "rounds": 2},
                     ca_file="ca.pem")
    shutil.copy(coordinator.tls[0], fed.configs[site].parent / "ca.pem")
    fed.run_here()

    final, _ = coordinator.final_model("tls")
    assert final["version"] == 2 and final["participants"] == [site]
    metrics = final["metrics"]
    assert isinstance(metrics, dict) and set(metrics) == {site}


def test_an_operator_steers_a_study_from_the_command_line(
        procs: Processes, shared: Coordinator) -> None:
    Federation(procs, shared, "steer", "synthetic", SYN_SITES, SYN_PLAN)
    key = ["--url", shared.url, "--admin-key-file", str(shared.key_file), "--study", "steer"]

    def admin(*args: str) -> str:
        done = in_process("admin", *args, *key)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def halted() -> object:
        with shared.client() as client:
            return client.get("/v1/studies/steer/status").json()["halted"]

    assert "paused" in admin("pause", "--reason", "data check")
    assert halted() == "paused by an operator: data check"
    admin("resume")
    assert halted() is None
    assert "enrolment token" in admin("add-site", "--site", "community_09")
    admin("revoke", "--site", SYN_SITES[0])
    assert halted() is None  # 3 of the 4 sites still meet min_sites (3)
    admin("revoke", "--site", SYN_SITES[1])
    assert str(halted()).startswith("waiting for sites: 2 active of the 3 required")
    assert "now needs 2 active sites" in admin("min-sites", "--sites", "2")
    assert halted() is None
    admin("min-sites", "--sites", "3")
    assert str(halted()).startswith("waiting for sites")
    assert "re-admitted" in admin("readmit", "--site", SYN_SITES[0])
    assert halted() is None
    admin("cancel", "--reason", "rehearsal over")
    refused = in_process("admin", "pause", "--reason", "again", *key)
    assert refused.returncode != 0 and "is over" in refused.stdout + refused.stderr
