"""Settings of the risk API, from ``CARDIOFED_*`` environment variables: its database,
the risk categories, batch and body limits, and cache lifetimes. Light to import: offline
scoring (``cardiofed predict``) reads the risk categories from here."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cardiofed.defaults import DEFAULT_DATABASE_URL
from cardiofed.serving.model import RISK_CATEGORIES, RISK_THRESHOLDS
from cardiofed.web.limits import BodyLimits

# Room per patient in a batch body: one with every feature, units and indentation is
# under 1 KiB of JSON; the default batch limit is max_batch times this.
PATIENT_BODY_BYTES = 2 * 1024
BATCH_PATH = "/v1/risk/batch"


class ServingSettings(BaseSettings):
    """Settings of the risk API, from ``CARDIOFED_*`` environment variables."""

    model_config = SettingsConfigDict(env_prefix="CARDIOFED_", frozen=True)

    database_url: str = DEFAULT_DATABASE_URL
    risk_thresholds: list[float] = list(RISK_THRESHOLDS)
    risk_categories: list[str] = list(RISK_CATEGORIES)
    max_batch: int = Field(default=1000, ge=1, le=100_000)
    max_body_bytes: int = Field(default=64 * 1024, ge=1024, description=(
        "Largest request body in bytes, except the batch endpoint's."))
    max_batch_body_bytes: int | None = Field(default=None, ge=1024, description=(
        "Largest batch request body in bytes (default: max_batch x 2 KiB, and at least "
        "max_body_bytes)."))
    key_cache_s: float = Field(default=5.0, ge=0)
    promoted_cache_s: float = Field(default=5.0, ge=0)
    opentelemetry: bool = Field(default=False, description=(
        "FastAPI's native OpenTelemetry spans and metrics, for a deployment that configures "
        "OpenTelemetry providers (its check costs every request about 5% of the "
        "application's time even when none is configured; /metrics and the request log "
        "are always on)."))

    @model_validator(mode="after")
    def _categories(self) -> ServingSettings:
        t = self.risk_thresholds
        if any(not 0 < x < 1 for x in t) or any(a >= b for a, b in zip(t, t[1:], strict=False)):
            raise ValueError(f"risk_thresholds must increase strictly within (0, 1); got {t}")
        if len(self.risk_categories) != len(t) + 1:
            raise ValueError(f"risk_categories needs {len(t) + 1} names for {len(t)} "
                             f"thresholds; got {self.risk_categories}")
        return self

    def body_limits(self) -> BodyLimits:
        """The batch endpoint's limit, and ``max_body_bytes`` for every other path."""
        batch = self.max_batch_body_bytes or max(self.max_body_bytes,
                                                 self.max_batch * PATIENT_BODY_BYTES)
        return BodyLimits(default=self.max_body_bytes, prefixes={BATCH_PATH: batch})


@lru_cache
def get_serving_settings() -> ServingSettings:
    return ServingSettings()
