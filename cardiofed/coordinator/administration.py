"""Administration: admin and viewer keys, the audit log, creating a study, and the
operator's controls (pause, resume, cancel, min_sites, adding, revoking and re-admitting
sites). Every change an admin makes through the API or the dashboard is audited.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import (
    delete,
    func,
    select,
    update,
)
from sqlalchemy.orm import Session

from cardiofed.coordinator import attribution, secure_sums
from cardiofed.coordinator.models import initial_weights, store_model
from cardiofed.coordinator.rounds import advance_locked
from cardiofed.coordinator.studies import (
    CANCELLED,
    PAUSED,
    STATISTICS,
    Clock,
    get_study,
    network_plan,
    round_of,
    serialised,
)
from cardiofed.exceptions import (
    AuthenticationError,
    ConfigurationError,
    Conflict,
    InvalidUpdate,
    NotFound,
    PermissionDenied,
)
from cardiofed.names import NAME_RULE, is_safe_name
from cardiofed.serving import registry
from cardiofed.simulation.config import SimulationConfig
from cardiofed.simulation.secure_runner import secure_groups
from cardiofed.store import (
    AdminKey,
    AuditEvent,
    Round,
    Site,
    Study,
    UiSession,
    hash_secret,
    new_secret,
    utcnow,
)

log = logging.getLogger("cardiofed.coordinator")


ADMIN, VIEWER = "admin", "viewer"  # a viewer reads what an admin reads, changes nothing


def create_admin_key(db: Session, role: str = ADMIN) -> str:
    """A new admin (or viewer) credential (shown once; stored as a hash)."""
    if role not in (ADMIN, VIEWER):
        raise ConfigurationError(f"role must be {ADMIN!r} or {VIEWER!r}; got {role!r}.")
    key = new_secret()
    db.add(AdminKey(key_hash=hash_secret(key), role=role))
    db.commit()
    return key


def authenticate_admin(db: Session, credential: str | None, *, write: bool = True
                       ) -> AdminKey:
    """The admin key of `credential`; with `write`, a viewer's is refused."""
    key = db.scalar(select(AdminKey).where(AdminKey.key_hash == hash_secret(credential),
                                           AdminKey.revoked_at.is_(None))
                    ) if credential else None
    if key is None:
        raise AuthenticationError("An admin credential is required for this request.")
    if write and key.role == VIEWER:
        raise PermissionDenied("A viewer credential reads but cannot change anything; "
                               "this request needs an admin credential.")
    return key


def revoke_admin_key(db: Session, key_id: int, now: Clock = utcnow) -> AdminKey:
    """Revoke an admin or viewer credential: it authenticates nothing from now on and its
    dashboard sessions end. The last admin key is kept (make another first)."""
    key = db.get(AdminKey, key_id)
    if key is None:
        raise NotFound(f"There is no admin or viewer key #{key_id}.")
    if key.revoked_at is not None:
        raise Conflict(f"Key #{key_id} was revoked on {key.revoked_at:%Y-%m-%d %H:%M} UTC.")
    if key.role != VIEWER and not db.scalar(select(AdminKey.id).where(
            AdminKey.id != key.id, AdminKey.revoked_at.is_(None),
            (AdminKey.role.is_(None)) | (AdminKey.role == ADMIN)).limit(1)):
        raise Conflict(f"Key #{key_id} is the last admin key: make another admin key before "
                       f"revoking it, or nobody can administer the coordinator.")
    key.revoked_at = now()
    db.execute(delete(UiSession).where(UiSession.admin_key_id == key.id))
    audit(db, key, "cli", "revoke key", None, f"key #{key.id} ({key.role or ADMIN})", now)
    db.commit()
    return key


def audit(db: Session, key: AdminKey, via: str, action: str, study_id: str | None,
          detail: str = "", now: Clock = utcnow) -> None:
    """Record an administrative act (committed with the change it describes)."""
    db.add(AuditEvent(at=now(), actor=f"{key.role or ADMIN} key #{key.id} ({via})",
                      action=action, study_id=study_id, detail=detail[:300]))


