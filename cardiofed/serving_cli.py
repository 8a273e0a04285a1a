"""Command-line entry points of the risk API: serve, models, keys, predict.

These act on the registry database directly (``--database-url``, default the
coordinator's ``sqlite:///cardiofed-coordinator.db`` or ``$CARDIOFED_DATABASE_URL``),
so they run where the database is, by whoever administers it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from cardiofed._console import console, fail
from cardiofed.defaults import DEFAULT_DATABASE_URL
from cardiofed.exceptions import CardioFedError

if TYPE_CHECKING:  # loaded when a command runs, not for --help
    from sqlalchemy.orm import Session, sessionmaker

models_app = typer.Typer(help="The model registry: list, show, promote, export.",
                         no_args_is_help=True)
keys_app = typer.Typer(help="API keys of the risk API: create, list, revoke.",
                       no_args_is_help=True)

DatabaseUrl = Annotated[str | None, typer.Option(
    help=f"SQLAlchemy URL of the registry (default $CARDIOFED_DATABASE_URL or "
         f"{DEFAULT_DATABASE_URL}).")]


def database_url(given: str | None) -> str:
    return given or os.environ.get("CARDIOFED_DATABASE_URL") or DEFAULT_DATABASE_URL


def _sessions(url: str | None) -> sessionmaker[Session]:
    from cardiofed.coordinator.deps import _sessions as cached

    return cached(database_url(url))


def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    db: DatabaseUrl = None,
    certfile: Annotated[Path | None, typer.Option(help="TLS certificate (PEM).")] = None,
    keyfile: Annotated[Path | None, typer.Option(help="TLS private key (PEM).")] = None,
    max_connections: Annotated[int, typer.Option(
        min=1, help="Connections held at once; beyond, a 503 (slow clients cannot queue "
                    "without bound).")] = 1024,
) -> None:
    """Serve the risk API (one uvicorn worker) on the registry's promoted model."""
    import uvicorn

    from cardiofed.serving.api import ServingSettings, create_serving_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        force=True)
    try:
        settings = ServingSettings(database_url=database_url(db))
    except ValueError as exc:
        raise fail(exc) from None
    # One log line per request comes from the API itself (no bodies); uvicorn's access
    # log would add a second one.
    uvicorn.run(create_serving_app(settings), host=host, port=port, log_config=None,
                access_log=False, ssl_certfile=str(certfile) if certfile else None,
                ssl_keyfile=str(keyfile) if keyfile else None, timeout_graceful_shutdown=10,
                limit_concurrency=max_connections, timeout_keep_alive=5)


@models_app.command("list")
def models_list(db: DatabaseUrl = None) -> None:
    """Every registered model version."""
    from cardiofed.serving import registry

    with _sessions(db)() as session:
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
        with _sessions(db)() as session:
            card = registry.card(session, version)
    except CardioFedError as exc:
        raise fail(exc) from None
    typer.echo(json.dumps(card, indent=2))


@models_app.command("promote")
def models_promote(version: str, db: DatabaseUrl = None) -> None:
    """Serve VERSION by default (running servers pick it up within 5 s)."""
    from cardiofed.serving import registry

    try:
        with _sessions(db)() as session:
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
        with _sessions(db)() as session:
            model = registry.load(session, version)
    except CardioFedError as exc:
        raise fail(exc) from None
    weights, card = model.save(out.with_suffix(".safetensors"))
    console.print(f"Wrote {weights} and {card}.")


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
        with _sessions(db)() as session:
            secret = create_key(session, name, scope, rate_limit, studies=study or None)
    except CardioFedError as exc:
        raise fail(exc) from None
    typer.echo(secret)


@keys_app.command("revoke")
def keys_revoke(name: str, db: DatabaseUrl = None) -> None:
    """Revoke a key (running servers refuse it within 5 s)."""
    from cardiofed.serving.keys import revoke_key

    try:
        with _sessions(db)() as session:
            revoke_key(session, name)
    except CardioFedError as exc:
        raise fail(exc) from None
    console.print(f"API key {name} revoked.")


@keys_app.command("list")
def keys_list(db: DatabaseUrl = None) -> None:
    """Names, scopes, studies and limits of the keys (never the keys)."""
    from cardiofed.serving.keys import list_keys

    with _sessions(db)() as session:
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


def predict(
    input_csv: Annotated[Path, typer.Argument(help="CSV export of the patients to score.")],
    model: Annotated[str | None, typer.Option(
        help="Registry version (default: the promoted one) or a .safetensors model file.")]
        = None,
    mapping: Annotated[Path | None, typer.Option(
        help="The site's mapping file (default: columns named as canonical features, in "
             "canonical units).")] = None,
    out: Annotated[Path, typer.Option(help="Output .csv or .parquet.")] = Path("risks.csv"),
    contributions: Annotated[bool, typer.Option(
        "--contributions", help="Add each feature's log-odds contribution.")] = False,
    site: Annotated[str | None, typer.Option(
        help="Apply this site's recalibration from the model card.")] = None,
    id_column: Annotated[str | None, typer.Option(
        help="Input column copied to the output to identify rows.")] = None,
    impute_missing: Annotated[bool, typer.Option(
        "--impute-missing", help="Score rows with missing features, filled with the "
                                 "federation's medians (as the API's impute_missing).")] = False,
    max_rejected: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="Largest fraction of rows that may be rejected before "
                               "nothing is written.")] = 0.01,
    db: DatabaseUrl = None,
) -> None:
    """Score a CSV file offline with a registered or exported model."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from cardiofed.data.mapping import SiteMapping
    from cardiofed.models.networks import set_threads
    from cardiofed.serving import registry
    from cardiofed.serving.api import ServingSettings
    from cardiofed.serving.model import RiskModel
    from cardiofed.serving.offline import predict_file

    try:
        set_threads()
        if model is not None and model.endswith(".safetensors"):
            risk_model = RiskModel.load(model)
        else:
            with _sessions(db)() as session:
                risk_model = registry.load(session, model or registry.promoted_version(session))
        site_mapping = SiteMapping.from_toml(mapping) if mapping else None
        with open(input_csv, "rb") as fh:
            total = max(sum(1 for _ in fh) - 1, 0)
        bar = Progress(TextColumn("[bold]scoring"), BarColumn(),
                       TextColumn("{task.completed:,}/{task.total:,} rows"), TimeElapsedColumn(),
                       console=console)
        with bar:
            task = bar.add_task("rows", total=total)
            settings = ServingSettings(database_url=database_url(db))  # risk categories
            done = predict_file(risk_model, input_csv, out, mapping=site_mapping,
                                contributions=contributions, site=site, id_column=id_column,
                                impute_missing=impute_missing, max_rejected=max_rejected,
                                thresholds=settings.risk_thresholds,
                                categories=settings.risk_categories,
                                on_rows=lambda n: bar.advance(task, n))
    except (CardioFedError, OSError, ValueError) as exc:
        raise fail(exc) from None
    console.print(f"Scored {done.scored:,} of {done.rows:,} rows with model "
                  f"{risk_model.card.version or model}; wrote {out}.")
    if done.rejected:
        console.print(f"[yellow]{done.rejected:,} rows not scored[/] (missing or invalid "
                      f"features); their row numbers and reasons are in {done.rejected_file}.")
