"""The risk prediction API: ``POST /v1/risk``, ``/v1/risk/batch``, ``GET /v1/models``.

:func:`create_serving_app` builds the standalone service (``cardiofed serve``); the
same :data:`router` can be mounted in the coordinator. Requests authenticate with an
API key (``Authorization: Bearer cfk_...``); scopes and per-key rate limits are in
:mod:`cardiofed.serving.keys`. Logs hold one line per request (request id, method,
path, status, bytes in and out, latency), never a body, so no patient value is logged.

Risk categories (configurable, ``CARDIOFED_RISK_THRESHOLDS`` / ``_CATEGORIES``) default
to the 10-year ASCVD risk categories of the 2019 ACC/AHA Guideline on the Primary
Prevention of Cardiovascular Disease (Arnett et al., Circulation 2019;140:e596-e646):
low < 5%, borderline 5-7.5%, intermediate 7.5-20%, high >= 20%.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from functools import lru_cache
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.responses import Response
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cardiofed import __version__
from cardiofed.coordinator.deps import _sessions, refused
from cardiofed.coordinator.settings import DEFAULT_DATABASE_URL
from cardiofed.evaluation.recalibration import Recalibration
from cardiofed.exceptions import CoordinatorError, InvalidUpdate, PayloadTooLarge
from cardiofed.serving import registry
from cardiofed.serving.keys import KeyCache, RateLimiter
from cardiofed.serving.model import (
    RISK_CATEGORIES,
    RISK_THRESHOLDS,
    PatientErrors,
    RiskModel,
    risk_categories,
    sigmoid,
)
from cardiofed.serving.schemas import (
    BatchRequest,
    BatchResponse,
    Calibration,
    RiskRequest,
    RiskResponse,
    RiskResult,
)

log = logging.getLogger("cardiofed.serving")


class ServingSettings(BaseSettings):
    """Settings of the risk API, from ``CARDIOFED_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="CARDIOFED_", frozen=True)

    database_url: str = DEFAULT_DATABASE_URL
    risk_thresholds: list[float] = list(RISK_THRESHOLDS)
    risk_categories: list[str] = list(RISK_CATEGORIES)
    max_batch: int = Field(default=1000, ge=1, le=100_000)
    key_cache_s: float = Field(default=5.0, ge=0)
    promoted_cache_s: float = Field(default=5.0, ge=0)

    @model_validator(mode="after")
    def _categories(self) -> ServingSettings:
        t = self.risk_thresholds
        if any(not 0 < x < 1 for x in t) or any(a >= b for a, b in zip(t, t[1:], strict=False)):
            raise ValueError(f"risk_thresholds must increase strictly within (0, 1); got {t}")
        if len(self.risk_categories) != len(t) + 1:
            raise ValueError(f"risk_categories needs {len(t) + 1} names for {len(t)} "
                             f"thresholds; got {self.risk_categories}")
        return self


@lru_cache
def get_serving_settings() -> ServingSettings:
    return ServingSettings()


class ServingState:
    """Per-process caches: keys, rate-limit buckets, loaded models, the promoted version."""

    def __init__(self, settings: ServingSettings) -> None:
        self.settings = settings
        self.sessions: sessionmaker[Session] = _sessions(settings.database_url)
        self.keys = KeyCache(settings.key_cache_s)
        self.limiter = RateLimiter()
        self._models: dict[str, RiskModel] = {}
        self._promoted: tuple[float, str] | None = None
        self._lock = threading.Lock()

    def model(self, version: str | None) -> RiskModel:
        if version is None:
            now = time.monotonic()
            cached = self._promoted
            if cached is None or now - cached[0] >= self.settings.promoted_cache_s:
                with self.sessions() as db:
                    cached = (now, registry.promoted_version(db))
                self._promoted = cached
            version = cached[1]
        model = self._models.get(version)
        if model is None:
            with self.sessions() as db:
                model = registry.load(db, version)
            with self._lock:
                self._models[version] = model
        return model

    def forget_promoted(self) -> None:
        self._promoted = None

    def categories(self, risk: np.ndarray) -> np.ndarray:
        return risk_categories(risk, self.settings.risk_thresholds,
                               self.settings.risk_categories)

    def category(self, risk: float) -> str:
        return str(self.categories(np.array([risk]))[0])


