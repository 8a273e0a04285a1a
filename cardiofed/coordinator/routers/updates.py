"""Updates: a site uploads its result for a round (safetensors or, to evaluate, JSON)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session, sessionmaker

from cardiofed.coordinator import enrolment, secure_sums, studies, uploads, wakeups
from cardiofed.coordinator.deps import (
    DB,
    Clock,
    Credential,
    CurrentSite,
    PathNumber,
    ReleasingRoute,
    Settings,
    refusals,
)
from cardiofed.coordinator.rounds import advance_locked
from cardiofed.coordinator.settings import CoordinatorSettings
from cardiofed.exceptions import CoordinatorError, PayloadTooLarge
from cardiofed.protocol.schemas import (
    RefusalRequest,
    SecureAdvert,
    SecureConfirm,
    SecureInput,
    SecureReveal,
    SecureShares,
    SubmitResponse,
)
from cardiofed.store import session_factory
from cardiofed.web.errors import RateLimited

router = APIRouter(prefix="/v1/studies", tags=["updates"], route_class=ReleasingRoute)

# Uploads of one site this process holds at once (a node uploads one at a time; a retry
# may overlap it): beyond, a 429, so one credential cannot pin the workers' memory.
MAX_UPLOADS_IN_FLIGHT = 2
_in_flight: dict[int, int] = {}  # site id -> uploads being received or stored


# The body is read as bytes, whatever its Content-Type: safetensors, or for an evaluation
# round a JSON object of metrics (the checks in cardiofed.coordinator.payloads).
PAYLOAD = {"requestBody": {"required": True, "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary"}}}, "description": (
    "The round's result: safetensors (tensors and a manifest), or for an evaluation round "
    "a JSON object of metrics; read as bytes whatever the Content-Type.")}}


@router.post("/{study_id}/rounds/{round_number}/updates", openapi_extra=PAYLOAD,
             responses=refusals(401, 403, 404, 409, 413, 422, 429))
async def submit_update(study_id: str, round_number: PathNumber, request: Request,
                        credential: Credential, settings: Settings,
                        clock: Clock) -> SubmitResponse:
    """Accept a site's payload for a round; committed before it is acknowledged."""
    # The hot path of a round: two hops to the thread pool (authenticate, then store),
    # each with its own session, so no database connection is held while the body
    # arrives or while the request waits for a worker thread (sync dependencies would
    # cost a hop each, and a session opened by one would pin its connection throughout).
    sessions = session_factory(settings.database_url)
    target = await run_in_threadpool(_authenticate, sessions, credential, study_id,
                                     round_number)
    site_id = target.site.id
    if _in_flight.get(site_id, 0) >= MAX_UPLOADS_IN_FLIGHT:
        raise RateLimited(f"Site {target.site.name!r} already has {MAX_UPLOADS_IN_FLIGHT} "
                          f"uploads in progress; retry when one has finished.", 1.0)
    _in_flight[site_id] = _in_flight.get(site_id, 0) + 1
    try:
        return await _receive(request, sessions, target, settings, clock)
    finally:
        _in_flight[site_id] -= 1
        if not _in_flight[site_id]:
            del _in_flight[site_id]


async def _receive(request: Request, sessions: sessionmaker[Session],
                   target: enrolment.UploadTarget, settings: CoordinatorSettings,
                   clock: studies.Clock) -> SubmitResponse:
    declared = int(request.headers.get("content-length") or 0)
    if declared > settings.max_update_bytes:
        raise PayloadTooLarge(f"Payload of {declared} bytes exceeds the limit of "
                              f"{settings.max_update_bytes} bytes.")
    chunks, size = [], 0
    async for chunk in request.stream():  # bounded even without a Content-Length
        size += len(chunk)
        if size > settings.max_update_bytes:
            raise PayloadTooLarge(f"Payload exceeds the limit of {settings.max_update_bytes} "
                                  f"bytes.")
        chunks.append(chunk)
    # Blocking database work (and, for the last report, the round's aggregation) runs in
    # the thread pool: on the event loop it would stall every other request, including
    # the ones that must finish to release the database lock it waits for.
    counted = request.app.state.uploads
    try:
        digest, new = await run_in_threadpool(
            _store, sessions, target, b"".join(chunks),
            settings.max_update_bytes, clock)
    except CoordinatorError:
        counted.labels("refused").inc()
        raise
    counted.labels("accepted" if new else "already accepted").inc()
    return SubmitResponse(sha256=digest, status="accepted" if new else "already accepted")


