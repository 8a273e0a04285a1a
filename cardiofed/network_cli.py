"""Command-line entry points of the networked federation: coordinator, admin, node, status."""

from __future__ import annotations

import json
import logging
import os
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from cardiofed._console import console, fail
from cardiofed.defaults import DEFAULT_DATABASE_URL
from cardiofed.exceptions import CardioFedError

if TYPE_CHECKING:  # loaded when a command runs, not for --help
    import httpx

    from cardiofed.node.config import NodeConfig

admin_app = typer.Typer(help="Administer studies on a running coordinator.",
                        no_args_is_help=True)
node_app = typer.Typer(help="Run a hospital node next to its records.", no_args_is_help=True)

KeyFile = Annotated[Path, typer.Option(help="File holding the admin credential.")]
Url = Annotated[str, typer.Option(help="Coordinator URL.")]
CaFile = Annotated[Path | None, typer.Option(help="CA certificate to verify the coordinator.")]


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

    from cardiofed.coordinator import service
    from cardiofed.coordinator.app import create_app
    from cardiofed.coordinator.deps import _sessions

    if not insecure and (certfile is None or keyfile is None):
        raise fail("TLS needs --certfile and --keyfile; use --insecure for plain HTTP on a "
                    "test machine.")
    if workers > 1 and not database_url.startswith("postgresql"):
        raise fail(f"--workers {workers} needs a PostgreSQL --database-url: round "
                    f"transitions are serialised by row locks, which SQLite does not have.")
    os.environ["CARDIOFED_DATABASE_URL"] = database_url
    sessions = _sessions(database_url)  # schema created or upgraded once, before workers
    if not admin_key_file.exists():
        with sessions() as db:
            key = service.create_admin_key(db)
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


def _admin_client(url: str, key_file: Path, ca_file: Path | None) -> httpx.Client:
    import httpx

    if not key_file.exists():
        raise fail(f"Admin key file {key_file} does not exist (the coordinator writes it on "
                    f"first start).")
    verify = ssl.create_default_context(cafile=str(ca_file)) if ca_file else True
    return httpx.Client(base_url=url, verify=verify, timeout=30,
                        headers={"Authorization": f"Bearer {key_file.read_text().strip()}"})


