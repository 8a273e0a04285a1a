"""FastAPI dependencies: settings, database sessions, authentication."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import Depends, Path
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from cardiofed.coordinator import administration, enrolment, studies
from cardiofed.coordinator.settings import CoordinatorSettings, get_settings
from cardiofed.store import AdminKey, Site, session_factory, utcnow
from cardiofed.web.errors import responses


async def app_settings() -> CoordinatorSettings:
    """The coordinator's settings (:func:`get_settings`; tests override this dependency).
    ``async``, like :func:`get_clock`: a sync dependency costs a thread-pool hop."""
    return get_settings()


Settings = Annotated[CoordinatorSettings, Depends(app_settings)]


async def get_db(settings: Settings) -> AsyncIterator[Session]:
    """The request's session. ``async``, so that closing it (which returns its
    connection to the pool) runs on the event loop: as a sync dependency the close
    queued for a worker thread while the session still held a connection, and at 200
    sites enrolling at once those connections were the pool, while the thread that held
    the study's lock waited for one (every request stalled until the pool timeout)."""
    with session_factory(settings.database_url)() as db:
        yield db


_bearer = HTTPBearer(auto_error=False, description="An admin or site credential: "
                                                   "`Authorization: Bearer ...`.")


async def bearer(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
                 ) -> str | None:
    """The bearer credential, if any; in OpenAPI a security scheme of the operation
    (``async``, like :func:`get_clock`: a sync dependency costs a thread-pool hop)."""
    return credentials.credentials.strip() if credentials else None


Credential = Annotated[str | None, Depends(bearer)]


# The coordinator's refusals in OpenAPI: the risk API's bodies, its own descriptions.
_REFUSALS = {
    401: "Missing, unknown or revoked credential (admin, or site where the operation "
         "allows it)",
    403: "A site's credential, for another study than its own",
    404: "No such study, round, site or model version",
    409: "Clashes with what was already accepted: another payload for the round, a closed "
         "round (code `round_closed`), or (code `stale_update`) an update trained from too "
         "old a model",
    413: "Request body over this endpoint's size limit (see `detail`)",
    422: "Invalid fields, each named (at most 20 listed), or an invalid payload (`errors` "
         "empty, `detail` says why)",
    429: "Too many uploads of this site in progress (see Retry-After)",
}


def refusals(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI `responses` of a coordinator endpoint answering `codes` besides its
    success (see :func:`cardiofed.web.errors.responses`)."""
    return responses(*codes, descriptions=_REFUSALS)


DB = Annotated[Session, Depends(get_db)]
# Round numbers and model versions in paths: bounded, so no database integer overflows.
PathNumber = Annotated[int, Path(ge=0, le=2**31 - 1)]


async def get_clock() -> studies.Clock:
    """The coordinator's clock (naive UTC); tests override it to pass deadlines without
    waiting on the wall clock."""
    return utcnow


Clock = Annotated[studies.Clock, Depends(get_clock)]


def current_site(db: DB, credential: Credential,
                 clock: Clock) -> Site:
    site = enrolment.authenticate_site(db, credential, clock)
    # Commit even with nothing to write (last_seen): it ends the read's transaction, so
    # the connection goes back to the pool before the endpoint runs. A long poll that
    # kept it while queueing for a worker thread held the pool from the thread that held
    # the study's lock: at 100 secure sites every request stalled until a pool timeout.
    db.commit()
    return site


def require_admin(db: DB, credential: Credential) -> AdminKey:
    return administration.authenticate_admin(db, credential)


CurrentSite = Annotated[Site, Depends(current_site)]
Admin = Annotated[AdminKey, Depends(require_admin)]