def _authenticate(sessions: sessionmaker[Session], credential: str | None, study_id: str,
                  round_number: int) -> enrolment.UploadTarget:
    """The uploading site, its study and the round, detached."""
    with sessions() as db:
        target = enrolment.authenticate_upload(db, credential, study_id, round_number)
        db.expunge_all()
        return target


def _store(sessions: sessionmaker[Session], target: enrolment.UploadTarget, payload: bytes,
           max_bytes: int, clock: studies.Clock) -> tuple[str, bool]:
    with sessions() as db:
        return uploads.submit(db, target, payload=payload, max_bytes=max_bytes, now=clock)


@router.post("/{study_id}/rounds/{round_number}/refusal", status_code=204,
             responses=refusals(401, 403, 404, 413, 422))
def refuse_task(study_id: str, round_number: PathNumber, body: RefusalRequest,
                site: CurrentSite, db: DB, clock: Clock) -> None:
    """A site's node refuses its task of a round (outside the plan it pinned); the
    refusal and its reason show in the study's status and the round goes on without it."""
    studies.ensure_site_access(site, study_id)
    enrolment.refuse(db, site, round_number=round_number, reason=body.reason, now=clock)
    wakeups.notify(study_id)


# A secure round's steps (cardiofed.protocol.secure_sums): one endpoint per message kind.
Attempt = Annotated[int, Query(ge=0, le=1_000_000, description="The sum's attempt, as in "
                                                               "the task")]
SECURE_REFUSALS = refusals(401, 403, 404, 409, 413, 422)


def _secure(credential: str | None, db: Session, clock: studies.Clock, study_id: str,
            round_number: int, step: str, attempt: int, body: object) -> None:
    """Store a secure-sum message and close its step if it was the last; one commit
    (the message is the contact: the site's last_seen is not written for it)."""
    site = enrolment.authenticate_site(db, credential, clock, record_contact=False)
    studies.ensure_site_access(site, study_id)
    study = studies.get_study(db, study_id)
    with studies.serialised(db, study):
        last = secure_sums.submit(db, site, study, round_number, step, attempt, body,  # type: ignore[arg-type]
                                  clock)
        if last:
            advance_locked(db, study, clock)  # the step's last message closes it
    if last:  # only then is there anything new for the waiting sites
        wakeups.notify(study_id)


@router.post("/{study_id}/rounds/{round_number}/secure/advertise", status_code=204,
             responses=SECURE_REFUSALS)
def secure_advertise(study_id: str, round_number: PathNumber, attempt: Attempt,
                     body: SecureAdvert, credential: Credential, db: DB,
                     clock: Clock) -> None:
    """A site's public keys for the round's secure sum, and the noise its budget needs."""
    _secure(credential, db, clock, study_id, round_number, "advertise", attempt, body)


@router.post("/{study_id}/rounds/{round_number}/secure/share", status_code=204,
             responses=SECURE_REFUSALS)
def secure_share(study_id: str, round_number: PathNumber, attempt: Attempt,
                 body: SecureShares, credential: Credential, db: DB,
                 clock: Clock) -> None:
    """A site's sealed share pairs, one per neighbour."""
    _secure(credential, db, clock, study_id, round_number, "share", attempt, body)


@router.post("/{study_id}/rounds/{round_number}/secure/input", status_code=204,
             responses=SECURE_REFUSALS)
def secure_input(study_id: str, round_number: PathNumber, attempt: Attempt,
                 body: SecureInput, credential: Credential, db: DB,
                 clock: Clock) -> None:
    """A site's masked vector."""
    _secure(credential, db, clock, study_id, round_number, "input", attempt, body)


@router.post("/{study_id}/rounds/{round_number}/secure/confirm", status_code=204,
             responses=SECURE_REFUSALS)
def secure_confirm(study_id: str, round_number: PathNumber, attempt: Attempt,
                   body: SecureConfirm, credential: Credential, db: DB,
                   clock: Clock) -> None:
    """A site's signature of the survivor list (a sum whose advertisements were signed)."""
    _secure(credential, db, clock, study_id, round_number, "confirm", attempt, body)


@router.post("/{study_id}/rounds/{round_number}/secure/reveal", status_code=204,
             responses=SECURE_REFUSALS)
def secure_reveal(study_id: str, round_number: PathNumber, attempt: Attempt,
                  body: SecureReveal, credential: Credential, db: DB,
                  clock: Clock) -> None:
    """A site's shares for unmasking: survivors' self-masks, dropped sites' mask keys."""
    _secure(credential, db, clock, study_id, round_number, "reveal", attempt, body)