def _scoped(scope: str) -> Any:
    """A dependency that authenticates the API key, checks its scope and rate limit, and
    hands the endpoint the serving state. It is ``async`` so that FastAPI runs it on the
    event loop instead of a worker thread: the work is microseconds (the database is read
    only on a key-cache miss)."""
    async def authorised(request: Request, authorization: Annotated[str | None, Header()]
                         = None) -> ServingState:
        state: ServingState = request.app.state.serving
        secret = authorization[7:].strip() if authorization and \
            authorization.lower().startswith("bearer ") else None
        key = state.keys.authenticate(state.sessions, secret)
        key.require(scope)
        wait = state.limiter.retry_after(key)
        if wait:
            raise RateLimited(f"Rate limit of {key.rate_limit_per_minute} requests per minute "
                              f"exceeded for API key {key.name!r}; retry in {wait:g} s.", wait)
        return state
    return Depends(authorised)


class RateLimited(CoordinatorError):
    status_code = 429

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after)))}


router = APIRouter(prefix="/v1", tags=["risk"])
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing, unknown or revoked API key"},
    403: {"description": "The key lacks the scope"},
    404: {"description": "No such model version (or none promoted)"},
    422: {"description": "Invalid fields, each named with its allowed range"},
    429: {"description": "Rate limit exceeded (see Retry-After)"},
}


def _calibration(model: RiskModel, site: str | None) -> tuple[Calibration | None,
                                                              Recalibration | None]:
    if site is None:
        return None, None
    recal = model.site_recalibration(site)
    if recal is None:
        return Calibration(site=site, applied=False, reason=(
            f"model {model.card.version} has no recalibration for site {site!r}; the global "
            f"model's risk is returned")), None
    return Calibration(site=site, applied=True, intercept=recal.intercept,
                       slope=recal.slope), recal


def _attribution(model: RiskModel) -> str:
    return ("exact (logistic regression)" if model.card.model == "logistic"
            else "integrated gradients from the federation's average patient, 64 steps")


def _results(state: ServingState, model: RiskModel, rows: np.ndarray, imputed: list[list[str]],
             recal: Recalibration | None, contributions: bool) -> list[RiskResult]:
    parts: np.ndarray | None = None
    if contributions:
        explained = model.explain(rows)
        logits, baseline, parts = explained.logit, explained.baseline, explained.contributions
    else:
        logits, baseline = model.logits(rows), None
    risks = sigmoid(logits)
    if recal is not None:
        risks = recal.apply(risks)
    categories = state.categories(risks)
    out = []
    for i, risk in enumerate(risks.tolist()):
        out.append(RiskResult(
            risk=risk, category=categories[i], logit=float(logits[i]),
            baseline_logit=baseline,
            contributions=None if parts is None else dict(
                zip(model.card.features, parts[i].tolist(), strict=True)),
            imputed=imputed[i]))
    return out


def _json(body: RiskResponse | BatchResponse) -> Response:
    """The response, serialised once by pydantic (FastAPI would validate it again)."""
    return Response(body.model_dump_json(), media_type="application/json")


@router.post("/risk", response_model=RiskResponse, responses=ERRORS)
async def risk(body: RiskRequest,
               state: Annotated[ServingState, _scoped("score")]) -> Response:
    """One patient's predicted risk, category, and each feature's contribution."""
    model = state.model(body.model)
    try:
        row, imputed = model.encode_patient(body.features, body.units,
                                            impute_missing=body.impute_missing)
    except PatientErrors as exc:
        raise InvalidPatient(exc.problems) from None
    calibration, recal = _calibration(model, body.site)
    result = _results(state, model, row[None, :], [imputed], recal, body.contributions)[0]
    return _json(RiskResponse(**result.__dict__, model_version=model.card.version,
                              outcome=model.card.outcome, calibration=calibration,
                              attribution=_attribution(model)))


