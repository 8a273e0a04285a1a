"""``cardiofed models``: the model registry (list, show, promote, export)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cardiofed._console import console, fail
from cardiofed.cli.db import DatabaseUrl, sessions
from cardiofed.exceptions import CardioFedError

models_app = typer.Typer(
    rich_markup_mode=None,  # help is plain text: brackets stay brackets
    help="The model registry: list, show, promote, export.",
    no_args_is_help=True)


@models_app.command("list")
def models_list(db: DatabaseUrl = None) -> None:
    """Every registered model version."""
    from cardiofed.serving import registry

    with sessions(db)() as session:
        rows = registry.list_models(session)
    table = Table(title="Registered models")
    for column in ("version", "promoted", "model", "outcome", "created", "content sha256"):
        table.add_column(column)
    for r in rows:
        table.add_row(str(r["version"]), "yes" if r["promoted"] else "", str(r["model"]),
                      str(r["outcome"]), str(r["created_at"]), str(r["content_sha256"])[:16])
    console.print(table)


@models_app.command("show")
def models_show(version: str, db: DatabaseUrl = None) -> None:
    """A version's model card (JSON)."""
    from cardiofed.serving import registry

    try:
        with sessions(db)() as session:
            card = registry.card(session, version)
    except CardioFedError as exc:
        raise fail(exc) from None
    typer.echo(json.dumps(card, indent=2))


@models_app.command("promote")
def models_promote(version: str, db: DatabaseUrl = None) -> None:
    """Serve VERSION by default (running servers pick it up within 5 s)."""
    from cardiofed.serving import registry

    try:
        with sessions(db)() as session:
            registry.promote(session, version)
    except CardioFedError as exc:
        raise fail(exc) from None
    console.print(f"Model {version} promoted.")


@models_app.command("export")
def models_export(version: str, out: Annotated[Path, typer.Option(
        help="Output file (.safetensors); the card is written beside it as .json.")],
        db: DatabaseUrl = None) -> None:
    """Write VERSION as a standalone file that scores without the coordinator."""
    from cardiofed.serving import registry

    try:
        with sessions(db)() as session:
            model = registry.load(session, version)
    except CardioFedError as exc:
        raise fail(exc) from None
    weights, card = model.save(out.with_suffix(".safetensors"))
    console.print(f"Wrote {weights} and {card}.")


