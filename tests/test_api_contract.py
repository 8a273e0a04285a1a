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

import hashlib
import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from schemathesis.checks import CHECKS, load_all_checks
from test_coordinator import SITES, Federation  # type: ignore[import-not-found]

from cardiofed.coordinator.app import create_app
from cardiofed.coordinator.checks import expected_tensors
from cardiofed.coordinator.models import initial_weights
from cardiofed.coordinator.studies import TRAIN, round_of, study_plan
from cardiofed.data.catalog import study_columns
from cardiofed.data.preprocessing import bin_edges, merge_statistics, site_statistics
from cardiofed.data.synthetic import synthetic_federation
from cardiofed.exceptions import NotFound
from cardiofed.schema import CATALOGUE, FeatureKind
from cardiofed.serving import provenance, registry
from cardiofed.serving.app import create_serving_app
from cardiofed.serving.keys import SCOPES, create_key
from cardiofed.serving.settings import ServingSettings
from cardiofed.simulation.config import SimulationConfig
from cardiofed.simulation.experiment import run_experiment
from cardiofed.store import Study, session_factory
from cardiofed.wire import encode_arrays

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


# The documents are read from applications built for that alone; the requests go to the
# fixtures' applications (the same settings, real databases), whose documents are checked
# to be the same. Credentials too come from the fixtures.
COORDINATOR = schemathesis.openapi.from_asgi(
    "/openapi.json", create_app(),
    config=_config(study_id=["s1", "r1"], round_number=[0, 1], version=[0], site_name=[SITES[2]]))
RISK = schemathesis.openapi.from_asgi(
    "/openapi.json", create_serving_app(ServingSettings(database_url="sqlite://",
                                                        max_batch=MAX_BATCH)),
    config=_config(version=["demo-v1"]))
CREDENTIALS: dict[str, str] = {}  # "admin", "site", "api": filled by the fixtures
STORE: list[str] = []  # the coordinator fixture's database URL
SERVED_INPUTS: list[str] = []  # the risk API's promoted model's inputs: filled by its fixture
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
    first site enrolled. Relay study r1, waiting for its national study's preprocessor."""
    fed = Federation(tmp_path_factory.mktemp("coordinator"))
    agents = [fed.agent(s) for s in SITES]
    fed.step(agents)
    names, ranges = study_columns("synthetic")
    assert fed.client.post("/v1/studies", headers=fed.auth(fed.admin), json={
        "id": "r1", "plan": {}, "sites": SITES[:1], "feature_names": names,
        "feature_ranges": ranges, "relay": True}).status_code == 201
    CREDENTIALS.update(admin=fed.admin, site=agents[0].credential())
    STORE[:] = [fed.settings.database_url]
    assert fed.app.openapi() == COORDINATOR.raw_schema
    return fed.app


# positive_data_acceptance expects every request the schema allows to be accepted. Parts
# of six bodies are valid only against the catalogue or stored data, which JSON Schema
# cannot state: a study's columns and plan; an update, a relayed preprocessor or model
# (safetensors bytes) for the study's model and round; a patient's features for the model
# that scores it. Just before a positive case of those operations is sent, those parts are
# replaced by valid ones drawn from the case itself (so runs stay reproducible), and half
# the time its path names an object that exists; everything else stays as schemathesis
# generated it, and negative cases are left alone. The check then runs on every operation.
# (Without the replacement it fails on three of them: tried.)
def _rng(case: schemathesis.Case) -> np.random.Generator:
    digest = hashlib.sha256(json.dumps(case.body, sort_keys=True, default=str).encode())
    return np.random.default_rng(int.from_bytes(digest.digest()[:8], "big"))


def _positive(case: schemathesis.Case) -> bool:
    return case.meta is not None and case.meta.generation.mode.is_positive


UPDATES = "POST /v1/studies/{study_id}/rounds/{round_number}/updates"
RELAY_PAYLOADS = {"PUT /v1/studies/{study_id}/relay/preprocessor",
                  "PUT /v1/studies/{study_id}/relay/models/{version}"}
# Plans the network accepts for any number of sites (a plan is validated as a whole).
VALID_PLANS: list[dict[str, object]] = [{}, {"rounds": 2}, {"rounds": 3, "local_epochs": 2},
                                        {"robust_rule": "median"}, {"algorithm": "fedprox"}]


def _valid_study(case: schemathesis.Case) -> None:
    """A study body with a valid plan, columns and ranges, distinct sites, a min_sites among
    them and a known outcome (or none): the rest as generated."""
    rng, body = _rng(case), dict(case.body)
    features = [f for f in CATALOGUE.features if rng.random() < 0.4] or ["age"]
    body["feature_names"] = CATALOGUE.encoded_names(features)
    body["feature_ranges"] = [list(r) for r in CATALOGUE.ranges(body["feature_names"])]
    body["plan"] = VALID_PLANS[rng.integers(len(VALID_PLANS))]
    body["sites"] = list(dict.fromkeys(body["sites"]))
    if body.get("min_sites") is not None:
        body["min_sites"] = int(rng.integers(1, len(body["sites"]) + 1))
    if body.get("outcome") is not None:
        body["outcome"] = str(rng.choice(list(CATALOGUE.outcomes)))
    case.body = body


