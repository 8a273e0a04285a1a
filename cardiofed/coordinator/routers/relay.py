"""Relay: a regional study's side of a hierarchical federation, driven by its region's
node with an admin credential (:mod:`cardiofed.protocol.relay`)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool

from cardiofed.coordinator import administration, regional
from cardiofed.coordinator.deps import (
    DB,
    Admin,
    Clock,
    Credential,
    PathNumber,
    ReleasingRoute,
    refusals,
)
from cardiofed.coordinator.routers.models import BINARY, SAFETENSORS
from cardiofed.protocol.schemas import RelayRoundRequest

router = APIRouter(prefix="/v1/studies", tags=["relay"], route_class=ReleasingRoute)
BODY = {"requestBody": {"required": True, "content": {SAFETENSORS: BINARY}}}


@router.get("/{study_id}/relay", responses=refusals(401, 404, 409, 413, 422))
def relay_info(study_id: str, db: DB,
               credential: Credential) -> dict[str, object]:
    """The relay study's plan, columns and where it stands (admin or viewer)."""
    administration.authenticate_admin(db, credential, write=False)
    return regional.relay_info(db, study_id)


@router.put("/{study_id}/relay/preprocessor", status_code=204, openapi_extra=BODY,
            responses=refusals(401, 403, 404, 409, 413, 422))
async def relay_preprocessor(study_id: str, request: Request, db: DB, _: Admin) -> None:
    """The national study's preprocessor (safetensors), set once."""
    await run_in_threadpool(regional.relay_preprocessor, db, study_id, await request.body())


@router.put("/{study_id}/relay/models/{version}", status_code=204, openapi_extra=BODY,
            responses=refusals(401, 403, 404, 409, 413, 422))
async def relay_model(study_id: str, version: PathNumber, request: Request, db: DB,
                      _: Admin) -> None:
    """National model `version` (safetensors), for the relay study's sites."""
    await run_in_threadpool(regional.relay_model, db, study_id, version, await request.body())


@router.post("/{study_id}/relay/rounds", status_code=204,
             responses=refusals(401, 403, 404, 409, 413, 422))
def relay_round(study_id: str, body: RelayRoundRequest, db: DB, _: Admin,
                clock: Clock) -> None:
    """Open the national round `number` for the relay study's sites."""
    regional.relay_round(db, study_id, number=body.number, kind=body.kind,
                        model_version=body.model_version, now=clock)


@router.get("/{study_id}/relay/rounds/{number}", response_class=Response, responses={
    200: {"content": {SAFETENSORS: BINARY, "application/json": {}}},
    204: {"description": "The round still waits for its sites"},
    **refusals(401, 403, 404, 409, 413, 422)})
def relay_result(study_id: str, number: PathNumber, db: DB, _: Admin,
                 clock: Clock) -> Response:
    """Round `number`'s aggregate once it closed: statistics or an update (safetensors),
    or the evaluation summary (JSON); 204 while it waits for its sites."""
    result = regional.relay_result(db, study_id, number, clock)
    if result is None:
        return Response(status_code=204)
    return Response(result, media_type="application/json" if result[:1] == b"{"
                    else SAFETENSORS)