def _checked(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        raise fail(f"{response.status_code}: {response.json().get('detail', response.text)}")
    return response


@admin_app.command("create-study")
def create_study(
    study: Annotated[str, typer.Option(help="Study identifier.")],
    site: Annotated[list[str], typer.Option(help="Site name (repeat, in a fixed order).")],
    dataset: Annotated[str | None, typer.Option(
        help="Take the feature columns of uci-heart, framingham or synthetic.")] = None,
    features: Annotated[str | None, typer.Option(
        help="Comma-separated canonical features (as in the sites' mapping files).")] = None,
    features_file: Annotated[Path | None, typer.Option(
        help="The study's own features and outcome (TOML); they travel with the plan.")]
        = None,
    config: Annotated[Path | None, typer.Option(
        help="TOML plan: training, or an [attribution] table for an attribution study.")]
        = None,
    rounds: Annotated[int | None, typer.Option(help="Override the plan's rounds.")] = None,
    min_sites: Annotated[int | None, typer.Option(
        help="Reports a round needs once its deadline passed (default: all sites).")] = None,
    round_timeout: Annotated[float, typer.Option(help="Seconds before a round's deadline.")]
        = 3600.0,
    url: Url = "https://127.0.0.1:8443",
    admin_key_file: KeyFile = Path("cardiofed-admin.key"),
    ca_file: CaFile = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the tokens as a JSON object {site: token}.")] = False,
    outcome: Annotated[str | None, typer.Option(
        help="The label's outcome for the model cards (default: the data set's).")] = None,
    relay: Annotated[bool, typer.Option(
        help="A regional study of a national one (the national plan, the region's "
             "sites): its rounds are opened by the region's node.")] = False,
) -> None:
    """Create a study; prints one one-time enrolment token per site."""
    from cardiofed.data.catalog import study_columns
    from cardiofed.data.study_features import StudyFeatures
    from cardiofed.simulation.config import SimulationConfig

    try:
        plan = (SimulationConfig.from_toml(config) if config else SimulationConfig.create())
        changes: dict[str, object] = {} if rounds is None else {"rounds": rounds}
        if features_file is not None:
            changes["study_features"] = StudyFeatures.from_toml(features_file)
        if changes:
            plan = SimulationConfig.create(**{**plan.model_dump(), **changes})
        # An attribution study's columns are its covariates' encoding (the coordinator's).
        names, ranges = (None, None) if plan.attribution is not None else study_columns(
            dataset, features.split(",") if features else None, plan.catalogue())
    except CardioFedError as exc:
        raise fail(exc) from None
    from cardiofed.serving.provenance import OUTCOME_OF_DATASET

    body = {"id": study, "plan": plan.model_dump(), "sites": site, "feature_names": names,
            "feature_ranges": ranges, "min_sites": min_sites, "round_timeout_s": round_timeout,
            "outcome": outcome or OUTCOME_OF_DATASET.get(dataset or "") or (
                plan.study_features.outcome.name if plan.study_features is not None
                and plan.study_features.outcome is not None else None), "relay": relay}
    with _admin_client(url, admin_key_file, ca_file) as client:
        tokens = _checked(client.post("/v1/studies", json=body)).json()["enrolment_tokens"]
    if as_json:
        typer.echo(json.dumps(tokens))
        return
    table = Table(title=f"Study {study}: one-time enrolment tokens")
    table.add_column("site")
    table.add_column("enrolment token")
    for name, token in tokens.items():
        table.add_row(name, token)
    console.print(table)


@admin_app.command("attribution-report")
def attribution_report(
    study: Annotated[str, typer.Option(help="A finished attribution study.")],
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("cardiofed-attribution"),
    url: Url = "https://127.0.0.1:8443",
    admin_key_file: KeyFile = Path("cardiofed-admin.key"),
    ca_file: CaFile = None,
) -> None:
    """Write a networked attribution study's report (JSON, HTML, Love plot, overlap)."""
    from cardiofed.causal.report import write_report
    from cardiofed.coordinator.attribution import result_of

    with _admin_client(url, admin_key_file, ca_file) as client:
        body = _checked(client.get(f"/v1/studies/{study}/attribution")).json()
    card = body["card"]
    write_report(result_of(body), out, caveats=f"{card['assumptions']} {card['releases']}",
                 title=(
        f"Attribution study {study}: {card['treatment']} on {card['outcome']}, "
        f"{body['estimand']}"))
    console.print(f"Report: {out / 'attribution.html'}")


@admin_app.command("new-key")
def new_key(key_file: Annotated[Path, typer.Option(help="Where to write the new credential "
                                                    "(must not exist).")],
            role: Annotated[str, typer.Option(help="admin, or viewer: reads the API and the "
                                                   "dashboard, changes nothing.")] = "viewer",
            database_url: Annotated[str, typer.Option(
                envvar="CARDIOFED_DATABASE_URL", help="The coordinator's database.")
            ] = DEFAULT_DATABASE_URL) -> None:
    """Make another credential in the coordinator's database (run where it runs)."""
    from cardiofed.coordinator import service
    from cardiofed.coordinator.deps import _sessions

    if key_file.exists():
        raise fail(f"{key_file} exists; choose a new file for the new credential.")
    if role not in (service.ADMIN, service.VIEWER):
        raise fail(f"--role must be {service.ADMIN} or {service.VIEWER}; got {role!r}.")
    with _sessions(database_url)() as db:
        key = service.create_admin_key(db, role)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key)
    console.print(f"A {role} credential written to {key_file} (keep it secret).")


