"""``POST /v1/risk`` answered by its lean handler gives what FastAPI's own handler of the
same declared route gives: status and body, for any body, content type and credentials
(hypothesis), valid or not."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from cardiofed.data.synthetic import synthetic_federation
from cardiofed.serving import api, provenance, registry
from cardiofed.serving.api import LeanRiskRoute
from cardiofed.serving.app import create_serving_app
from cardiofed.serving.keys import create_key
from cardiofed.serving.schemas import RiskRequest
from cardiofed.serving.settings import ServingSettings
from cardiofed.simulation.config import SimulationConfig
from cardiofed.simulation.experiment import run_experiment
from cardiofed.store import session_factory

PATIENT: dict[str, Any] = {
    "age": 67.25, "sex": "male", "total_cholesterol": 213.0, "hdl_cholesterol": 47.0,
    "systolic_bp": 143.5, "bp_treated": True, "current_smoker": False, "diabetes": False}


def _reference(settings: ServingSettings) -> FastAPI:
    """The service with ``/v1/risk`` handled by FastAPI itself (dependencies, body model)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(api, "LeanRiskRoute", APIRoute)
        return create_serving_app(settings)


def _routes(routes: list[Any]) -> list[Any]:
    """Every route, those of included routers too."""
    out = []
    for route in routes:
        included = getattr(route, "original_router", None)
        out += _routes(included.routes) if included is not None else [route]
    return out


class Pair:
    def __init__(self, tmp: Path) -> None:
        data = synthetic_federation(n_sites=3, seed=1, size_scale=0.2)
        result = run_experiment(data, SimulationConfig.create(rounds=2, eval_every=0,
                                                              recalibrate=True),
                                baselines=False)
        model = provenance.from_experiment(result, study="demo",
                                           feature_names=data.feature_names,
                                           outcome=data.outcome)
        url = f"sqlite:///{tmp}/lean.db"
        with session_factory(url)() as db:
            self.version = registry.register(db, model, promote=True)
            self.key = create_key(db, "partner", ["score"], 10**9)
            self.reader = create_key(db, "reader", ["models:read"], 10**9)
        settings = ServingSettings(database_url=url)
        self.lean = TestClient(create_serving_app(settings))
        self.reference = TestClient(_reference(settings))

    def both(self, content: bytes, headers: dict[str, str]) -> tuple[Any, Any]:
        return tuple(client.post("/v1/risk", content=content, headers=headers)
                     for client in (self.lean, self.reference))


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    return Pair(tmp_path_factory.mktemp("lean"))


def _same(lean: Any, reference: Any) -> None:
    assert lean.status_code == reference.status_code, (lean.text, reference.text)
    assert lean.content == reference.content
    for header in ("content-type", "retry-after", "x-content-type-options"):
        assert lean.headers.get(header) == reference.headers.get(header), header


def test_the_risk_route_is_the_lean_one_and_documented_as_before(pair: Pair) -> None:
    for client, kind in ((pair.lean, LeanRiskRoute), (pair.reference, APIRoute)):
        routes = [r for r in _routes(client.app.router.routes)  # type: ignore[attr-defined]
                  if getattr(r, "path", "") == "/v1/risk"]
        assert len(routes) == 1 and type(routes[0]) is kind
    # The service answers the route ahead of FastAPI's router; the reference does not.
    assert [m.cls for m in pair.lean.app.user_middleware].count(  # type: ignore[attr-defined]
        api.RiskFastPath) == 1
    assert api.RiskFastPath not in [m.cls for m in pair.reference.app.user_middleware]  # type: ignore[attr-defined]
    lean = pair.lean.get("/openapi.json").json()["paths"]["/v1/risk"]
    reference = pair.reference.get("/openapi.json").json()["paths"]["/v1/risk"]
    assert lean == reference
    assert lean["post"]["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/RiskRequest"}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats()
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
feature_values = st.sampled_from(list(PATIENT.values())) | json_values
features = st.dictionaries(st.sampled_from([*PATIENT, "weight", ""]), feature_values,
                           max_size=10)
bodies = st.fixed_dictionaries({}, optional={
    "features": features | json_values,
    "units": st.dictionaries(st.sampled_from(["total_cholesterol", "age", "x"]),
                             st.sampled_from(["mmol/L", "mg/dL", "kg"]) | json_values,
                             max_size=3),
    "impute_missing": st.booleans() | json_values,
    "contributions": st.booleans() | json_values,
    "site": st.sampled_from(["community_01", "tier3_01", "../x", ""]) | json_values,
    "model": st.sampled_from(["demo-v1", "demo-v9"]) | json_values,
    "extra": json_values})
