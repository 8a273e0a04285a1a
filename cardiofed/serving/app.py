"""The standalone risk API (``cardiofed serve``): the routes of
:mod:`cardiofed.serving.api`, the clinician's calculator page and a health check."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.telemetry import TelemetryConfig

from cardiofed import __version__
from cardiofed.serving import calculator
from cardiofed.serving.api import add_risk_api
from cardiofed.serving.settings import ServingSettings, get_serving_settings
from cardiofed.web.errors import responses
from cardiofed.web.security import STRICT_POLICY, SecurityHeaders

_NO_TELEMETRY: TelemetryConfig = {"tracing": False, "metrics": False, "logs": False}


def create_serving_app(settings: ServingSettings | None = None) -> FastAPI:
    """The standalone risk API (``cardiofed serve``)."""
    settings = settings or get_serving_settings()
    app = FastAPI(title="CardioFed risk API", version=__version__,
                  description="Cardiovascular risk from a federated model. Authenticate "
                              "with `Authorization: Bearer <API key>`.",
                  telemetry=None if settings.opentelemetry else _NO_TELEMETRY)
    add_risk_api(app, settings)
    app.include_router(calculator.router)
    # The calculator page carries its own small stylesheet inline.
    app.add_middleware(SecurityHeaders, policy=STRICT_POLICY.replace(
        "style-src 'self'", "style-src 'self' 'unsafe-inline'"))

    @app.get("/healthz", tags=["health"], responses=responses(413))
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
