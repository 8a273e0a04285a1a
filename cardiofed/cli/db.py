"""``cardiofed db``: the store's schema (upgrade, current), and the ``--db`` option the
registry and key commands share."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Annotated

import typer

from cardiofed._console import console, fail
from cardiofed.defaults import DEFAULT_DATABASE_URL
from cardiofed.exceptions import CardioFedError

if TYPE_CHECKING:  # loaded when a command runs, not for --help
    from sqlalchemy.orm import Session, sessionmaker

db_app = typer.Typer(
    rich_markup_mode=None,  # help is plain text: brackets stay brackets
    help="The database both services share: schema upgrade and revision.",
    no_args_is_help=True)

DatabaseUrl = Annotated[str | None, typer.Option(
    help=f"SQLAlchemy URL of the database (default $CARDIOFED_DATABASE_URL or "
         f"{DEFAULT_DATABASE_URL}).")]


def chosen_url(given: str | None) -> str:
    """`given`, else $CARDIOFED_DATABASE_URL, else the default database."""
    return given or os.environ.get("CARDIOFED_DATABASE_URL") or DEFAULT_DATABASE_URL


def sessions(url: str | None) -> sessionmaker[Session]:
    from cardiofed.store import session_factory

    return session_factory(chosen_url(url))


@db_app.command("upgrade")
def upgrade(database_url: Annotated[str | None, typer.Option(
        "--database-url", help=f"SQLAlchemy URL (default $CARDIOFED_DATABASE_URL or "
                               f"{DEFAULT_DATABASE_URL}).")] = None) -> None:
    """Migrate the database to this release's schema (back it up first; stop the
    services that use it). An empty database gets the whole schema."""
    from cardiofed.store import make_engine
    from cardiofed.store.migrations import upgrade as migrate

    url = chosen_url(database_url)
    engine = make_engine(url, check_schema=False)
    try:
        before, after = migrate(engine)
    except CardioFedError as exc:
        raise fail(exc) from None
    finally:
        engine.dispose()
    shown = engine.url.render_as_string(hide_password=True)
    if before == after:
        console.print(f"{shown} is already at schema revision {after}.")
    else:
        console.print(f"{shown} upgraded from schema revision "
                      f"{before or 'none (a release before migrations)'} to {after}.")


@db_app.command("current")
def current(database_url: Annotated[str | None, typer.Option(
        "--database-url", help="SQLAlchemy URL (default as for upgrade).")] = None) -> None:
    """The database's schema revision, and this release's."""
    from cardiofed.store import make_engine
    from cardiofed.store.migrations import HEAD, revision_of

    engine = make_engine(chosen_url(database_url), check_schema=False)
    with engine.connect() as conn:
        revision = revision_of(conn)
    engine.dispose()
    console.print(f"schema revision {revision or 'none'}; this release needs {HEAD}.")
