"""The risk prediction API: ``POST /v1/risk``, ``/v1/risk/batch``, ``GET /v1/models``,
``POST /v1/attribution``.

:func:`cardiofed.serving.app.create_serving_app` builds the standalone service
(``cardiofed serve``); :func:`add_risk_api` mounts the same routes on another application. Requests
authenticate with an API key (``Authorization: Bearer cfk_...``); scopes, the studies a
key may use and per-key rate limits are in :mod:`cardiofed.serving.keys`. Request bodies
are size-limited before anything parses them (:mod:`cardiofed.web.limits`:
``CARDIOFED_MAX_BODY_BYTES``, 64 KiB; ``CARDIOFED_MAX_BATCH_BODY_BYTES`` for the batch
endpoint, by default 2 KiB per patient of ``CARDIOFED_MAX_BATCH``), and refusals have
bounded bodies (:mod:`cardiofed.web.errors`). Logs hold one line per request
(request id, method, path, status, bytes in and out, latency), never a body, so no
patient value is logged.

Risk categories (configurable, ``CARDIOFED_RISK_THRESHOLDS`` / ``_CATEGORIES``) default
to the 10-year ASCVD risk categories of the 2019 ACC/AHA Guideline on the Primary
Prevention of Cardiovascular Disease (Arnett et al., Circulation 2019;140:e596-e646):
low < 5%, borderline 5-7.5%, intermediate 7.5-20%, high >= 20%.
"""

from __future__ import annotations

import bisect
import inspect
import json
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from cardiofed.evaluation.recalibration import Recalibration
from cardiofed.exceptions import CoordinatorError, NotFound, PermissionDenied
from cardiofed.protocol.schemas import AttributionRequest, AttributionResponse
from cardiofed.serving import registry
from cardiofed.serving.attribution import report as attribution_report
from cardiofed.serving.keys import KeyCache, KeyInfo, RateLimiter
from cardiofed.serving.model import RiskModel, risk_categories
from cardiofed.serving.patient_input import PatientErrors
from cardiofed.serving.request_log import RequestLog
from cardiofed.serving.schemas import (
    BatchRequest,
    BatchResponse,
    Calibration,
    ModelSummary,
    RiskRequest,
    RiskResponse,
    RiskResult,
    batch_request,
)
from cardiofed.serving.settings import BATCH_PATH, ServingSettings
from cardiofed.store import Study, session_factory
from cardiofed.web.errors import (
    InvalidPatient,
    RateLimited,
    invalid_request,
    refused,
    responses,
    unreadable_body,
)
from cardiofed.web.limits import BodyLimits, BodySizeLimit
from cardiofed.web.metrics import RequestMetrics, ServiceMetrics


class ServingState:
    """Per-process caches: keys, rate-limit buckets, loaded models, the promoted version."""

    def __init__(self, settings: ServingSettings) -> None:
        self.settings = settings
        self.sessions: sessionmaker[Session] = session_factory(settings.database_url)
        self.keys = KeyCache(settings.key_cache_s)
        self.limiter = RateLimiter()
        self._models: dict[str, RiskModel] = {}
        self._promoted: tuple[float, str | None] | None = None
        self._lock = threading.Lock()
        self._thresholds = np.asarray(settings.risk_thresholds, dtype=np.float64)
        self._thresholds_list = self._thresholds.tolist()
        self._categories = np.asarray(settings.risk_categories, dtype=object)

    def promoted(self) -> str | None:
        """The promoted version (None if none is), re-read every ``promoted_cache_s``."""
        now = time.monotonic()
        cached = self._promoted
        if cached is None or now - cached[0] >= self.settings.promoted_cache_s:
            with self.sessions() as db:
                cached = (now, registry.promoted_or_none(db))
            self._promoted = cached
        return cached[1]

    def model_for(self, key: KeyInfo, pinned: str | None) -> RiskModel:
        """The model a request scores with: `pinned`, or the promoted one. A key without
        ``score:any-version`` may pin only the promoted version (checked before anything
        is loaded); a key limited to studies may use only their models."""
        promoted = self.promoted()
        if pinned is not None:
            key.require_pin(pinned, promoted)
        version = pinned or promoted
        if version is None:
            raise NotFound("No model is promoted yet; promote one with "
                           "`cardiofed models promote VERSION`.")
        model = self._load(version)
        key.require_study(model.card.study, version)
        return model

    def _load(self, version: str) -> RiskModel:
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
        return risk_categories(risk, self._thresholds, self._categories)

    def category(self, risk: float) -> str:
        """:meth:`categories` of one risk."""
        return str(self._categories[bisect.bisect_right(self._thresholds_list, risk)])


