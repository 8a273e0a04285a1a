"""Coordinator settings, from the environment (``CARDIOFED_*``) or explicit values."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from cardiofed.defaults import DEFAULT_DATABASE_URL

__all__ = ["CoordinatorSettings", "get_settings"]


class CoordinatorSettings(BaseSettings):
    """``database_url`` takes any SQLAlchemy URL: SQLite (default) or PostgreSQL."""

    model_config = SettingsConfigDict(env_prefix="CARDIOFED_", frozen=True)

    database_url: str = DEFAULT_DATABASE_URL
    max_update_bytes: int = Field(default=16 * 1024 * 1024, gt=0)
    long_poll_s: float = Field(default=20.0, ge=0, le=300)


@lru_cache
def get_settings() -> CoordinatorSettings:
    return CoordinatorSettings()
