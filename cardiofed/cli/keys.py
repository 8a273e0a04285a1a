"""``cardiofed keys``: the risk API's keys (create, list, revoke)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from cardiofed._console import console, fail
from cardiofed.cli.db import DatabaseUrl, sessions
from cardiofed.exceptions import CardioFedError

keys_app = typer.Typer(
    rich_markup_mode=None,  # help is plain text: brackets stay brackets
    help="API keys of the risk API: create, list, revoke.",
    no_args_is_help=True)


@keys_app.command("create")
def keys_create(
    name: str,
    scope: Annotated[list[str], typer.Option(
        help="score (the promoted model), score:any-version (also pin other versions), "
             "models:read or admin (repeat).")],
    study: Annotated[list[str] | None, typer.Option(
        help="Limit the key to this study's models (repeat; default: every study).")] = None,
    rate_limit: Annotated[int, typer.Option(help="Requests per minute.")] = 600,
    db: DatabaseUrl = None,
) -> None:
    """Create an API key; it is printed once and stored only as a hash."""
    from cardiofed.serving.keys import create_key

    try:
        with sessions(db)() as session:
            secret = create_key(session, name, scope, rate_limit, studies=study or None)
    except CardioFedError as exc:
        raise fail(exc) from None
    typer.echo(secret)


@keys_app.command("revoke")
def keys_revoke(name: str, db: DatabaseUrl = None) -> None:
    """Revoke a key (running servers refuse it within 5 s)."""
    from cardiofed.serving.keys import revoke_key

    try:
        with sessions(db)() as session:
            revoke_key(session, name)
    except CardioFedError as exc:
        raise fail(exc) from None
    console.print(f"API key {name} revoked.")


@keys_app.command("list")
def keys_list(db: DatabaseUrl = None) -> None:
    """Names, scopes, studies and limits of the keys (never the keys)."""
    from cardiofed.serving.keys import list_keys

    with sessions(db)() as session:
        rows = list_keys(session)
    table = Table(title="API keys")
    for column in ("name", "scopes", "studies", "requests/min", "revoked", "created"):
        table.add_column(column)
    for r in rows:
        table.add_row(str(r["name"]), ", ".join(r["scopes"]),  # type: ignore[arg-type]
                      ", ".join(r["studies"]) if r["studies"] else "all",  # type: ignore[arg-type]
                      str(r["rate_limit_per_minute"]), "yes" if r["revoked"] else "",
                      str(r["created_at"]))
    console.print(table)