def create_study(db: Session, *, study_id: str, plan: SimulationConfig, sites: list[str],
                 feature_names: list[str], feature_ranges: list[tuple[float, float]],
                 min_sites: int | None = None, round_timeout_s: float = 3600.0,
                 outcome: str | None = None, relay: bool = False, now: Clock = utcnow,
                 by: tuple[AdminKey, str] | None = None) -> dict[str, str]:
    """Create a study and its sites; returns a one-time enrolment token per site.
    `relay`: a regional study of a national one (:mod:`cardiofed.protocol.relay`).
    `by`: the admin key and the door it came through, for the audit log."""
    if db.get(Study, study_id) is not None:
        raise Conflict(f"Study {study_id!r} already exists.")
    if registry.has_study(db, study_id):
        raise Conflict(f"The model registry already holds models named {study_id!r}-v<n> "
                       f"(from a simulation); choose another study id.")
    if not sites or len(set(sites)) != len(sites):
        raise InvalidUpdate(f"A study needs distinct site names; got {sites}.")
    unsafe = [name for name in [study_id, *sites] if not is_safe_name(name)]
    if unsafe:
        raise InvalidUpdate(f"Study and site names must {NAME_RULE}; got {unsafe}.")
    simulation_only = [name for name, on in (
        ("algorithm scaffold", plan.algorithm == "scaffold"),
        ("weighting", plan.weighting != "sample-size"), ("label_quality", plan.label_quality),
        ("covariate_shift", plan.covariate_shift), ("recalibrate", plan.recalibrate),
        ("finetune", plan.finetune)) if on]
    if simulation_only:
        raise InvalidUpdate(f"The networked federation aggregates with sample-size weights "
                            f"only; {', '.join(simulation_only)} is available in simulation "
                            f"only for now.")
    plan = network_plan(plan, len(sites))
    if plan.dp_epsilon is not None:
        raise InvalidUpdate("Privacy budgets belong to each site's node configuration, not to "
                            "the study plan; remove dp_epsilon from the plan.")
    min_sites = len(sites) if min_sites is None else min_sites
    if not 1 <= min_sites <= len(sites):
        raise InvalidUpdate(f"min_sites must be in [1, {len(sites)}]; got {min_sites}.")
    if round_timeout_s <= 0:
        raise InvalidUpdate(f"round_timeout_s must be > 0; got {round_timeout_s}.")
    outcomes = plan.catalogue().outcomes
    if outcome is not None and outcome not in outcomes:
        raise InvalidUpdate(f"outcome must be one of {', '.join(outcomes)} (built in or "
                            f"declared in plan.study_features); got {outcome!r}.")
    if relay and (plan.analysis is not None or plan.aggregation == "async"):
        raise InvalidUpdate("A relay study runs the rounds its region's node opens for the "
                            "national study: it cannot be an analysis study, and its own "
                            "aggregation is 'sync' (the national plan may be asynchronous).")
    if relay and plan.secure_aggregation:
        raise InvalidUpdate("A relay study cannot be secure: its region's node would send "
                            "its sites' sum upward, and secure sums are not relayed yet.")
    try:
        plan.check_buffer_size(len(sites))
        if plan.secure_group_size is not None:
            secure_groups(sites, plan.secure_group_size, seed=0)  # at least 3 groups
    except ConfigurationError as exc:
        raise InvalidUpdate(str(exc)) from None
    if plan.analysis is not None:
        if feature_names != attribution.columns_of(plan.analysis, plan.catalogue()):
            raise InvalidUpdate("An analysis study's feature columns are its covariates' "
                                "encoding.")
        if outcome is None:
            raise InvalidUpdate("An analysis study names its outcome (the sites' mapping "
                                "files' outcome, e.g. chd_10y).")
    study = Study(id=study_id, plan=plan.model_dump(), feature_names=feature_names,
                  feature_ranges=[list(r) for r in feature_ranges], min_sites=min_sites,
                  round_timeout_s=round_timeout_s, outcome=outcome, active_sites=len(sites),
                  relay=relay or None)
    db.add(study)
    db.flush()
    tokens = {}
    for index, name in enumerate(sites):
        tokens[name] = new_secret()
        db.add(Site(study_id=study_id, name=name, index=index,
                    enrol_token_hash=hash_secret(tokens[name])))
    if plan.analysis is not None:
        first = attribution.begin(study, plan.analysis)
    else:
        if not relay:  # a relay study's models are the national study's
            store_model(db, study, initial_weights(plan, feature_names), version=0,
                         round_number=0, participants=[])
        first = STATISTICS
    step, attempt = secure_sums.open_step(plan.secure_aggregation, first)
    db.add(Round(study_id=study_id, number=0, kind=first, model_version=0,
                 opened_at=now(), deadline=now() + timedelta(seconds=round_timeout_s),
                 secure_step=step, secure_attempt=attempt))
    if by is not None:
        audit(db, *by, "create study", study_id, f"{len(sites)} sites: {', '.join(sites)}",
              now)
    db.commit()
    return tokens


