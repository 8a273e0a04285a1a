"""``cardiofed admin`` and ``cardiofed status``: administer studies on a running
coordinator (over HTTPS with the admin credential, or on its database for keys)."""

from __future__ import annotations

import json
import os
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.console import Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from cardiofed._console import console, fail
from cardiofed.defaults import DEFAULT_DATABASE_URL
from cardiofed.exceptions import CardioFedError

if TYPE_CHECKING:  # loaded when a command runs, not for --help
    import httpx

admin_app = typer.Typer(
    rich_markup_mode=None,  # help is plain text: brackets stay brackets
    help="Administer studies on a running coordinator.",
    no_args_is_help=True)

KeyFile = Annotated[Path, typer.Option(help="File holding the admin credential.")]
Url = Annotated[str, typer.Option(help="Coordinator URL.")]
CaFile = Annotated[Path | None, typer.Option(help="CA certificate to verify the coordinator.")]


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
        help="TOML plan: training, an [attribution] table for an attribution study, or a "
             "[survival] table for a federated Cox model.")]
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
        # An analysis study's columns are its covariates' encoding (the coordinator's).
        names, ranges = (None, None) if plan.analysis is not None else study_columns(
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
    from cardiofed.serving.attribution import result_of

    with _admin_client(url, admin_key_file, ca_file) as client:
        body = _checked(client.get(f"/v1/studies/{study}/attribution")).json()
    card = body["card"]
    write_report(result_of(body), out, caveats=f"{card['assumptions']} {card['releases']}",
                 title=(
        f"Attribution study {study}: {card['treatment']} on {card['outcome']}, "
        f"{body['estimand']}"))
    console.print(f"Report: {out / 'attribution.html'}")


@admin_app.command("survival-report")
def survival_report(
    study: Annotated[str, typer.Option(help="A finished survival study.")],
    out: Annotated[Path, typer.Option(help="Report folder.")] = Path("cardiofed-survival"),
    url: Url = "https://127.0.0.1:8443",
    admin_key_file: KeyFile = Path("cardiofed-admin.key"),
    ca_file: CaFile = None,
) -> None:
    """Write a networked survival study's Cox model (survival.json) and print its hazard
    ratios."""
    with _admin_client(url, admin_key_file, ca_file) as client:
        body = _checked(client.get(f"/v1/studies/{study}/survival")).json()
    out.mkdir(parents=True, exist_ok=True)
    (out / "survival.json").write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")
    table = Table(title=escape(
        f"Survival study {study}: Cox model of {body['outcome']}, "
        f"{'stratified by site' if body['stratified'] else 'one baseline hazard'}, "
        f"{body['events']:g} events at {len(body['sites'])} sites"))
    table.add_column("column", overflow="fold")
    for heading in ("coefficient", "SE", "hazard ratio (95% CI)"):
        table.add_column(heading, justify="right", no_wrap=True)
    for name, c in body["coefficients"].items():
        table.add_row(escape(name), f"{c['coefficient']:+.4f}", f"{c['se']:.4f}",
                      f"{c['hazard_ratio']:.3f} ({c['hr_low']:.3f}-{c['hr_high']:.3f})")
    console.print(table)
    if body["kaplan_meier_risk_at_horizon"] is not None:
        console.print(f"Kaplan-Meier risk by {body['horizon_years']:g} years, all sites "
                      f"pooled: {body['kaplan_meier_risk_at_horizon']:.3f}.")
    if body["evaluation"]:
        console.print(_survival_evaluation(body))
    if body["baselines_at_horizon"] is not None:  # stratified: one served version per site
        console.print(escape(
            f"Each site's baseline cumulative hazard by {body['horizon_years']:g} years "
            f"(its model version, in this order): " + ", ".join(
                f"{site} {h0:.4f}" for site, h0 in body["baselines_at_horizon"].items())
            + "".join(f"; {site}: no event by then, not served"
                      for site in body["without_baseline"] or []) + "."))
    console.print(f"Report: {out / 'survival.json'}")


def _survival_evaluation(body: dict[str, Any]) -> Table:
    """Each site's figures of the model it is served, on its held-out rows."""
    def ci(value: float | None, interval: list[float | None], fmt: str) -> str:
        if value is None:
            return "undefined"
        ends = "" if interval[0] is None or interval[1] is None else (
            f" ({interval[0]:{fmt}} to {interval[1]:{fmt}})")
        return f"{value:{fmt}}{ends}"

    table = Table(title=escape(f"Each site's held-out rows, by {body['horizon_years']:g} "
                               f"years"))
    for heading in ("site", "patients / events", "Uno's C", "observed / predicted", "slope",
                    "CITL", "verdict"):
        table.add_column(heading, overflow="fold")
    for site, j in body["evaluation"].items():
        predicted = "undefined" if j["predicted"] is None else f"{j['predicted']:.3f}"
        table.add_row(escape(site), f"{j['n']} / {j['events']}",
                      ci(j["uno_c"], j["uno_c_ci"], ".3f"),
                      f"{ci(j['observed'], j['observed_ci'], '.3f')} / {predicted}",
                      ci(j["slope"], j["slope_ci"], ".2f"), ci(j["citl"], j["citl_ci"], "+.2f"),
                      escape(j["verdict"]))
    return table


@admin_app.command("new-key")
def new_key(key_file: Annotated[Path, typer.Option(help="Where to write the new credential "
                                                    "(must not exist).")],
            role: Annotated[str, typer.Option(help="admin, or viewer: reads the API and the "
                                                   "dashboard, changes nothing.")] = "viewer",
            database_url: Annotated[str, typer.Option(
                envvar="CARDIOFED_DATABASE_URL", help="The coordinator's database.")
            ] = DEFAULT_DATABASE_URL) -> None:
    """Make another credential in the coordinator's database (run where it runs)."""
    from cardiofed.coordinator import administration
    from cardiofed.store import session_factory

    if key_file.exists():
        raise fail(f"{key_file} exists; choose a new file for the new credential.")
    if role not in (administration.ADMIN, administration.VIEWER):
        raise fail(f"--role must be {administration.ADMIN} or {administration.VIEWER}; "
                   f"got {role!r}.")
    with session_factory(database_url)() as db:
        key = administration.create_admin_key(db, role)
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

    from cardiofed.store import AdminKey, session_factory

    with session_factory(database_url)() as db:
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
    from cardiofed.coordinator import administration
    from cardiofed.store import session_factory

    with session_factory(database_url)() as db:
        try:
            key = administration.revoke_admin_key(db, key_id)
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
           admin_key_file: KeyFile = Path("cardiofed-admin.key"), ca_file: CaFile = None,
           as_json: Annotated[bool, typer.Option(
               "--json", help="The coordinator's status document, as JSON.")] = False) -> None:
    """What the federation is doing and which sites it waits for."""
    with _admin_client(url, admin_key_file, ca_file) as client:
        state = _checked(client.get(f"/v1/studies/{study}/status")).json()
    if as_json:
        console.print_json(json.dumps(state))
    else:
        console.print(status_view(state))


