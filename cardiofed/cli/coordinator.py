"""``cardiofed coordinator``: run the coordinator service."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from cardiofed._console import console, fail
from cardiofed.cli.admin import KeyFile
from cardiofed.defaults import DEFAULT_DATABASE_URL
from cardiofed.exceptions import CardioFedError


def coordinator(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8443,
    database_url: Annotated[str, typer.Option(
        help="SQLAlchemy URL: sqlite:///file.db (default) or postgresql://...")] =
        DEFAULT_DATABASE_URL,
    certfile: Annotated[Path | None, typer.Option(help="TLS certificate (PEM).")] = None,
    keyfile: Annotated[Path | None, typer.Option(help="TLS private key (PEM).")] = None,
    insecure: Annotated[bool, typer.Option(
        "--insecure", help="Serve plain HTTP (local testing only).")] = False,
    admin_key_file: KeyFile = Path("cardiofed-admin.key"),
    workers: Annotated[int, typer.Option(
        min=1, help="Worker processes sharing the port (more than one needs PostgreSQL).")] = 1,
    max_connections: Annotated[int, typer.Option(
        min=1, help="Connections each worker holds at once; beyond, a 503 (slow clients "
                    "cannot queue without bound). Put a reverse proxy with header "
                    "timeouts in front on the internet.")] = 1024,
) -> None:
    """Run the coordinator (FastAPI under uvicorn); state lives in the database, so
    several processes (``--workers``, or coordinators on other machines) can share it."""
    import uvicorn

    from cardiofed.coordinator import administration
    from cardiofed.coordinator.app import create_app
    from cardiofed.store import session_factory

    if not insecure and (certfile is None or keyfile is None):
        raise fail("TLS needs --certfile and --keyfile; use --insecure for plain HTTP on a "
                    "test machine.")
    if workers > 1 and not database_url.startswith("postgresql"):
        raise fail(f"--workers {workers} needs a PostgreSQL --database-url: round "
                    f"transitions are serialised by row locks, which SQLite does not have.")
    os.environ["CARDIOFED_DATABASE_URL"] = database_url
    try:  # the schema is created (or an older one refused) once, before any worker
        sessions = session_factory(database_url)
    except CardioFedError as exc:
        raise fail(exc) from None
    if not admin_key_file.exists():
        with sessions() as db:
            key = administration.create_admin_key(db)
        fd = os.open(admin_key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(key)
        console.print(f"Admin credential written to {admin_key_file} (keep it secret).")
    # A graceful shutdown waits at most 10 s for requests in flight (long polls included).
    # One process runs the app itself; several import it by name, each in its own process.
    app = create_app() if workers == 1 else "cardiofed.coordinator.app:create_app"
    uvicorn.run(app, factory=workers > 1, workers=workers, host=host, port=port,
                log_level="info",
                ssl_certfile=str(certfile) if certfile else None,
                ssl_keyfile=str(keyfile) if keyfile else None, timeout_graceful_shutdown=10,
                limit_concurrency=max_connections, timeout_keep_alive=5)