def revoke_site(db: Session, study_id: str, site_name: str,
                by: tuple[AdminKey, str] | None = None, now: Clock = utcnow) -> None:
    site = db.scalar(select(Site).where(Site.study_id == study_id, Site.name == site_name))
    if site is None:
        raise NotFound(f"Study {study_id!r} has no site {site_name!r}.")
    # A conditional update: of any number of concurrent revocations exactly one flips the
    # flag, and only that one counts the site out of the study's active sites.
    flipped = db.execute(update(Site).where(Site.id == site.id, Site.revoked.is_(False))
                         .values(revoked=True).returning(Site.id)).first()
    if flipped is not None:
        _count_active(db, study_id, -1)
    if by is not None:
        audit(db, *by, "revoke site", study_id, site_name, now)
    db.commit()


def pause_study(db: Session, study_id: str, reason: str,
                by: tuple[AdminKey, str] | None = None, now: Clock = utcnow) -> None:
    """Stop a study from advancing until :func:`resume_study`: no round closes, no task
    is handed out; what sites upload meanwhile waits in its round."""
    study = get_study(db, study_id)
    with serialised(db, study):
        _refuse_finished(study, "pause")
        study.halted = f"{PAUSED} by an operator: {reason}"[:300]
        if by is not None:
            audit(db, *by, "pause study", study_id, reason, now)
        db.commit()


def resume_study(db: Session, study_id: str, by: tuple[AdminKey, str] | None = None,
                 now: Clock = utcnow) -> None:
    """Let a paused study go on; its open round gets a fresh deadline."""
    study = get_study(db, study_id)
    with serialised(db, study):
        _refuse_finished(study, "resume")
        if study.halted is None:
            raise Conflict(f"Study {study_id!r} is not paused.")
        study.halted = None
        rnd = round_of(db, study)
        rnd.deadline = now() + timedelta(seconds=study.round_timeout_s)
        if by is not None:
            audit(db, *by, "resume study", study_id, "", now)
        db.commit()
        advance_locked(db, study, now)


def cancel_study(db: Session, study_id: str, reason: str,
                 by: tuple[AdminKey, str] | None = None, now: Clock = utcnow) -> None:
    """End a study where it stands: its open rounds close, nodes stop, the models
    published so far stay (the status says it was cancelled, and why)."""
    study = get_study(db, study_id)
    with serialised(db, study):
        _refuse_finished(study, "cancel")
        for rnd in db.scalars(select(Round).where(Round.study_id == study.id,
                                                  Round.closed_at.is_(None))):
            rnd.closed_at = now()
            rnd.outcome = f"{CANCELLED}: {reason}"[:200]
        study.phase = "done"
        study.halted = f"{CANCELLED} by an operator: {reason}"[:300]
        if by is not None:
            audit(db, *by, "cancel study", study_id, reason, now)
        db.commit()


