"""Models: versioned global weights (safetensors) and the shared preprocessor."""

from __future__ import annotations

from datetime import UTC

from fastapi import APIRouter, Response
from sqlalchemy import select

from cardiofed.coordinator import administration, enrolment, models, studies
from cardiofed.coordinator.deps import DB, Credential, PathNumber, ReleasingRoute, refusals
from cardiofed.exceptions import AuthenticationError, NotFound
from cardiofed.protocol.schemas import ModelInfo
from cardiofed.store import ModelVersion

router = APIRouter(prefix="/v1/studies", tags=["models"], route_class=ReleasingRoute)
SAFETENSORS = "application/octet-stream"
BINARY = {"schema": {"type": "string", "format": "binary"}}


def _member_or_admin(db: DB, study_id: str, credential: str | None) -> None:
    try:
        administration.authenticate_admin(db, credential, write=False)
    except AuthenticationError:
        studies.ensure_site_access(enrolment.authenticate_site(db, credential), study_id)


@router.get("/{study_id}/models", responses=refusals(401, 403, 404, 413, 422))
def list_models(study_id: str, db: DB,
                credential: Credential) -> list[ModelInfo]:
    """Every global model version of the study (version 0: the initial model)."""
    _member_or_admin(db, study_id, credential)
    studies.get_study(db, study_id)  # 404 for a study that does not exist
    versions = db.scalars(select(ModelVersion).where(ModelVersion.study_id == study_id)
                        .order_by(ModelVersion.version))
    return [ModelInfo(version=m.version, round=m.round_number, sha256=m.sha256,
                      participants=m.participants, metrics=m.metrics,
                      created_at=m.created_at.replace(tzinfo=UTC))
            for m in versions]


@router.get("/{study_id}/models/{version}", response_class=Response, responses={
    200: {"content": {SAFETENSORS: BINARY}, "headers": {"X-SHA256": {
        "description": "SHA-256 of the body, hex.", "required": True,
        "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"}}}},
    **refusals(401, 403, 404, 413, 422)})
def get_model(study_id: str, version: PathNumber, db: DB,
              credential: Credential) -> Response:
    _member_or_admin(db, study_id, credential)
    model = models.model_blob(db, study_id, version)
    return Response(model.weights, media_type=SAFETENSORS, headers={"X-SHA256": model.sha256})


@router.get("/{study_id}/preprocessor", response_class=Response, responses={
    200: {"content": {SAFETENSORS: BINARY}}, **refusals(401, 403, 404, 413, 422)})
def get_preprocessor(study_id: str, db: DB,
                     credential: Credential) -> Response:
    _member_or_admin(db, study_id, credential)
    study = studies.get_study(db, study_id)
    if study.preprocessor is None:
        raise NotFound(f"Study {study_id!r} has no preprocessor yet (statistics round open).")
    return Response(study.preprocessor, media_type=SAFETENSORS)