def _names(names: list[str], most: int = 12) -> str:
    shown = ", ".join(names[:most]) + (f" and {len(names) - most} more"
                                        if len(names) > most else "")
    return shown or "none"


def status_view(state: dict[str, Any]) -> Group:
    """A study's status as tables that wrap to the terminal (80 columns included): where
    it stands, then refusals, quarantined updates and robust aggregation's cuts."""
    overview = Table(box=box.SIMPLE, show_header=False, title=Text(
        f"Study {state['study']}"), title_justify="left", expand=False)
    overview.add_column(no_wrap=True, style="bold")
    overview.add_column(overflow="fold")
    rows = [
        ("phase", f"{state['phase']} (round {state['round']}, {state['kind']})"),
        ("model version", f"{state['model_version']} of {state['rounds_planned']} rounds "
                          f"({state['aggregation']})"),
        ("halted", state["halted"] or "no"),
        ("reported", _names(state["reported"])),
        ("waiting for", _names(state["waiting_for"])),
        ("deadline", f"{state['deadline']} (min_sites {state['min_sites']})"),
        ("last round", state["round_outcome"] or ""),
        ("revoked", _names(state["revoked"])),
        ("exact releases", _names(state["non_private_sites"])),
    ]
    if state["aggregation"] == "async":
        rows.append(("buffered updates", str(state["buffered"])))
    if secure := state.get("secure_sum"):
        rows.append(("secure sum", f"step {secure['step']} (attempt {secure['attempt']}); "
                                   f"reported: the sites that took it"))
    if step := state.get("intercept_step"):
        left = f"; left out: {_names(step['left_out'])}" if step["left_out"] else ""
        rows.append(("intercept step", f"{step['step']:+.3f} (log-odds, round "
                                       f"{step['round']}) from {len(step['kept'])} sites{left}"))
    for key, value in rows:
        overview.add_row(key, Text(str(value)))  # as given: never read as markup
    parts: list[Table] = [overview]
    for title, key, fields in (
            ("Refusals", "refusals", ("site", "round", "reason")),
            ("Quarantined updates", "quarantined", ("site", "round", "reason")),
            ("Robust aggregation", "robust_aggregation", ("round", "site", "what"))):
        entries = state.get(key) or []
        if not entries:
            continue
        table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
        for name in fields:
            table.add_column(name, overflow="fold", no_wrap=name != fields[-1])
        for entry in entries:
            what = entry.get("reason") or ", ".join(
                f"{k}: {v}" for k, v in entry.items() if k not in ("round", "site"))
            table.add_row(*(Text(str(entry.get(f, what if f == "what" else "")))
                            for f in fields))
        parts.append(table)
    return Group(*parts)


