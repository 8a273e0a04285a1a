"""FastAPI dependencies: settings, database sessions, authentication."""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from typing import Annotated

from fastapi import Depends, Header, Path, Request
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session, sessionmaker

from cardiofed.coordinator import service
from cardiofed.coordinator.settings import CoordinatorSettings, get_settings
from cardiofed.coordinator.storage import Site, make_engine, make_sessionmaker, utcnow
from cardiofed.exceptions import CoordinatorError


@lru_cache(maxsize=8)
def _sessions(url: str) -> sessionmaker[Session]:
    return make_sessionmaker(make_engine(url))


def get_db(settings: Annotated[CoordinatorSettings, Depends(get_settings)]) -> Iterator[Session]:
    with _sessions(settings.database_url)() as db:
        yield db


async def refused(_: Request, exc: CoordinatorError) -> JSONResponse:
    """The exception handler of every CardioFed service for its refusals."""
    return JSONResponse(status_code=exc.status_code, content=exc.body(), headers=exc.headers())


def bearer(authorization: Annotated[str | None, Header()] = None) -> str | None:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None


DB = Annotated[Session, Depends(get_db)]
# Round numbers and model versions in paths: bounded, so no database integer overflows.
PathNumber = Annotated[int, Path(ge=0, le=2**31 - 1)]
Settings = Annotated[CoordinatorSettings, Depends(get_settings)]


def get_clock() -> service.Clock:
    """The coordinator's clock (naive UTC); tests override it to pass deadlines without
    waiting on the wall clock."""
    return utcnow


Clock = Annotated[service.Clock, Depends(get_clock)]


def current_site(db: DB, credential: Annotated[str | None, Depends(bearer)],
                 clock: Clock) -> Site:
    site = service.authenticate_site(db, credential, clock)
    db.commit()  # last_seen
    return site


def require_admin(db: DB, credential: Annotated[str | None, Depends(bearer)]) -> None:
    service.authenticate_admin(db, credential)


CurrentSite = Annotated[Site, Depends(current_site)]
Admin = Annotated[None, Depends(require_admin)]
