"""Request and response bodies of the coordinator API (version 1).

Request bodies are validated strictly: a JSON value of another type than the schema's
(``"3600"`` or ``true`` for a number, ``0`` for a boolean) is refused, not converted.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field

from cardiofed.names import NAME_PATTERN


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


# A secure sum's messages (cardiofed.protocol.secure_sums): keys, sealed shares and masked
# vectors travel as base64 (standard alphabet) inside JSON.
B64 = Annotated[str, Field(max_length=1 << 22, pattern=r"^[A-Za-z0-9+/]*={0,2}$")]


class SecureAdvert(BaseModel):
    """A site's public keys for one secure sum, and the noise multiplier its budget needs
    on the sum."""

    model_config = ConfigDict(extra="forbid", strict=True)
    c_public: B64
    s_public: B64
    noise_multiplier: float = Field(gt=0, le=1e6, allow_inf_nan=False)
    signature: B64 | None = Field(None, max_length=128, description=(
        "Ed25519 signature of the advertisement by the site's roster key (a node with a "
        "roster signs, and shares keys only when every advertisement is signed)"))


class SecureShares(BaseModel):
    """A site's sealed share pairs, one per neighbour."""

    model_config = ConfigDict(extra="forbid", strict=True)
    sealed: dict[str, B64] = Field(max_length=10_000)  # names: the sender's neighbours


class SecureInput(BaseModel):
    """A site's masked vector: little-endian unsigned 64-bit ring elements."""

    model_config = ConfigDict(extra="forbid", strict=True)
    masked: B64


class SecureConfirm(BaseModel):
    """A site's signature of the survivor list its confirm task named (by its roster
    key): no site reveals a share until enough sites signed the same list."""

    model_config = ConfigDict(extra="forbid", strict=True)
    signature: B64 = Field(max_length=128)


class RevealedShare(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    kind: Literal["b", "s"]
    share: B64


class SecureReveal(BaseModel):
    """For each site whose shares this site holds: its self-mask share (``b``, the site's
    input arrived) or its mask-key share (``s``, it dropped)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    shares: dict[str, RevealedShare] = Field(max_length=10_000)  # names: sites that shared


class SecureTask(BaseModel):
    """A secure round's step for this site, with what it needs for that step."""

    step: Literal["advertise", "share", "input", "confirm", "reveal"]
    attempt: int
    sites: list[str] | None = Field(default=None, description="advertise: the round's sites")
    adverts: dict[str, SecureAdvert] | None = Field(default=None, description="share: every "
                                                    "site's advertisement")
    noise_multiplier: float | None = Field(default=None, description="share and input: the "
                                           "largest any advertising site needs")
    inbox: dict[str, str] | None = Field(default=None, description="input: the sealed share "
                                         "pairs the site's neighbours sent it")
    survivors: list[str] | None = Field(default=None, description="confirm and reveal: the "
                                        "sites of this site's sum whose masked input arrived")
    confirmations: dict[str, str] | None = Field(default=None, description=(
        "reveal, after a confirm step: each confirming site's signature of the survivor "
        "list"))


class TaskResponse(BaseModel):
    study: str
    round: int
    kind: str = Field(description="statistics, train, intercept or evaluate; an attribution "
                                  "study's moments, newton, estimate or sandwich; a survival "
                                  "study's km, cox, baseline or assess")
    model_version: int
    deadline: AwareDatetime = Field(description="UTC, with its offset")
    site_index: int
    plan: dict[str, object]
    feature_names: list[str]
    feature_ranges: list[list[float]]
    outcome: str | None = Field(None, description="The study's outcome (its label)")
    attribution: dict[str, Any] | None = Field(
        None, description="An analysis study (attribution or survival): the step and what "
                          "it is computed at")
    secure: SecureTask | None = Field(
        None, description="A secure round (plan.secure_aggregation): the step of its "
                          "secure sum")


class RefusalRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    reason: str = Field(min_length=1, max_length=500)


class SubmitResponse(BaseModel):
    sha256: str
    status: str = Field(description="'accepted', or 'already accepted' for a retry")


class StudyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    id: str = Field(min_length=1, max_length=64, pattern=NAME_PATTERN)
    plan: dict[str, object]
    sites: list[Annotated[str, Field(pattern=NAME_PATTERN)]] = Field(min_length=1)
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
    relay: bool = Field(False, description="A regional study relayed into a national one: "
                                           "its rounds are opened by the region's node")


def _whole(value: object) -> object:
    """JSON Schema's integers include 3.0; strict validation takes them, not "3" or true."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


WholeNumber = Annotated[int, BeforeValidator(_whole)]


class RelayRoundRequest(BaseModel):
    """The national round a region's node opens in its relay study."""

    model_config = ConfigDict(extra="forbid", strict=True)
    number: WholeNumber = Field(ge=1, le=1_000_000)
    kind: Literal["train", "intercept", "evaluate"]
    model_version: WholeNumber = Field(ge=0, le=1_000_000)


class StudyCreated(BaseModel):
    id: str
    enrolment_tokens: dict[str, str]


class Reason(BaseModel):
    """Why an operator pauses or cancels a study (kept in the status and audit log)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    reason: str = Field(min_length=1, max_length=200)


def _integral(value: object) -> object:
    """JSON's 3.0 is the integer 3 (as JSON Schema counts it); 3.5 stays a float."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


class MinSites(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    min_sites: Annotated[int, BeforeValidator(_integral)] = Field(ge=1, le=1_000_000)


class SiteAdded(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(min_length=1, max_length=64, pattern=NAME_PATTERN)


class EnrolmentToken(BaseModel):
    site: str
    enrolment_token: str


class ModelInfo(BaseModel):
    version: int
    round: int
    sha256: str
    participants: list[str]
    metrics: dict[str, object]
    created_at: AwareDatetime = Field(description="UTC, with its offset")


class AttributionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"study": "statins-2026"}]})
    study: str = Field(min_length=1, max_length=64, pattern=NAME_PATTERN)


