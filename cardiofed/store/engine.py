"""Opening the store: an engine per URL, its sessions, and the schema check.

SQLite (the default) gets WAL with ``synchronous=FULL``, so a committed update survives
SIGKILL and power loss, and foreign keys; a server database (PostgreSQL, through the
same ``database_url`` setting) gets a pool of :data:`POOL_SIZE` connections. An empty
database is created at the newest schema revision; one at an older revision is refused
until ``cardiofed db upgrade`` migrates it (:mod:`cardiofed.store.migrations`).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker

from cardiofed.store.migrations import ensure_schema

# Per coordinator process: four processes stay within PostgreSQL's default
# max_connections of 100; more requests than this wait for a connection.
POOL_SIZE = 20


def make_engine(url: str, *, check_schema: bool = True) -> Engine:
    """An engine for `url`; with `check_schema`, an empty database gets the schema and a
    database at an older revision is refused (:class:`~cardiofed.exceptions.SchemaOutOfDate`)."""
    if url.startswith("sqlite"):
        # A file's pool as large as a server database's: the default 5 (+10 overflow)
        # left the worker threads of a secure round's 50 sites waiting for a connection.
        in_memory = make_url(url).database in (None, "", ":memory:")
        engine = create_engine(url, connect_args={"check_same_thread": False}, **(
            {} if in_memory else {"pool_size": POOL_SIZE, "max_overflow": 10,
                                  "pool_timeout": 60}))

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()
    else:
        engine = create_engine(url, pool_size=POOL_SIZE, max_overflow=0, pool_timeout=60)
    if check_schema:
        ensure_schema(engine)
    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@lru_cache(maxsize=8)
def session_factory(url: str) -> sessionmaker[Session]:
    """Sessions of the store at `url`: one engine per URL and process."""
    return make_sessionmaker(make_engine(url))
