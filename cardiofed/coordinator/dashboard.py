"""The operator dashboard (``/ui``): server-rendered pages over the coordinator's state.

Login exchanges an admin (or viewer) credential for a session cookie (HttpOnly,
SameSite=Strict, Secure under TLS; the database keeps only its hash). Every
state-changing form carries a CSRF token derived from the session's secret, which a
page of another origin can neither read nor compute. Pages refresh themselves while a
study runs; everything they load ships in the package.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from datetime import timedelta
from importlib.resources import files
from typing import Annotated, Any
from urllib.parse import parse_qs, quote, urlsplit

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from cardiofed.coordinator import administration, status, studies
from cardiofed.coordinator.deps import DB, Clock, ReleasingRoute
from cardiofed.exceptions import AuthenticationError, CoordinatorError, PermissionDenied
from cardiofed.experiments.acceptability import (
    Check,
    calibration_checks,
    combined,
    interval_text,
)
from cardiofed.serving import attribution as attribution_answer
from cardiofed.serving.survival import study_report as survival_report
from cardiofed.store import (
    AdminKey,
    AuditEvent,
    ModelVersion,
    Refusal,
    Round,
    Site,
    Study,
    UiSession,
    Update,
    hash_secret,
    new_secret,
)

COOKIE = "cardiofed_session"
SESSION_HOURS = 8
REFRESH_S = 5
router = APIRouter(prefix="/ui", include_in_schema=False, route_class=ReleasingRoute)
_templates = Environment(loader=PackageLoader("cardiofed.coordinator", "templates"),
                         autoescape=select_autoescape(["html"]))
NO_STORE = {"Cache-Control": "no-store"}


def _csrf(token: str) -> str:
    return hmac.new(token.encode(), b"cardiofed-csrf", hashlib.sha256).hexdigest()


class Login:
    """The signed-in operator of a request: role, key and CSRF token."""

    def __init__(self, session: UiSession, token: str) -> None:
        self.role, self.key_id, self.csrf = session.role, session.admin_key_id, _csrf(token)
        self.token_hash = session.token_hash

    @property
    def can_change(self) -> bool:
        return self.role == administration.ADMIN


def current_login(request: Request, db: DB, clock: Clock) -> Login | None:
    token = request.cookies.get(COOKIE)
    if not token:
        return None
    session = db.get(UiSession, hash_secret(token))
    if session is None or session.expires_at <= clock():
        return None
    key = db.get(AdminKey, session.admin_key_id)  # checked on every request
    if key is None or key.revoked_at is not None:
        return None
    return Login(session, token)


OptionalLogin = Annotated[Login | None, Depends(current_login)]


def _page(name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    return HTMLResponse(_templates.get_template(name).render(**context),
                        status_code=status_code, headers=NO_STORE)


def _to_login() -> RedirectResponse:
    return RedirectResponse("/ui/login", status_code=303)


async def _form(request: Request) -> dict[str, str]:
    """An urlencoded form (the body is bounded by the app's body limit), posted from this
    dashboard: a browser's ``Origin`` (or, without one, ``Referer``) must name this host,
    so no other site can post a form here, a login included (login CSRF)."""
    source = request.headers.get("origin") or request.headers.get("referer")
    if source is not None and urlsplit(source).netloc != request.headers.get("host"):
        raise PermissionDenied("The form was posted from another site; open the dashboard "
                               "at its own address and try again.")
    fields = parse_qs((await request.body()).decode("utf-8", "replace"))
    return {k: v[0] for k, v in fields.items()}


def _checked(login: Login | None, form: dict[str, str]) -> Login:
    """The login of a state-changing form, its CSRF token verified."""
    if login is None:
        raise AuthenticationError("Your dashboard session has ended; log in again.")
    if not hmac.compare_digest(form.get("csrf", ""), login.csrf):
        raise PermissionDenied("The form's CSRF token is missing or wrong; reload the page "
                               "and try again.")
    return login


@router.get("/login", response_class=HTMLResponse)
def login_page(login: OptionalLogin) -> Response:
    return RedirectResponse("/ui", status_code=303) if login else _page("login.html")


@router.post("/login", response_class=HTMLResponse)
async def log_in(request: Request, db: DB, clock: Clock) -> Response:
    form = await _form(request)
    try:
        key = administration.authenticate_admin(db, form.get("credential", "").strip(), write=False)
    except AuthenticationError:
        return _page("login.html", 401, error="Unknown credential.")
    token = new_secret()
    db.add(UiSession(token_hash=hash_secret(token), admin_key_id=key.id,
                     role=key.role or administration.ADMIN,
                     expires_at=clock() + timedelta(hours=SESSION_HOURS)))
    db.execute(delete(UiSession).where(UiSession.expires_at <= clock()))
    administration.audit(db, key, "dashboard", "log in", None, now=clock)
    db.commit()
    response = RedirectResponse("/ui", status_code=303)
    response.set_cookie(COOKIE, token, max_age=SESSION_HOURS * 3600, path="/ui",
                        httponly=True, samesite="strict",
                        secure=request.url.scheme == "https")
    return response


@router.post("/logout")
async def log_out(request: Request, db: DB, login: OptionalLogin) -> Response:
    form = await _form(request)
    if login is not None:
        _checked(login, form)
        db.execute(delete(UiSession).where(UiSession.token_hash == login.token_hash))
        db.commit()
    response = _to_login()
    response.delete_cookie(COOKIE, path="/ui")
    return response


@router.get("", response_class=HTMLResponse)
def studies_page(db: DB, login: OptionalLogin, clock: Clock) -> Response:
    if login is None:
        return _to_login()
    rows = []
    for study in db.scalars(select(Study).order_by(Study.created_at)):
        rounds = studies.study_plan(study).rounds
        sites = db.scalar(select(func.count()).select_from(Site).where(
            Site.study_id == study.id)) or 0
        rows.append({"id": study.id, "phase": study.phase, "round": study.current_round,
                     "rounds": rounds, "sites": sites, "version": study.model_version,
                     "progress": _progress(study, rounds), "created": study.created_at})
    running = any(r["phase"] != "done" for r in rows)
    return _page("studies.html", login=login, studies=rows, refresh=REFRESH_S if running else 0)


def _progress(study: Study, rounds: int) -> float:
    """Share of the study's rounds closed (statistics, training rounds, evaluation)."""
    return 1.0 if study.phase == "done" else min(1.0, study.current_round / (rounds + 2))


@router.get("/studies/{study_id}", response_class=HTMLResponse)
def study_page(study_id: str, db: DB, login: OptionalLogin, clock: Clock) -> Response:
    if login is None:
        return _to_login()
    try:
        study = studies.get_study(db, study_id)
    except CoordinatorError as exc:
        return _page("error.html", exc.status_code, login=login, message=str(exc))
    state = status.status(db, study, clock)
    finished = (study.analysis or {}).get("result") is not None
    survival = finished and study.plan.get("survival") is not None
    return _page("study.html", login=login, study=study, state=state,
                 attribution=attribution_answer.report(study).model_dump()
                 if finished and not survival else None,
                 survival=survival_report(study).model_dump() if survival else None,
                 sites=_sites(db, study, state), rounds=_rounds(db, study, clock),
                 models=_models(db, study), charts=_auc_charts(db, study),
                 refresh=REFRESH_S if study.phase != "done" else 0, quote=quote)


def _sites(db: Session, study: Study, state: dict[str, Any]) -> list[dict[str, Any]]:
    refusals: dict[str, list[str]] = {}
    for r in state["refusals"]:
        refusals.setdefault(r["site"], []).append(f"round {r['round']}: {r['reason']}")
    quarantines: dict[str, list[str]] = {}
    for q in state["quarantined"]:
        quarantines.setdefault(q["site"], []).append(f"round {q['round']}: {q['reason']}")
    shares = state["update_share"]
    epsilon = _epsilon(db, study)
    return [{"name": s.name, "revoked": s.revoked, "last_seen": s.last_seen,
             "share": shares.get(s.name, 0.0), "refusals": refusals.get(s.name, []),
             "quarantines": quarantines.get(s.name, []), "epsilon": epsilon.get(s.name, {}),
             "privacy": s.privacy,
             "reported": s.name in state["reported"], "waiting": s.name in state["waiting_for"]}
            for s in db.scalars(select(Site).where(Site.study_id == study.id)
                                .order_by(Site.index))]


def _epsilon(db: Session, study: Study) -> dict[str, dict[str, float]]:
    """Epsilon spent per site and release kind, as each site's metrics report it."""
    final = db.scalar(select(ModelVersion).where(ModelVersion.study_id == study.id)
                      .order_by(ModelVersion.version.desc()).limit(1))
    out: dict[str, dict[str, float]] = {}
    for site, metrics in ((final.metrics or {}) if final else {}).items():
        if isinstance(metrics, dict):
            spent = {k: float(v) for k, v in metrics.items()
                     if k.startswith("epsilon") and isinstance(v, int | float)}
            if spent:
                out[site] = spent
    return out


def _rounds(db: Session, study: Study, clock: Clock) -> list[dict[str, Any]]:
    counts = dict(db.execute(select(Update.round_id, func.count()).join(
        Round, Update.round_id == Round.id).where(Round.study_id == study.id)
        .group_by(Update.round_id)).all())
    refused = dict(db.execute(select(Refusal.round_number, func.count()).where(
        Refusal.study_id == study.id).group_by(Refusal.round_number)).all())
    now = clock()
    return [{"number": r.number, "kind": r.kind, "opened": r.opened_at, "closed": r.closed_at,
             "open_for_s": None if r.closed_at else (now - r.opened_at).total_seconds(),
             "reports": counts.get(r.id, 0), "refusals": refused.get(r.number, 0),
             "outcome": r.outcome or ""}
            for r in db.scalars(select(Round).where(Round.study_id == study.id)
                                .order_by(Round.number.desc()))]


def _models(db: Session, study: Study) -> list[dict[str, Any]]:
    """Every version, newest first, with the median of its sites' AUCs (the newest
    evaluated one also with every site's metrics)."""
    out, detailed = [], False
    for m in db.scalars(select(ModelVersion).where(ModelVersion.study_id == study.id)
                        .order_by(ModelVersion.version.desc())):
        aucs = _aucs(m)
        out.append({"version": m.version, "round": m.round_number, "created": m.created_at,
                    "participants": len(m.participants), "sha256": m.sha256,
                    "evaluated": len(m.metrics or {}),
                    "median_auc": float(np.median([a for a, _, _ in aucs.values()]))
                    if aucs else None,
                    "metrics": m.metrics if m.metrics and not detailed else None})
        detailed = detailed or bool(m.metrics)
    return out


def _aucs(m: ModelVersion) -> dict[str, tuple[float, Any, Any]]:
    """site -> (AUC, low, high) of the sites that sent an AUC for `m`."""
    return {site: (float(v["auc"]), v.get("auc_ci_low"), v.get("auc_ci_high"))
            for site, v in (m.metrics or {}).items()
            if isinstance(v, dict) and isinstance(v.get("auc"), int | float)}


def _auc_charts(db: Session, study: Study) -> dict[str, Any]:
    """The newest evaluated version's AUC per site (with intervals where sent), and the
    spread of the sites' AUCs over every evaluated version (min, median, max)."""
    trend: list[dict[str, Any]] = []
    newest: ModelVersion | None = None
    for m in db.scalars(select(ModelVersion).where(ModelVersion.study_id == study.id)
                        .order_by(ModelVersion.version)):
        aucs = _aucs(m)
        if not aucs:
            continue
        values = np.array([a for a, _, _ in aucs.values()])
        trend.append({"version": m.version, "min": float(values.min()),
                      "median": float(np.median(values)), "max": float(values.max())})
        newest = m
    latest = [] if newest is None else [
        {"version": newest.version, "site": site, "auc": a, "low": lo, "high": hi,
         **_calibration((newest.metrics or {})[site])}
        for site, (a, lo, hi) in _aucs(newest).items()]
    return {"latest": latest, "trend": trend}


def _calibration(metrics: Any) -> dict[str, str]:
    """A site's reported calibration slope and calibration-in-the-large with their
    intervals, and the verdict the report gives them (the acceptability criteria)."""
    def number(key: str) -> float:
        value = metrics.get(key)
        return float(value) if isinstance(value, int | float) else math.nan

    slope, citl = calibration_checks(
        number("calibration_slope"), (number("calibration_slope_ci_low"),
                                      number("calibration_slope_ci_high")),
        number("calibration_intercept"), (number("calibration_intercept_ci_low"),
                                          number("calibration_intercept_ci_high")))
    return {"slope": _shown(slope), "citl": _shown(citl),
            "calibration": str(combined((slope, citl)))}


def _shown(check: Check) -> str:
    return interval_text(check, 2) if math.isfinite(check.value) else "not reported"


@router.post("/studies/{study_id}/sites/{site_name}/revoke")
async def revoke(study_id: str, site_name: str, request: Request, db: DB,
                 login: OptionalLogin, clock: Clock) -> Response:
    form = await _form(request)
    checked = _checked(login, form)
    if not checked.can_change:
        raise PermissionDenied("A viewer cannot revoke sites.")
    study = studies.get_study(db, study_id)
    if form.get("confirm") != "yes":  # the first press asks; the second revokes
        return _page("confirm.html", login=checked, study=study.id, site=site_name,
                     min_sites=study.min_sites, quote=quote)
    key = db.get(AdminKey, checked.key_id)
    assert key is not None  # a session's key is never deleted
    administration.revoke_site(db, study_id, site_name, by=(key, "dashboard"), now=clock)
    return RedirectResponse(f"/ui/studies/{quote(study_id)}", status_code=303)


@router.get("/audit", response_class=HTMLResponse)
def audit_page(db: DB, login: OptionalLogin) -> Response:
    if login is None:
        return _to_login()
    events = db.scalars(select(AuditEvent).order_by(AuditEvent.id.desc()).limit(500))
    return _page("audit.html", login=login, events=list(events))


@router.get("/static/style.css")
def stylesheet() -> Response:
    css = files("cardiofed.coordinator").joinpath("templates/style.css").read_text()
    return Response(css, media_type="text/css", headers={"Cache-Control": "max-age=3600"})