@router.post("/risk/batch", response_model=BatchResponse, responses=ERRORS)
async def risk_batch(body: BatchRequest,
                     state: Annotated[ServingState, _scoped("score")]) -> Response:
    """Up to ``max_batch`` (default 1,000) patients in one request."""
    if len(body.patients) > state.settings.max_batch:
        raise PayloadTooLarge(f"A batch holds at most {state.settings.max_batch} patients; got "
                              f"{len(body.patients)}.")
    model = state.model(body.model)
    rows, imputed, problems = [], [], []
    for i, patient in enumerate(body.patients):
        try:
            row, missing = model.encode_patient(patient.features, patient.units,
                                                impute_missing=patient.impute_missing,
                                                where=f"patients[{i}]")
        except PatientErrors as exc:
            problems += exc.problems
            continue
        rows.append(row)
        imputed.append(missing)
    if problems:
        raise InvalidPatient(problems)
    calibration, recal = _calibration(model, body.site)
    return _json(BatchResponse(model_version=model.card.version, outcome=model.card.outcome,
                               calibration=calibration, attribution=_attribution(model),
                               results=_results(state, model, np.vstack(rows), imputed, recal,
                                                body.contributions)))


@router.get("/models", responses=ERRORS)
def models(state: Annotated[ServingState, _scoped("models:read")]
           ) -> list[dict[str, object]]:
    """Every registered version (the promoted one is marked)."""
    with state.sessions() as db:
        return registry.list_models(db)


@router.get("/models/{version}", responses=ERRORS)
def model_card(version: str, state: Annotated[ServingState, _scoped("models:read")]
               ) -> dict[str, object]:
    """The model card: provenance (study, algorithm, settings, sites, epsilon per site,
    schema version, content hash) and metrics per site."""
    with state.sessions() as db:
        return registry.card(db, version)


@router.post("/models/{version}/promote", responses=ERRORS)
def promote(version: str, state: Annotated[ServingState, _scoped("admin")]
            ) -> dict[str, str]:
    """Serve `version` by default from now on."""
    with state.sessions() as db:
        registry.promote(db, version)
    state.forget_promoted()
    return {"promoted": version}


class InvalidPatient(InvalidUpdate):
    """422 listing each invalid field."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{f}: {m}" for f, m in problems))
        self.problems = problems

    def body(self) -> dict[str, object]:
        return super().body() | {"errors": [{"field": f, "message": m}
                                            for f, m in self.problems]}


class RequestLog:
    """ASGI middleware: a request id header and one log line per request, no bodies."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = uuid.uuid4().hex[:16]
        sizes = {"in": 0, "out": 0, "status": 500}

        async def counting_receive() -> Message:
            message = await receive()
            sizes["in"] += len(message.get("body", b""))
            return message

        async def tagged_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                sizes["status"] = message["status"]
                message["headers"] = [*message.get("headers", []),
                                      (b"x-request-id", request_id.encode())]
            elif message["type"] == "http.response.body":
                sizes["out"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counting_receive, tagged_send)
        finally:
            log.info("request_id=%s method=%s path=%s status=%d bytes_in=%d bytes_out=%d "
                     "latency_ms=%.2f", request_id, scope["method"], scope["path"],
                     sizes["status"], sizes["in"], sizes["out"],
                     (time.perf_counter() - started) * 1000)


def add_risk_api(app: FastAPI, settings: ServingSettings) -> None:
    """Mount the risk API (router, state, error handlers, request log) on `app`."""
    app.state.serving = ServingState(settings)
    app.include_router(router)
    app.add_middleware(RequestLog)

    app.add_exception_handler(CoordinatorError, refused)  # type: ignore[arg-type]


def create_serving_app(settings: ServingSettings | None = None) -> FastAPI:
    """The standalone risk API (``cardiofed serve``)."""
    app = FastAPI(title="CardioFed risk API", version=__version__,
                  description="Cardiovascular risk from a federated model. Authenticate "
                              "with `Authorization: Bearer <API key>`.")
    add_risk_api(app, settings or get_serving_settings())

    @app.get("/healthz", tags=["health"])
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