contents = (bodies.map(lambda b: json.dumps(b).encode())
            | json_values.map(lambda v: json.dumps(v).encode())
            | st.binary(max_size=40)
            | st.sampled_from([b"", b"{", b'{"features": {"age": NaN}}', b"\xff\xfe{}",
                               b'{"features": 1e999}', "{\"features\": {\"age\": \"\u00e9\"}}"
                               .encode("utf-16")]))
content_types = st.sampled_from([None, "application/json", "application/json; charset=utf-8",
                                 "Application/JSON", "application/problem+json", "text/plain",
                                 "application/x-www-form-urlencoded", "", "json"])


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(content=b"null", content_type="application/json", credentials="key")  # a body
@given(content=contents, content_type=content_types,
       credentials=st.sampled_from(["key", "reader", "none", "basic", "unknown", "spaced",
                                    "lower"]))
def test_lean_and_reference_answer_alike(pair: Pair, content: bytes, content_type: str | None,
                                         credentials: str) -> None:
    headers = {"Authorization": {
        "key": f"Bearer {pair.key}", "reader": f"Bearer {pair.reader}", "none": "",
        "basic": f"Basic {pair.key}", "unknown": "Bearer cfk_nope",
        "spaced": f"Bearer   {pair.key}  ", "lower": f"bearer {pair.key}"}[credentials]}
    if content_type is not None:
        headers["Content-Type"] = content_type
    _same(*pair.both(content, headers))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(patient=st.fixed_dictionaries({**{k: st.just(v) for k, v in PATIENT.items()},
                                      "age": st.floats(0, 130) | st.integers(0, 130)}),
       drop=st.sets(st.sampled_from(list(PATIENT)), max_size=3),
       impute=st.booleans(), contributions=st.booleans(),
       site=st.sampled_from([None, "community_01", "tier3_01", "nowhere"]))
def test_valid_patients_score_alike(pair: Pair, patient: dict[str, Any], drop: set[str],
                                    impute: bool, contributions: bool, site: str | None
                                    ) -> None:
    body: dict[str, Any] = {"features": {k: v for k, v in patient.items() if k not in drop},
                            "impute_missing": impute, "contributions": contributions}
    if site is not None:
        body["site"] = site
    _same(*pair.both(json.dumps(body).encode(), {"Authorization": f"Bearer {pair.key}",
                                                 "Content-Type": "application/json"}))


def test_an_error_without_a_handler_is_the_same_500(pair: Pair,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path hands an exception no handler answers on to the server-error
    middleware, as FastAPI's router does: the same 500, never the error's text."""
    def broken(*_: Any) -> Any:
        raise RuntimeError("scoring failed")

    monkeypatch.setattr(api, "_risk", broken)
    lean, reference = (TestClient(client.app, raise_server_exceptions=False).post(
        "/v1/risk", json={"features": PATIENT}, headers={"Authorization": f"Bearer {pair.key}"})
        for client in (pair.lean, pair.reference))
    assert lean.status_code == 500 and "scoring failed" not in lean.text
    _same(lean, reference)


def test_opentelemetry_is_off_unless_the_settings_turn_it_on(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/otel.db"
    off = create_serving_app(ServingSettings(database_url=url))
    on = create_serving_app(ServingSettings(database_url=url, opentelemetry=True))
    assert not any(off._telemetry[k] for k in ("tracing", "metrics", "logs"))
    assert all(on._telemetry[k] for k in ("tracing", "metrics", "logs"))


@settings(max_examples=300, deadline=None)
@example(content=b'{"features": {"age": 1}, "features": {"age": 2}}')
@example(content=b'{"features": {"age": NaN, "sex": "\\ud800"}}')
@example(content=b'\xef\xbb\xbf{"features": {"age": 1}}')
@example(content=b'{"features": {"age": 1e999, "a\\u0000": 123456789012345678901234567890}}')
@given(content=contents)
def test_what_is_validated_straight_from_json_is_what_fastapi_validates(content: bytes
                                                                        ) -> None:
    """The lean handler validates a plain-JSON body in one pass and hands anything that
    pass refuses to FastAPI's steps (parse, then validate): so whatever the one pass
    accepts, the two steps accept too, with the same values."""
    try:
        direct = RiskRequest.model_validate_json(content)
    except ValidationError:
        return
    stepwise = RiskRequest.model_validate(json.loads(content), from_attributes=True)
    assert repr(direct) == repr(stepwise)  # repr: NaN equals NaN