def _existing(case: schemathesis.Case, rng: np.random.Generator, **parameters: object) -> None:
    """Half the time, the path parameters of an object that exists (the generated ones
    mostly name none: a 404 is accepted, and leaves the valid body unsent)."""
    if rng.random() < 0.5:
        case.path_parameters = {**case.path_parameters, **parameters}


def _valid_relay_body(case: schemathesis.Case) -> None:
    """For a relay study that exists, a preprocessor of its columns or a model of its
    tensors (safetensors), with values drawn from the case; else the bytes as generated."""
    rng = _rng(case)
    _existing(case, rng, study_id="r1")
    with session_factory(STORE[0])() as db:
        study = db.get(Study, case.path_parameters["study_id"])
        if study is None:
            return
        plan, names = study_plan(study), list(study.feature_names)
        ranges = [tuple(r) for r in study.feature_ranges]
    if case.operation.label.endswith("/preprocessor"):
        low, high = np.array(ranges).T
        edges = bin_edges(ranges)
        x = rng.uniform(low, high, size=(int(rng.integers(2, 50)), len(names)))
        case.body = encode_arrays(merge_statistics(
            [site_statistics(x, edges)], edges, names, plan.model_form(names)).to_arrays())
    else:
        case.body = encode_arrays({k: rng.normal(size=v.shape).astype(v.dtype)
                                   for k, v in initial_weights(plan, names).items()})


def _valid_update(case: schemathesis.Case) -> None:
    """For a training round that exists, the enrolled site's update of the round's model
    (safetensors: its tensors, drawn from the case, and the manifest naming the study,
    round, model version and site); else the bytes as generated."""
    rng = _rng(case)
    _existing(case, rng, study_id="s1", round_number=1)
    number = case.path_parameters["round_number"]
    with session_factory(STORE[0])() as db:
        study = db.get(Study, case.path_parameters["study_id"])
        try:
            rnd = round_of(db, study, number) if study and isinstance(number, int) else None
        except NotFound:
            return
        if rnd is None or rnd.kind != TRAIN:
            return
        tensors = expected_tensors(db, study, rnd.model_version)
        manifest = {"study": study.id, "round": str(number),
                    "model_version": str(rnd.model_version), "site": SITES[0],
                    "num_samples": str(rng.integers(1, 10_000))}
    case.body = encode_arrays({k: (0.1 * rng.normal(size=shape)).astype(dtype)
                               for k, (shape, dtype) in tensors.items()}, manifest)


def _valid_coordinator_parts(case: schemathesis.Case) -> None:
    if not _positive(case):
        return
    if case.media_type == "application/octet-stream":
        # Schemathesis relabels an edited case by validating it again, and cannot validate
        # bytes (it would call the case negative): any bytes fit the schema, so it stays
        # the positive case it was generated as.
        case.freeze_metadata()
    if case.operation.label == "POST /v1/studies" and isinstance(case.body, dict):
        _valid_study(case)
    elif case.operation.label in RELAY_PAYLOADS:
        _valid_relay_body(case)
    elif case.operation.label == UPDATES:
        _valid_update(case)


@COORDINATOR.parametrize()
@FAST
def test_coordinator_matches_its_openapi(case: schemathesis.Case, coordinator: FastAPI) -> None:
    _credential(case)
    _valid_coordinator_parts(case)
    case.call_and_validate(app=coordinator, checks=list(ALL_CHECKS.values()))


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
    SERVED_INPUTS[:] = model.card.features
    app = create_serving_app(ServingSettings(database_url=url, max_batch=MAX_BATCH,
                                             key_cache_s=0, promoted_cache_s=0))
    assert app.openapi() == RISK.raw_schema
    return app


def _valid_patient(rng: np.random.Generator, patient: dict[str, Any]) -> dict[str, Any]:
    """`patient` with features and units valid for the promoted model: each input in its
    range, in its unit or another it knows; with ``impute_missing`` some left out."""
    features: dict[str, Any] = {}
    units: dict[str, str] = {}
    for name in SERVED_INPUTS:
        feature = CATALOGUE.feature(name)
        if patient.get("impute_missing") and rng.random() < 0.3:
            continue
        if feature.kind is FeatureKind.CONTINUOUS:
            unit = str(rng.choice([feature.unit, *feature.unit_factors]))
            value = rng.uniform(float(feature.low), float(feature.high))  # type: ignore[arg-type]
            features[name] = value / feature.conversion_factor(unit)
            if unit != feature.unit or rng.random() < 0.5:
                units[name] = unit
        elif feature.kind is FeatureKind.BINARY:
            features[name] = bool(rng.integers(2))
        else:
            features[name] = str(rng.choice(feature.codes))
    return {**patient, "features": features, "units": units}


def _valid_risk_parts(case: schemathesis.Case) -> None:
    if _positive(case) and isinstance(case.body, dict):
        rng = _rng(case)
        if case.operation.label == "POST /v1/risk":
            case.body = _valid_patient(rng, case.body)
        elif case.operation.label == "POST /v1/risk/batch":
            case.body = {**case.body, "patients": [_valid_patient(rng, p)
                                                    for p in case.body["patients"]]}


@RISK.parametrize()
@FAST
def test_risk_api_matches_its_openapi(case: schemathesis.Case, risk_api: FastAPI) -> None:
    _credential(case)
    _valid_risk_parts(case)
    case.call_and_validate(app=risk_api, checks=list(ALL_CHECKS.values()))


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
