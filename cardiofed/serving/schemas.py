"""Request and response bodies of the risk API (version 1), with OpenAPI examples.

Request bodies are validated strictly: a JSON value of another type than the schema's
(``0`` or ``"true"`` for ``contributions``) is refused, not converted. Each feature's
value is checked against the scoring model's inputs (:mod:`cardiofed.serving.model`).
"""

from __future__ import annotations

from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, create_model

from cardiofed.names import NAME_PATTERN

PATIENT_EXAMPLE: Any = {
    "age": 61, "sex": "male", "total_cholesterol": 5.4, "hdl_cholesterol": 1.1,
    "systolic_bp": 142, "bp_treated": True, "current_smoker": False, "diabetes": False}
UNITS_EXAMPLE: Any = {"total_cholesterol": "mmol/L", "hdl_cholesterol": "mmol/L"}
PIN = ("Pin a model version (default: the promoted one). Another version than the "
       "promoted one needs a key with the `score:any-version` scope.")


class Patient(BaseModel):
    """One patient's canonical features (the model card lists them), in canonical units
    unless ``units`` states others (e.g. cholesterol in mmol/L)."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"features": PATIENT_EXAMPLE, "units": UNITS_EXAMPLE}]})
    # An empty object is refused, and the schema says so (minProperties: 1).
    features: dict[str, float | int | bool | str | None] = Field(min_length=1)
    units: dict[str, str] = Field(default_factory=dict)
    impute_missing: bool = Field(False, description="Fill absent features with the "
                                                    "federation's median (listed in the "
                                                    "response) instead of refusing.")


class RiskRequest(Patient):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"features": PATIENT_EXAMPLE, "units": UNITS_EXAMPLE, "site": "community_01"}]})
    model: str | None = Field(None, max_length=200, description=PIN)
    site: str | None = Field(None, pattern=NAME_PATTERN,
                             description="The caller's site: its recalibration, when "
                                         "the model has one, is applied.")
    contributions: bool = True


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"patients": [{"features": PATIENT_EXAMPLE, "units": UNITS_EXAMPLE}]}]})
    # The largest max_batch a server accepts; a server's own is set by batch_request().
    patients: list[Patient] = Field(min_length=1, max_length=100_000)
    model: str | None = Field(None, max_length=200, description=PIN)
    site: str | None = Field(None, pattern=NAME_PATTERN)
    contributions: bool = False


def batch_request(max_batch: int) -> type[BatchRequest]:
    """:class:`BatchRequest` holding at most `max_batch` patients. Pydantic refuses a
    longer list by its length, before it validates a single patient, and the OpenAPI
    document states the limit (``maxItems``)."""
    return create_model("BatchRequest", __base__=BatchRequest, __module__=__name__,
                        patients=(list[Patient], Field(min_length=1, max_length=max_batch)))


class Calibration(BaseModel):
    site: str
    applied: bool
    intercept: float | None = None
    slope: float | None = None
    terms: dict[str, float] = Field(
        default_factory=dict, description="Corrections of model terms the site's update "
                                          "revised, on the standardised scale.")
    reason: str = ""


class RiskResult(BaseModel):
    risk: float = Field(description="Predicted probability of the model's outcome "
                                    "(e.g. 10-year CHD), after the site's calibration if any.")
    category: str | None = Field(description=(
        "Risk category (by default the 10-year bands of the 2019 ACC/AHA guideline); null "
        "when the model's outcome has no 10-year horizon, which the bands are defined for."))
    logit: float = Field(description=(
        "The linear predictor (uncalibrated): the log-odds of a logistic model or network; "
        "for a Cox model (the card's link 'cloglog') the log cumulative hazard by the "
        "horizon, risk = 1 - exp(-exp(logit))."))
    baseline_logit: float | None = Field(
        None, description="The linear predictor of the federation's average patient; plus "
                          "the contributions it gives `logit` (uncalibrated).")
    contributions: dict[str, float] | None = None
    imputed: list[str] = Field(default_factory=list)


class RiskResponse(RiskResult):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "risk": 0.142, "category": "intermediate", "logit": -1.80, "baseline_logit": -2.31,
        "contributions": {"age": 0.52, "sex": 0.21, "systolic_bp": 0.18},
        "imputed": [], "model_version": "demo-v1", "outcome": "cvd_10y",
        "risk_of": "First cardiovascular event within 10 years (10-year horizon)",
        "calibration": None, "attribution": "exact (logistic regression)"}]})
    model_version: str
    outcome: str
    risk_of: str = Field(description="What the risk is the probability of: the outcome "
                                     "and its time horizon, as the model card states.")
    calibration: Calibration | None = None
    attribution: str


class ModelSummary(BaseModel):
    """A registered model version, as ``GET /v1/models`` lists it."""

    version: str
    study: str
    promoted: bool
    content_sha256: str
    created_at: AwareDatetime = Field(description="When it was registered (UTC).")
    outcome: str | None = None
    model: str | None = None


class BatchResponse(BaseModel):
    model_version: str
    outcome: str
    risk_of: str
    calibration: Calibration | None = None
    attribution: str
    results: list[RiskResult]
