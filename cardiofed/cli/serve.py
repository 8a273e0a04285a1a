"""``cardiofed serve`` and ``cardiofed predict``: the risk API, online and offline.

These act on the registry database directly (``--db``, default the
coordinator's ``sqlite:///cardiofed-coordinator.db`` or ``$CARDIOFED_DATABASE_URL``),
so they run where the database is, by whoever administers it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from cardiofed._console import console, fail
from cardiofed.cli.db import DatabaseUrl, chosen_url, sessions
from cardiofed.exceptions import CardioFedError


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

    from cardiofed.serving.app import create_serving_app
    from cardiofed.serving.settings import ServingSettings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        force=True)
    # A line per request: skip what the format does not show (the logging HOWTO's
    # "Optimization": caller, thread and process of each record).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    try:
        settings = ServingSettings(database_url=chosen_url(db))
    except ValueError as exc:
        raise fail(exc) from None
    try:
        app = create_serving_app(settings)
    except CardioFedError as exc:  # e.g. a database at an older schema revision
        raise fail(exc) from None
    # One log line per request comes from the API itself (no bodies); uvicorn's access
    # log would add a second one.
    uvicorn.run(app, host=host, port=port, log_config=None,
                access_log=False, ssl_certfile=str(certfile) if certfile else None,
                ssl_keyfile=str(keyfile) if keyfile else None, timeout_graceful_shutdown=10,
                limit_concurrency=max_connections, timeout_keep_alive=5)


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
    from cardiofed.models.kinds import set_threads
    from cardiofed.serving.model import RiskModel
    from cardiofed.serving.offline import predict_file
    from cardiofed.serving.settings import ServingSettings

    try:
        set_threads()
        if model is not None and model.endswith(".safetensors"):
            risk_model = RiskModel.load(model)
        else:  # the registry's database, only when the model comes from it
            from cardiofed.serving import registry

            with sessions(db)() as session:
                risk_model = registry.load(session, model or registry.promoted_version(session))
        # The model's own declarations (a study's features and outcome) read the mapping.
        site_mapping = (SiteMapping.from_toml(mapping, risk_model.catalogue) if mapping
                        else None)
        with open(input_csv, "rb") as fh:
            total = max(sum(1 for _ in fh) - 1, 0)
        bar = Progress(TextColumn("[bold]scoring"), BarColumn(),
                       TextColumn("{task.completed:,}/{task.total:,} rows"), TimeElapsedColumn(),
                       console=console)
        with bar:
            task = bar.add_task("rows", total=total)
            settings = ServingSettings(database_url=chosen_url(db))  # risk categories
            done = predict_file(risk_model, input_csv, out, mapping=site_mapping,
                                contributions=contributions, site=site, id_column=id_column,
                                impute_missing=impute_missing, max_rejected=max_rejected,
                                thresholds=settings.risk_thresholds,
                                categories=settings.risk_categories,
                                on_rows=lambda n: bar.advance(task, n))
    except (CardioFedError, OSError, ValueError) as exc:
        raise fail(exc) from None
    console.print(f"Scored {done.scored:,} of {done.rows:,} rows with model "
                  f"{risk_model.card.version or model}; wrote {out}. The risk is of: "
                  f"{escape(risk_model.risk_of)}. The model learnt from "
                  f"{escape(risk_model.learnt_from)}.")
    if not risk_model.categorised:
        console.print("No risk categories: they are 10-year risk bands, and this model's "
                      "outcome has no 10-year horizon.")
    if done.rejected:
        console.print(f"[yellow]{done.rejected:,} rows not scored[/] (missing or invalid "
                      f"features); their row numbers and reasons are in {done.rejected_file}.")
