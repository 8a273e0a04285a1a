"""The risk API under abuse: body size limits, bounded 422 bodies, the OpenAPI contract.

No test measures time: "refused quickly" is asserted as "refused by the list length
before any patient is validated" and "refused before the body is read".
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from starlette.types import Message, Receive, Scope, Send

from cardiofed.data.synthetic import synthetic_federation
from cardiofed.serving import provenance, registry
from cardiofed.serving.app import create_serving_app
from cardiofed.serving.keys import create_key, list_keys
from cardiofed.serving.model import RiskModel
from cardiofed.serving.settings import ServingSettings
from cardiofed.simulation.config import SimulationConfig
from cardiofed.simulation.experiment import run_experiment
from cardiofed.store import session_factory
from cardiofed.web.limits import BodyLimits, BodySizeLimit, describe_size

PATIENT = {"age": 67.25, "sex": "male", "total_cholesterol": 213.0, "hdl_cholesterol": 47.0,
           "systolic_bp": 143.5, "bp_treated": True, "current_smoker": False,
           "diabetes": False}
KIB = 1024
DEFAULT_LIMIT = ("The request body exceeds this endpoint's limit of 65,536 bytes "
                 "(64 KiB).")


@pytest.fixture(scope="module")
def model() -> RiskModel:
    data = synthetic_federation(n_sites=3, seed=1, size_scale=0.2)
    result = run_experiment(data, SimulationConfig.create(rounds=1, eval_every=0),
                            baselines=False)
    return provenance.from_experiment(result, study="demo", feature_names=data.feature_names,
                                      outcome=data.outcome)


class Risk:
    """A risk API on a fresh registry: demo-v1 promoted, a score key."""

    def __init__(self, tmp: Path, model: RiskModel, **settings: Any) -> None:
        url = f"sqlite:///{tmp}/serving.db"
        with session_factory(url)() as db:
            registry.register(db, model, promote=True)
            self.key = create_key(db, "partner", ["score"], 1000)
        self.app = create_serving_app(ServingSettings(
            database_url=url, key_cache_s=0, promoted_cache_s=0, **settings))
        self.client = TestClient(self.app)
        self.auth = {"Authorization": f"Bearer {self.key}"}

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        headers = {**self.auth, **kwargs.pop("headers", {})}
        return self.client.post(path, headers=headers, **kwargs)


@pytest.fixture
def risk(tmp_path: Path, model: RiskModel) -> Risk:
    return Risk(tmp_path, model, max_batch=5, max_batch_body_bytes=256 * KIB)


def _padded(n_bytes: int) -> bytes:
    """A valid JSON request for one patient, padded with whitespace to `n_bytes`."""
    body = json.dumps({"features": PATIENT}).encode()
    return body[:-1] + b" " * (n_bytes - len(body)) + b"}"


# ---------------------------------------------------------------- the middleware alone

async def _drive(app: Any, path: str, chunks: list[bytes], content_length: int | None = None
                 ) -> tuple[int, dict[str, Any], int]:
    """Send `chunks` as one request through the ASGI `app`; returns the status, the JSON
    body and how many chunks the application pulled."""
    headers = [] if content_length is None else [(b"content-length",
                                                  str(content_length).encode())]
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers}
    pulled, sent = 0, []

    async def receive() -> Message:
        nonlocal pulled
        pulled += 1
        if pulled > len(chunks):
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": chunks[pulled - 1],
                "more_body": pulled < len(chunks)}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body), pulled


async def _echo_length(scope: Scope, receive: Receive, send: Send) -> None:
    """An application that reads the whole body and answers its length."""
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    body = json.dumps({"size": size}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


LIMITED = BodySizeLimit(_echo_length, limits=BodyLimits(
    default=100, prefixes={"/big": 1000, "/big/small": 10}))


def test_a_declared_length_over_the_limit_is_refused_without_reading_a_byte() -> None:
    status, body, pulled = asyncio.run(_drive(LIMITED, "/x", [b"a" * 101], 101))
    assert (status, pulled) == (413, 0)
    assert body == {"detail": "The request body exceeds this endpoint's limit of 100 bytes."}


def test_a_streamed_body_is_counted_and_cut_at_the_limit() -> None:
    status, body, pulled = asyncio.run(_drive(LIMITED, "/x", [b"a" * 60] * 5))
    assert status == 413 and pulled == 2  # the second chunk passes 100 bytes: no third
    assert body["detail"].endswith("limit of 100 bytes.")
    # A body that understates its Content-Length is counted all the same.
    assert asyncio.run(_drive(LIMITED, "/x", [b"a" * 60] * 2, 50))[0] == 413
    assert asyncio.run(_drive(LIMITED, "/x", [b"a" * 50] * 2))[:2] == (200, {"size": 100})


def test_the_longest_matching_path_prefix_sets_the_limit() -> None:
    limits = LIMITED.limits
    assert [limits.for_path(p) for p in ("/", "/big", "/big/", "/big/x", "/bigger",
                                          "/big/small/y", "/big/smaller")] == \
        [100, 1000, 1000, 1000, 100, 10, 1000]
    assert asyncio.run(_drive(LIMITED, "/big/x", [b"a" * 900], 900))[:2] == (200,
                                                                              {"size": 900})
    with pytest.raises(ValueError, match="must start with '/'; got 'big'"):
        BodyLimits(default=1, prefixes={"big": 2})
    with pytest.raises(ValueError, match="The body limit of 'default' must be an integer "
                                         ">= 0 bytes; got -1."):
        BodyLimits(default=-1)
    assert describe_size(2 * 1024 * 1024) == "2,097,152 bytes (2 MiB)"


def test_whatever_the_application_answers_to_a_cut_body_becomes_413() -> None:
    async def answers_400(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await receive()
        except Exception:
            await send({"type": "http.response.start", "status": 400, "headers": []})
            await send({"type": "http.response.body", "body": b'{"detail": "bad"}'})

    async def raises(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()

    for app in (answers_400, raises):
        limited = BodySizeLimit(app, limits=BodyLimits(default=10))
        assert asyncio.run(_drive(limited, "/", [b"a" * 11]))[0] == 413


# ---------------------------------------------------------------- the risk API's limits

def test_an_oversized_body_is_refused_before_authentication(risk: Risk) -> None:
    for headers in ({}, risk.auth):  # no credential, and a valid one: the same 413
        r = risk.client.post("/v1/risk", content=_padded(64 * KIB + 1),
                             headers={**headers, "Content-Type": "application/json"})
        assert r.status_code == 413
        assert r.json() == {"detail": DEFAULT_LIMIT}
    # Up to the limit the same body is scored.
    ok = risk.post("/v1/risk", content=_padded(64 * KIB),
                   headers={"Content-Type": "application/json"})
    assert ok.status_code == 200, ok.text


def test_a_chunked_body_without_content_length_is_counted(risk: Risk) -> None:
    def chunks(body: bytes) -> Iterator[bytes]:
        for i in range(0, len(body), 8 * KIB):
            yield body[i:i + 8 * KIB]

    sent: list[httpx.Request] = []
    risk.client.event_hooks["request"].append(sent.append)
    r = risk.post("/v1/risk", content=chunks(_padded(64 * KIB + 1)),
                  headers={"Content-Type": "application/json"})
    assert "content-length" not in sent[-1].headers
    assert sent[-1].headers["transfer-encoding"] == "chunked"
    assert r.status_code == 413 and r.json() == {"detail": DEFAULT_LIMIT}
    ok = risk.post("/v1/risk", content=chunks(_padded(64 * KIB)),
                   headers={"Content-Type": "application/json"})
    assert ok.status_code == 200, ok.text


def test_the_batch_endpoint_has_its_own_limit(risk: Risk) -> None:
    body = json.dumps({"patients": [{"features": PATIENT}] * 5}).encode()
    padded = body[:-1] + b" " * (200 * KIB - len(body)) + b"}"
    r = risk.post("/v1/risk/batch", content=padded, headers={"Content-Type":
                                                              "application/json"})
    assert r.status_code == 200, r.text
    over = padded + b" " * (56 * KIB + 1)
    r = risk.post("/v1/risk/batch", content=over, headers={"Content-Type":
                                                            "application/json"})
    assert r.status_code == 413
    assert r.json() == {"detail": "The request body exceeds this endpoint's limit of "
                                  "262,144 bytes (256 KiB)."}


def test_default_limits_follow_max_batch() -> None:
    limits = ServingSettings().body_limits()
    assert limits.for_path("/v1/risk") == limits.for_path("/healthz") == 64 * KIB
    assert limits.for_path("/v1/risk/batch") == 1000 * 2 * KIB  # ~2 MiB for 1,000 patients
    assert ServingSettings(max_batch=10).body_limits().for_path("/v1/risk/batch") == 64 * KIB
    assert ServingSettings(max_batch_body_bytes=10 * KIB).body_limits().for_path(
        "/v1/risk/batch") == 10 * KIB
    with pytest.raises(ValueError, match="max_body_bytes"):
        ServingSettings(max_body_bytes=10)


def test_healthz_answers_while_an_oversized_body_streams_in(risk: Risk) -> None:
    async def scenario() -> tuple[httpx.Response, httpx.Response, bool]:
        first_chunk_sent, health_answered = asyncio.Event(), asyncio.Event()
        pulled_past_limit = False

        async def body() -> AsyncIterator[bytes]:
            nonlocal pulled_past_limit
            yield b'{"features": {"pad": "' + b"x" * 40 * KIB
            first_chunk_sent.set()
            await health_answered.wait()
            yield b"x" * 40 * KIB  # passes 64 KiB: refused here
            pulled_past_limit = True
            yield b'"}}'

        transport = httpx.ASGITransport(app=risk.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://risk") as client:
            upload = asyncio.create_task(client.post(
                "/v1/risk", content=body(), headers={"Content-Type": "application/json"}))
            await first_chunk_sent.wait()  # the upload is now mid-body
            health = await client.get("/healthz")
            health_answered.set()
            return health, await upload, pulled_past_limit

    health, refused, pulled_past_limit = asyncio.run(scenario())
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert refused.status_code == 413 and refused.json() == {"detail": DEFAULT_LIMIT}
    assert not pulled_past_limit


def test_refusals_for_size_are_logged(risk: Risk, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="cardiofed.serving"):
        risk.client.post("/v1/risk", content=b" " * (64 * KIB + 1))
    assert "path=/v1/risk status=413" in caplog.text


# ---------------------------------------------------------------- bounded 422 bodies

def test_an_over_long_batch_is_refused_by_its_length_with_a_small_body(
        tmp_path: Path, model: RiskModel) -> None:
    big = Risk(tmp_path, model, max_batch_body_bytes=8 * 1024 * KIB)  # max_batch 1,000
    # Every patient is invalid too (no features): validating any of them would add an error.
    r = big.post("/v1/risk/batch", json={"patients": [{"features": {}}] * 100_001})
    assert r.status_code == 422
    assert r.json() == {
        "detail": "patients: List should have at most 1000 items after validation, not "
                  "100001",
        "errors": [{"field": "patients", "message": "List should have at most 1000 items "
                                                    "after validation, not 100001"}],
        "more_errors": 0}
    assert len(r.content) < 4 * KIB


def test_a_422_names_at_most_20_fields_and_counts_the_rest(risk: Risk) -> None:
    bad = {"age": 5, "sex": "x", "total_cholesterol": 1, "hdl_cholesterol": 1,
           "systolic_bp": 10, "bp_treated": "maybe", "current_smoker": "maybe",
           "diabetes": "maybe"}  # 8 bad fields a patient, 40 in the batch
    r = risk.post("/v1/risk/batch", json={"patients": [{"features": bad}] * 5})
    body = r.json()
    assert r.status_code == 422
    assert len(body["errors"]) == 20 and body["more_errors"] == 20
    assert body["errors"][0]["field"] == "patients[0].features.age"
    assert body["errors"][19]["field"] == "patients[2].features.hdl_cholesterol"
    assert body["detail"].endswith("(and 20 more invalid fields)")
    assert body["detail"].count("patients[") == 20


def test_a_422_from_pydantic_never_echoes_the_input(risk: Risk) -> None:
    extra = {f"field_{i:02d}": f"SECRET-{i}-" + "v" * 1000 for i in range(30)}
    r = risk.post("/v1/risk", json={"features": PATIENT, **extra})
    body = r.json()
    assert r.status_code == 422
    assert [e["field"] for e in body["errors"]] == [f"field_{i:02d}" for i in range(20)]
    assert {e["message"] for e in body["errors"]} == {"Extra inputs are not permitted"}
    assert body["more_errors"] == 10
    assert body["detail"].endswith("(and 10 more invalid fields)")
    assert "SECRET" not in r.text and "\"input\"" not in r.text
    assert len(r.content) < 4 * KIB


def test_long_values_and_names_are_cut_in_messages(risk: Risk) -> None:
    r = risk.post("/v1/risk", json={"features": {**PATIENT, "sex": "m" * 30_000,
                                                 "k" * 30_000: 1}})
    errors = {e["field"][:20]: e["message"] for e in r.json()["errors"]}
    assert r.status_code == 422 and len(r.content) < 4 * KIB
    assert errors["features.sex"] == ("must be one of female, male; got "
                                      "'mmmmmmmmmmmmmmmmmmmmmmm... (30,002 characters)")
    assert "features.kkkkkkkkkkk" in errors


def test_malformed_json_is_named_without_the_body(risk: Risk) -> None:
    r = risk.post("/v1/risk", content=b'{"features": {"age": SECRET}}',
                  headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    assert r.json()["errors"] == [{"field": "body", "message": "is not valid JSON (Expecting "
                                                               "value at character 21)"}]
    assert "SECRET" not in r.text


def test_empty_features_are_refused_as_the_schema_says(risk: Risk) -> None:
    schema = risk.app.openapi()["components"]["schemas"]["Patient"]["properties"]["features"]
    assert schema["minProperties"] == 1
    for impute in (False, True):
        r = risk.post("/v1/risk", json={"features": {}, "impute_missing": impute})
        assert r.status_code == 422
        assert r.json()["errors"] == [{"field": "features", "message": "Dictionary should "
                                       "have at least 1 item after validation, not 0"}]


# ---------------------------------------------------------------- the OpenAPI contract

def test_every_status_is_declared_with_its_body(risk: Risk) -> None:
    spec = risk.app.openapi()
    ref = "#/components/schemas/"
    expected = {
        ("post", "/v1/risk"): {"200", "401", "403", "404", "413", "422", "429"},
        ("post", "/v1/risk/batch"): {"200", "401", "403", "404", "413", "422", "429"},
        ("get", "/v1/models"): {"200", "401", "403", "413", "429"},
        ("get", "/v1/models/{version}"): {"200", "401", "403", "404", "413", "422", "429"},
        ("post", "/v1/models/{version}/promote"): {"200", "401", "403", "404", "413", "422",
                                                  "429"},
        ("post", "/v1/attribution"): {"200", "401", "403", "404", "409", "413", "422", "429"},
        ("get", "/healthz"): {"200", "413"},
        ("get", "/metrics"): {"200", "401", "403", "413", "429"},
    }
    declared = {(method, path): op for path, ops in spec["paths"].items()
                for method, op in ops.items()}
    assert set(declared) == set(expected)
    for where, codes in expected.items():
        responses = declared[where]["responses"]
        assert set(responses) == codes, where
        for code in codes - {"200"}:
            schema = responses[code]["content"]["application/json"]["schema"]["$ref"]
            assert schema == ref + ("ValidationErrorBody" if code == "422" else "ErrorBody")
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    assert "Retry-After" in declared[("post", "/v1/risk")]["responses"]["429"]["headers"]
    batch = spec["components"]["schemas"]["BatchRequest"]["properties"]["patients"]
    assert batch["maxItems"] == 5  # this server's max_batch
    created = spec["components"]["schemas"]["ModelSummary"]["properties"]["created_at"]
    assert created["format"] == "date-time"


def test_the_declared_statuses_are_the_ones_answered(risk: Risk) -> None:
    """Each status POST /v1/risk declares is produced, with a `detail` string."""
    with session_factory(risk.app.state.serving.settings.database_url)() as db:
        slow = create_key(db, "slow", ["score"], 1)
        reader = create_key(db, "reader", ["models:read"], 10)
        pinner = create_key(db, "pinner", ["score", "score:any-version"], 10)

    def post(key: str | None, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return risk.client.post("/v1/risk", headers=headers, **kwargs)

    post(slow, json={"features": PATIENT})  # spends the one token
    answers = {
        200: post(risk.key, json={"features": PATIENT}),
        401: post(None, json={"features": PATIENT}),
        403: post(reader, json={"features": PATIENT}),
        404: post(pinner, json={"features": PATIENT, "model": "demo-v9"}),
        413: post(risk.key, content=b" " * (64 * KIB + 1)),
        422: post(risk.key, json={"features": {"age": 500}}),
        429: post(slow, json={"features": PATIENT}),
    }
    declared = risk.app.openapi()["paths"]["/v1/risk"]["post"]["responses"]
    assert {str(s) for s in answers} == set(declared)
    for status, answer in answers.items():
        assert answer.status_code == status, (status, answer.text)
        if status != 200:
            assert isinstance(answer.json()["detail"], str)


def test_timestamps_are_utc_with_an_offset(risk: Risk) -> None:
    with session_factory(risk.app.state.serving.settings.database_url)() as db:
        reader = create_key(db, "reader", ["models:read"], 10)
        keys = list_keys(db)
    listed = risk.client.get("/v1/models", headers={"Authorization": f"Bearer {reader}"})
    card = risk.client.get("/v1/models/demo-v1",
                           headers={"Authorization": f"Bearer {reader}"}).json()
    stamps = [listed.json()[0]["created_at"], card["created_at"],
              *(str(k["created_at"]) for k in keys)]
    for stamp in stamps:
        parsed = datetime.fromisoformat(stamp)
        assert parsed.utcoffset() == timedelta(0), stamp
