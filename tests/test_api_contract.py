"""Both services against their own OpenAPI documents, with schemathesis and every check on.

Each operation of the coordinator and of the risk API gets generated requests, valid and
invalid (the examples, coverage and fuzzing phases), sent in-process to an application
over a real database in a temporary folder. Every answer must have a declared status and
the declared content type, headers and body, no answer may be a 5xx, a valid request must
not be refused for its form nor an invalid one accepted, and the checks that send further
requests (without credentials, with invalid ones, with other methods) run too.

Requests carry valid credentials (the admin key, a site's credential for the sites'
operations, an API key with every scope), through a schemathesis auth provider rather
than fixed headers: that way the negative cases that leave the credential out really
leave it out, and must be answered 401.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from schemathesis.checks import CHECKS, load_all_checks
from test_coordinator import SITES, Federation  # type: ignore[import-not-found]

from cardiofed.coordinator.app import create_app
from cardiofed.data.synthetic import synthetic_federation
from cardiofed.serving import provenance, registry
from cardiofed.serving.app import create_serving_app
from cardiofed.serving.keys import SCOPES, create_key
from cardiofed.serving.settings import ServingSettings
from cardiofed.simulation.config import SimulationConfig
from cardiofed.simulation.experiment import run_experiment
from cardiofed.store import session_factory

load_all_checks()
# Every check schemathesis has (max_response_time needs a limit: timing is no contract).
ALL_CHECKS = {check.__name__: check for check in CHECKS.get_all()}
assert {"not_a_server_error", "status_code_conformance", "content_type_conformance",
        "response_headers_conformance", "response_schema_conformance",
        "negative_data_rejection", "positive_data_acceptance", "missing_required_header",
        "ignored_auth", "unsupported_method", "allow_header_conformance"} <= set(ALL_CHECKS)

MAX_BATCH = 5
FAST = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


def _config(**existing: list[object]) -> schemathesis.Config:
    """A fixed seed, and each path parameter in `existing` drawn half the time from the
    objects that exist (else generated: mostly objects that do not exist)."""
    return schemathesis.Config.from_dict({
        "seed": 20260101,
        "dictionaries": {name: {"values": values} for name, values in existing.items()},
        "parameters": {f"path.{name}": {"dictionary": name, "probability": 0.5}
                       for name in existing}})


def _checks(label: str, excluded: dict[str, set[str]]) -> list[Any]:
    """Every check except those `excluded` for the operation `label`."""
    return [check for name, check in ALL_CHECKS.items() if name not in excluded.get(label, ())]


# The documents are read from applications built for that alone; the requests go to the
# fixtures' applications (the same settings, real databases), whose documents are checked
# to be the same. Credentials too come from the fixtures.
COORDINATOR = schemathesis.openapi.from_asgi(
    "/openapi.json", create_app(),
    config=_config(study_id=["s1"], round_number=[0, 1], version=[0], site_name=[SITES[2]]))
RISK = schemathesis.openapi.from_asgi(
    "/openapi.json", create_serving_app(ServingSettings(database_url="sqlite://",
                                                        max_batch=MAX_BATCH)),
    config=_config(version=["demo-v1"]))
CREDENTIALS: dict[str, str] = {}  # "admin", "site", "api": filled by the fixtures
SITE_OPERATIONS = {"GET /v1/me", "GET /v1/tasks/next",
                   "POST /v1/studies/{study_id}/rounds/{round_number}/updates",
                   "POST /v1/studies/{study_id}/rounds/{round_number}/refusal"}


class _Bearer:
    """Schemathesis sets it on each case unless the case leaves the credential out. Cases
    are built at collection, before the fixtures make the credentials: the case names one
    (``Bearer admin``) and :func:`_credential` puts it in just before the request."""

    def get(self, case: schemathesis.Case, ctx: schemathesis.AuthContext) -> str | None:
        return self.kind(case)

    def set(self, case: schemathesis.Case, data: str, ctx: schemathesis.AuthContext) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}

    def kind(self, case: schemathesis.Case) -> str:
        raise NotImplementedError


@COORDINATOR.auth(refresh_interval=None)
class CoordinatorCredential(_Bearer):
    """The site's credential for the sites' operations, else the admin key."""

    def kind(self, case: schemathesis.Case) -> str:
        return "site" if case.operation.label in SITE_OPERATIONS else "admin"


@RISK.auth(refresh_interval=None)
class ApiKey(_Bearer):
    def kind(self, case: schemathesis.Case) -> str:
        return "api"


def _credential(case: schemathesis.Case) -> None:
    """The named credential in place of its name, if the case carries one."""
    name = (case.headers or {}).get("Authorization", "").removeprefix("Bearer ")
    if name in CREDENTIALS:
        case.headers = {**case.headers, "Authorization": f"Bearer {CREDENTIALS[name]}"}


# ---------------------------------------------------------------- the coordinator

@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    """Study s1 past its statistics round (the preprocessor exists, round 1 trains); its
    first site enrolled."""
    fed = Federation(tmp_path_factory.mktemp("coordinator"))
    agents = [fed.agent(s) for s in SITES]
    fed.step(agents)
    CREDENTIALS.update(admin=fed.admin, site=agents[0].credential())
    assert fed.app.openapi() == COORDINATOR.raw_schema
    return fed.app


# positive_data_acceptance expects every request the schema allows to be accepted; these
# operations refuse some for reasons between fields or against stored data, which JSON
# Schema cannot state (each refusal is a documented 422).
COORDINATOR_EXCLUDED: dict[str, set[str]] = {
    # feature_names must be the encoded columns of canonical features, in their order,
    # with one (low, high) range each; the plan must be a valid simulation plan.
    "POST /v1/studies": {"positive_data_acceptance"},
    # The body is safetensors (or JSON metrics) whose tensors, manifest and sizes must fit
    # the study's model and round: bytes to JSON Schema.
    "POST /v1/studies/{study_id}/rounds/{round_number}/updates": {"positive_data_acceptance"},
    # A relay study's preprocessor and models are safetensors of its model's tensors.
    "PUT /v1/studies/{study_id}/relay/preprocessor": {"positive_data_acceptance"},
    "PUT /v1/studies/{study_id}/relay/models/{version}": {"positive_data_acceptance"},
}


@COORDINATOR.parametrize()
@FAST
def test_coordinator_matches_its_openapi(case: schemathesis.Case, coordinator: FastAPI) -> None:
    _credential(case)
    case.call_and_validate(app=coordinator,
                           checks=_checks(case.operation.label, COORDINATOR_EXCLUDED))


# ---------------------------------------------------------------- the risk API

@pytest.fixture(scope="module")
def risk_api(tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    """demo-v1 registered and promoted; a key with every scope."""
    data = synthetic_federation(n_sites=3, seed=1, size_scale=0.2)
    result = run_experiment(data, SimulationConfig.create(rounds=1, eval_every=0),
                            baselines=False)
    model = provenance.from_experiment(result, study="demo", feature_names=data.feature_names,
                                       outcome=data.outcome)
    url = f"sqlite:///{tmp_path_factory.mktemp('risk')}/serving.db"
    with session_factory(url)() as db:
        registry.register(db, model, promote=True)
        CREDENTIALS["api"] = create_key(db, "everything", list(SCOPES), 1_000_000)
    app = create_serving_app(ServingSettings(database_url=url, max_batch=MAX_BATCH,
                                             key_cache_s=0, promoted_cache_s=0))
    assert app.openapi() == RISK.raw_schema
    return app


RISK_EXCLUDED: dict[str, set[str]] = {
    # A patient's features and units must be the inputs of the model that scores it (its
    # card lists them, each with its range and units), and the model is chosen per request.
    "POST /v1/risk": {"positive_data_acceptance"},
    "POST /v1/risk/batch": {"positive_data_acceptance"},
}


@RISK.parametrize()
@FAST
def test_risk_api_matches_its_openapi(case: schemathesis.Case, risk_api: FastAPI) -> None:
    _credential(case)
    case.call_and_validate(app=risk_api, checks=_checks(case.operation.label, RISK_EXCLUDED))


# ---------------------------------------------------------------- what schemathesis found

@pytest.mark.parametrize("spec", [COORDINATOR.raw_schema, RISK.raw_schema],
                         ids=["coordinator", "risk"])
def test_both_services_document_refusals_alike(spec: dict[str, Any]) -> None:
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            assert "413" in operation["responses"], (method, path)
            for status, response in operation["responses"].items():
                if status.startswith("4"):
                    body = response["content"]["application/json"]["schema"]["$ref"]
                    assert body.rsplit("/", 1)[1] == (
                        "ValidationErrorBody" if status == "422" else "ErrorBody"), status


def _post(app: FastAPI, path: str, credential: str, **kwargs: Any) -> Any:
    from fastapi.testclient import TestClient

    return TestClient(app).post(path, headers={"Authorization": f"Bearer {credential}",
                                               "Content-Type": "application/json"}, **kwargs)


def test_a_body_that_is_not_utf8_is_a_documented_422(coordinator: FastAPI,
                                                     risk_api: FastAPI) -> None:
    for app, path, key in [(coordinator, "/v1/enrol", "admin"), (risk_api, "/v1/risk", "api")]:
        r = _post(app, path, CREDENTIALS[key], content=b'{"token": "\xff\xfe"}')
        assert r.status_code == 422, r.text  # FastAPI's own answer was an undocumented 400
        assert r.json()["errors"] == [{"field": "body",
                                       "message": "is not valid JSON (not UTF-8 text)"}]


def test_a_coordinator_422_has_the_documented_body(coordinator: FastAPI) -> None:
    r = _post(coordinator, "/v1/studies", CREDENTIALS["admin"], json={
        "id": "s9", "plan": {}, "sites": ["a"], "feature_names": ["age"],
        "feature_ranges": []})
    assert r.status_code == 422
    assert r.json() == {"detail": "feature_ranges needs one (low, high) per feature name.",
                        "errors": [], "more_errors": 0}


@pytest.mark.parametrize(("app", "path", "key", "body"), [
    ("risk", "/v1/risk", "api", {"features": {"age": 61}, "contributions": 0}),
    ("coordinator", "/v1/studies", "admin", {"id": "s9", "plan": {}, "sites": ["a"],
                                             "feature_names": ["age"],
                                             "feature_ranges": [[0, 1]],
                                             "round_timeout_s": "3600"}),
    ("coordinator", "/v1/studies", "admin", {"id": "s9", "plan": {}, "sites": ["a"],
                                             "feature_names": ["age"],
                                             "feature_ranges": [[0, 1]], "min_sites": True}),
])
def test_values_of_another_type_are_refused_not_converted(
        request: pytest.FixtureRequest, app: str, path: str, key: str,
        body: dict[str, Any]) -> None:
    fixture = request.getfixturevalue("risk_api" if app == "risk" else "coordinator")
    r = _post(fixture, path, CREDENTIALS[key], json=body)
    assert r.status_code == 422
    assert len(r.json()["errors"]) == 1


def test_coordinator_timestamps_carry_their_offset(tmp_path: Path) -> None:
    fed = Federation(tmp_path)
    site = fed.auth(fed.agent(SITES[0]).credential())
    task = fed.client.get("/v1/tasks/next", headers=site).json()
    models = fed.client.get("/v1/studies/s1/models", headers=site).json()
    for stamp in (task["deadline"], models[0]["created_at"]):
        assert datetime.fromisoformat(stamp).utcoffset() == timedelta(0), stamp