@admin_app.command("keys")
def keys(database_url: Annotated[str, typer.Option(
        envvar="CARDIOFED_DATABASE_URL", help="The coordinator's database.")
        ] = DEFAULT_DATABASE_URL) -> None:
    """List the admin and viewer credentials (ids and roles; never the keys)."""
    from sqlalchemy import select

    from cardiofed.coordinator.deps import _sessions
    from cardiofed.coordinator.storage import AdminKey

    with _sessions(database_url)() as db:
        for key in db.scalars(select(AdminKey).order_by(AdminKey.id)):
            state = (f"revoked {key.revoked_at:%Y-%m-%d %H:%M} UTC" if key.revoked_at
                     else "active")
            console.print(f"#{key.id}  {key.role or 'admin':6}  created "
                          f"{key.created_at:%Y-%m-%d %H:%M} UTC  {state}")


@admin_app.command("revoke-key")
def revoke_key(key_id: Annotated[int, typer.Option("--id", help="The key's number (see "
                                                   "'cardiofed admin keys').")],
               database_url: Annotated[str, typer.Option(
                   envvar="CARDIOFED_DATABASE_URL", help="The coordinator's database.")
               ] = DEFAULT_DATABASE_URL) -> None:
    """Revoke an admin or viewer credential (run where the coordinator runs): it stops
    working at once and its dashboard sessions end."""
    from cardiofed.coordinator import service
    from cardiofed.coordinator.deps import _sessions

    with _sessions(database_url)() as db:
        try:
            key = service.revoke_admin_key(db, key_id)
        except CardioFedError as exc:
            raise fail(exc) from None
    console.print(f"Key #{key.id} ({key.role or 'admin'}) revoked; its sessions ended.")


def _admin_post(url: str, key_file: Path, ca_file: Path | None, path: str,
                body: dict[str, object] | None = None) -> dict[str, Any]:
    """POST an admin request; the JSON answer ({} for none), or exit with its refusal."""
    with _admin_client(url, key_file, ca_file) as client:
        response = _checked(client.post(path, json=body))
    return response.json() if response.content else {}


StudyId = Annotated[str, typer.Option(help="The study.")]
SiteName = Annotated[str, typer.Option(help="The site.")]
Reason = Annotated[str, typer.Option(help="Why (kept in the status and audit log).")]
DEFAULT_URL = "https://127.0.0.1:8443"


@admin_app.command("revoke")
def revoke(study: StudyId, site: SiteName, url: Url = DEFAULT_URL,
           admin_key_file: KeyFile = Path("cardiofed-admin.key"), ca_file: CaFile = None) -> None:
    """Revoke a site: its credential stops working at once."""
    _admin_post(url, admin_key_file, ca_file, f"/v1/studies/{study}/sites/{site}/revoke")
    console.print(f"Site {site} of study {study} revoked.")


@admin_app.command("pause")
def pause(study: StudyId, reason: Reason, url: Url = DEFAULT_URL,
          admin_key_file: KeyFile = Path("cardiofed-admin.key"), ca_file: CaFile = None) -> None:
    """Pause a study: no round closes and no task is handed out until resume."""
    _admin_post(url, admin_key_file, ca_file, f"/v1/studies/{study}/pause", {"reason": reason})
    console.print(f"Study {study} paused.")


@admin_app.command("resume")
def resume(study: StudyId, url: Url = DEFAULT_URL,
           admin_key_file: KeyFile = Path("cardiofed-admin.key"), ca_file: CaFile = None) -> None:
    """Resume a paused study; its open round gets a fresh deadline."""
    _admin_post(url, admin_key_file, ca_file, f"/v1/studies/{study}/resume")
    console.print(f"Study {study} resumed.")


@admin_app.command("cancel")
def cancel(study: StudyId, reason: Reason, url: Url = DEFAULT_URL,
           admin_key_file: KeyFile = Path("cardiofed-admin.key"), ca_file: CaFile = None) -> None:
    """End a study where it stands; nodes stop, the models published so far stay."""
    _admin_post(url, admin_key_file, ca_file, f"/v1/studies/{study}/cancel", {"reason": reason})
    console.print(f"Study {study} cancelled.")


