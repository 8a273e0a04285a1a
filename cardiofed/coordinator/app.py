"""The coordinator's FastAPI application."""

from __future__ import annotations

from fastapi import FastAPI

from cardiofed import __version__
from cardiofed.coordinator.deps import refused
from cardiofed.coordinator.routers import models, sites, studies, updates
from cardiofed.exceptions import CoordinatorError


def create_app() -> FastAPI:
    """The coordinator API; settings come from :func:`get_settings` (override in tests)."""
    app = FastAPI(title="CardioFed coordinator", version=__version__,
                  description="Coordinates federated training of a cardiovascular risk model. "
                              "Sites send model updates, metrics and statistics, never rows.")
    for module in (studies, sites, updates, models):
        app.include_router(module.router)

    app.add_exception_handler(CoordinatorError, refused)  # type: ignore[arg-type]

    @app.get("/healthz", tags=["health"])
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
