"""Request and response bodies of the coordinator API (version 1).

Request bodies are validated strictly: a JSON value of another type than the schema's
(``"3600"`` or ``true`` for a number, ``0`` for a boolean) is refused, not converted.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field


class EnrolRequest(BaseModel):
    model_config = ConfigDict(strict=True, json_schema_extra={"examples": [
        {"token": "one-time-token"}]})
    token: str = Field(min_length=1)


class EnrolResponse(BaseModel):
    study: str
    site: str
    site_index: int
    credential: str


class SiteInfo(BaseModel):
    site: str
    study: str
    site_index: int


class TaskResponse(BaseModel):
    study: str
    round: int
    kind: str = Field(description="statistics, train or evaluate; an attribution study's "
                                  "moments, newton, estimate or sandwich")
    model_version: int
    deadline: AwareDatetime = Field(description="UTC, with its offset")
    site_index: int
    plan: dict[str, object]
    feature_names: list[str]
    feature_ranges: list[list[float]]
    outcome: str | None = Field(None, description="The study's outcome (its label)")
    attribution: dict[str, Any] | None = Field(
        None, description="An attribution study: the step and what it is computed at")


class RefusalRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    reason: str = Field(min_length=1, max_length=500)


class SubmitResponse(BaseModel):
    sha256: str
    status: str = Field(description="'accepted', or 'already accepted' for a retry")


class StudyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    plan: dict[str, object]
    sites: list[str] = Field(min_length=1)
    # An attribution study (plan.attribution) may leave both out: its covariates' encoding.
    feature_names: list[str] | None = Field(None, min_length=1)
    # (low, high) per feature, as two-item lists: strict validation takes no JSON array
    # for a tuple.
    feature_ranges: list[Annotated[list[float], Field(min_length=2, max_length=2)]] | None = None
    min_sites: int | None = None
    round_timeout_s: float = Field(3600.0, gt=0, le=30 * 86400, allow_inf_nan=False,
                                   description="Seconds a round waits (at most 30 days)")
    outcome: str | None = Field(None, description="The label's outcome (e.g. chd_10y), for "
                                                  "the model cards")


class StudyCreated(BaseModel):
    id: str
    enrolment_tokens: dict[str, str]


class ModelInfo(BaseModel):
    version: int
    round: int
    sha256: str
    participants: list[str]
    metrics: dict[str, object]
    created_at: AwareDatetime = Field(description="UTC, with its offset")