@dataclass(frozen=True)
class Caller:
    """An authenticated request: the serving state and the caller's key."""

    state: ServingState
    key: KeyInfo

    def model(self, pinned: str | None) -> RiskModel:
        return self.state.model_for(self.key, pinned)


_bearer = HTTPBearer(auto_error=False, description="An API key: "
                                                   "`Authorization: Bearer cfk_...`.")


def _scoped(scope: str) -> Any:
    """A dependency that authenticates the API key, checks its scope and rate limit, and
    hands the endpoint the caller. It is ``async`` so that FastAPI runs it on the event
    loop instead of a worker thread: the work is microseconds (the database is read only
    on a key-cache miss)."""
    async def authorised(request: Request, credentials: Annotated[
            HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> Caller:
        secret = credentials.credentials.strip() if credentials else None
        return caller_of(request.app.state.serving, secret, scope)
    return Depends(authorised)


def caller_of(state: ServingState, secret: str | None, scope: str) -> Caller:
    """The caller of API key `secret`, its scope and rate limit checked."""
    key = state.keys.authenticate(state.sessions, secret)
    key.require(scope)
    wait = state.limiter.retry_after(key)
    if wait:
        raise RateLimited(f"Rate limit of {key.rate_limit_per_minute} requests per minute "
                          f"exceeded for API key {key.name!r}; retry in {wait:g} s.", wait)
    return Caller(state, key)


Version = Annotated[str, Path(max_length=100, description="A registered version, e.g. "
                                                          "`demo-v2`.")]


def _calibration(model: RiskModel, site: str | None) -> tuple[Calibration | None,
                                                              Recalibration | None]:
    if site is None:
        return None, None
    recal = model.site_recalibration(site)
    if recal is None:
        return Calibration(site=site, applied=False, reason=(
            f"model {model.card.version} has no recalibration for site {site!r}; the global "
            f"model's risk is returned")), None
    names = model.column_names
    return Calibration(site=site, applied=True, intercept=recal.intercept, slope=recal.slope,
                       terms={names[j]: c for j, c in recal.coefficients.items()}), recal


def _attribution(model: RiskModel) -> str:
    if model.card.model == "cox":
        return "exact (Cox model; contributions on the log cumulative hazard scale)"
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
    risks = model.inverse_link(logits)
    if recal is not None:
        risks = recal.apply(risks, model.preprocessor.standardise(rows)
                            if recal.coefficients else None)
    categories = (state.categories(risks) if model.categorised
                  else [None] * len(risks))
    return [RiskResult(**_fields(model, risk, categories[i], float(logits[i]), baseline,
                                 None if parts is None else parts[i].tolist(), imputed[i]))
            for i, risk in enumerate(risks.tolist())]


def _fields(model: RiskModel, risk: float, category: str | None, logit: float,
            baseline: float | None, parts: list[float] | None, imputed: list[str]
            ) -> dict[str, Any]:
    """A :class:`RiskResult`'s fields (`parts`: the contributions in the card's order)."""
    return {"risk": risk, "category": category, "logit": logit, "baseline_logit": baseline,
            "contributions": None if parts is None
            else dict(zip(model.card.features, parts, strict=True)), "imputed": imputed}


def _json(body: RiskResponse | BatchResponse) -> Response:
    """The response, serialised once by pydantic (FastAPI would validate it again)."""
    return Response(body.model_dump_json(), media_type="application/json")


async def risk(body: RiskRequest, caller: Annotated[Caller, _scoped("score")]) -> Response:
    """One patient's predicted risk, category, and each feature's contribution."""
    return _risk(body, caller)


def _risk(body: RiskRequest, caller: Caller) -> Response:
    model = caller.model(body.model)
    try:
        row, imputed = model.encode_row(body.features, body.units,
                                        impute_missing=body.impute_missing)
    except PatientErrors as exc:
        raise InvalidPatient(exc.problems) from None
    calibration, recal = _calibration(model, body.site)
    if recal is None and (body.contributions or model.linear):  # explaining costs nothing
        risk, logit, baseline, parts = model.explain_row(row)
        shown = body.contributions
        result = _fields(model, risk, caller.state.category(risk) if model.categorised
                         else None, logit, baseline if shown else None,
                         parts if shown else None, imputed)
    else:
        result = _results(caller.state, model, np.array([row]), [imputed], recal,
                          body.contributions)[0].__dict__
    return _json(RiskResponse(**result, model_version=model.card.version,
                              outcome=model.card.outcome, risk_of=model.risk_of,
                              calibration=calibration, attribution=_attribution(model)))


def _json_body(request: Request, body: bytes) -> Any:
    """The request body as FastAPI reads it for a JSON body model: parsed when the
    content type is JSON, the raw bytes (which then fail validation) otherwise."""
    content_type = request.headers.get("content-type")
    if not content_type:
        return body
    main, _, subtype = content_type.partition(";")[0].strip().lower().partition("/")
    if main == "application" and (subtype == "json" or subtype.endswith("+json")):
        try:
            return json.loads(body)
        except json.JSONDecodeError as exc:
            raise RequestValidationError([{
                "type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error",
                "input": {}, "ctx": {"error": exc.msg}}]) from None
        except UnicodeDecodeError as exc:
            raise HTTPException(400, "There was an error parsing the body") from exc
    return body


async def _lean_risk(request: Request) -> Response:
    """``POST /v1/risk`` as :func:`risk` declares it, answered without FastAPI's
    per-request dependency solving (a quarter of the application's time per request,
    measured in process). The steps and
    their order are FastAPI's: read the body (invalid JSON is refused first),
    authenticate, then validate; ``tests/test_serving_lean.py`` holds the two to the
    same answers."""
    raw = await request.body()
    parsed = _valid_json(request, raw)  # the usual request, in one pass
    body = _json_body(request, raw) if raw and parsed is None else None
    scheme, secret = get_authorization_scheme_param(request.headers.get("authorization"))
    caller = caller_of(request.app.state.serving,
                       secret if scheme.lower() == "bearer" and secret else None, "score")
    if parsed is not None:
        return _risk(parsed, caller)
    if not raw:  # no body at all; a JSON null is a body, which validation refuses
        raise RequestValidationError([{"type": "missing", "loc": ("body",),
                                       "msg": "Field required", "input": None}])
    try:
        parsed = RiskRequest.model_validate(body, from_attributes=True)  # as FastAPI does
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])}
                                      for e in exc.errors()]) from None
    return _risk(parsed, caller)


