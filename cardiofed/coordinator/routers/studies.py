"""Studies: created and administered with an admin credential; status for sites too."""

from __future__ import annotations

import math
from collections.abc import Sequence

from fastapi import APIRouter

from cardiofed.coordinator import administration, attribution, enrolment, status, studies
from cardiofed.coordinator.deps import DB, Admin, Clock, Credential, ReleasingRoute, refusals
from cardiofed.data.dataset import feature_ranges_for
from cardiofed.exceptions import AuthenticationError, ConfigurationError, InvalidUpdate
from cardiofed.protocol.schemas import (
    AttributionResponse,
    EnrolmentToken,
    MinSites,
    Reason,
    SiteAdded,
    StudyCreate,
    StudyCreated,
    SurvivalResponse,
)
from cardiofed.schema import Catalogue, canonical_features
from cardiofed.serving import attribution as attribution_answer
from cardiofed.serving.survival import study_report as survival_study_report
from cardiofed.simulation.config import SimulationConfig

router = APIRouter(prefix="/v1/studies", tags=["studies"], route_class=ReleasingRoute)


@router.post("", status_code=201, responses=refusals(401, 403, 409, 413, 422))
def create_study(body: StudyCreate, db: DB, key: Admin, clock: Clock) -> StudyCreated:
    """A model study (feature_names and feature_ranges required), or an analysis study
    (plan.attribution or plan.survival: its columns are its covariates' encoding)."""
    try:
        plan = SimulationConfig.create(**body.plan)
    except ConfigurationError as exc:
        raise InvalidUpdate(str(exc)) from None
    catalogue = plan.catalogue()  # the built-in features and the study's own
    ranges: Sequence[Sequence[float]]
    if plan.analysis is not None:
        names = attribution.columns_of(plan.analysis, catalogue)
        ranges = feature_ranges_for(names, catalogue)
    else:
        names, ranges = _model_columns(body, catalogue)
    tokens = administration.create_study(db, study_id=body.id, plan=plan, sites=body.sites,
                                  feature_names=body.feature_names or names,
                                  feature_ranges=[(lo, hi) for lo, hi in ranges],
                                  min_sites=body.min_sites,
                                  round_timeout_s=body.round_timeout_s, outcome=body.outcome,
                                  relay=body.relay,
                                  now=clock, by=(key, "api"))
    return StudyCreated(id=body.id, enrolment_tokens=tokens)


def _model_columns(body: StudyCreate, catalogue: Catalogue
                   ) -> tuple[list[str], list[list[float]]]:
    if body.feature_names is None or body.feature_ranges is None:
        raise InvalidUpdate("A model study needs feature_names and feature_ranges (only an "
                            "analysis study, plan.attribution or plan.survival, derives them).")
    if len(body.feature_ranges) != len(body.feature_names):
        raise InvalidUpdate("feature_ranges needs one (low, high) per feature name.")
    bad = [f"{name}: {list(r)}" for name, r in zip(body.feature_names, body.feature_ranges,
                                                   strict=True)
           if not (math.isfinite(r[0]) and math.isfinite(r[1]) and r[0] < r[1])]
    if bad:
        raise InvalidUpdate(f"feature_ranges must be finite with low < high; got "
                            f"{'; '.join(bad[:5])}.")
    try:
        features = canonical_features(body.feature_names)
        known = catalogue.encoded_names(features) == body.feature_names
    except (ValueError, KeyError) as exc:
        raise InvalidUpdate(f"feature_names must be the encoded columns of built-in or "
                            f"declared features (plan.study_features): {exc}") from None
    if not known:
        raise InvalidUpdate(f"feature_names {body.feature_names[:20]} are not the encoding of "
                            f"canonical features {features[:20]}; use "
                            f"'cardiofed admin create-study --features' to build them.")
    return body.feature_names, body.feature_ranges


def _reader(db: DB, credential: str | None, clock: Clock, study_id: str) -> None:
    """An admin or viewer credential, or a site of `study_id` (a read is not recorded as
    the site's contact: an uncommitted last_seen would hold SQLite's write lock for the
    whole request)."""
    try:
        administration.authenticate_admin(db, credential, write=False)
    except AuthenticationError:
        site = enrolment.authenticate_site(db, credential, clock, record_contact=False)
        studies.ensure_site_access(site, study_id)


