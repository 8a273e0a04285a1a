"""The coordinator's FastAPI application."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from cardiofed import __version__
from cardiofed.coordinator.deps import refusals, refused
from cardiofed.coordinator.routers import models, sites, studies, updates
from cardiofed.coordinator.settings import get_settings
from cardiofed.exceptions import CoordinatorError
from cardiofed.web.errors import invalid_request, unreadable_body
from cardiofed.web.limits import BodyLimits, BodySizeLimit

JSON_BODY_LIMIT = 64 * 1024  # enrolment, refusals: small JSON, often before authentication


def create_app() -> FastAPI:
    """The coordinator API; settings come from :func:`get_settings` (override in tests)."""
    app = FastAPI(title="CardioFed coordinator", version=__version__,
                  description="Coordinates federated training of a cardiovascular risk model. "
                              "Sites send model updates, metrics and statistics, never rows.")
    for module in (studies, sites, updates, models):
        app.include_router(module.router)

    app.add_exception_handler(CoordinatorError, refused)  # type: ignore[arg-type]
    # 422s name the bad fields (at most 20) and never echo the input (a NaN input made
    # FastAPI's own handler fail with a 500).
    app.add_exception_handler(RequestValidationError, invalid_request)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, unreadable_body)  # type: ignore[arg-type]
    # No body is parsed beyond its limit, authenticated or not: uploads up to the
    # configured update size, everything else 64 KiB.
    app.add_middleware(BodySizeLimit, limits=BodyLimits(
        default=JSON_BODY_LIMIT, prefixes={"/v1/studies": get_settings().max_update_bytes}))

    @app.get("/healthz", tags=["health"], responses=refusals(413))
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