def _valid_json(request: Request, raw: bytes) -> RiskRequest | None:
    """`raw` validated straight from JSON when the content type is plain JSON, else None.
    Anything it does not accept takes FastAPI's steps instead, which say why."""
    if request.headers.get("content-type") != "application/json" or not raw:
        return None
    try:
        return RiskRequest.model_validate_json(raw)
    except ValidationError:
        return None


class LeanRiskRoute(APIRoute):
    """The route of :func:`risk`: documented by FastAPI from its signature, answered by
    :func:`_lean_risk` (FastAPI's custom-route hook), and by :class:`RiskFastPath` ahead
    of the router where the service installs it."""

    lean = True

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        return _lean_risk


class RiskFastPath:
    """ASGI middleware answering ``POST`` on `route`'s path with :func:`_lean_risk`
    ahead of FastAPI's exception middleware and router, whose per-request work it skips.
    It runs inside the service's own middleware (request log, metrics, size limit,
    security headers), marks the request with its route as the router does (metrics
    count it by template), and answers an exception with the handler `service`
    registered for it, as FastAPI's exception middleware does; one without a handler
    propagates (a 500)."""

    def __init__(self, app: ASGIApp, *, service: FastAPI, route: APIRoute) -> None:
        self.app, self.service, self.route = app, service, route
        self.path = route.path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path \
                or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route
        request = Request(scope, receive, send)
        try:
            response = await _lean_risk(request)
        except Exception as exc:
            handler = self._handler(exc)
            if handler is None:
                raise
            response = handler(request, exc)
            if inspect.isawaitable(response):
                response = await response
        await response(scope, receive, send)

    def _handler(self, exc: Exception) -> Callable[..., Any] | None:
        handlers = self.service.exception_handlers
        if isinstance(exc, HTTPException) and exc.status_code in handlers:
            return handlers[exc.status_code]
        return next((handlers[cls] for cls in type(exc).__mro__ if cls in handlers), None)


async def _risk_batch(body: BatchRequest, caller: Caller) -> Response:
    model = caller.model(body.model)
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
                               risk_of=model.risk_of, calibration=calibration,
                               attribution=_attribution(model),
                               results=_results(caller.state, model, np.vstack(rows), imputed,
                                                recal, body.contributions)))


def _batch_endpoint(max_batch: int) -> Callable[..., Awaitable[Response]]:
    """``POST /v1/risk/batch`` whose body holds at most `max_batch` patients: the list
    length is part of the request model, so a longer list is refused before any patient
    is validated, and the OpenAPI document states it."""
    async def risk_batch(body: BatchRequest, caller: Annotated[Caller, _scoped("score")]
                         ) -> Response:
        return await _risk_batch(body, caller)

    # FastAPI reads the body's model from the annotation: this deployment's limit.
    risk_batch.__annotations__["body"] = batch_request(max_batch)
    risk_batch.__doc__ = f"Up to {max_batch:,} patients in one request (max_batch)."
    return risk_batch


