"""``cardiofed node``: run a hospital node next to its records, and audit its releases."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from cardiofed._console import console, fail
from cardiofed.exceptions import CardioFedError

if TYPE_CHECKING:  # loaded when a command runs, not for --help
    from cardiofed.node.config import NodeConfig

node_app = typer.Typer(
    rich_markup_mode=None,  # help is plain text: brackets stay brackets
    help="Run a hospital node next to its records.", no_args_is_help=True)


@node_app.command("run")
def node_run(config: Annotated[Path, typer.Option(help="The node's TOML config.")]) -> None:
    """Enrol if needed, then poll for tasks and run them until the study is done."""
    from cardiofed.models.kinds import set_threads
    from cardiofed.node.agent import NodeAgent
    from cardiofed.node.config import NodeConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        set_threads()
        tasks = NodeAgent(NodeConfig.from_toml(config)).run()
    except CardioFedError as exc:
        raise fail(exc) from None
    console.print(f"Study finished; this node ran {tasks} tasks.")


@node_app.command("identity")
def node_identity(config: Annotated[Path, typer.Option(help="The node's TOML config.")]
                  ) -> None:
    """Print this site's public signing key (made in state_dir on first use), for the
    federation's roster: the hospitals agree on the roster out of band, and a node with
    `roster = "..."` in its config signs its secure sums' advertisements and checks
    everyone else's."""
    from cardiofed.node.config import NodeConfig
    from cardiofed.secure.identity import IDENTITY_KEY, identity_key, roster_line

    try:
        cfg = NodeConfig.from_toml(config)
        private = identity_key(cfg.state_dir / IDENTITY_KEY)
    except CardioFedError as exc:
        raise fail(exc) from None
    console.print("This site's line of the roster's [sites] table (its name as enrolled):",
                  markup=False)
    console.print(roster_line("<site name>", private), markup=False, soft_wrap=True)


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
    from cardiofed.experiments.privacy_audit import scan_payloads
    from cardiofed.node.work import load_site_data

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