def set_min_sites(db: Session, study_id: str, min_sites: int,
                  by: tuple[AdminKey, str] | None = None, now: Clock = utcnow) -> None:
    """Change how many active sites the study needs (at least 1, at most its sites); a
    study paused for want of sites goes on at once if it has enough for the new value."""
    study = get_study(db, study_id)
    with serialised(db, study):
        _refuse_finished(study, "change")
        n_sites = int(db.scalar(select(func.count()).select_from(Site)
                                .where(Site.study_id == study.id)) or 0)
        if min_sites > n_sites:  # the schema bounds it below; the study's sites above
            raise Conflict(f"min_sites must be in [1, {n_sites}] (the study's sites); got "
                           f"{min_sites}.")
        before = study.min_sites
        study.min_sites = min_sites
        if by is not None:
            audit(db, *by, "set min_sites", study_id, f"{before} -> {min_sites}", now)
        db.commit()
        advance_locked(db, study, now)


def _count_active(db: Session, study_id: str, change: int) -> None:
    """Move the study's stored count of active sites by `change`, in the database (so
    concurrent changes add up), where the study keeps one."""
    db.execute(update(Study).where(Study.id == study_id, Study.active_sites.is_not(None))
               .values(active_sites=Study.active_sites + change))


def _refuse_finished(study: Study, action: str) -> None:
    if study.phase == "done":
        raise Conflict(f"Study {study.id!r} is over ({study.halted or 'done'}); there is "
                       f"nothing to {action}.")


def add_site(db: Session, study_id: str, site_name: str,
             by: tuple[AdminKey, str] | None = None, now: Clock = utcnow) -> str:
    """Enrol a new site into a running study; returns its one-time enrolment token. It
    takes part from the next task it is given (the merged preprocessor is shared)."""
    study = get_study(db, study_id)
    if not is_safe_name(site_name):
        raise InvalidUpdate(f"Site names must {NAME_RULE}; got {site_name!r}.")
    with serialised(db, study):
        _refuse_finished(study, "add a site to")
        if study.relay or study.analysis is not None:
            raise Conflict(f"Study {study_id!r} fixes its sites at creation (a relay or "
                           f"analysis study).")
        if db.scalar(select(Site.id).where(Site.study_id == study.id,
                                           Site.name == site_name)) is not None:
            raise Conflict(f"Study {study_id!r} already has a site {site_name!r}; re-admit "
                           f"it if it was revoked.")
        token = new_secret()
        index = db.scalar(select(func.max(Site.index)).where(Site.study_id == study.id))
        db.add(Site(study_id=study.id, name=site_name, index=(index or 0) + 1,
                    enrol_token_hash=hash_secret(token)))
        _count_active(db, study.id, +1)
        if by is not None:
            audit(db, *by, "add site", study_id, site_name, now)
        db.commit()
        return token


def readmit_site(db: Session, study_id: str, site_name: str,
                 by: tuple[AdminKey, str] | None = None, now: Clock = utcnow) -> str:
    """Re-admit a revoked site with a new one-time enrolment token (its old credential
    stays dead); returns the token."""
    study = get_study(db, study_id)
    with serialised(db, study):
        _refuse_finished(study, "re-admit a site to")
        site = db.scalar(select(Site).where(Site.study_id == study.id,
                                            Site.name == site_name))
        if site is None:
            raise NotFound(f"Study {study_id!r} has no site {site_name!r}.")
        token = new_secret()
        flipped = db.execute(update(Site).where(Site.id == site.id, Site.revoked.is_(True))
                             .values(revoked=False, credential_hash=None,
                                     enrol_token_hash=hash_secret(token))
                             .returning(Site.id)).first()
        if flipped is None:
            raise Conflict(f"Site {site_name!r} of study {study_id!r} is not revoked.")
        _count_active(db, study.id, +1)
        if by is not None:
            audit(db, *by, "re-admit site", study_id, site_name, now)
        db.commit()
        return token