class EffectEstimate(BaseModel):
    """One estimator's effect: risks by arm, risk difference and ratio with 95% intervals,
    the E-values of the estimate and of the interval's limit nearest 1."""

    treated_risk: float
    control_risk: float
    risk_difference: float
    rd_low: float
    rd_high: float
    risk_ratio: float
    rr_low: float
    rr_high: float
    n_treated: float
    n_control: float
    e_value: float
    e_value_ci: float


class Overlap(BaseModel):
    bins: int = Field(description="Equal-width bins of the propensity score over [0, 1]")
    treated: list[float]
    control: list[float]


class Propensity(BaseModel):
    """The propensity model: logistic coefficients (intercept first) on the covariates'
    columns standardised with the federation's mean and SD."""

    coefficients: list[float]
    mean: list[float]
    sd: list[float]


class AttributionCard(BaseModel):
    treatment: str
    outcome: str | None
    covariates: list[str]
    columns: list[str] = Field(description="The covariates' model columns")
    methods: list[str]
    trim: float
    sites: list[str]
    patients: int
    trimmed: int
    propensity_newton_steps: int
    restarts: int
    notes: list[str]
    assumptions: str
    private: bool
    releases: str = Field(description="What the sites released: exact or noisy sums")


class AttributionResponse(BaseModel):
    """A finished attribution study: estimates, balance (SMD per covariate before and
    after each estimator; |SMD| < 0.1 counts as balanced), overlap and card."""

    study: str
    estimand: str
    estimate: dict[str, EffectEstimate]
    balance: dict[str, dict[str, float]]
    balanced: dict[str, bool]
    overlap: Overlap
    propensity: Propensity
    card: AttributionCard


class CoxCoefficient(BaseModel):
    coefficient: float = Field(description="log hazard ratio per unit of the column")
    se: float
    hazard_ratio: float
    hr_low: float = Field(description="95% interval (Wald)")
    hr_high: float


class SurvivalSiteEvaluation(BaseModel):
    """One site's figures of the model it is served, on its held-out rows at the horizon
    (None where a figure is undefined), judged by the coordinator as the simulator judges
    its own: Uno's C, slope and calibration-in-the-large on their 95% intervals."""

    n: int
    events: int
    uno_c: float | None
    uno_c_ci: list[float | None]
    observed: float | None = Field(description="1 - the site's Kaplan-Meier survival by "
                                               "the horizon")
    observed_ci: list[float | None]
    predicted: float | None = Field(description="The mean predicted risk by the horizon")
    slope: float | None
    slope_ci: list[float | None]
    citl: float | None
    citl_ci: list[float | None]
    harrell_c: float | None
    horizon_auc: float | None = Field(description="Cumulative/dynamic AUC at the horizon")
    brier: float | None = Field(description="IPCW Brier score at the horizon")
    verdict: str
    calibration_verdict: str
    reasons: list[str]


class SurvivalResponse(BaseModel):
    """A finished survival study: the federated Cox model's coefficients with standard
    errors (observed information), and Breslow's baseline cumulative hazard on the public
    grid (covariates at ``center``): one, or stratified by site, each site's own."""

    study: str
    outcome: str | None
    columns: list[str]
    coefficients: dict[str, CoxCoefficient]
    covariance: list[list[float]]
    center: list[float]
    loglik: float
    newton_steps: int
    events: float = Field(description="Events on the grid, summed over the sites")
    sites: list[str]
    restarts: int
    stratified: bool
    ties: str
    grid_step_years: float
    max_years: float
    horizon_years: float
    baseline: list[float] | None = Field(
        None, description="H0 at each grid point (None when stratified by site)")
    baseline_at_horizon: float | None = None
    baselines: dict[str, list[float]] | None = Field(
        None, description="Stratified by site: each site's own H0 at each grid point")
    baselines_at_horizon: dict[str, float] | None = Field(
        None, description="Stratified by site: each site's H0 by horizon_years (its served "
                          "model's baseline)")
    evaluation: dict[str, SurvivalSiteEvaluation] | None = Field(
        None, description="With evaluate: each site's figures on its held-out rows")
    without_baseline: list[str] | None = Field(
        None, description="Stratified by site: sites without an event by horizon_years "
                          "(no baseline; not served)")
    kaplan_meier: dict[str, list[float | None]] | None = Field(
        None, description="The pooled Kaplan-Meier survival at each grid point, its "
                          "Greenwood standard error (None where undefined) and the "
                          "Nelson-Aalen cumulative hazard (None with kaplan_meier = false)")
    kaplan_meier_risk_at_horizon: float | None = Field(
        None, description="1 - the pooled Kaplan-Meier survival by horizon_years")
    releases: str = Field(description="What the sites released")