@admin_app.command("min-sites")
def min_sites(study: StudyId, sites: Annotated[int, typer.Option(
                  "--sites", min=1, help="Active sites the study needs from now on.")],
              url: Url = DEFAULT_URL, admin_key_file: KeyFile = Path("cardiofed-admin.key"),
              ca_file: CaFile = None) -> None:
    """Change how many active sites a study needs (a study paused for want of sites goes
    on if it has enough)."""
    _admin_post(url, admin_key_file, ca_file, f"/v1/studies/{study}/min-sites",
                {"min_sites": sites})
    console.print(f"Study {study} now needs {sites} active sites.")


@admin_app.command("add-site")
def add_site(study: StudyId, site: SiteName, url: Url = DEFAULT_URL,
             admin_key_file: KeyFile = Path("cardiofed-admin.key"),
             ca_file: CaFile = None) -> None:
    """Add a site to a running study and print its one-time enrolment token."""
    token = _admin_post(url, admin_key_file, ca_file, f"/v1/studies/{study}/sites",
                        {"name": site})["enrolment_token"]
    console.print(f"Site {site} added to study {study}; its enrolment token (give it to the "
                  f"site's node, once): {token}")


@admin_app.command("readmit")
def readmit(study: StudyId, site: SiteName, url: Url = DEFAULT_URL,
            admin_key_file: KeyFile = Path("cardiofed-admin.key"),
            ca_file: CaFile = None) -> None:
    """Re-admit a revoked site and print its new one-time enrolment token."""
    token = _admin_post(url, admin_key_file, ca_file,
                        f"/v1/studies/{study}/sites/{site}/readmit")["enrolment_token"]
    console.print(f"Site {site} of study {study} re-admitted; its new enrolment token "
                  f"(give it to the site's node, once): {token}")


def status(study: Annotated[str, typer.Option()], url: Url = "https://127.0.0.1:8443",
           admin_key_file: KeyFile = Path("cardiofed-admin.key"), ca_file: CaFile = None) -> None:
    """What the federation is doing and which sites it waits for."""
    with _admin_client(url, admin_key_file, ca_file) as client:
        state = _checked(client.get(f"/v1/studies/{study}/status")).json()
    console.print_json(json.dumps(state))


@node_app.command("run")
def node_run(config: Annotated[Path, typer.Option(help="The node's TOML config.")]) -> None:
    """Enrol if needed, then poll for tasks and run them until the study is done."""
    from cardiofed.models.networks import set_threads
    from cardiofed.node.agent import NodeAgent
    from cardiofed.node.config import NodeConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        set_threads()
        tasks = NodeAgent(NodeConfig.from_toml(config)).run()
    except CardioFedError as exc:
        raise fail(exc) from None
    console.print(f"Study finished; this node ran {tasks} tasks.")


@node_app.command("audit")
def node_audit(
    config: Annotated[Path, typer.Option(help="The node's TOML config.")],
    scan_rows: Annotated[bool, typer.Option(
        "--scan-rows", help="Also search every sent payload (kept in the node's outbox) for "
                            "the site's own training values.")] = False,
) -> None:
    """Summarise everything that left this site (from the node's outbound log)."""
    from cardiofed.node.config import NodeConfig
    from cardiofed.node.outbound import OutboundLog

    try:
        cfg = NodeConfig.from_toml(config)
    except CardioFedError as exc:
        raise fail(exc) from None
    summary = OutboundLog(cfg.state_dir / "outbound.jsonl").summary()
    table = Table(title="Outbound payloads (model updates, statistics, metrics; never rows)")
    for column in ("kind", "payloads", "bytes"):
        table.add_column(column)
    for kind, row in summary.items():
        table.add_row(kind, str(row["payloads"]), str(row["bytes"]))
    console.print(table)
    if scan_rows:
        _scan_outbox(cfg)