def models(caller: Annotated[Caller, _scoped("models:read")]) -> list[dict[str, object]]:
    """Every registered version the key may see (the promoted one is marked)."""
    with caller.state.sessions() as db:
        return registry.list_models(db, caller.key.studies)


def model_card(version: Version, caller: Annotated[Caller, _scoped("models:read")]
               ) -> dict[str, object]:
    """The model card: provenance (study, algorithm, settings, sites, epsilon per site,
    schema version, content hash) and metrics per site."""
    with caller.state.sessions() as db:
        card = registry.card(db, version)
    caller.key.require_study(str(card["study"]), version)
    return card


def promote(version: Version, caller: Annotated[Caller, _scoped("admin")]) -> dict[str, str]:
    """Serve `version` by default from now on."""
    with caller.state.sessions() as db:
        caller.key.require_study(registry.study_of(db, version), version)
        registry.promote(db, version, by=f"API key {caller.key.name} (risk API)")
    caller.state.forget_promoted()
    return {"promoted": version}


def attribution(body: AttributionRequest,
                caller: Annotated[Caller, _scoped("attribution:read")]) -> AttributionResponse:
    """A finished attribution study's estimates (risk difference and ratio with 95%
    intervals, E-values), balance, overlap and card; 409 until it is finished."""
    if not caller.key.may_see(body.study):
        raise PermissionDenied(f"API key {caller.key.name!r} is limited to studies "
                               f"{', '.join(repr(s) for s in sorted(caller.key.studies or ()))}"
                               f"; not {body.study!r}.")
    with caller.state.sessions() as db:
        study = db.get(Study, body.study)
        if study is None:
            raise NotFound(f"No study {body.study!r}.")
        return attribution_report(study)


def risk_router(settings: ServingSettings) -> APIRouter:
    """The ``/v1`` routes, each declaring every status it answers with its body."""
    router = APIRouter(prefix="/v1", tags=["risk"])
    scoring = responses(401, 403, 404, 413, 422, 429)
    router.add_api_route("/risk", risk, methods=["POST"], response_model=RiskResponse,
                         responses=scoring, route_class_override=LeanRiskRoute)
    router.add_api_route(BATCH_PATH.removeprefix("/v1"), _batch_endpoint(settings.max_batch),
                         methods=["POST"], response_model=BatchResponse, responses=scoring)
    router.add_api_route("/models", models, methods=["GET"],
                         response_model=list[ModelSummary],
                         responses=responses(401, 403, 413, 429))
    by_version = responses(401, 403, 404, 413, 422, 429)
    router.add_api_route("/models/{version}", model_card, methods=["GET"],
                         responses=by_version)
    router.add_api_route("/models/{version}/promote", promote, methods=["POST"],
                         responses=by_version)
    router.add_api_route("/attribution", attribution, methods=["POST"],
                         responses=responses(401, 403, 404, 409, 413, 422, 429))
    return router


def add_risk_api(app: FastAPI, settings: ServingSettings, *,
                 body_limits: BodyLimits | None = None) -> None:
    """Mount the risk API on `app`: routes, state, error handlers, the request log, and
    the body size limits, which cover every path of `app` (default
    ``settings.body_limits()``; an application with larger bodies elsewhere passes its
    own prefixes)."""
    app.state.serving = ServingState(settings)
    router = risk_router(settings)
    app.include_router(router)
    metrics = ServiceMetrics()
    lean = next((r for r in router.routes if getattr(r, "lean", False)), None)
    if isinstance(lean, APIRoute):  # added first: inside the log, metrics and size limit
        app.add_middleware(RiskFastPath, service=app, route=lean)

    async def prometheus(caller: Annotated[Caller, _scoped("admin")]) -> Response:
        """Prometheus metrics (an API key with the ``admin`` scope as the scrape's bearer)."""
        return metrics.response()

    app.add_api_route("/metrics", prometheus, methods=["GET"], tags=["health"],
                      response_class=Response, responses={
                          200: {"content": {"text/plain": {}}}, **responses(401, 403, 413, 429)})
    app.add_middleware(BodySizeLimit, limits=body_limits or settings.body_limits())
    app.add_middleware(RequestMetrics, metrics=metrics)
    app.add_middleware(RequestLog)  # outermost: requests refused for size are logged too

    app.add_exception_handler(CoordinatorError, refused)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, invalid_request)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, unreadable_body)  # type: ignore[arg-type]
