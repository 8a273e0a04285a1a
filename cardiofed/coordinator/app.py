"""The coordinator's FastAPI application."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from sqlalchemy import func, select
from starlette.exceptions import HTTPException

from cardiofed import __version__
from cardiofed.coordinator import administration, dashboard
from cardiofed.coordinator.deps import DB, Credential, ReleasingRoute, refusals
from cardiofed.coordinator.routers import models, relay, sites, studies, updates
from cardiofed.coordinator.settings import get_settings
from cardiofed.exceptions import CoordinatorError
from cardiofed.store import Round, Update
from cardiofed.web.errors import invalid_request, refused, unreadable_body
from cardiofed.web.limits import BodyLimits, BodySizeLimit
from cardiofed.web.metrics import RequestMetrics, ServiceMetrics
from cardiofed.web.security import SecurityHeaders

JSON_BODY_LIMIT = 64 * 1024  # enrolment, refusals: small JSON, often before authentication
STUDY_BODY_LIMIT = 4 << 20  # a study plan with its sites, before the admin key is checked


def create_app() -> FastAPI:
    """The coordinator API; settings come from :func:`get_settings` (tests override the
    dependency :func:`cardiofed.coordinator.deps.app_settings`)."""
    app = FastAPI(title="CardioFed coordinator", version=__version__,
                  description="Coordinates federated training of a cardiovascular risk model. "
                              "Sites send model updates, metrics and statistics, never rows.")
    app.router.route_class = ReleasingRoute
    for module in (studies, sites, updates, models, relay, dashboard):
        app.include_router(module.router)

    app.add_exception_handler(CoordinatorError, refused)  # type: ignore[arg-type]
    # 422s name the bad fields (at most 20) and never echo the input (a NaN input made
    # FastAPI's own handler fail with a 500).
    app.add_exception_handler(RequestValidationError, invalid_request)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, unreadable_body)  # type: ignore[arg-type]
    # No body is parsed beyond its limit, authenticated or not. Only the routes that take
    # payloads (site uploads, a region's relayed preprocessor and models) take up to the
    # configured update size, and they authenticate before they read the body; a new
    # study (a national one lists 36,000 sites) 4 MiB; everything else 64 KiB.
    upload = get_settings().max_update_bytes
    app.add_middleware(BodySizeLimit, limits=BodyLimits(
        default=JSON_BODY_LIMIT, routes={
            r"/v1/studies/[^/]+/rounds/[^/]+/updates": upload,
            # a secure sum's masked vector is as long as an update
            r"/v1/studies/[^/]+/rounds/[^/]+/secure/[a-z]+": upload,
            r"/v1/studies/[^/]+/relay/(preprocessor|models/[^/]+)": upload,
            r"/v1/studies/?": STUDY_BODY_LIMIT}))
    metrics = app.state.metrics = ServiceMetrics()
    # accepted, already accepted, refused (any 4xx, the reason in the request metrics)
    app.state.uploads = metrics.counter("cardiofed_uploads", "Site uploads answered",
                                        ["outcome"])
    rounds_closed = metrics.gauge("cardiofed_rounds_closed", "Rounds closed, all studies")
    rounds_open = metrics.gauge("cardiofed_rounds_open", "Rounds open, all studies")
    buffered = metrics.gauge("cardiofed_updates_buffered",
                             "Accepted updates of open rounds not yet aggregated")
    app.add_middleware(RequestMetrics, metrics=metrics)
    app.add_middleware(SecurityHeaders)

    @app.get("/metrics", tags=["health"], response_class=Response,
             responses={200: {"content": {"text/plain": {}}}, **refusals(401, 413)})
    def prometheus(db: DB, credential: Credential) -> Response:
        """Prometheus metrics (an admin or viewer credential as the scrape's bearer)."""
        administration.authenticate_admin(db, credential, write=False)
        closed = Round.closed_at.is_not(None)
        rounds_closed.set(db.scalar(select(func.count()).where(closed)) or 0)
        rounds_open.set(db.scalar(select(func.count()).select_from(Round).where(~closed)) or 0)
        buffered.set(db.scalar(select(func.count()).select_from(Update).join(
            Round, Update.round_id == Round.id).where(~closed, Update.aggregated_into.is_(None)))
            or 0)
        return metrics.response()

    @app.get("/healthz", tags=["health"], responses=refusals(413))
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
