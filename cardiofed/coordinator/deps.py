"""FastAPI dependencies: settings, database sessions, authentication."""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import Depends, Path
from fastapi.routing import APIRoute
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
    """The request's session; closed on the event loop (see :class:`ReleasingRoute`)."""
    with session_factory(settings.database_url)() as db:
        yield db


class ReleasingRoute(APIRoute):
    """A route whose sync endpoint gives its session's connection back to the pool before
    it returns, when nothing is left to write (a read's transaction, committed).

    No request may hold a pooled connection while it queues for a worker thread: the
    threads can all be waiting for a connection (one of them holding the study's lock),
    and nothing then moves until the pool times out. At 200 secure sites every request
    stalled that way: a finished endpoint's session kept its read transaction open while
    FastAPI queued the response's serialisation (and a sync dependency's exit) for a
    thread. So the session closes on the event loop (:func:`get_db` is ``async``), the
    credential checks commit (:func:`current_site`, :func:`require_admin`), and this
    class ends the endpoint's own transaction."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        if not inspect.iscoroutinefunction(endpoint):
            endpoint = _releasing(endpoint)  # its signature and name are the endpoint's
        super().__init__(path, endpoint, **kwargs)


def _releasing(call: Callable[..., Any]) -> Callable[..., Any]:
    if getattr(call, "_releases_sessions", False):
        return call

    @functools.wraps(call)
    def endpoint(*args: Any, **kwargs: Any) -> Any:
        result = call(*args, **kwargs)
        for value in kwargs.values():
            if isinstance(value, Session) and value.in_transaction() \
                    and not (value.new or value.dirty or value.deleted):
                value.commit()  # expire_on_commit is off: the result's objects stay loaded
        return result

    endpoint._releases_sessions = True  # type: ignore[attr-defined]
    return endpoint


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
    db.commit()  # last_seen, if due; and the read's connection back to the pool (a long
    return site  # poll then queues for a worker thread: see ReleasingRoute)


def require_admin(db: DB, credential: Credential) -> AdminKey:
    key = administration.authenticate_admin(db, credential)
    db.commit()  # the read's connection back to the pool (see ReleasingRoute)
    return key


CurrentSite = Annotated[Site, Depends(current_site)]
Admin = Annotated[AdminKey, Depends(require_admin)]
