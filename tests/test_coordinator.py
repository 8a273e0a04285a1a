"""Coordinator and node together in-process (ASGI transport): auth, validation, faults."""

from __future__ import annotations

import dataclasses
import io
import json
import re
import shutil
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from cardiofed.coordinator import administration, enrolment, payloads, rounds, studies, uploads
from cardiofed.coordinator.app import create_app
from cardiofed.coordinator.deps import app_settings, get_clock
from cardiofed.coordinator.settings import CoordinatorSettings
from cardiofed.data.catalog import study_columns
from cardiofed.node.agent import NodeAgent, NodeError
from cardiofed.node.config import NodeConfig, NodePrivacy
from cardiofed.simulation.config import SimulationConfig
from cardiofed.simulation.experiment import FEDERATED, ExperimentResult, run_experiment
from cardiofed.store import TALLY_SHARDS, session_factory
from cardiofed.wire import decode_arrays, encode_arrays

SITES = ["tier3_01", "tier2_01", "community_01"]
PLAN = {"rounds": 3, "local_epochs": 1, "batch_size": 32, "lr": 0.05, "seed": 5}


class Federation:
    def __init__(self, tmp: Path, *, max_bytes: int = 1 << 24, timeout: float = 3600.0,
                 min_sites: int | None = None, database_url: str | None = None,
                 plan: dict[str, object] | None = None,
                 study: dict[str, object] | None = None) -> None:
        """`study`: fields of the study's creation request besides (or instead of) the
        defaults."""
        self.tmp = tmp
        self.now = datetime(2026, 1, 1)  # the coordinator's clock: tests move it, never wait
        self.settings = CoordinatorSettings(
            database_url=database_url or f"sqlite:///{tmp}/coord.db", long_poll_s=0,
            max_update_bytes=max_bytes)
        self.restart()
        with session_factory(self.settings.database_url)() as db:
            self.admin = administration.create_admin_key(db)
        names, ranges = study_columns("synthetic")
        response = self.client.post("/v1/studies", headers=self.auth(self.admin), json={
            "id": "s1", "plan": plan or PLAN, "sites": SITES, "feature_names": names,
            "feature_ranges": ranges, "min_sites": min_sites, "round_timeout_s": timeout,
            **(study or {})})
        assert response.status_code == 201, response.text
        self.tokens = response.json()["enrolment_tokens"]

    def restart(self) -> None:
        """A fresh coordinator application over the same database."""
        self.app = create_app()

        async def settings() -> CoordinatorSettings:  # async, as the ones they replace
            return self.settings

        async def clock() -> studies.Clock:
            return self.clock

        self.app.dependency_overrides[app_settings] = settings
        self.app.dependency_overrides[get_clock] = clock
        self.client = TestClient(self.app)

    def clock(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        """Let `seconds` pass on the coordinator's clock."""
        self.now += timedelta(seconds=seconds)

    @staticmethod
    def auth(credential: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {credential}"}

    def agent(self, site: str, **settings: object) -> NodeAgent:
        """A node for `site`; `settings` add to its config (e.g. ``privacy``; without
        it the node is explicitly non-private, to compare with the simulator)."""
        config = NodeConfig.create(**{
            "coordinator_url": "http://testserver", "state_dir": str(self.tmp / site),
            "enrolment_token": self.tokens.get(site), "poll_wait_s": 0, "privacy": "off",
            "data": {"dataset": "synthetic", "site": site, "seed": 0}, **settings})
        return NodeAgent(config, client=self.client)

    def status(self) -> dict[str, object]:
        return self.client.get("/v1/studies/s1/status", headers=self.auth(self.admin)).json()

    def step(self, agents: list[NodeAgent]) -> int:
        """Let each agent run at most one pending task; returns how many ran."""
        ran = 0
        for agent in agents:
            r = self.client.get("/v1/tasks/next", headers=self.auth(agent.credential()))
            if r.status_code == 200:
                ran += agent.run(max_tasks=1)
        return ran


@pytest.fixture
def fed(tmp_path: Path) -> Federation:
    return Federation(tmp_path)


def _until_done(fed: Federation, agents: list[NodeAgent], patience_s: float = 60.0) -> None:
    give_up = time.monotonic() + patience_s
    while time.monotonic() < give_up:
        if fed.status()["phase"] == "done":
            return
        if not fed.step(agents):
            fed.advance(3601)  # nothing to do: let the open round's deadline pass
    raise AssertionError(f"federation did not finish: {fed.status()}")


def _simulated(plan: dict[str, object]) -> ExperimentResult:
    """The simulator's run of SITES under `plan`, as a networked study runs it."""
    from cardiofed.data.synthetic import synthetic_federation

    data = synthetic_federation(seed=0)
    sub = dataclasses.replace(data, sites=[data.site(s) for s in SITES])
    # A networked study aggregates robustly by default; the simulator does so when asked.
    # Nodes train one site each: the simulator's per-site backend is the exact twin.
    config = studies.network_plan(SimulationConfig.create(**plan, backend="loop"), len(SITES))
    return run_experiment(sub, config, baselines=False)


def test_networked_run_equals_the_simulator(fed: Federation) -> None:
    agents = [fed.agent(s) for s in SITES]

    _until_done(fed, agents)

    models = fed.client.get("/v1/studies/s1/models", headers=fed.auth(fed.admin)).json()
    final = models[-1]
    assert final["version"] == PLAN["rounds"] and final["participants"] == SITES
    sim = _simulated(PLAN)
    for site in SITES:  # same code, same seeds: the same model to float32 precision
        assert final["metrics"][site]["auc"] == pytest.approx(
            sim.metrics[site][FEDERATED]["auc"], abs=1e-6)
    # Every published version is in the model registry; the final one carries metrics.
    from cardiofed.serving import registry

    with session_factory(fed.settings.database_url)() as db:
        versions = [m["version"] for m in registry.list_models(db)]
        card = registry.card(db, "s1-v3")
        served = registry.load(db, "s1-v3")
    assert versions == ["s1-v1", "s1-v2", "s1-v3"]
    assert card["source"] == "network" and card["sites"] == SITES and card["rounds"] == 3
    assert card["metrics"]["tier3_01"]["auc"] == final["metrics"]["tier3_01"]["auc"]
    assert card["privacy"] == {}  # no node trained with DP
    for name, value in served.weights.items():
        np.testing.assert_array_equal(value, sim.federated.weights[name])


def _networked_and_simulated(tmp_path: Path, plan: dict[str, object]
                             ) -> tuple[Federation, Any, ExperimentResult]:
    """A networked study of `plan` run to the end, its last registered model, and the
    simulator's run of the same plan."""
    from cardiofed.serving import registry

    fed = Federation(tmp_path, plan=plan)
    _until_done(fed, [fed.agent(s) for s in SITES])
    with session_factory(fed.settings.database_url)() as db:
        served = registry.load(db, f"s1-v{plan['rounds']}")
    return fed, served, _simulated(plan)


def test_a_clinical_model_form_trains_over_the_network_as_in_simulation(
        tmp_path: Path) -> None:
    _, served, sim = _networked_and_simulated(
        tmp_path, {**PLAN, "rounds": 2, "feature_transform": "clinical"})
    assert served.card.feature_transform == "clinical"
    assert served.weights["linear.weight"].shape == (1, 17)
    for name, value in served.weights.items():
        np.testing.assert_array_equal(value, sim.federated.weights[name])


def test_a_tail_averaged_study_serves_the_simulators_model(tmp_path: Path) -> None:
    """``average_last = 2``: after 3 rounds the coordinator stores the mean of versions 2
    and 3 as version 4; the sites evaluate it and the registry serves it."""
    from cardiofed.serving import registry

    plan = {**PLAN, "rounds": 3, "average_last": 2}
    fed = Federation(tmp_path, plan=plan)
    _until_done(fed, [fed.agent(s) for s in SITES])
    models = fed.client.get("/v1/studies/s1/models", headers=fed.auth(fed.admin)).json()
    with session_factory(fed.settings.database_url)() as db:
        served = registry.load(db, "s1-v4")
        versions = [registry.load(db, f"s1-v{v}").weights for v in (2, 3)]

    assert [m["version"] for m in models] == [0, 1, 2, 3, 4]
    assert models[-1]["metrics"] and models[-1]["participants"] == sorted(SITES)
    sim = _simulated(plan)
    for name, value in served.weights.items():
        np.testing.assert_array_equal(value, sim.federated.weights[name])
        np.testing.assert_allclose(value, (versions[0][name] + versions[1][name]) / 2,
                                   rtol=1e-6)


def test_a_mean_round_streams_to_the_simulators_robust_mean(tmp_path: Path) -> None:
    """The robust mean (weight cap and norm bound on: the largest site is capped) is a
    running sum over the payloads, never every update at once; the same model."""
    fed, served, sim = _networked_and_simulated(
        tmp_path, {**PLAN, "rounds": 2, "robust_rule": "mean"})
    for name, value in served.weights.items():
        np.testing.assert_allclose(value, sim.federated.weights[name], rtol=0, atol=1e-6)
    from cardiofed.store import Round

    with session_factory(fed.settings.database_url)() as db:
        first = db.scalar(select(Round).where(Round.number == 1))
        assert first is not None and first.aggregation is not None
        shares = {a["site"]: a["weight_share"] for a in first.aggregation}
    assert shares["tier3_01"] == pytest.approx(0.5)  # 2,100 of 3,010 rows, capped


def test_networked_run_on_postgresql(tmp_path: Path, postgres_url: str) -> None:
    fed = Federation(tmp_path, database_url=postgres_url)

    _until_done(fed, [fed.agent(s) for s in SITES])

    final = fed.client.get("/v1/studies/s1/models", headers=fed.auth(fed.admin)).json()[-1]
    assert final["version"] == PLAN["rounds"] and set(final["metrics"]) == set(SITES)


START = datetime(2026, 1, 1)


def _race_study(postgres_url: str) -> tuple[Any, int]:
    """An engine on a fresh PostgreSQL study "race" (opened at START), and the id of its
    first site, enrolled."""
    from cardiofed.store import make_engine, make_sessionmaker

    engine = make_engine(postgres_url)
    names, ranges = study_columns("synthetic")
    with make_sessionmaker(engine)() as db:
        tokens = administration.create_study(db, study_id="race", plan=SimulationConfig(**PLAN),
                                      sites=SITES, feature_names=names, feature_ranges=ranges,
                                      min_sites=1, round_timeout_s=60, now=lambda: START)
        db.commit()
        return engine, enrolment.enrol(db, tokens[SITES[0]])[0].id


def _until_queued(engine: Any, waiter: Any) -> None:
    """Until some statement waits for a lock (`waiter`, a thread, must still be alive)."""
    from sqlalchemy import text

    with engine.connect() as conn:
        give_up = time.monotonic() + 60
        while not conn.execute(text("SELECT count(*) FROM pg_locks WHERE NOT granted")
                               ).scalar():
            assert time.monotonic() < give_up and waiter.is_alive()
            time.sleep(0.01)


def test_postgresql_round_close_waits_for_an_upload_in_flight(postgres_url: str) -> None:
    """A round closing past its deadline reads its reports only once the uploads holding
    the round's shared lock have committed: none is acknowledged and left out."""
    import threading

    from cardiofed.store import Round, Update, make_sessionmaker

    engine, site_id = _race_study(postgres_url)
    sessions = make_sessionmaker(engine)
    inserted, release = threading.Event(), threading.Event()

    def upload() -> None:  # submit's one statement, held in a transaction until released
        with engine.begin() as conn:
            round_id = conn.execute(select(Round.id).where(Round.number == 0)).scalar_one()
            assert conn.execute(uploads._ADMIT, _admission(round_id, site_id, START)
                                ).scalar_one() == 1
            inserted.set()
            assert release.wait(60)

    def close() -> None:  # a poll past the deadline
        with sessions() as db:
            rounds.advance(db, studies.get_study(db, "race"),
                            lambda: START + timedelta(seconds=61))

    uploader = threading.Thread(target=upload)
    uploader.start()
    assert inserted.wait(60)
    closer = threading.Thread(target=close)
    closer.start()
    _until_queued(engine, closer)  # the close, behind the upload's lock
    release.set()
    uploader.join(60)
    closer.join(60)
    with sessions() as db:
        update = db.scalar(select(Update))
        rnd = db.scalar(select(Round).where(Round.number == 0))
    assert update is not None and rnd is not None
    assert update.quarantine is not None  # the close read it (and refused its payload)
    assert rnd.outcome is not None and "deadline extended" in rnd.outcome
    engine.dispose()


def _admission(round_id: int, site_id: int, at: datetime) -> dict[str, object]:
    """The parameters of submit's statement, for an update that fails the round's checks."""
    return {"round_id": round_id, "site_id": site_id, "payload": b"not stats",
            "sha256": "0" * 64, "num_samples": 1, "received_at": at, "staleness": None,
            "shard": site_id % TALLY_SHARDS}


def test_postgresql_upload_waiting_on_a_closing_round_is_not_admitted(postgres_url: str
                                                                       ) -> None:
    """An upload whose statement waits for a round being closed finds it closed once the
    close commits, and inserts nothing: no update lands in a closed round."""
    import threading

    from sqlalchemy import func, update

    from cardiofed.store import Round, Update, make_sessionmaker

    engine, site_id = _race_study(postgres_url)
    sessions = make_sessionmaker(engine)
    admitted: list[int] = []
    with engine.begin() as closing:  # what closing a round does: lock it, then close it
        round_id = closing.execute(select(Round.id).where(Round.number == 0)
                                   .with_for_update()).scalar_one()

        def upload() -> None:
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                admitted.append(conn.execute(uploads._ADMIT, _admission(
                    round_id, site_id, START)).scalar_one())

        uploader = threading.Thread(target=upload)
        uploader.start()
        _until_queued(engine, uploader)  # the upload, behind the close's lock
        closing.execute(update(Round).where(Round.id == round_id).values(closed_at=START))
    uploader.join(60)
    with sessions() as db:
        assert admitted == [0] and db.scalar(select(func.count()).select_from(Update)) == 0
    engine.dispose()


def test_requests_without_or_with_wrong_credentials_are_refused(fed: Federation) -> None:
    assert fed.client.get("/v1/tasks/next").status_code == 401
    r = fed.client.get("/v1/tasks/next", headers=fed.auth("not-a-credential"))
    assert r.status_code == 401 and r.json()["detail"] == "Unknown site credential."
    r = fed.client.post("/v1/studies", json={}, headers=fed.auth("nope"))
    assert r.status_code == 401
    assert r.json()["detail"] == "An admin credential is required for this request."


def test_enrolment_token_is_one_time_and_secrets_are_hashed(fed: Federation) -> None:
    token = fed.tokens[SITES[0]]
    first = fed.client.post("/v1/enrol", json={"token": token})
    again = fed.client.post("/v1/enrol", json={"token": token})

    assert first.status_code == 200
    assert again.status_code == 401
    assert again.json()["detail"] == "Unknown or already used enrolment token."
    db_bytes = (fed.tmp / "coord.db").read_bytes() + b"".join(
        p.read_bytes() for p in fed.tmp.glob("coord.db-*"))
    assert first.json()["credential"].encode() not in db_bytes
    assert token.encode() not in db_bytes


def test_site_cannot_write_another_studys_round(fed: Federation) -> None:
    credential = fed.agent(SITES[0]).credential()
    r = fed.client.post("/v1/studies/other/rounds/0/updates", content=b"x",
                        headers=fed.auth(credential))
    assert r.status_code == 403
    assert r.json()["detail"] == "Site 'tier3_01' belongs to study 's1', not 'other'."


def test_revoked_site_is_refused_and_the_federation_goes_on(tmp_path: Path) -> None:
    fed = Federation(tmp_path, min_sites=2)
    agents = [fed.agent(s) for s in SITES]
    credential = agents[2].credential()
    r = fed.client.post(f"/v1/studies/s1/sites/{SITES[2]}/revoke", headers=fed.auth(fed.admin))
    assert r.status_code == 204

    r = fed.client.get("/v1/tasks/next", headers=fed.auth(credential))
    assert r.status_code == 401
    assert r.json()["detail"] == "Site 'community_01' has been revoked."
    _until_done(fed, agents[:2])
    assert fed.status()["revoked"] == ["community_01"]


def test_a_study_pauses_when_revocations_leave_fewer_than_min_sites(tmp_path: Path) -> None:
    # Issue 29: after a revocation, a study of "at least 2 sites per round" closed a
    # round with 1 and trained on.
    fed = Federation(tmp_path, min_sites=2)
    agents = [fed.agent(s) for s in SITES]
    fed.step(agents)  # statistics
    for site in SITES[1:]:
        assert fed.client.post(f"/v1/studies/s1/sites/{site}/revoke",
                               headers=fed.auth(fed.admin)).status_code == 204
    assert fed.step(agents[:1]) == 0  # no task while paused
    fed.advance(7200)  # past every deadline: still no round closes with one site
    state = fed.status()
    assert state["round"] == 1 and state["model_version"] == 0
    assert state["halted"] == ("waiting for sites: 1 active of the 2 required (min_sites); "
                               "re-admit or add sites, lower min_sites, or cancel the study")

    r = fed.client.post(f"/v1/studies/s1/sites/{SITES[2]}/readmit",
                        headers=fed.auth(fed.admin))
    assert r.status_code == 201
    readmitted = fed.agent(SITES[2], enrolment_token=r.json()["enrolment_token"],
                           state_dir=str(tmp_path / "readmitted"))
    assert fed.status()["halted"] is None
    _until_done(fed, [agents[0], readmitted])
    assert fed.status()["phase"] == "done"


def test_lowering_min_sites_lets_a_paused_study_go_on(tmp_path: Path) -> None:
    fed = Federation(tmp_path)  # min_sites: every site
    agents = [fed.agent(s) for s in SITES]
    admin = fed.auth(fed.admin)
    fed.step(agents)
    assert fed.client.post(f"/v1/studies/s1/sites/{SITES[2]}/revoke",
                           headers=admin).status_code == 204
    assert str(fed.status()["halted"]).startswith("waiting for sites: 2 active of the 3")
    zero = fed.client.post("/v1/studies/s1/min-sites", headers=admin, json={"min_sites": 0})
    assert zero.status_code == 422
    r = fed.client.post("/v1/studies/s1/min-sites", headers=admin, json={"min_sites": 4})
    assert r.status_code == 409 and "min_sites must be in [1, 3]" in r.json()["detail"]
    assert fed.client.post("/v1/studies/s1/min-sites", headers=admin,
                           json={"min_sites": 2}).status_code == 204
    assert fed.status()["halted"] is None
    _until_done(fed, agents[:2])
    assert fed.status()["phase"] == "done"


def test_an_operator_pauses_resumes_and_cancels_a_study(fed: Federation) -> None:
    agents = [fed.agent(s) for s in SITES]
    admin = fed.auth(fed.admin)
    assert fed.client.post("/v1/studies/s1/pause", headers=admin,
                           json={"reason": "data check"}).status_code == 204
    assert fed.step(agents) == 0
    assert fed.status()["halted"] == "paused by an operator: data check"
    assert fed.client.post("/v1/studies/s1/resume", headers=admin).status_code == 204
    assert fed.client.post("/v1/studies/s1/resume", headers=admin).status_code == 409
    assert fed.step(agents) == 3

    r = fed.client.post("/v1/studies/s1/cancel", headers=admin, json={"reason": "wrong cohort"})
    assert r.status_code == 204
    state = fed.status()
    assert state["phase"] == "done" and state["halted"] == (
        "cancelled by an operator: wrong cohort")
    assert state["round_outcome"] == "cancelled: wrong cohort"
    assert fed.step(agents) == 0  # nodes stop
    again = fed.client.post("/v1/studies/s1/pause", headers=admin, json={"reason": "x"})
    assert again.status_code == 409 and "is over" in again.json()["detail"]
    audit = fed.client.get("/v1/audit", headers=admin)
    if audit.status_code == 200:
        assert {"pause study", "resume study", "cancel study"} <= {
            e["action"] for e in audit.json()}


def test_a_site_is_added_to_a_running_study(fed: Federation) -> None:
    agents = [fed.agent(s) for s in SITES]
    fed.step(agents)  # statistics without it
    admin = fed.auth(fed.admin)
    r = fed.client.post("/v1/studies/s1/sites", headers=admin, json={"name": "tier3_02"})
    assert r.status_code == 201
    late = fed.agent("tier3_02", enrolment_token=r.json()["enrolment_token"])
    assert fed.step([*agents, late]) == 4  # it trains from the next round
    again = fed.client.post("/v1/studies/s1/sites", headers=admin, json={"name": "tier3_02"})
    assert again.status_code == 409 and again.json()["detail"] == (
        "Study 's1' already has a site 'tier3_02'; re-admit it if it was revoked.")
    bad = fed.client.post("/v1/studies/s1/sites", headers=admin, json={"name": "../x"})
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "name"
    live = fed.client.post(f"/v1/studies/s1/sites/{SITES[0]}/readmit", headers=admin)
    assert live.status_code == 409 and live.json()["detail"] == (
        f"Site {SITES[0]!r} of study 's1' is not revoked.")


def test_operator_controls_need_an_admin(fed: Federation) -> None:
    with session_factory(fed.settings.database_url)() as db:
        viewer = administration.create_admin_key(db, administration.VIEWER)
    for path, body in (("pause", {"reason": "x"}), ("resume", None),
                       ("min-sites", {"min_sites": 1}),
                       ("cancel", {"reason": "x"}), ("sites", {"name": "x"}),
                       (f"sites/{SITES[0]}/readmit", None)):
        assert fed.client.post(f"/v1/studies/s1/{path}", json=body).status_code == 401
        assert fed.client.post(f"/v1/studies/s1/{path}", json=body,
                               headers=fed.auth(viewer)).status_code == 403


def _statistics_payload(fed: Federation, site: str, **manifest: str) -> bytes:
    names, ranges = study_columns("synthetic")
    d = len(names)
    mid = np.array([(lo + hi) / 2 for lo, hi in ranges])  # one record at each range's middle
    histogram = np.zeros((d, 256))
    histogram[:, 128] = 1.0
    arrays = {"count": np.ones(d), "total": mid, "total_sq": mid**2,
              "n_missing": np.zeros(d), "histogram": histogram}
    return encode_arrays(arrays, {"study": "s1", "round": "0", "model_version": "0",
                                  "site": site, **manifest})


def test_one_site_declaring_ten_million_records_at_the_top_moves_no_mean_far(
        tmp_path: Path) -> None:
    # Issue 29: statistics were summed, so one site declaring 10,000,000 records at the
    # top of every range (a release that passes every check) owned every mean and fill.
    names, ranges = study_columns("synthetic")
    d = len(names)
    top = np.array([hi for _, hi in ranges], dtype=float)
    histogram = np.zeros((d, 256))
    histogram[:, -1] = 1e7
    forged = encode_arrays({"count": np.full(d, 1e7), "total": 1e7 * top,
                            "total_sq": 1e7 * top**2, "n_missing": np.zeros(d),
                            "histogram": histogram},
                           {"study": "s1", "round": "0", "model_version": "0",
                            "site": "community_01"})

    def merged(attack: bool) -> np.ndarray:
        (tmp_path / str(attack)).mkdir()
        fed = Federation(tmp_path / str(attack), plan=PLAN)
        agents = [fed.agent(s) for s in SITES]
        fed.step(agents[:2])
        if attack:
            r = fed.client.post("/v1/studies/s1/rounds/0/updates", content=forged,
                                headers=fed.auth(agents[2].credential()))
            assert r.status_code == 200, r.text
        else:
            fed.step(agents[2:])
        state = fed.status()
        pre = decode_arrays(fed.client.get("/v1/studies/s1/preprocessor",
                                           headers=fed.auth(fed.admin)).content)[0]
        if attack:
            cut = [a for a in state["robust_aggregation"] if "statistics_down_weighted" in a]
            assert cut and cut[0]["site"] == "community_01"
            assert cut[0]["statistics_down_weighted"] == names
        return pre["mean"]

    width = np.array([hi - lo for lo, hi in ranges])
    moved = np.abs(merged(True) - merged(False)) / width
    # Ungated, every mean moved to its range's top (> 0.5 of the range). Of 3 sites the
    # two honest ones' spread bounds the forged one: a prevalence that differs between
    # them leaves it within 2 spreads (bench/robustness.py measures 8 sites).
    assert moved[width > 1].max() < 0.1 and moved.max() < 0.4


@pytest.mark.parametrize(("payload", "status", "detail"), [
    (b"garbage", 422, "Payload of 7 bytes is too short for safetensors."),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......", 422,
     "Payload is not valid safetensors"),
    (None, 422, "Manifest field 'round' is '7'; expected '0'."),
    (encode_arrays({"count": np.ones(3)}, {"study": "s1", "round": "0", "model_version": "0",
                                           "site": "tier3_01"}),
     422, "Statistics payload must hold count, total, total_sq, n_missing of shape (8,)"),
    (encode_arrays({"count": np.array([np.nan])}, {}), 422,
     "Array 'count' contains non-finite values."),
])
def test_malformed_statistics_are_rejected_with_a_reason(fed: Federation, payload: bytes | None,
                                                         status: int, detail: str) -> None:
    credential = fed.agent(SITES[0]).credential()
    body = payload if payload is not None else _statistics_payload(fed, SITES[0], round="7")
    r = fed.client.post("/v1/studies/s1/rounds/0/updates", content=body,
                        headers=fed.auth(credential))
    assert r.status_code == status
    assert detail in r.json()["detail"]


def test_update_shapes_dtypes_and_version_are_checked(fed: Federation) -> None:
    agents = [fed.agent(s) for s in SITES]
    fed.step(agents)  # statistics round done; round 1 trains from model version 0
    credential = agents[0].credential()
    base = {"study": "s1", "round": "1", "model_version": "0", "site": SITES[0],
            "num_samples": "10"}

    def post(arrays: dict[str, np.ndarray], **manifest: str) -> tuple[int, str]:
        r = fed.client.post("/v1/studies/s1/rounds/1/updates", headers=fed.auth(credential),
                            content=encode_arrays(arrays, {**base, **manifest}))
        return r.status_code, r.json()["detail"]

    good = {"linear.weight": np.zeros((1, 8), np.float32), "linear.bias": np.zeros(1, np.float32)}
    assert post({"linear.weight": np.zeros((1, 7), np.float32),
                 "linear.bias": np.zeros(1, np.float32)}) == (
        422, "Update tensor 'linear.weight' has shape (1, 7) and dtype float32; expected "
             "(1, 8) and float32.")
    assert post({**good, "linear.bias": np.zeros(1, np.float64)})[0] == 422
    assert post({"w": np.zeros(1, np.float32)})[1] == (
        "Update tensors ['w'] do not match the model's ['linear.bias', 'linear.weight'].")
    assert post(good, model_version="3") == (
        422, "Manifest field 'model_version' is '3'; expected '0'.")
    assert post(good, num_samples="0") == (
        422, "Manifest field 'num_samples' must be an integer in [1, 10000000]; got '0'.")


def test_duplicate_upload_is_idempotent_and_a_different_one_conflicts(fed: Federation) -> None:
    credential = fed.agent(SITES[0]).credential()
    payload = _statistics_payload(fed, SITES[0])
    url, headers = "/v1/studies/s1/rounds/0/updates", fed.auth(credential)

    first = fed.client.post(url, content=payload, headers=headers)
    retry = fed.client.post(url, content=payload, headers=headers)
    other = fed.client.post(url, content=_statistics_payload(fed, SITES[0], extra="x"),
                            headers=headers)

    assert first.json()["status"] == "accepted"
    assert retry.status_code == 200 and retry.json() == {**first.json(),
                                                        "status": "already accepted"}
    assert other.status_code == 409
    assert "already submitted a different payload for round 0" in other.json()["detail"]


def test_an_upload_holds_no_database_connection_while_its_body_arrives(
        fed: Federation) -> None:
    """Slow uploads must not pin pooled connections: with more of them in flight than
    the pool has connections, the pool ran dry (500s: ``QueuePool limit ... reached``)."""
    import asyncio

    import httpx

    credential = fed.agent(SITES[0]).credential()
    payload = _statistics_payload(fed, SITES[0])
    pool = session_factory(fed.settings.database_url).kw["bind"].pool
    held: list[int] = []

    async def body() -> Any:  # pulled by the endpoint as it reads the request
        held.append(pool.checkedout())
        yield payload[:100]
        held.append(pool.checkedout())
        yield payload[100:]

    async def upload() -> httpx.Response:
        transport = httpx.ASGITransport(app=fed.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.post("/v1/studies/s1/rounds/0/updates", content=body(),
                                     headers=fed.auth(credential))

    r = asyncio.run(upload())

    assert r.status_code == 200 and r.json()["status"] == "accepted"
    assert held == [0, 0]


def test_an_upload_makes_two_trips_to_the_thread_pool(fed: Federation,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Authenticate, then store: a sync dependency (settings, say) would add a trip, each
    one a hand-over between threads on the hot path of a round."""
    import anyio.to_thread

    credential = fed.agent(SITES[0]).credential()
    payload = _statistics_payload(fed, SITES[0])
    trips: list[str] = []
    run_sync = anyio.to_thread.run_sync

    async def counted(func: Any, *args: Any, **kwargs: Any) -> Any:
        trips.append(getattr(getattr(func, "func", func), "__name__", repr(func)))
        return await run_sync(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counted)
    r = fed.client.post("/v1/studies/s1/rounds/0/updates", content=payload,
                        headers=fed.auth(credential))

    assert r.status_code == 200, r.text
    assert trips == ["_authenticate", "_store"]


def test_oversized_payload_is_rejected(tmp_path: Path) -> None:
    fed = Federation(tmp_path, max_bytes=100)
    credential = fed.agent(SITES[0]).credential()
    r = fed.client.post("/v1/studies/s1/rounds/0/updates", content=b"x" * 500,
                        headers=fed.auth(credential))
    assert r.status_code == 413
    assert r.json()["detail"] == "Payload of 500 bytes exceeds the limit of 100 bytes."


def test_dropped_site_does_not_hang_the_round_after_its_deadline(tmp_path: Path) -> None:
    fed = Federation(tmp_path, min_sites=2)
    agents = [fed.agent(s) for s in SITES[:2]]  # the third site never shows up

    fed.step(agents)
    assert fed.status()["waiting_for"] == ["community_01"]  # until the round's deadline
    for _ in range(20):
        if fed.status()["phase"] == "done":
            break
        if not fed.step(agents):
            fed.advance(3601)  # the deadline passes: the round closes without it
    assert fed.status()["phase"] == "done"

    models = fed.client.get("/v1/studies/s1/models", headers=fed.auth(fed.admin)).json()
    assert models[-1]["participants"] == SITES[:2]


def test_a_result_for_a_round_that_closed_without_it_does_not_stop_the_node(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from cardiofed.protocol.schemas import TaskResponse

    fed = Federation(tmp_path, min_sites=2)
    agents = [fed.agent(s) for s in SITES]
    fed.step(agents)  # statistics
    late = agents[2]
    task = TaskResponse.model_validate(fed.client.get(
        "/v1/tasks/next", headers=fed.auth(late.credential())).json())
    assert task.kind == "train"
    fed.step(agents[:2])
    fed.advance(3601)  # round 1 closes without the late site
    assert fed.status()["round"] == 2
    assert late.run_task(task) is True  # its upload: 409 round_closed, logged, not raised
    assert "closed before this result arrived" in caplog.text
    r = fed.client.post("/v1/studies/s1/rounds/1/updates", headers=fed.auth(
        late.credential()), content=(late.state_dir / "outbox" / "s1-round1.bin").read_bytes())
    assert r.status_code == 409 and r.json()["code"] == "round_closed"
    _until_done(fed, agents)  # and it takes part in the next rounds


def test_round_past_deadline_without_enough_reports_is_extended(tmp_path: Path) -> None:
    fed = Federation(tmp_path, timeout=60.0, min_sites=2)
    fed.step([fed.agent(SITES[0])])
    fed.advance(61)

    state = fed.status()

    assert state["round"] == 0 and state["phase"] == "statistics"
    assert state["round_outcome"] == "deadline extended: 1 of the 2 usable reports required"
    assert state["waiting_for"] == ["tier2_01", "community_01"]


def test_node_restart_resends_the_cached_payload(fed: Federation) -> None:
    agents = [fed.agent(s) for s in SITES]
    fed.step(agents)
    # A node that crashed after computing round 1 but before the upload finished:
    task = fed.client.get("/v1/tasks/next", headers=fed.auth(agents[0].credential()))
    from cardiofed.protocol.schemas import TaskResponse

    parsed = TaskResponse.model_validate(task.json())
    cache = agents[0].state_dir / "outbox" / "s1-round1.bin"
    payload = agents[0]._compute(parsed)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_bytes(payload)

    restarted = fed.agent(SITES[0])
    restarted.run_task(parsed)

    assert restarted.outbound.entries()[-1]["sha256"] == __import__("hashlib").sha256(
        payload).hexdigest()
    _until_done(fed, [restarted, *agents[1:]])


def test_node_audit_log_records_every_payload(fed: Federation) -> None:
    agents = [fed.agent(s) for s in SITES]
    _until_done(fed, agents)

    summary = agents[0].outbound.summary()

    assert summary["statistics"]["payloads"] == 1
    assert summary["train"]["payloads"] == PLAN["rounds"]
    assert summary["evaluate"]["payloads"] == 1
    assert all(e["bytes"] > 0 and len(e["sha256"]) == 64 for e in agents[0].outbound.entries())


def test_node_reports_a_refusal_with_the_coordinators_reason(fed: Federation) -> None:
    agent = fed.agent(SITES[0])
    agent.credential()
    fed.client.post(f"/v1/studies/s1/sites/{SITES[0]}/revoke", headers=fed.auth(fed.admin))

    with pytest.raises(NodeError, match="401 Site 'tier3_01' has been revoked."):
        agent.run(max_tasks=1)


def test_openapi_document_lists_the_versioned_routes(fed: Federation) -> None:
    paths = fed.client.get("/openapi.json").json()["paths"]
    assert {"/v1/enrol", "/v1/tasks/next", "/v1/studies",
            "/v1/studies/{study_id}/rounds/{round_number}/updates",
            "/v1/studies/{study_id}/models/{version}"} <= set(paths)


def test_node_audit_finds_no_record_values_in_what_was_sent(fed: Federation) -> None:
    from typer.testing import CliRunner

    from cardiofed.cli import app

    agents = [fed.agent(s) for s in SITES]
    _until_done(fed, agents)
    config = fed.tmp / "node.toml"
    config.write_text(f'coordinator_url = "http://testserver"\nstate_dir = "{SITES[0]}"\n'
                      f'privacy = "off"\n[data]\ndataset = "synthetic"\nsite = "{SITES[0]}"\n')

    result = CliRunner().invoke(app, ["node", "audit", "--config", str(config), "--scan-rows"])

    assert result.exit_code == 0, result.output
    assert "Searched 5 sent payloads" in result.output and ": 0 found." in result.output


@pytest.mark.parametrize(("values", "message"), [
    ({"data": {"csv": "a.csv"}},
     "Invalid node config: data: data.csv and data.mapping go together."),
    ({"data": {"dataset": "synthetic"}},
     "Invalid node config: data: data.dataset needs data.site."),
    ({"data": {"dataset": "synthetic", "site": "a"}, "coordinator_url": "ftp://x"},
     "Invalid node config: coordinator_url: String should match pattern '^https?://'."),
    ({"data": {"dataset": "synthetic", "site": "a"},
      "privacy": {"epsilon_max": 0, "ledger_dir": "ledgers"}},
     "Invalid node config: privacy.epsilon_max: Input should be greater than 0."),
    ({"data": {"dataset": "synthetic", "site": "a"}, "privacy": "on"},
     "Invalid node config: config: privacy must be a [privacy] table or \"off\"; "
     "got 'on'."),
    ({"data": {"dataset": "synthetic", "site": "a"}, "privacy": {"ledger_dir": "s/ledger"}},
     "Invalid node config: config: privacy.ledger_dir (s/ledger) must lie outside "
     "state_dir (s): clearing the node's state must not reset what the hospital has spent."),
    ({"data": {"dataset": "synthetic", "site": "a"},
      "privacy": {"ledger_dir": "l", "seal_file": "l/seal"}},
     "Invalid node config: config: privacy.seal_file (l/seal) must lie outside "
     "privacy.ledger_dir (l)."),
    ({"data": {"dataset": "synthetic", "site": "a"}, "opt_in": ["small_batches"]},
     "Invalid node config: config: opt_in applies to a non-private site (privacy "
     "= \"off\"); a private site's releases carry noise whatever the plan."),
    ({"data": {"dataset": "synthetic", "site": "a"}, "privacy": "off", "opt_in": ["everything"]},
     "Invalid node config: opt_in.0: Input should be 'small_batches', 'exact_attribution' "
     "or 'exact_survival'."),
    ({"data": {"dataset": "synthetic", "site": "a"},
      "privacy": {"epsilon_max": 1.0, "reset_privacy_ledger": True}},
     "Invalid node config: privacy.reset_privacy_ledger is no longer a setting (left in a "
     "config it would reset the ledger at every start). Reset deliberately, once, with "
     "`cardiofed node reset-ledger --config <node.toml> --reason \"...\"`."),
    ({"data": {"dataset": "synthetic", "site": "a"}, "train_delay_s": -1},
     "Invalid node config: train_delay_s: Input should be greater than or equal to 0."),
    ({"data": {"dataset": "synthetic", "site": "a"}, "retry_max_delay_s": 0},
     "Invalid node config: retry_max_delay_s: Input should be greater than 0."),
])
def test_node_config_errors_name_the_field(values: dict[str, object], message: str) -> None:
    from cardiofed.exceptions import ConfigurationError

    settings = {"coordinator_url": "http://127.0.0.1:8000", "state_dir": "s", **values}
    with pytest.raises(ConfigurationError) as err:
        NodeConfig.create(**settings)
    assert str(err.value) == message


def test_node_config_paths_are_relative_to_the_file_and_privacy_defaults(
        tmp_path: Path) -> None:
    path = tmp_path / "etc" / "node.toml"
    path.parent.mkdir()
    path.write_text('coordinator_url = "http://127.0.0.1:8000"\nstate_dir = "state"\n'
                    '[data]\ndataset = "synthetic"\nsite = "a"\n'
                    '[privacy]\nepsilon_max = 1.0\nledger_dir = "../ledgers"\n'
                    'shares = { statistics = 0.2, train = 0.6, evaluate = 0.2 }\n')

    config = NodeConfig.from_toml(path)

    assert config.state_dir == tmp_path / "etc" / "state"
    assert config.privacy is not None
    assert config.privacy.ledger_dir == tmp_path / "etc" / ".." / "ledgers"
    assert config.privacy.shares == {"statistics": 0.2, "train": 0.6, "evaluate": 0.2}
    assert config.ledger_location() == (tmp_path / "etc" / ".." / "ledgers",
                                        tmp_path / "etc" / ".." / "ledgers.seal")
    assert config.publish_metrics is True
    # Private by default: the documented budget, the ledger beside state_dir.
    default = NodeConfig.create(coordinator_url="http://x", state_dir="s",
                                data={"dataset": "synthetic", "site": "a"})
    assert default.privacy is None and default.private == NodePrivacy()
    assert (default.private.epsilon_max, default.private.study_epsilon) == (3.0, 1.0)
    assert default.private.shares == {"statistics": 0.1, "train": 0.8, "evaluate": 0.1}
    assert default.ledger_location() == (Path("s-privacy"), Path("s-privacy.seal"))
    off = NodeConfig.create(coordinator_url="http://x", state_dir="s", privacy="off",
                            data={"dataset": "synthetic", "site": "a"})
    assert off.private is None and off.opt_in == []


def test_bias_corrections_the_network_does_not_run_are_refused(fed: Federation) -> None:
    names, ranges = study_columns("synthetic")
    r = fed.client.post("/v1/studies", headers=fed.auth(fed.admin), json={
        "id": "s2", "plan": {**PLAN, "weighting": "type-balanced", "label_quality": True},
        "sites": ["a"], "feature_names": names, "feature_ranges": ranges})

    assert r.status_code == 422
    assert r.json()["detail"] == (
        "The networked federation aggregates with sample-size weights only; weighting, "
        "label_quality is available in simulation only for now.")


# ---------------------------------------------------------------- asynchronous studies

# robust_byzantine 0: versions of 2 updates (a plan tolerating f = 1 needs 3 distinct sites).
ASYNC_PLAN = {**PLAN, "aggregation": "async", "buffer_size": 2, "rounds": 3,
              "robust_byzantine": 0}


def _train_once(fed: Federation, agent: NodeAgent) -> None:
    assert fed.step([agent]) == 1


def test_async_study_publishes_every_k_updates_without_waiting_for_the_slowest(
        tmp_path: Path) -> None:
    fed = Federation(tmp_path, plan=ASYNC_PLAN)
    agents = [fed.agent(s) for s in SITES]
    fed.step(agents)  # statistics: every site
    fast = agents[:2]  # community_01 never trains

    _train_once(fed, fast[0])
    state = fed.status()
    assert (state["aggregation"], state["buffered"], state["model_version"]) == ("async", 1, 0)
    assert fed.step([fast[0]]) == 0  # one update per version: it waits for version 1
    _train_once(fed, fast[1])
    assert fed.status()["model_version"] == 1
    for _ in range(2):
        for agent in fast:
            _train_once(fed, agent)
    assert fed.status()["phase"] == "evaluate"
    _until_done(fed, agents)

    models = fed.client.get("/v1/studies/s1/models", headers=fed.auth(fed.admin)).json()
    assert [m["version"] for m in models] == [0, 1, 2, 3]
    assert all(m["participants"] == ["tier3_01", "tier2_01"] for m in models[1:])
    assert set(models[-1]["metrics"]) == set(SITES)  # every site evaluates the final model
    assert fed.status()["update_share"] == {"tier3_01": 0.5, "tier2_01": 0.5,
                                            "community_01": 0.0}


@pytest.mark.parametrize("windowed", [True, False])
def test_an_async_version_aggregates_every_sites_latest_update_under_a_robust_rule(
        tmp_path: Path, windowed: bool) -> None:
    # Issue 29: sites that upload first after each publication used to make up every
    # buffer. Under a robust rule a version aggregates the buffer and each other site's
    # latest folded update, so they are f of the sites heard from, not f of the buffer.
    _check_the_window(Federation(tmp_path, plan={**ASYNC_PLAN, "async_window": windowed}),
                      windowed)


def test_the_async_window_on_postgresql(tmp_path: Path, postgres_url: str) -> None:
    _check_the_window(Federation(tmp_path, plan=ASYNC_PLAN, database_url=postgres_url),
                      True)


def _check_the_window(fed: Federation, windowed: bool) -> None:
    agents = [fed.agent(s) for s in SITES]
    fed.step(agents)  # statistics
    _train_once(fed, agents[0])
    _train_once(fed, agents[2])  # version 1: tier3_01, community_01
    _train_once(fed, agents[0])
    _train_once(fed, agents[1])  # version 2: tier3_01, tier2_01 (+ community_01's)

    from cardiofed.store import Round

    with session_factory(fed.settings.database_url)() as db:
        outcome = db.scalar(select(Round.outcome).where(Round.outcome.like("version 2 %")))
    assert outcome == ("version 2 published from 2 buffered updates and 1 other site(s)' "
                       "latest earlier update: tier3_01, tier2_01" if windowed else
                       "version 2 published from 2 buffered updates: tier3_01, tier2_01")
    models = fed.client.get("/v1/studies/s1/models", headers=fed.auth(fed.admin)).json()
    assert models[2]["participants"] == ["tier3_01", "tier2_01"]


def test_a_private_async_study_steps_the_intercept_before_its_evaluation(
        tmp_path: Path) -> None:
    fed = Federation(tmp_path, plan=ASYNC_PLAN)
    agents = [_private_agent(fed, s) for s in SITES]
    _until_done(fed, agents)

    models = fed.client.get("/v1/studies/s1/models", headers=fed.auth(fed.admin)).json()
    assert [m["version"] for m in models] == [0, 1, 2, 3, 4]
    assert fed.status()["intercept_step"]["round"] == models[-1]["round"]
    assert set(models[-1]["metrics"]) == set(SITES)  # every site evaluates version 4
    for agent in agents:
        assert [e["what"] for e in _ledger(agent)][-2:] == ["intercept step release",
                                                            "evaluation release"]


def test_async_buffer_takes_one_update_per_site(tmp_path: Path) -> None:
    # The attack (issue 29): training rounds stay open while newer versions appear, so a
    # site that uploads into several open rounds used to fill the buffer alone (a
    # version published from [community_03, community_03, community_03]).
    from cardiofed.protocol.schemas import TaskResponse

    fed = Federation(tmp_path, plan=ASYNC_PLAN)
    agents = [fed.agent(s) for s in SITES]
    fed.step(agents)  # statistics
    attacker = agents[0]
    old_task = fed.client.get("/v1/tasks/next", headers=fed.auth(attacker.credential())).json()
    _train_once(fed, agents[1])
    _train_once(fed, agents[2])  # version 1; round 1 stays open for slow sites
    assert fed.status()["model_version"] == 1
    _train_once(fed, attacker)  # into round 2: one update of the attacker is buffered

    again = attacker._compute(TaskResponse.model_validate(old_task))  # round 1, stale by 1
    r = fed.client.post("/v1/studies/s1/rounds/1/updates", content=again,
                        headers=fed.auth(attacker.credential()))

    assert r.status_code == 409, r.text
    assert r.json()["detail"] == (
        "Site 'tier3_01' already reported to round 2; an update for the older round 1 is "
        "discarded.")
    assert fed.status()["buffered"] == 1 and fed.status()["model_version"] == 1
    _train_once(fed, agents[1])
    models = fed.client.get("/v1/studies/s1/models", headers=fed.auth(fed.admin)).json()
    assert models[-1]["participants"] == ["tier3_01", "tier2_01"]


def test_async_updates_that_raced_into_one_buffer_count_once(tmp_path: Path) -> None:
    # Two uploads of one site that raced past the check: the buffer folds the first,
    # quarantines the second, and waits for another site.
    fed = Federation(tmp_path, plan=ASYNC_PLAN)
    agents = [fed.agent(s) for s in SITES]
    fed.step(agents)
    _train_once(fed, agents[1])
    _train_once(fed, agents[2])  # version 1; tier3_01 reported nothing in round 1
    _train_once(fed, agents[0])  # round 2
    with session_factory(fed.settings.database_url)() as db:
        from cardiofed.store import Round, Update

        first = db.scalars(select(Update).join(Round, Update.round_id == Round.id).where(
            Round.number == 2)).one()
        old_round = db.scalars(select(Round).where(Round.number == 1)).one()
        db.add(Update(round_id=old_round.id, site_id=first.site_id, payload=first.payload,
                      sha256="0" * 64, num_samples=first.num_samples,
                      received_at=first.received_at, staleness=1))
        db.commit()

    status = fed.status()

    assert status["model_version"] == 1  # one site's two updates are not two sites
    assert [q["reason"] for q in status["quarantined"]] == [
        "a second update of the same site in one buffer"]


def test_async_update_older_than_max_staleness_is_refused(tmp_path: Path) -> None:
    fed = Federation(tmp_path, plan={**ASYNC_PLAN, "buffer_size": 1, "max_staleness": 0})
    agents = [fed.agent(s) for s in SITES]
    fed.step(agents)
    slow = agents[2]
    task = fed.client.get("/v1/tasks/next", headers=fed.auth(slow.credential()))
    assert task.json()["model_version"] == 0
    _train_once(fed, agents[0])  # version 1 is out while the slow site trains on 0

    from cardiofed.protocol.schemas import TaskResponse

    payload = slow._compute(TaskResponse.model_validate(task.json()))
    r = fed.client.post("/v1/studies/s1/rounds/1/updates", content=payload,
                        headers=fed.auth(slow.credential()))
    assert r.status_code == 409 and r.json()["code"] == "stale_update"
    assert r.json()["detail"] == (
        "Stale update from site 'community_01': the update was trained from a model 1 "
        "versions old; the study accepts at most max_staleness=0; train again on version 1.")
    # The node logs the refusal and goes on with the newest model.
    slow.run_task(TaskResponse.model_validate(task.json()))
    assert fed.status()["model_version"] == 1
    assert fed.step([slow]) == 1 and fed.status()["model_version"] == 2


def test_async_buffer_is_published_after_its_timeout(tmp_path: Path) -> None:
    fed = Federation(tmp_path, plan={**ASYNC_PLAN, "buffer_size": 3,
                                     "buffer_timeout_s": 60.0})
    agents = [fed.agent(s) for s in SITES]
    fed.step(agents)
    _train_once(fed, agents[0])
    fed.advance(59)
    assert fed.status()["model_version"] == 0
    fed.advance(2)

    assert fed.status()["model_version"] == 1
    models = fed.client.get("/v1/studies/s1/models", headers=fed.auth(fed.admin)).json()
    assert models[-1]["participants"] == ["tier3_01"]


def test_async_buffer_survives_a_coordinator_restart(tmp_path: Path) -> None:
    fed = Federation(tmp_path, plan=ASYNC_PLAN)
    agents = [fed.agent(s) for s in SITES]
    fed.step(agents)
    _train_once(fed, agents[0])

    fed.restart()  # a new process over the same database
    second = fed.agent(SITES[1])
    assert fed.status()["buffered"] == 1
    _train_once(fed, second)

    models = fed.client.get("/v1/studies/s1/models", headers=fed.auth(fed.admin)).json()
    assert models[-1]["version"] == 1 and models[-1]["participants"] == SITES[:2]


def test_async_buffer_published_after_its_timeout_holds_2f_plus_1_sites(
        tmp_path: Path) -> None:
    # Issue 29: the timeout used to publish a version from one update; under a rule
    # tolerating f = 1 malicious site a version needs 3 distinct sites.
    fed = Federation(tmp_path, plan={**ASYNC_PLAN, "buffer_size": 3, "robust_byzantine": 1,
                                     "buffer_timeout_s": 60.0})
    agents = [fed.agent(s) for s in SITES]
    fed.step(agents)
    _train_once(fed, agents[0])
    _train_once(fed, agents[1])
    fed.advance(3600)
    assert fed.status()["model_version"] == 0
    _train_once(fed, agents[2])
    assert fed.status()["model_version"] == 1


def test_async_buffer_smaller_than_2f_plus_1_is_refused(fed: Federation) -> None:
    names, ranges = study_columns("synthetic")
    r = fed.client.post("/v1/studies", headers=fed.auth(fed.admin), json={
        "id": "s2", "plan": {**ASYNC_PLAN, "robust_byzantine": 1}, "sites": SITES,
        "feature_names": names, "feature_ranges": ranges})
    assert r.status_code == 422
    assert ("'buffer_size' parameter must be at least 2 x robust_byzantine + 1 = 3 under "
            "robust_rule 'weighted-median'") in r.text


def test_async_buffer_larger_than_the_federation_is_refused(fed: Federation) -> None:
    names, ranges = study_columns("synthetic")
    r = fed.client.post("/v1/studies", headers=fed.auth(fed.admin), json={
        "id": "s2", "plan": {**ASYNC_PLAN, "buffer_size": 4}, "sites": SITES,
        "feature_names": names, "feature_ranges": ranges})
    assert r.status_code == 422
    assert "'buffer_size' parameter must be at most the number of sites (3); got 4" in r.text


def test_unknown_outcome_is_refused(fed: Federation) -> None:
    names, ranges = study_columns("synthetic")
    r = fed.client.post("/v1/studies", headers=fed.auth(fed.admin), json={
        "id": "s3", "plan": PLAN, "sites": SITES, "feature_names": names,
        "feature_ranges": ranges, "outcome": "stroke_5y"})
    assert r.status_code == 422
    assert r.json()["detail"] == ("outcome must be one of cvd_10y, chd_10y, heart_disease "
                                  "(built in or declared in plan.study_features); got "
                                  "'stroke_5y'.")


def test_async_training_goes_on_without_a_dead_site_after_the_deadline(tmp_path: Path) -> None:
    # K = 3 and no buffer timeout, but community_01 died after enrolling: the round's
    # deadline (600 s) bounds the wait, as in a synchronous study.
    fed = Federation(tmp_path, plan={**ASYNC_PLAN, "buffer_size": 3}, timeout=600.0)
    agents = [fed.agent(s) for s in SITES]
    fed.step(agents)
    for agent in agents[:2]:
        _train_once(fed, agent)
    fed.advance(599)
    assert fed.status()["model_version"] == 0
    fed.advance(2)
    assert fed.status()["model_version"] == 1


def test_async_study_with_every_site_revoked_publishes_nothing(tmp_path: Path) -> None:
    fed = Federation(tmp_path, plan=ASYNC_PLAN)
    agents = [fed.agent(s) for s in SITES]
    fed.step(agents)
    for site in SITES:
        r = fed.client.post(f"/v1/studies/s1/sites/{site}/revoke", headers=fed.auth(fed.admin))
        assert r.status_code == 204
    state = fed.status()
    assert state["model_version"] == 0 and state["phase"] == "train"


def test_metrics_that_are_not_finite_numbers_are_rejected(fed: Federation) -> None:
    agents = [fed.agent(s) for s in SITES]
    _until_done_but_evaluation(fed, agents)
    credential = agents[0].credential()
    rnd = fed.status()["round"]
    r = fed.client.post(f"/v1/studies/s1/rounds/{rnd}/updates", content=b'{"auc": 1e999}',
                        headers=fed.auth(credential))
    assert r.status_code == 422
    huge = fed.client.post(f"/v1/studies/s1/rounds/{rnd}/updates",
                           content=b'{"n": ' + b"9" * 400 + b"}", headers=fed.auth(credential))
    assert huge.status_code == 422
    assert huge.json()["detail"] == ("Evaluation payload must map at most 64 metric names "
                                     "(<= 64 characters) to finite numbers or null.")


def _until_done_but_evaluation(fed: Federation, agents: list[NodeAgent]) -> None:
    give_up = time.monotonic() + 60
    while fed.status()["phase"] != "evaluate":
        assert time.monotonic() < give_up, fed.status()
        for agent in agents:
            if fed.status()["phase"] == "evaluate":
                break
            fed.step([agent])


def test_a_study_id_taken_by_simulated_models_is_refused(fed: Federation) -> None:
    from cardiofed.exceptions import Conflict
    from cardiofed.serving import registry

    names, ranges = study_columns("synthetic")
    agents = [fed.agent(s) for s in SITES]
    _until_done(fed, agents)
    with session_factory(fed.settings.database_url)() as db:
        trained = registry.load(db, "s1-v1")
        with pytest.raises(Conflict, match="is a networked study's name"):
            registry.register(db, trained.with_card(study="s1"))
        registry.register(db, trained.with_card(study="sim"))
    r = fed.client.post("/v1/studies", headers=fed.auth(fed.admin), json={
        "id": "sim", "plan": PLAN, "sites": SITES, "feature_names": names,
        "feature_ranges": ranges})
    assert r.status_code == 409
    assert "already holds models named 'sim'-v<n>" in r.json()["detail"]


# ---------------------------------------------------------------- the node's own plan

def _set_plan(fed: Federation, plan: dict[str, object]) -> None:
    """Change the study's plan in the coordinator's database (a misbehaving coordinator)."""
    from cardiofed.store import Study

    with session_factory(fed.settings.database_url)() as db:
        study = db.get(Study, "s1")
        assert study is not None
        study.plan = plan
        db.commit()


def _set_round_version(fed: Federation, number: int, version: int) -> None:
    from sqlalchemy import select

    from cardiofed.store import Round

    with session_factory(fed.settings.database_url)() as db:
        rnd = db.scalar(select(Round).where(Round.study_id == "s1", Round.number == number))
        assert rnd is not None
        rnd.model_version = version
        db.commit()


def _has_task(fed: Federation, agent: NodeAgent) -> bool:
    r = fed.client.get("/v1/tasks/next", headers=fed.auth(agent.credential()))
    return r.status_code == 200


def test_a_changed_plan_is_refused_shown_in_the_status_and_the_node_goes_on(
        fed: Federation) -> None:
    agents = [fed.agent(s) for s in SITES]
    fed.step(agents)  # statistics: every node pins the plan
    with session_factory(fed.settings.database_url)() as db:
        pinned = dict(studies.get_study(db, "s1").plan)

    _set_plan(fed, {**pinned, "lr": 5.0})  # the coordinator changes the plan mid-study
    assert fed.step(agents[:1]) == 1  # tier3_01 takes round 1, refuses it, reports why
    _set_plan(fed, pinned)

    state = fed.status()
    [refusal] = state["refusals"]  # type: ignore[misc]
    assert (refusal["site"], refusal["round"]) == ("tier3_01", 1)
    assert refusal["reason"].startswith(
        "Refused train task (round 1, model version 0) of study 's1': its plan (sha256 ")
    assert refusal["reason"].endswith("is not the plan this site pinned (sha256 "
                                      f"{agents[0].policy.pinned('s1')[:12]}...).")
    # The coordinator does not offer the round again, nor wait for the site.
    assert state["waiting_for"] == ["tier2_01", "community_01"]
    assert not _has_task(fed, agents[0])
    assert not (agents[0].state_dir / "outbox" / "s1-round1.bin").exists()  # nothing sent

    _until_done(fed, agents)

    models = fed.client.get("/v1/studies/s1/models", headers=fed.auth(fed.admin)).json()
    assert models[1]["participants"] == ["tier2_01", "community_01"]
    assert models[2]["participants"] == models[3]["participants"] == SITES  # it goes on
    assert set(models[-1]["metrics"]) == set(SITES)
    assert agents[0].policy.studies["s1"]["done"]["train"] == [2, 3]
    assert fed.status()["refusals"] == [refusal]


def test_an_evaluation_of_a_model_other_than_the_final_one_is_refused(
        fed: Federation) -> None:
    agents = [fed.agent(s) for s in SITES]
    for _ in range(4):  # statistics and the 3 training rounds
        fed.step(agents)
    state = fed.status()
    assert (state["phase"], state["round"], state["model_version"]) == ("evaluate", 4, 3)

    _set_round_version(fed, 4, 1)  # the coordinator asks tier3_01 to evaluate version 1
    assert fed.step(agents[:1]) == 1
    _set_round_version(fed, 4, 3)

    [refusal] = fed.status()["refusals"]  # type: ignore[misc]
    assert refusal == {"site": "tier3_01", "round": 4, "reason": (
        "Refused evaluate task (round 4, model version 1) of study 's1': this site trained "
        "round 3, so the study's final model is version 3 or later.")}
    _until_done(fed, agents)
    final = fed.client.get("/v1/studies/s1/models", headers=fed.auth(fed.admin)).json()[-1]
    assert set(final["metrics"]) == {"tier2_01", "community_01"}


def test_a_round_every_site_refuses_stops_the_study_instead_of_hanging(
        fed: Federation) -> None:
    agents = [fed.agent(s) for s in SITES]
    for _ in range(4):  # statistics and the 3 training rounds
        fed.step(agents)
    _set_round_version(fed, 4, 1)  # every site is asked to evaluate a non-final version

    assert fed.step(agents) == len(SITES)

    state = fed.status()
    assert state["phase"] == "done"
    assert state["round_outcome"] == "study stopped: every active site refused this round"
    assert [r["site"] for r in state["refusals"]] == list(SITES)  # type: ignore[union-attr]


def test_a_refusal_needs_the_sites_credential_and_a_reason(fed: Federation) -> None:
    credential = fed.agent(SITES[0]).credential()
    url = "/v1/studies/s1/rounds/0/refusal"

    assert fed.client.post(url, json={"reason": "no"}).status_code == 401
    r = fed.client.post(url, json={"reason": ""}, headers=fed.auth(credential))
    assert r.status_code == 422
    r = fed.client.post("/v1/studies/other/rounds/0/refusal", json={"reason": "no"},
                        headers=fed.auth(credential))
    assert r.status_code == 403
    r = fed.client.post("/v1/studies/s1/rounds/9/refusal", json={"reason": "no"},
                        headers=fed.auth(credential))
    assert r.status_code == 404
    r = fed.client.post(url, json={"reason": "not this one"}, headers=fed.auth(credential))
    assert r.status_code == 204
    again = fed.client.post(url, json={"reason": "twice"}, headers=fed.auth(credential))
    assert again.status_code == 204
    assert fed.status()["refusals"] == [{"site": "tier3_01", "round": 0,
                                         "reason": "not this one"}]  # recorded once


# ---------------------------------------------------------------- private nodes

PRIVATE_KEYS = {"auc", "auc_ci_low", "auc_ci_high", "calibration_slope",
                "calibration_slope_ci_low", "calibration_slope_ci_high", "brier",
                "brier_ci_low", "brier_ci_high", "prevalence"}


def test_evaluation_histograms_become_metrics_with_intervals() -> None:
    from cardiofed.evaluation.private_metrics import score_bin_edges, score_histograms
    from cardiofed.exceptions import InvalidUpdate

    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.3).astype(int)
    p = np.clip(0.3 + 0.3 * (y - 0.3) + rng.normal(0, 0.15, 400), 0.01, 0.99)
    neg, pos = score_histograms(y, p, score_bin_edges())
    payload = encode_arrays({"negatives": neg, "positives": pos},
                            {"noise_std": "2.0", "epsilon_spent": "0.9",
                             "epsilon_delta": "1e-05"})

    metrics = payloads.evaluation_metrics(payload)

    assert set(metrics) >= PRIVATE_KEYS
    assert metrics["auc_ci_low"] < metrics["auc_ci_high"] and 0.5 < metrics["auc"] <= 1.0
    assert (metrics["epsilon_spent"], metrics["epsilon_delta"]) == (0.9, 1e-5)
    assert payloads.evaluation_metrics(b'{"auc": 0.7, "n": 10}') == {"auc": 0.7, "n": 10}
    assert payloads.evaluation_metrics(b"{}") == {}  # a site that does not publish
    with pytest.raises(InvalidUpdate, match=re.escape(
            "Evaluation metrics out of range: auc = 99.0 is outside [0, 1]; epsilon_spent = "
            "-3.0 is negative.")):
        payloads.evaluation_metrics(b'{"auc": 99, "epsilon_spent": -3}')
    with pytest.raises(InvalidUpdate, match=re.escape(
            "Evaluation histograms must be 'negatives' and 'positives', two 1-D arrays of "
            "one length (4 to 1000 bins);")):
        payloads.evaluation_metrics(encode_arrays({"negatives": neg, "positives": pos[:-1]},
                                                 {"noise_std": "2.0"}))
    with pytest.raises(InvalidUpdate, match="Evaluation histograms are not usable"):
        payloads.evaluation_metrics(encode_arrays({"negatives": neg[:5], "positives": pos[:5]},
                                                 {"noise_std": "2.0"}))
    with pytest.raises(InvalidUpdate, match="neither JSON metrics nor score histograms"):
        payloads.evaluation_metrics(b"garbage")


def _private_agent(fed: Federation, site: str, **settings: object) -> NodeAgent:
    return fed.agent(site, privacy={"epsilon_max": 2.0,
                                    "ledger_dir": str(fed.tmp / "ledgers" / site)},
                     **settings)


def _ledger(agent: NodeAgent) -> list[dict[str, Any]]:
    """The entries of the agent's hospital ledger, verified against its seal."""
    from cardiofed.privacy.ledger_file import open_ledger_file

    ledger_dir, seal_file = agent.config.ledger_location()
    return open_ledger_file(ledger_dir, seal_file=seal_file).entries


def test_private_nodes_release_everything_under_their_ledgers(fed: Federation) -> None:
    # Every site has a budget; community_01 does not publish its evaluation. Statistics,
    # training and evaluation are each charged to the site's ledger, and the card's
    # metrics come from the noisy score histograms, with intervals.
    agents = [_private_agent(fed, s) for s in SITES[:2]]
    agents.append(_private_agent(fed, SITES[2], publish_metrics=False))

    _until_done(fed, agents)

    models = fed.client.get("/v1/studies/s1/models", headers=fed.auth(fed.admin)).json()
    final = models[-1]
    # Every site trained each version; the intercept step may leave a site out (its
    # noisy sums decide), and says so.
    assert all(m["participants"] == SITES for m in models[1:-1])
    step = fed.status()["intercept_step"]
    assert final["participants"] == step["kept"]
    assert sorted(step["kept"] + step["left_out"]) == sorted(SITES)
    for site in SITES[:2]:
        metrics = final["metrics"][site]
        assert set(metrics) >= PRIVATE_KEYS, metrics
        assert 0.0 <= metrics["auc"] <= 1.0
        assert metrics["auc_ci_low"] <= metrics["auc_ci_high"]
        assert 0 < metrics["epsilon_spent"] <= 2.0 and 0 < metrics["epsilon_delta"] <= 1e-5
    assert final["metrics"]["community_01"] == {}
    from cardiofed.serving import registry

    with session_factory(fed.settings.database_url)() as db:
        card = registry.card(db, "s1-v4")  # version 3, its intercept stepped
    assert set(card["metrics"]) == set(SITES[:2])  # a site that declines is left out
    for site in SITES[:2]:
        assert set(card["metrics"][site]) >= PRIVATE_KEYS
        assert not any(k.startswith("epsilon") for k in card["metrics"][site])
        assert card["privacy"][site]["epsilon_spent"] == final["metrics"][site]["epsilon_spent"]
    for agent, site in zip(agents, SITES, strict=True):
        entries = _ledger(agent)
        kinds = [e["kind"] for e in entries]
        assert kinds == ["statistics", "train", "train", "train", "train"] + (
            ["evaluate"] if site != "community_01" else [])
        assert entries[4]["what"] == "intercept step release"
        assert {e["study"] for e in entries} == {"s1"}
        assert entries[-1]["epsilon_after"] <= 1.0 + 1e-9  # study_epsilon, by default 1
        # The ledger lives in ledger_dir, its seal beside it; nothing in the node's state.
        assert (fed.tmp / "ledgers" / f"{site}.seal").is_file()
        assert not list(agent.state_dir.glob("*ledger*"))
    # Training updates declare the noisy count and no training loss.
    from cardiofed.wire import decode_arrays

    _, manifest = decode_arrays((agents[0].state_dir / "outbox" / "s1-round1.bin").read_bytes())
    assert "train_loss" not in manifest and "global_loss" not in manifest
    released_n = _ledger(agents[0])[0]["released_n"]
    assert int(manifest["num_samples"]) == max(1, round(released_n))


def test_a_private_study_ends_training_with_the_intercept_step(fed: Federation) -> None:
    # After the last training round each private site releases its intercept sums; the
    # coordinator steps version 3's output bias, and nothing else, into version 4, the
    # model the sites evaluate; the status and the round's outcome say by how much.
    from cardiofed.cli.admin import status_view
    from cardiofed.coordinator.models import load_model
    from cardiofed.store import Study

    agents = [_private_agent(fed, s) for s in SITES]
    _until_done(fed, agents)

    status = fed.status()
    step = status["intercept_step"]
    assert step["round"] == 4 and sorted(step["kept"] + step["left_out"]) == sorted(SITES)
    assert set(step["z"]) == set(SITES) and abs(step["step"]) <= 1.0
    with session_factory(fed.settings.database_url)() as db:
        study = db.get(Study, "s1")
        assert study is not None and study.model_version == 4
        trained, stepped = load_model(db, study, 3), load_model(db, study, 4)
    bias = "linear.bias"
    assert all(np.array_equal(trained[k], stepped[k]) for k in trained if k != bias)
    assert float(stepped[bias][0] - trained[bias][0]) == pytest.approx(step["step"], abs=1e-6)
    final = fed.client.get("/v1/studies/s1/models", headers=fed.auth(fed.admin)).json()[-1]
    assert final["version"] == 4 and set(final["metrics"]) == set(SITES)
    for agent in agents:
        entries = _ledger(agent)
        assert [e["what"] for e in entries][-2:] == ["intercept step release",
                                                     "evaluation release"]
        assert entries[-1]["epsilon_after"] <= 1.0 + 1e-9
    assert f"{step['step']:+.3f} (log-odds, round 4)" in " ".join(
        _rendered(status_view(status)).split())
    ui = TestClient(fed.app)
    ui.post("/ui/login", data={"credential": fed.admin}, follow_redirects=False)
    page = ui.get("/ui/studies/s1").text
    assert f'<dd id="intercept-step">{step["step"]:+.3f} on the log-odds scale (round 4), ' \
           f'from {len(step["kept"])} sites' in page


def _rendered(view: object) -> str:
    from rich.console import Console

    console = Console(width=80, record=True, file=io.StringIO())
    console.print(view)
    return console.export_text()


def _second_study(fed: Federation, study: str = "s2") -> dict[str, str]:
    names, ranges = study_columns("synthetic")
    r = fed.client.post("/v1/studies", headers=fed.auth(fed.admin), json={
        "id": study, "plan": PLAN, "sites": SITES[:1], "feature_names": names,
        "feature_ranges": ranges})
    assert r.status_code == 201, r.text
    return r.json()["enrolment_tokens"]


def test_a_private_nodes_ledger_outlives_its_state_dir(tmp_path: Path) -> None:
    # The operator wipes the node's state between studies: the hospital's one ledger is
    # found again and the second study composes on top of the first.
    fed = Federation(tmp_path, plan=PLAN)
    site = SITES[0]
    agents = [_private_agent(fed, site), *[fed.agent(s) for s in SITES[1:]]]
    _until_done(fed, agents)
    first = _ledger(agents[0])
    spent_first = first[-1]["epsilon_after"]

    shutil.rmtree(agents[0].state_dir)
    tokens = _second_study(fed)
    config = NodeConfig.create(
        coordinator_url="http://testserver", state_dir=str(tmp_path / site),
        enrolment_token=tokens[site], poll_wait_s=0,
        data={"dataset": "synthetic", "site": site, "seed": 0},
        privacy={"epsilon_max": 2.0, "ledger_dir": str(tmp_path / "ledgers" / site)})
    node = NodeAgent(config, client=fed.client)
    node.run(max_tasks=6)

    entries = _ledger(node)
    assert [e["study"] for e in entries] == ["s1"] * 6 + ["s2"] * 6
    assert spent_first < entries[6]["epsilon_after"]  # it keeps composing
    assert entries[-1]["epsilon_after"] <= 2.0


@pytest.mark.parametrize("loss", ["ledger_dir deleted", "ledger_dir moved", "seal deleted",
                                  "config points elsewhere"])
def test_a_lost_ledger_stops_the_node_until_a_deliberate_reset(
        fed: Federation, caplog: pytest.LogCaptureFixture, loss: str) -> None:
    from typer.testing import CliRunner

    from cardiofed.cli import app
    from cardiofed.exceptions import PrivacyLedgerError

    agents = [_private_agent(fed, SITES[0]), *[fed.agent(s) for s in SITES[1:]]]
    fed.step(agents)  # statistics, charged to the ledger
    ledger_dir, seal = agents[0].config.ledger_location()
    settings: dict[str, object] = {"epsilon_max": 2.0, "ledger_dir": str(ledger_dir)}
    if loss == "ledger_dir deleted":
        shutil.rmtree(ledger_dir)
    elif loss == "ledger_dir moved":
        ledger_dir.rename(ledger_dir.with_name("elsewhere"))
    elif loss == "seal deleted":
        seal.unlink()
    else:
        settings["ledger_dir"] = str(fed.tmp / "ledgers" / "new")
        settings["seal_file"] = str(seal)

    with pytest.raises(PrivacyLedgerError, match="cardiofed node reset-ledger"):
        fed.agent(SITES[0], privacy=settings)

    config = fed.tmp / "node.toml"
    config.write_text(f'coordinator_url = "http://testserver"\nstate_dir = "{SITES[0]}"\n'
                      f'[data]\ndataset = "synthetic"\nsite = "{SITES[0]}"\n[privacy]\n'
                      + "".join(f'{k} = {json.dumps(v)}\n' for k, v in settings.items()))
    with caplog.at_level("WARNING", logger="cardiofed.privacy"):
        result = CliRunner().invoke(app, ["node", "reset-ledger", "--config", str(config),
                                          "--reason", "restored server, nothing released"])
    assert result.exit_code == 0, result.output
    assert any("RESET deliberately" in r.getMessage() for r in caplog.records)
    reset = fed.agent(SITES[0], privacy=settings)
    assert reset.ledger is not None and reset.ledger.entries == []
    assert reset.ledger.file is not None
    assert reset.ledger.file.header["reset"]["reason"] == "restored server, nothing released"


def test_a_study_stops_once_converged_as_the_simulator_does(tmp_path: Path) -> None:
    """The plan's rounds are a maximum: the coordinator stops on the sites' reported
    loss at the round the simulator stops at, with the same model."""
    plan = {**PLAN, "rounds": 60, "stop_patience": 2, "stop_tolerance": 0.01}
    fed = Federation(tmp_path, plan=plan)
    _until_done(fed, [fed.agent(s) for s in SITES])
    sim = _simulated(plan)
    stopped = sim.federated.stopped_at
    assert stopped is not None and stopped < 60
    from cardiofed.serving import registry
    from cardiofed.store import Round

    with session_factory(fed.settings.database_url)() as db:
        served = registry.load(db, f"s1-v{stopped}")
        rounds = db.scalars(select(Round).where(Round.kind == "train")
                            .order_by(Round.number)).all()
        assert [r.number for r in rounds] == list(range(1, stopped + 1))
        assert all(r.loss is not None and r.loss > 0 for r in rounds)
        assert rounds[-1].outcome is not None and rounds[-1].outcome.startswith("converged")
        assert registry.card(db, f"s1-v{stopped}")["metrics"]  # evaluated, then done
    for name, value in served.weights.items():
        np.testing.assert_array_equal(value, sim.federated.weights[name])