@node_app.command("ledger")
def node_ledger(config: Annotated[Path, typer.Option(help="The node's TOML config.")]) -> None:
    """Show the hospital's privacy ledger (verified against its seal): epsilon per study and
    kind of release, the composed total and what is left."""
    from cardiofed.node.config import NodeConfig
    from cardiofed.privacy.budget import PrivacyLedger
    from cardiofed.privacy.ledger_file import open_ledger_file

    try:
        cfg = NodeConfig.from_toml(config)
        if cfg.private is None:
            raise fail("This node is not private (privacy = \"off\"): it keeps no ledger.")
        ledger_dir, seal_file = cfg.ledger_location()
        ledger = PrivacyLedger(site="this site", budget=cfg.private.budget(),
                               file=open_ledger_file(ledger_dir, seal_file=seal_file))
    except CardioFedError as exc:
        raise fail(exc) from None
    table = Table(title=f"Privacy ledger {ledger_dir} (delta {ledger.delta:.3g})")
    for column in ("study", "kind", "releases", "epsilon alone"):
        table.add_column(column)
    seen: dict[tuple[str, str], list[dict[str, object]]] = {}
    for entry in ledger.entries:
        seen.setdefault((str(entry.get("study")), str(entry["kind"])), []).append(entry)
    for (study, kind), entries in seen.items():
        table.add_row(study, kind, str(len(entries)), f"{ledger.epsilon_of(entries):.3f}")
    console.print(table)
    console.print(f"Composed over every release: epsilon {ledger.spent():.3f} of "
                  f"{ledger.budget.epsilon_max:g}; {ledger.remaining():.3f} left.")


@node_app.command("reset-ledger")
def node_reset_ledger(
    config: Annotated[Path, typer.Option(help="The node's TOML config.")],
    reason: Annotated[str, typer.Option(help="Why (recorded in the new ledger and logged).")],
) -> None:
    """Start a new privacy ledger deliberately: the old ledger and seal are archived beside
    them, and the new ledger records the reset. Only when the records' privacy is accounted
    elsewhere (e.g. a restored backup is not available and nothing was released)."""
    from cardiofed.node.config import NodeConfig
    from cardiofed.privacy.ledger_file import reset_ledger

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        cfg = NodeConfig.from_toml(config)
        if cfg.private is None:
            raise fail("This node is not private (privacy = \"off\"): it keeps no ledger.")
        ledger_dir, seal_file = cfg.ledger_location()
        path = reset_ledger(ledger_dir, seal_file=seal_file, reason=reason,
                            create=cfg.private.budget().ledger_header())
    except CardioFedError as exc:
        raise fail(exc) from None
    console.print(f"New privacy ledger {path}; the old one is archived beside it.")


def _scan_outbox(cfg: NodeConfig) -> None:
    """The privacy audit's canary search, with the site's real rows as the canaries."""
    from cardiofed.data.study_features import StudyFeatures, catalogue_of
    from cardiofed.node.work import load_site_data
    from cardiofed.privacy.audit import scan_payloads

    if cfg.data is None:
        raise fail("--scan-rows searches a site's payloads for its rows; this node relays a "
                   "region and holds no rows.")
    sent = sorted((cfg.state_dir / "outbox").glob("*.bin"))
    if not sent:
        raise fail(f"No sent payloads kept in {cfg.state_dir / 'outbox'}.")
    names = json.loads((cfg.state_dir / "feature_names.json").read_text())
    declared = cfg.state_dir / "study_features.json"
    site = load_site_data(cfg.data, names, catalogue_of(
        StudyFeatures.model_validate_json(declared.read_text()) if declared.exists() else None))
    matches = scan_payloads([("this site", p.stem, p.read_bytes()) for p in sent], site.x_train)
    console.print(f"Searched {len(sent)} sent payloads for the values of {site.n_train} "
                  f"training records: {len(matches)} found.")
    if matches:
        raise fail("Record values were found in sent payloads: " + ", ".join(
            f"{m.kind} (feature {m.feature}, {m.encoding})" for m in matches[:10]))