@router.get("/{study_id}/status", responses=refusals(401, 403, 404, 413, 422))
def study_status(study_id: str, db: DB, clock: Clock,
                 credential: Credential) -> dict[str, object]:
    """What the federation is doing and which sites it waits for (admin or member site)."""
    _reader(db, credential, clock, study_id)
    return status.status(db, studies.get_study(db, study_id), clock)


@router.get("/{study_id}/attribution", responses=refusals(401, 403, 404, 409, 413, 422))
def attribution_result(study_id: str, db: DB, clock: Clock,
                       credential: Credential
                       ) -> AttributionResponse:
    """A finished attribution study's estimates (95% intervals, E-values), balance,
    overlap and card (admin, viewer or member site); 409 until it is finished."""
    _reader(db, credential, clock, study_id)
    return attribution_answer.report(studies.get_study(db, study_id))


@router.get("/{study_id}/survival", responses=refusals(401, 403, 404, 409, 413, 422))
def survival_result(study_id: str, db: DB, clock: Clock,
                    credential: Credential) -> SurvivalResponse:
    """A finished survival study's Cox model: coefficients with standard errors and
    hazard ratios, and Breslow's baseline hazard on the grid (admin, viewer or member
    site); 409 until it is finished."""
    _reader(db, credential, clock, study_id)
    return survival_study_report(studies.get_study(db, study_id))


@router.post("/{study_id}/sites/{site_name}/revoke", status_code=204,
             responses=refusals(401, 403, 404, 413, 422))
def revoke(study_id: str, site_name: str, db: DB, key: Admin, clock: Clock) -> None:
    administration.revoke_site(db, study_id, site_name, by=(key, "api"), now=clock)


@router.post("/{study_id}/pause", status_code=204,
             responses=refusals(401, 403, 404, 409, 413, 422))
def pause(study_id: str, body: Reason, db: DB, key: Admin, clock: Clock) -> None:
    """Stop the study from advancing (no round closes, no task is handed out)."""
    administration.pause_study(db, study_id, body.reason, by=(key, "api"), now=clock)


@router.post("/{study_id}/resume", status_code=204,
             responses=refusals(401, 403, 404, 409, 413, 422))
def resume(study_id: str, db: DB, key: Admin, clock: Clock) -> None:
    """Let a paused study go on (its open round gets a fresh deadline)."""
    administration.resume_study(db, study_id, by=(key, "api"), now=clock)


@router.post("/{study_id}/cancel", status_code=204,
             responses=refusals(401, 403, 404, 409, 413, 422))
def cancel(study_id: str, body: Reason, db: DB, key: Admin, clock: Clock) -> None:
    """End the study where it stands; the models published so far stay."""
    administration.cancel_study(db, study_id, body.reason, by=(key, "api"), now=clock)


@router.post("/{study_id}/min-sites", status_code=204,
             responses=refusals(401, 403, 404, 409, 413, 422))
def min_sites(study_id: str, body: MinSites, db: DB, key: Admin, clock: Clock) -> None:
    """Change how many active sites the study needs (a paused study may go on)."""
    administration.set_min_sites(db, study_id, body.min_sites, by=(key, "api"), now=clock)


@router.post("/{study_id}/sites", status_code=201,
             responses=refusals(401, 403, 404, 409, 413, 422))
def add_site(study_id: str, body: SiteAdded, db: DB, key: Admin,
             clock: Clock) -> EnrolmentToken:
    """Add a site to a running study; returns its one-time enrolment token."""
    token = administration.add_site(db, study_id, body.name, by=(key, "api"), now=clock)
    return EnrolmentToken(site=body.name, enrolment_token=token)


@router.post("/{study_id}/sites/{site_name}/readmit", status_code=201,
             responses=refusals(401, 403, 404, 409, 413, 422))
def readmit(study_id: str, site_name: str, db: DB, key: Admin,
            clock: Clock) -> EnrolmentToken:
    """Re-admit a revoked site with a new one-time enrolment token."""
    token = administration.readmit_site(db, study_id, site_name, by=(key, "api"), now=clock)
    return EnrolmentToken(site=site_name, enrolment_token=token)
