"""Abuse of the coordinator by one site or an outsider: each answered with a 4xx, the
study goes on."""

from __future__ import annotations

import threading
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session
from test_coordinator import SITES, Federation  # type: ignore[import-not-found]

from cardiofed.coordinator import administration, enrolment, models, studies, uploads
from cardiofed.data.catalog import study_columns
from cardiofed.exceptions import AuthenticationError
from cardiofed.store import Site, session_factory


@pytest.fixture
def fed(tmp_path: Path) -> Federation:
    return Federation(tmp_path)


def test_concurrent_enrolments_with_one_token_have_exactly_one_winner(fed: Federation) -> None:
    token, results = fed.tokens[SITES[0]], []

    def enrol() -> None:
        with session_factory(fed.settings.database_url)() as db:
            try:
                results.append(enrolment.enrol(db, token)[1])
            except AuthenticationError:
                results.append(None)

    threads = [threading.Thread(target=enrol) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert sum(r is not None for r in results) == 1


@pytest.mark.parametrize("wait", ["nan", "inf", "-1", "1e300"])
def test_a_long_poll_wait_must_be_finite_and_bounded(fed: Federation, wait: str) -> None:
    credential = fed.agent(SITES[0]).credential()

    r = fed.client.get(f"/v1/tasks/next?wait={wait}", headers=fed.auth(credential))

    assert r.status_code == 422


@pytest.mark.parametrize("path", ["/v1/studies/s1/rounds/9223372036854775808/updates",
                                  "/v1/studies/s1/rounds/-1/updates"])
def test_path_numbers_out_of_range_are_refused(fed: Federation, path: str) -> None:
    credential = fed.agent(SITES[0]).credential()

    assert fed.client.post(path, content=b"x", headers=fed.auth(credential)).status_code == 422


def _create(fed: Federation, **changes: object) -> tuple[int, str]:
    names, ranges = study_columns("synthetic")
    body = {"id": "s2", "plan": {"rounds": 2}, "sites": ["a", "b"], "feature_names": names,
            "feature_ranges": ranges, **changes}
    r = fed.client.post("/v1/studies", headers={**fed.auth(fed.admin),
                                                "Content-Type": "application/json"},
                        content=__import__("json").dumps(body).encode())
    return r.status_code, r.text


@pytest.mark.parametrize("timeout", [float("nan"), 1e300, 0.0, -5.0])
def test_round_timeout_must_be_finite_and_bounded(fed: Federation, timeout: float) -> None:
    assert _create(fed, round_timeout_s=timeout)[0] == 422


def test_feature_names_outside_the_schema_are_refused(fed: Federation) -> None:
    status, text = _create(fed, feature_names=["foo", "bar"], feature_ranges=[[0, 1], [0, 1]])

    assert status == 422
    assert "feature_names must be the encoded columns of built-in or declared features" in text


def test_feature_ranges_must_be_finite_and_ordered(fed: Federation) -> None:
    names, ranges = study_columns("synthetic")
    bad = [list(r) for r in ranges]
    bad[0] = [110, 18]

    status, text = _create(fed, feature_ranges=bad)

    assert status == 422 and "feature_ranges must be finite with low < high" in text


def test_a_task_deadline_carries_its_timezone(fed: Federation) -> None:
    credential = fed.agent(SITES[0]).credential()

    task = fed.client.get("/v1/tasks/next", headers=fed.auth(credential)).json()

    assert datetime.fromisoformat(task["deadline"]).utcoffset() is not None


def test_networked_studies_aggregate_robustly_by_default(fed: Federation) -> None:
    r = fed.client.get("/v1/studies/s1/status", headers=fed.auth(fed.admin))
    with session_factory(fed.settings.database_url)() as db:
        plan = studies.study_plan(studies.get_study(db, "s1"))

    assert r.json()["robust_aggregation"] == []
    assert plan.robust_rule == studies.DEFAULT_NETWORK_RULE == "weighted-median"
    assert plan.robust_byzantine == 1  # of 3 sites; 2 from 5 sites on


def test_an_oversized_unauthenticated_body_is_refused_before_parsing(fed: Federation) -> None:
    body = b'{"token": "' + b"x" * (2 << 20) + b'"}'

    r = fed.client.post("/v1/enrol", content=body, headers={"Content-Type": "application/json"})

    assert r.status_code == 413
    assert r.json() == {"detail": "The request body exceeds this endpoint's limit of 65,536 "
                                  "bytes (64 KiB)."}


@pytest.mark.parametrize(("path", "limit"), [
    ("/v1/studies/s1/sites/tier3_01/revoke", "65,536 bytes (64 KiB)"),
    ("/v1/studies/s1/rounds/1/refusal", "65,536 bytes (64 KiB)"),
    ("/v1/studies/s1/relay/rounds", "65,536 bytes (64 KiB)"),
    ("/v1/studies", "4,194,304 bytes (4 MiB)"),
])
def test_only_the_upload_routes_take_large_bodies(fed: Federation, path: str,
                                                  limit: str) -> None:
    # Issue 29: every path under /v1/studies took 16 MiB, and FastAPI parses a JSON body
    # before the credential is checked: 4 such bodies took the coordinator to 2 GiB.
    body = b'{"reason": "' + b"x" * (5 << 20) + b'"}'

    r = fed.client.post(path, content=body, headers={"Content-Type": "application/json"})

    assert r.status_code == 413
    assert r.json() == {"detail": f"The request body exceeds this endpoint's limit of {limit}."}


def test_an_upload_route_checks_the_credential_before_it_reads_a_large_body(
        fed: Federation) -> None:
    r = fed.client.post("/v1/studies/s1/rounds/0/updates", content=b"\0" * (5 << 20))

    assert r.status_code == 401


def test_a_422_never_echoes_the_input(fed: Federation) -> None:
    r = fed.client.post("/v1/enrol", json={"token": ""})

    assert r.status_code == 422
    assert set(r.json()) == {"detail", "errors", "more_errors"}
    assert all(set(e) == {"field", "message"} for e in r.json()["errors"])


def test_a_stored_payload_that_no_longer_passes_is_quarantined_and_the_round_goes_on(
        tmp_path: Path) -> None:
    from cardiofed.store import Update

    fed = Federation(tmp_path, min_sites=2)
    agents = [fed.agent(s) for s in SITES]
    assert fed.step(agents[:2]) == 2  # two sites upload their statistics
    with session_factory(fed.settings.database_url)() as db:  # one payload corrupted at rest
        first = db.query(Update).order_by(Update.id).first()
        assert first is not None
        first.payload = b"not safetensors any more"
        db.commit()

    assert fed.step(agents[2:]) == 1  # the last report closes the round

    state = fed.status()
    assert (state["phase"], state["round"]) == ("train", 1)
    [quarantined] = state["quarantined"]  # type: ignore[misc]
    assert quarantined["site"] == SITES[0] and quarantined["round"] == 0
    assert quarantined["reason"].startswith("Payload header length")


def test_an_asynchronous_buffer_quarantines_a_payload_that_no_longer_passes(
        tmp_path: Path) -> None:
    from cardiofed.store import Round, Update

    fed = Federation(tmp_path, plan={"rounds": 2, "local_epochs": 1, "batch_size": 32,
                                     "lr": 0.05, "seed": 5, "aggregation": "async",
                                     "buffer_size": 3, "robust_byzantine": 0})
    agents = [fed.agent(s) for s in SITES]
    assert fed.step(agents) == 3  # statistics
    assert fed.step(agents[:2]) == 2  # two training updates wait in the buffer
    with session_factory(fed.settings.database_url)() as db:
        first = db.query(Update).join(Round, Update.round_id == Round.id).filter(
            Round.kind == "train").order_by(Update.id).first()
        assert first is not None
        first.payload = b"not safetensors any more"
        db.commit()

    assert fed.step(agents[2:]) == 1  # the buffer is full: a version is published

    state = fed.status()
    assert state["model_version"] == 1
    [quarantined] = state["quarantined"]  # type: ignore[misc]
    assert quarantined["site"] == SITES[0] and quarantined["round"] == 1
    assert quarantined["reason"].startswith("Payload header length")
    models = fed.client.get("/v1/studies/s1/models", headers=fed.auth(fed.admin)).json()
    assert models[1]["participants"] == SITES[1:]


@pytest.mark.parametrize("setting", [{"seed": int("9" * 400)}, {"seed": 2**64},
                                     {"lr": float("inf")}, {"batch_size": 10**30}])
def test_plan_numbers_out_of_range_are_a_422_not_a_500(fed: Federation,
                                                       setting: dict[str, object]) -> None:
    names, ranges = study_columns("synthetic")
    body = {"id": "s9", "plan": {"rounds": 2, **setting}, "sites": ["a"],
            "feature_names": names, "feature_ranges": ranges}
    content = __import__("json").dumps(body).replace("Infinity", "1e999").encode()

    r = fed.client.post("/v1/studies", content=content,
                        headers={**fed.auth(fed.admin), "Content-Type": "application/json"})

    assert r.status_code == 422, r.text


def test_a_refused_aggregate_keeps_the_previous_model_and_optimiser_state() -> None:
    import numpy as np

    from cardiofed.aggregation.server_optimizers import ServerState
    from cardiofed.store import Round, Study

    rnd = Round(number=3)
    before = ({"w": np.ones(2, np.float32)}, ServerState(step=2, m={"w": np.ones(2)}, v={}))
    poisoned = ({"w": np.array([np.inf, 0.0], np.float32)},
                ServerState(step=3, m={"w": np.full(2, 1e30)}, v={}))

    kept = models.plausible_model(rnd, Study(id="s1"), before, poisoned, [])

    assert kept is before
    assert rnd.aggregation == [{"refused": "aggregate refused: largest |weight| inf exceeds "
                                           "10000; the previous model is kept"}]


def test_concurrent_revocations_count_a_site_out_once(fed: Federation) -> None:
    # Issue 29: 20 concurrent revokes drove active_sites to -7.
    import threading

    from cardiofed.store import Study

    def revoke() -> None:
        with session_factory(fed.settings.database_url)() as db:
            administration.revoke_site(db, "s1", "tier3_01")

    threads = [threading.Thread(target=revoke) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)

    with session_factory(fed.settings.database_url)() as db:
        assert db.get(Study, "s1").active_sites == 2  # 3 sites, one revoked


def test_an_identical_retry_is_found_by_its_hash_before_any_check(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Issue 29: a retried payload was validated again on every retry (0.46 CPU-s for a
    # 16 KB evaluation payload).
    from test_coordinator import _statistics_payload  # type: ignore[import-not-found]

    fed = Federation(tmp_path)
    credential = fed.agent(SITES[0]).credential()
    body = _statistics_payload(fed, SITES[0])
    url = "/v1/studies/s1/rounds/0/updates"
    assert fed.client.post(url, content=body, headers=fed.auth(credential)).json()[
        "status"] == "accepted"

    def no_check(*args: object) -> None:
        raise AssertionError("validated again")

    monkeypatch.setattr(uploads, "check_report", no_check)
    # Small payloads validate faster than the look-up; this one stands for a large one.
    monkeypatch.setattr(uploads, "HASH_FIRST_BYTES", 0)
    again = fed.client.post(url, content=body, headers=fed.auth(credential))
    assert again.status_code == 200 and again.json()["status"] == "already accepted"


def test_a_site_holds_at_most_two_uploads_in_flight(tmp_path: Path) -> None:
    from cardiofed.coordinator.routers import updates

    fed = Federation(tmp_path)
    agent = fed.agent(SITES[0])
    credential = agent.credential()
    with session_factory(fed.settings.database_url)() as db:
        site_id = db.scalar(select(Site.id).where(
            Site.name == SITES[0]))
    updates._in_flight[site_id] = updates.MAX_UPLOADS_IN_FLIGHT
    try:
        r = fed.client.post("/v1/studies/s1/rounds/0/updates", content=b"x" * 100,
                            headers=fed.auth(credential))
    finally:
        del updates._in_flight[site_id]
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert "2 uploads in progress" in r.json()["detail"]
    assert fed.step([agent]) == 1  # once they finish, it uploads


def test_a_database_of_the_previous_release_gains_the_new_columns(tmp_path: Path) -> None:
    # studies.halted and admin_keys.revoked_at arrived with operator controls (issue 29).
    import sqlite3

    from sqlalchemy import inspect

    from cardiofed.store import make_engine
    from cardiofed.store.migrations import upgrade

    fed = Federation(tmp_path)
    path = tmp_path / "coord.db"
    with sqlite3.connect(path) as conn:  # as the tables were before, without migrations
        conn.execute("ALTER TABLE studies DROP COLUMN halted")
        conn.execute("ALTER TABLE admin_keys DROP COLUMN revoked_at")
        conn.execute("DROP TABLE alembic_version")
    engine = make_engine(f"sqlite:///{path}", check_schema=False)
    upgrade(engine)  # cardiofed db upgrade
    columns = {t: {c["name"] for c in inspect(engine).get_columns(t)}
               for t in ("studies", "admin_keys")}
    assert "halted" in columns["studies"] and "revoked_at" in columns["admin_keys"]
    engine.dispose()
    fed.restart()
    assert fed.status()["halted"] is None


def test_an_authenticated_request_holds_no_database_connection_when_its_endpoint_runs(
        fed: Federation) -> None:
    """A long poll waits for a worker thread after its credential check: holding the
    connection of that check meanwhile, 100 secure sites' polls took the pool from the
    thread holding the study's lock, and every request stalled until a pool timeout.
    The check ends its transaction whether or not it wrote ``last_seen``."""
    from cardiofed.coordinator.deps import current_site

    credential = fed.agent(SITES[0]).credential()
    with session_factory(fed.settings.database_url)() as db:
        for _ in range(2):  # the first records the contact; the second has nothing to write
            site = current_site(db, credential, fed.clock)
            assert not db.in_transaction()
            assert db.get_bind().pool.checkedout() == 0  # type: ignore[attr-defined]
        assert site.name == SITES[0] and site.study_id == "s1"  # still loaded, no query


def test_no_request_holds_a_pooled_connection_while_it_queues_for_a_thread(
        fed: Federation) -> None:
    """200 secure sites stalled every request until a pool timeout: finished endpoints'
    sessions kept their read transactions while FastAPI queued the response (and the
    session's close) for a worker thread, which were all waiting for a connection. Every
    sync endpoint now commits a read before it returns, and the close runs on the loop."""
    import inspect

    from fastapi.routing import APIRoute

    from cardiofed.coordinator.deps import ReleasingRoute, _releasing, get_db

    assert inspect.isasyncgenfunction(get_db)
    routes, routers = [], [fed.app.router]
    while routers:  # included routers keep their own routes
        for route in routers.pop().routes:
            routes.append(route)
            routers += [route.original_router] if hasattr(route, "original_router") else []
    api = [r for r in routes if isinstance(r, APIRoute)]
    assert len(api) > 30 and all(isinstance(r, ReleasingRoute) for r in api), [
        r.path for r in api if not isinstance(r, ReleasingRoute)]

    def read(db: Session) -> str:
        return db.scalar(select(Site.name).where(Site.name == SITES[0])) or ""

    def write(db: Session) -> None:
        db.scalar(select(Site).where(Site.name == SITES[0])).revoked = True

    with session_factory(fed.settings.database_url)() as db:
        assert _releasing(read)(db=db) == SITES[0]
        assert not db.in_transaction()  # the read's connection is back in the pool
        _releasing(write)(db=db)  # a pending write is the endpoint's to commit or not
        assert db.in_transaction() and db.dirty
        db.rollback()
