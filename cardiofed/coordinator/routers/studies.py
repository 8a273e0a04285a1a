"""Studies: created and administered with an admin credential; status for sites too."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from cardiofed.coordinator import service
from cardiofed.coordinator.deps import DB, Admin, bearer
from cardiofed.coordinator.schemas import StudyCreate, StudyCreated
from cardiofed.exceptions import AuthenticationError, ConfigurationError, InvalidUpdate
from cardiofed.simulation.config import SimulationConfig

router = APIRouter(prefix="/v1/studies", tags=["studies"])


@router.post("", status_code=201)
def create_study(body: StudyCreate, db: DB, _: Admin) -> StudyCreated:
    if len(body.feature_ranges) != len(body.feature_names):
        raise InvalidUpdate("feature_ranges needs one (low, high) per feature name.")
    try:
        plan = SimulationConfig.create(**body.plan)
    except ConfigurationError as exc:
        raise InvalidUpdate(str(exc)) from None
    tokens = service.create_study(db, study_id=body.id, plan=plan, sites=body.sites,
                                  feature_names=body.feature_names,
                                  feature_ranges=body.feature_ranges, min_sites=body.min_sites,
                                  round_timeout_s=body.round_timeout_s, outcome=body.outcome)
    return StudyCreated(id=body.id, enrolment_tokens=tokens)


@router.get("/{study_id}/status")
def study_status(study_id: str, db: DB,
                 credential: Annotated[str | None, Depends(bearer)]) -> dict[str, object]:
    """What the federation is doing and which sites it waits for (admin or member site)."""
    try:
        service.authenticate_admin(db, credential)
    except AuthenticationError:
        site = service.authenticate_site(db, credential)
        service.ensure_site_access(site, study_id)
    return service.status(db, service.get_study(db, study_id))


@router.post("/{study_id}/sites/{site_name}/revoke", status_code=204)
def revoke(study_id: str, site_name: str, db: DB, _: Admin) -> None:
    service.revoke_site(db, study_id, site_name)
