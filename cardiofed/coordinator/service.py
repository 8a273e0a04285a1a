"""The coordinator's domain logic, independent of HTTP.

A study runs in rounds: round 0 gathers federated statistics, rounds 1..R train
(the plan's algorithm: each site's update is folded by the same ``server_update`` the
simulator uses), round R+1 gathers each site's evaluation metrics. A round closes when
every active site has reported, or when its deadline passes with at least
``min_sites`` reports; past the deadline with fewer, it is extended and the status
says which sites it waits for.

With ``aggregation = "async"`` in the plan, training has no barrier (see
:mod:`cardiofed.algorithms.staleness`): training round ``r`` means "trained from model
version ``r - 1``" and stays open while newer versions appear. Updates wait in a
buffer (rows with ``aggregated_into`` NULL; one per site); once ``buffer_size`` have
arrived (or ``buffer_timeout_s`` after the last publication, from at least 2f + 1 distinct
sites under a robust rule tolerating f) they are folded,
discounted by staleness, into a new version and the next round opens. Updates older
than ``max_staleness`` versions are refused. After ``rounds`` versions, the evaluation
round gathers metrics as in a synchronous study. Each accepted update is committed before it is
acknowledged; a repeated identical upload is acknowledged again, a different one for
the same round is a conflict. Accepting an update and closing a round are serialised
(:func:`_serialised`), so concurrent requests never close a round twice nor accept an
update into a round that has just closed.

A *relay* study (``relay`` set at creation; :mod:`cardiofed.protocol.relay`) is a
region of a national study: its statistics round opens with it, its later rounds are
opened by the region's node with the national model, and each closed round keeps the
aggregate that node sends upward, the study waiting (phase ``relay``) in between.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

import numpy as np
from sqlalchemy import (
    Integer,
    Table,
    bindparam,
    delete,
    exists,
    func,
    insert,
    inspect,
    literal,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, defer

from cardiofed.aggregation.robust import SiteAggregation, streamed_mean, update_norm
from cardiofed.aggregation.robust_statistics import (
    Moments,
    StatisticsGate,
    consistent,
    gate_factors,
    scaled,
    site_moments,
)
from cardiofed.aggregation.server_optimizers import ServerState
from cardiofed.algorithms import ClientUpdate, FederatedAlgorithm
from cardiofed.algorithms.staleness import StaleUpdate, buffer_ready, publish_buffer
from cardiofed.causal.study import add as add_sums
from cardiofed.coordinator import attribution
from cardiofed.coordinator.payloads import (
    MAX_METRICS_BYTES,
    check_manifest,
    check_statistics,
    check_update,
    evaluation_metrics,
)
from cardiofed.data.preprocessing import (
    DEFAULT_BINS,
    SiteStatistics,
    add_statistics,
    bin_edges,
    merge_statistics,
)
from cardiofed.exceptions import (
    AuthenticationError,
    ConfigurationError,
    Conflict,
    CoordinatorError,
    DataValidationError,
    InvalidUpdate,
    NotFound,
    PayloadTooLarge,
    PermissionDenied,
    RoundClosed,
    StaleUpdateRefused,
)
from cardiofed.models.networks import Weights, get_weights, make_model
from cardiofed.names import NAME_RULE, is_safe_name
from cardiofed.protocol import relay
from cardiofed.serving import provenance, registry
from cardiofed.simulation.config import SimulationConfig
from cardiofed.simulation.runner import shares
from cardiofed.store import (
    TALLY_SHARDS,
    AdminKey,
    AuditEvent,
    ModelVersion,
    Refusal,
    ReportTally,
    Round,
    Site,
    Study,
    UiSession,
    Update,
    hash_secret,
    new_secret,
    sha256,
    utcnow,
)
from cardiofed.wire import decode_arrays, encode_arrays

log = logging.getLogger("cardiofed.coordinator")
Clock = Callable[[], datetime]
STATISTICS, TRAIN, EVALUATE = "statistics", "train", "evaluate"
# A relay study between rounds: it waits for its region's node to open the next one.
RELAY = "relay"


# One coordinator process serves many threads (uvicorn's thread pool, long polls).
_TRANSITIONS = threading.RLock()


@contextmanager
def _serialised(db: Session, study: Study) -> Iterator[None]:
    """Hold the study's state still: a process-wide lock, and on databases that have it
    (PostgreSQL) a row lock on the study. Pending writes (``last_seen``) are committed
    first so that no database lock is held while waiting, and every object is re-read
    inside, so decisions are taken on the current state, never on a stale copy."""
    db.commit()
    with _TRANSITIONS:
        db.expire_all()
        db.refresh(study, with_for_update=True)
        try:
            yield
        except BaseException:
            db.rollback()
            raise
        db.commit()  # ends the transaction (and releases the row lock)


# ---------------------------------------------------------------- administration

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
    if relay and (plan.attribution is not None or plan.aggregation == "async"):
        raise InvalidUpdate("A relay study runs the rounds its region's node opens for the "
                            "national study: it cannot be an attribution study, and its own "
                            "aggregation is 'sync' (the national plan may be asynchronous).")
    try:
        plan.check_buffer_size(len(sites))
    except ConfigurationError as exc:
        raise InvalidUpdate(str(exc)) from None
    if plan.attribution is not None:
        if feature_names != attribution.columns_of(plan.attribution, plan.catalogue()):
            raise InvalidUpdate("An attribution study's feature columns are its covariates' "
                                "encoding.")
        if outcome is None:
            raise InvalidUpdate("An attribution study names its outcome (the sites' mapping "
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
    if plan.attribution is not None:
        first = attribution.begin(study, plan.attribution)
    else:
        if not relay:  # a relay study's models are the national study's
            _store_model(db, study, _initial_weights(plan, feature_names), version=0,
                         round_number=0, participants=[])
        first = STATISTICS
    db.add(Round(study_id=study_id, number=0, kind=first, model_version=0,
                 opened_at=now(), deadline=now() + timedelta(seconds=round_timeout_s)))
    if by is not None:
        audit(db, *by, "create study", study_id, f"{len(sites)} sites: {', '.join(sites)}",
              now)
    db.commit()
    return tokens


def _initial_weights(plan: SimulationConfig, feature_names: list[str]) -> Weights:
    form = plan.model_form(feature_names)
    n_columns = len(feature_names) if form is None else form.n_columns
    return get_weights(make_model(plan.model, n_columns, seed=plan.seed))


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
        db.execute(update(Study).where(Study.id == study_id, Study.active_sites.is_not(None))
                   .values(active_sites=Study.active_sites - 1))
    if by is not None:
        audit(db, *by, "revoke site", study_id, site_name, now)
    db.commit()


# ---------------------------------------------------------------- operator controls

PAUSED, CANCELLED, FEW_SITES = "paused", "cancelled", "waiting for sites"


def _active_count(db: Session, study: Study) -> int:
    return int(db.scalar(select(func.count()).select_from(Site)
                         .where(Site.study_id == study.id, ~Site.revoked)) or 0)


def pause_study(db: Session, study_id: str, reason: str,
                by: tuple[AdminKey, str] | None = None, now: Clock = utcnow) -> None:
    """Stop a study from advancing until :func:`resume_study`: no round closes, no task
    is handed out; what sites upload meanwhile waits in its round."""
    study = get_study(db, study_id)
    with _serialised(db, study):
        _refuse_finished(study, "pause")
        study.halted = f"{PAUSED} by an operator: {reason}"[:300]
        if by is not None:
            audit(db, *by, "pause study", study_id, reason, now)
        db.commit()


def resume_study(db: Session, study_id: str, by: tuple[AdminKey, str] | None = None,
                 now: Clock = utcnow) -> None:
    """Let a paused study go on; its open round gets a fresh deadline."""
    study = get_study(db, study_id)
    with _serialised(db, study):
        _refuse_finished(study, "resume")
        if study.halted is None:
            raise Conflict(f"Study {study_id!r} is not paused.")
        study.halted = None
        rnd = _round(db, study)
        rnd.deadline = now() + timedelta(seconds=study.round_timeout_s)
        if by is not None:
            audit(db, *by, "resume study", study_id, "", now)
        db.commit()
        _advance(db, study, now)


def cancel_study(db: Session, study_id: str, reason: str,
                 by: tuple[AdminKey, str] | None = None, now: Clock = utcnow) -> None:
    """End a study where it stands: its open rounds close, nodes stop, the models
    published so far stay (the status says it was cancelled, and why)."""
    study = get_study(db, study_id)
    with _serialised(db, study):
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
    with _serialised(db, study):
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
        _advance(db, study, now)


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
    with _serialised(db, study):
        _refuse_finished(study, "add a site to")
        if study.relay or study.plan.get("attribution") is not None:
            raise Conflict(f"Study {study_id!r} fixes its sites at creation (a relay or "
                           f"attribution study).")
        if db.scalar(select(Site.id).where(Site.study_id == study.id,
                                           Site.name == site_name)) is not None:
            raise Conflict(f"Study {study_id!r} already has a site {site_name!r}; re-admit "
                           f"it if it was revoked.")
        token = new_secret()
        index = db.scalar(select(func.max(Site.index)).where(Site.study_id == study.id))
        db.add(Site(study_id=study.id, name=site_name, index=(index or 0) + 1,
                    enrol_token_hash=hash_secret(token)))
        db.execute(update(Study).where(Study.id == study.id, Study.active_sites.is_not(None))
                   .values(active_sites=Study.active_sites + 1))
        if by is not None:
            audit(db, *by, "add site", study_id, site_name, now)
        db.commit()
        return token


def readmit_site(db: Session, study_id: str, site_name: str,
                 by: tuple[AdminKey, str] | None = None, now: Clock = utcnow) -> str:
    """Re-admit a revoked site with a new one-time enrolment token (its old credential
    stays dead); returns the token."""
    study = get_study(db, study_id)
    with _serialised(db, study):
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
        db.execute(update(Study).where(Study.id == study.id, Study.active_sites.is_not(None))
                   .values(active_sites=Study.active_sites + 1))
        if by is not None:
            audit(db, *by, "re-admit site", study_id, site_name, now)
        db.commit()
        return token


def _held(db: Session, study: Study, now: Clock) -> bool:
    """Whether the study must not advance: paused by an operator, or with fewer active
    sites than ``min_sites`` (it pauses itself and says why, and goes on once enough
    sites are active again)."""
    if study.halted is not None and study.halted.startswith(PAUSED):
        return True
    active = _active_count(db, study)
    if active < study.min_sites:
        why = (f"{FEW_SITES}: {active} active of the {study.min_sites} required "
               f"(min_sites); re-admit or add sites, lower min_sites, or cancel the study")
        if study.halted != why:
            study.halted = why
            db.commit()
        return True
    if study.halted is not None:  # enough sites again
        study.halted = None
        rnd = _round(db, study)
        if rnd.closed_at is None:
            rnd.deadline = max(rnd.deadline, now() + timedelta(seconds=study.round_timeout_s))
        db.commit()
    return False


# ---------------------------------------------------------------- sites

def enrol(db: Session, token: str) -> tuple[Site, str]:
    """Exchange a one-time enrolment token for a long-lived site credential."""
    token_hash = hash_secret(token)
    site = db.scalar(select(Site).where(Site.enrol_token_hash == token_hash))
    if site is None:
        raise AuthenticationError("Unknown or already used enrolment token.")
    if site.revoked:
        raise AuthenticationError(f"Site {site.name!r} has been revoked.")
    credential = new_secret()
    # One conditional UPDATE: of any number of concurrent enrolments with one token,
    # exactly one finds the token still there.
    claimed = db.execute(update(Site).where(Site.id == site.id,
                                            Site.enrol_token_hash == token_hash)
                         .values(enrol_token_hash=None, credential_hash=hash_secret(credential))
                         .execution_options(synchronize_session=False))
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        db.rollback()
        raise AuthenticationError("Unknown or already used enrolment token.")
    db.commit()
    db.refresh(site)
    return site, credential


def authenticate_site(db: Session, credential: str | None, now: Clock = utcnow, *,
                      record_contact: bool = True) -> Site:
    """The site whose credential this is; `record_contact` sets its ``last_seen``."""
    site = _usable(db.scalar(select(Site).where(
        Site.credential_hash == _credential_hash(credential))))
    if record_contact:
        site.last_seen = now()
    return site


def _credential_hash(credential: str | None) -> str:
    if not credential:
        raise AuthenticationError("A site credential is required (Authorization: Bearer ...).")
    return hash_secret(credential)


def _usable(site: Site | None) -> Site:
    if site is None:
        raise AuthenticationError("Unknown site credential.")
    if site.revoked:
        raise AuthenticationError(f"Site {site.name!r} has been revoked.")
    return site


@dataclass(frozen=True)
class UploadTarget:
    """Who uploads for which round: the site, its study, and the round (None if the study
    has no round of that number), as read before the payload arrives."""

    site: Site
    study: Study
    round: Round | None
    round_number: int


# The site, its study and the round, in one statement; the study's and the round's
# binary columns are not needed by an upload.
_UPLOADER = (select(Site, Study, Round).join(Study, Study.id == Site.study_id)
             .outerjoin(Round, (Round.study_id == Site.study_id)
                        & (Round.number == bindparam("round_number")))
             .where(Site.credential_hash == bindparam("credential_hash"))
             .options(defer(Study.preprocessor), defer(Study.server_state),
                      defer(Round.relay_result), defer(Round.aggregation)))


def authenticate_upload(db: Session, credential: str | None, study_id: str,
                        round_number: int) -> UploadTarget:
    """An upload's site, checked as by :func:`authenticate_site` and for access to
    `study_id` (its ``last_seen`` is stored with the upload: a refused upload is not
    recorded as contact), in one statement. `db` is a fresh session."""
    _statement_transactions(db)
    row = db.execute(_UPLOADER, {"credential_hash": _credential_hash(credential),
                                 "round_number": round_number}).one_or_none()
    site = _usable(row.Site if row else None)
    ensure_site_access(site, study_id)
    assert row is not None
    return UploadTarget(site, row.Study, row.Round, round_number)


def _statement_transactions(db: Session) -> None:
    """On PostgreSQL, run each of a fresh session's statements as its own transaction
    (no BEGIN and COMMIT round trips): for an upload's reads, and its write, which is
    one statement."""
    if _shared_locks(db):
        db.connection(execution_options={"isolation_level": "AUTOCOMMIT"})


def get_study(db: Session, study_id: str) -> Study:
    study = db.get(Study, study_id)
    if study is None:
        raise NotFound(f"No study {study_id!r}.")
    return study


def study_plan(study: Study) -> SimulationConfig:
    return SimulationConfig.model_validate(study.plan)


def _round(db: Session, study: Study, number: int | None = None, *,
           lock: bool = False) -> Round:
    number = study.current_round if number is None else number
    query = select(Round).where(Round.study_id == study.id, Round.number == number)
    if lock and _shared_locks(db):
        query = query.with_for_update()
    rnd = db.scalar(query)
    if rnd is None:
        raise NotFound(f"Study {study.id!r} has no round {number}.")
    return rnd


def _active_sites(db: Session, study: Study) -> list[Site]:
    return list(db.scalars(select(Site).where(Site.study_id == study.id, ~Site.revoked)
                           .order_by(Site.index)))


def _active_ids(db: Session, study: Study) -> list[int]:
    """The ids of :func:`_active_sites`, without loading a site."""
    return list(db.scalars(select(Site.id).where(Site.study_id == study.id, ~Site.revoked)
                           .order_by(Site.index)))


def _reported(db: Session, rnd: Round, site: Site) -> Update | None:
    return db.scalar(select(Update).where(Update.round_id == rnd.id,
                                          Update.site_id == site.id))


def _round_updates(db: Session, rnd: Round) -> dict[int, Update]:
    return {u.site_id: u for u in db.scalars(select(Update).where(Update.round_id == rnd.id))}


def _refusals(db: Session, study: Study) -> list[Refusal]:
    return list(db.scalars(select(Refusal).where(Refusal.study_id == study.id)
                           .order_by(Refusal.id)))


def _refused(db: Session, study: Study, round_number: int) -> set[int]:
    """Sites that refused this round's task: the round does not wait for them."""
    return {r.site_id for r in _refusals(db, study) if r.round_number == round_number}


def refuse(db: Session, site: Site, *, round_number: int, reason: str,
           now: Clock = utcnow) -> None:
    """Record that `site` refused its task of `round_number` (logged and in the status);
    the round goes on without it."""
    study = get_study(db, site.study_id)
    with _serialised(db, study):
        _round(db, study, round_number)  # NotFound for a round that does not exist
        if site.id not in _refused(db, study, round_number):
            db.add(Refusal(study_id=study.id, site_id=site.id, round_number=round_number,
                           reason=reason[:500], created_at=now()))
            log.warning("study %s: site %s refused round %d: %s", study.id, site.name,
                        round_number, reason[:500])
        db.commit()
        _advance(db, study, now)


@dataclass(frozen=True)
class Task:
    study_id: str
    round: int
    kind: str
    model_version: int
    deadline: datetime


def next_task(db: Session, site: Site, now: Clock = utcnow) -> Task | None:
    """The task `site` should run now, or None (finished, or already reported)."""
    study = get_study(db, site.study_id)
    advance(db, study, now)
    if study.phase in ("done", RELAY):
        return None
    rnd = _round(db, study)
    if study.halted is not None or rnd.closed_at is not None \
            or _reported(db, rnd, site) is not None or site.id in _refused(db, study, rnd.number):
        return None
    return Task(study.id, rnd.number, rnd.kind, rnd.model_version, rnd.deadline)


# A retry of a payload this large, or of any evaluation's metrics, is looked up by its
# hash before it is validated again; smaller ones validate faster than the extra query
# (bench/network_scale.py: the query on every upload cost 6 to 20% of uploads/s).
HASH_FIRST_BYTES = 16 * 1024


def submit(db: Session, target: UploadTarget, *, payload: bytes, max_bytes: int,
           now: Clock = utcnow) -> tuple[str, bool]:
    """Validate and durably store a site's payload for a round (`db`: a fresh session).

    Returns (sha256, newly_accepted). A byte-identical retry is acknowledged again.
    Uploads do not wait for each other: the payload is checked before any lock, and on
    PostgreSQL one statement takes a shared lock on the round (which closing the round
    takes exclusively), inserts the update if the round is still open, counts it and
    records the site's contact, so an update is either in the round it was accepted for
    or refused (one process on SQLite: a process lock).
    """
    if len(payload) > max_bytes:
        raise PayloadTooLarge(f"Payload of {len(payload)} bytes exceeds the limit of "
                              f"{max_bytes} bytes.")
    site, study, rnd = target.site, target.study, target.round
    if rnd is None:
        raise NotFound(f"Study {study.id!r} has no round {target.round_number}.")
    _statement_transactions(db)
    digest = sha256(payload)
    if (rnd.kind == EVALUATE or len(payload) > HASH_FIRST_BYTES) and db.scalar(
            select(Update.sha256).where(Update.round_id == rnd.id,
                                        Update.site_id == site.id)) == digest:
        return digest, False  # a retry of what was accepted: found by its hash, not checked
    try:
        _refuse_closed(study, rnd, site)
        staleness = _staleness(study, rnd, site)
        if staleness is not None:
            _refuse_second_in_buffer(db, study, rnd, site)
        num_samples = _check(db, study, rnd, site.name, payload).num_samples
    except CoordinatorError:
        if _acknowledged(db, rnd, site, digest):  # a retry of what was accepted
            return digest, False
        raise
    row = {"round_id": rnd.id, "site_id": site.id, "payload": payload, "sha256": digest,
           "num_samples": num_samples, "received_at": now(), "staleness": staleness,
           "shard": site.id % TALLY_SHARDS}
    try:
        if _shared_locks(db):
            admitted = db.connection().execute(_ADMIT, row).scalar_one() == 1
        else:
            admitted = _admit_serialised(db, study, rnd, row)
    except IntegrityError:  # the site's report of the round is in: a retry, or a race
        db.rollback()
        if not _acknowledged(db, rnd, site, digest):
            raise
        return digest, False
    if not admitted:  # the round closed while the payload arrived
        rnd = _round(db, study, rnd.number)
        if _acknowledged(db, rnd, site, digest):
            return digest, False
        _refuse_closed(study, rnd, site)
    # The update is committed (durable); does the round close now?
    if not _still_waiting(db, study.id, now):
        advance(db, db.merge(study, load=False), now)
    return digest, True


def _acknowledged(db: Session, rnd: Round, site: Site, digest: str) -> bool:
    """True if `site` already reported exactly `digest` for `rnd`; a different report
    for the round is a conflict."""
    existing = _reported(db, rnd, site)
    if existing is None:
        return False
    if existing.sha256 != digest:
        raise Conflict(f"Site {site.name!r} already submitted a different payload for "
                       f"round {rnd.number} (sha256 {existing.sha256[:12]}...).")
    return True


def _admit_statement() -> Any:
    """PostgreSQL, one statement: a shared lock on the round if it is open, the update
    inserted into it (a second report of the site fails here), one more report in the
    site's shard of the round's tally (:class:`ReportTally`), and the site's
    ``last_seen``; it returns 1, or 0 if the round is closed. On the tables, not the
    entities (the ORM's unit of work cost more than the database did)."""
    rounds, updates, tallies, sites = (cast(Table, t.__table__)
                                       for t in (Round, Update, ReportTally, Site))
    columns = ["round_id", "site_id", "payload", "sha256", "num_samples", "received_at",
               "staleness"]
    open_round = (select(rounds.c.id).where(rounds.c.id == bindparam("round_id"),
                                            rounds.c.closed_at.is_(None))
                  .with_for_update(read=True).cte("open_round"))
    inserted = (insert(updates).from_select(columns, select(
        open_round.c.id, *(bindparam(c, type_=updates.c[c].type) for c in columns[1:])))
        .returning(updates.c.round_id).cte("inserted"))
    tallied = (postgresql.insert(tallies).from_select(["round_id", "shard", "reports"], select(
        inserted.c.round_id, bindparam("shard", type_=Integer), literal(1)))
        .on_conflict_do_update(index_elements=["round_id", "shard"],
                               set_={"reports": tallies.c.reports + 1}).cte("tallied"))
    touched = (update(sites).where(sites.c.id == bindparam("site_id"),
                                   exists(select(inserted.c.round_id)))
               .values(last_seen=bindparam("received_at")).cte("touched"))
    return select(func.count()).select_from(inserted).add_cte(tallied, touched)


_ADMIT = _admit_statement()
_INSERT_UPDATE = insert(cast(Table, Update.__table__))
_TOUCH = (update(cast(Table, Site.__table__)).where(Site.__table__.c.id == bindparam("t_site"))
          .values(last_seen=bindparam("t_seen")))
_TALLY = (sqlite.insert(cast(Table, ReportTally.__table__))
          .values(round_id=bindparam("t_round"), shard=bindparam("t_shard"), reports=1)
          .on_conflict_do_update(index_elements=["round_id", "shard"],
                                 set_={"reports": ReportTally.__table__.c.reports + 1}))


def _admit_serialised(db: Session, study: Study, rnd: Round, row: dict[str, Any]) -> bool:
    """SQLite (one process): the update, its tally and ``last_seen`` in one transaction,
    under the process-wide lock, if the round is still open; committed."""
    study, rnd = db.merge(study, load=False), db.merge(rnd, load=False)
    with _serialised(db, study):
        db.refresh(rnd)
        if rnd.closed_at is not None:
            return False
        conn = db.connection()
        conn.execute(_INSERT_UPDATE, {k: v for k, v in row.items() if k != "shard"})
        conn.execute(_TALLY, {"t_round": row["round_id"], "t_shard": row["shard"]})
        conn.execute(_TOUCH, {"t_site": row["site_id"], "t_seen": row["received_at"]})
    return True


def _refuse_closed(study: Study, rnd: Round, site: Site) -> None:
    if rnd.closed_at is not None and _is_async(study) and rnd.kind == TRAIN:
        raise StaleUpdateRefused(f"Stale update from site {site.name!r}: training "
                                 f"finished at version {study.model_version}; the "
                                 f"update is discarded.")
    if rnd.closed_at is not None:
        raise RoundClosed(f"Round {rnd.number} of study {study.id!r} is closed "
                       f"({rnd.outcome}); the current round is {study.current_round}.")


def _shared_locks(db: Session) -> bool:
    """The database serialises round transitions itself (several coordinator processes
    may share it): PostgreSQL."""
    bind = db.get_bind()
    return bind.dialect.name == "postgresql"


def _is_async(study: Study) -> bool:
    return study.plan.get("aggregation") == "async"


def _staleness(study: Study, rnd: Round, site: Site) -> int | None:
    """Versions published since `rnd`'s model (asynchronous training only); refuses an
    update older than the plan's ``max_staleness``."""
    if not (_is_async(study) and rnd.kind == TRAIN):
        return None
    staleness = study.model_version - rnd.model_version
    try:
        study_plan(study).staleness_rule().check(staleness)
    except StaleUpdate as exc:
        raise StaleUpdateRefused(f"Stale update from site {site.name!r}: {exc}; train again "
                                 f"on version {study.model_version}.") from None
    return staleness


def _refuse_second_in_buffer(db: Session, study: Study, rnd: Round, site: Site) -> None:
    """An asynchronous study takes at most one update per site into its buffer: a site
    with an update still waiting there (in any open round) is refused another, so no
    site can fill the buffer alone by uploading into several open rounds; nor does it
    take an update into a round older than one the site already reported to."""
    newer = db.scalar(
        select(Round.number).join(Update, Update.round_id == Round.id)
        .where(Round.study_id == study.id, Round.number > rnd.number,
               Update.site_id == site.id).limit(1))
    if newer is not None:
        raise StaleUpdateRefused(f"Site {site.name!r} already reported to round {newer}; an "
                                 f"update for the older round {rnd.number} is discarded.")
    waiting = db.scalar(
        select(Round.number).join(Update, Update.round_id == Round.id)
        .where(Round.study_id == study.id, Round.kind == TRAIN, Round.closed_at.is_(None),
               Round.id != rnd.id, Update.site_id == site.id,
               Update.aggregated_into.is_(None), Update.quarantine.is_(None)).limit(1))
    if waiting is not None:
        raise Conflict(f"Site {site.name!r} already has an update in the buffer (round "
                       f"{waiting}); an asynchronous study takes one update per site until "
                       f"the next version is published.")


def _one_per_site(buffer: list[Update]) -> list[Update]:
    """The buffer with each site's first update only; any later one (two uploads that
    raced past :func:`_refuse_second_in_buffer`) is quarantined, never folded."""
    kept: dict[int, Update] = {}
    for u in buffer:
        if u.site_id in kept:
            u.quarantine = "a second update of the same site in one buffer"
        else:
            kept[u.site_id] = u
    return list(kept.values())


@dataclass(frozen=True)
class _Checked:
    """A payload that passed the checks: its declared sample size and what it holds."""

    num_samples: int
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    manifest: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] | None = None  # an evaluation's


def _check(db: Session, study: Study, rnd: Round, site_name: str, payload: bytes
           ) -> _Checked:
    """The payload checked by :mod:`cardiofed.coordinator.payloads` against the round."""
    if rnd.kind == EVALUATE:
        if len(payload) > MAX_METRICS_BYTES:
            raise PayloadTooLarge(f"Metrics payload exceeds {MAX_METRICS_BYTES} bytes.")
        return _Checked(0, metrics=evaluation_metrics(payload))
    try:
        arrays, manifest = decode_arrays(payload)
    except DataValidationError as exc:
        raise InvalidUpdate(str(exc)) from None
    check_manifest(manifest, {"study": study.id, "round": str(rnd.number),
                              "model_version": str(rnd.model_version), "site": site_name})
    if study.plan.get("attribution") is not None:
        plan = study_plan(study).attribution
        assert plan is not None
        n = attribution.check_payload(plan, study, rnd.kind, arrays)
    elif rnd.kind == STATISTICS:
        n = check_statistics(arrays, [(lo, hi) for lo, hi in study.feature_ranges])
    else:
        n = check_update(arrays, manifest, _expected_tensors(db, study, rnd.model_version))
    return _Checked(n, arrays, manifest)


_TENSORS: dict[tuple[str, datetime, int], dict[str, tuple[tuple[int, ...], np.dtype[Any]]]] = {}


def _expected_tensors(db: Session, study: Study, version: int
                      ) -> dict[str, tuple[tuple[int, ...], np.dtype[Any]]]:
    """The tensors of a model version, decoded once per process (a stored version never
    changes; a study's creation time tells a re-created study of the same id apart)."""
    key = (study.id, study.created_at, version)
    if key not in _TENSORS:
        if len(_TENSORS) > 1024:
            _TENSORS.clear()
        _TENSORS[key] = {k: (v.shape, v.dtype)
                         for k, v in _load_model(db, study, version).items()}
    return _TENSORS[key]


# ---------------------------------------------------------------- rounds

def advance(db: Session, study: Study, now: Clock = utcnow) -> None:
    """Close the current round if it is complete (or past its deadline), and open the next.

    Every poll and upload asks; one query without a lock answers a synchronous round
    that is still waiting, so thousands of sites do not queue behind each other."""
    identity = inspect(study).identity  # its id, without re-reading an expired study
    if identity is not None and _still_waiting(db, identity[0], now):
        return
    with _serialised(db, study):
        _advance(db, study, now)


def _waiting_query() -> Any:
    """The current round's state and counts, in one statement (built once: building it
    cost more than running it)."""
    counted = select(func.count()).select_from(Site).where(
        Site.study_id == Study.id, ~Site.revoked).scalar_subquery()
    active = func.coalesce(Study.active_sites, counted)
    refused = select(func.count()).select_from(Refusal).where(
        Refusal.study_id == Study.id, Refusal.round_number == Round.number).scalar_subquery()
    reported = select(func.coalesce(func.sum(ReportTally.reports), 0)).where(
        ReportTally.round_id == Round.id).scalar_subquery()
    return (select(Study.phase, Study.plan["aggregation"].as_string(), Round.closed_at,
                   Round.deadline, active, refused, reported, Study.min_sites, Study.halted)
            .join(Round, (Round.study_id == Study.id) & (Round.number == Study.current_round))
            .where(Study.id == bindparam("study_id")))


_WAITING = _waiting_query()


def _still_waiting(db: Session, study_id: str, now: Clock) -> bool:
    """The current synchronous round is open, before its deadline, with reports missing."""
    row = db.connection().execute(_WAITING, {"study_id": study_id}).one_or_none()
    if row is None:
        return False
    (phase, aggregation, closed_at, deadline, n_active, n_refused, n_reported, min_sites,
     halted) = row
    if phase == RELAY:  # nothing to close until the region's node opens a round
        return True
    if halted is not None or n_active < min_sites:
        return False  # _advance says why it holds, or lets it go on
    if phase == "done" or (phase == TRAIN and aggregation == "async"):
        return False
    return closed_at is None and now() < deadline and n_reported < n_active - n_refused


def _advance(db: Session, study: Study, now: Clock) -> None:
    if study.phase in ("done", RELAY) or _held(db, study, now):
        return
    while study.phase not in ("done", RELAY):
        if study.phase == TRAIN and _is_async(study):
            if not _publish_buffered(db, study, now):
                return
            continue
        # Exclusively on PostgreSQL: uploads in flight (a shared lock) commit first and
        # are folded; later ones see the round closed.
        rnd = _round(db, study, lock=True)
        refused = _refused(db, study, rnd.number)
        active = [i for i in _active_ids(db, study) if i not in refused]
        reported = _reported_ids(db, rnd)
        # In site order (the simulator's order, so the sums match it); revoked sites drop out.
        usable = [reported[i] for i in active if i in reported]
        if not active and refused:
            # Every remaining site refused this round: nobody is left to wait for.
            rnd.closed_at = now()
            rnd.outcome = "study stopped: every active site refused this round"
            study.phase = "done"
            log.warning("study %s stopped: every active site refused round %d", study.id,
                        rnd.number)
            db.commit()
            return
        if len(usable) < len(active) and now() < rnd.deadline:
            return
        folded = _fold(db, study, rnd, usable)
        if not folded.names or len(folded.names) < min(study.min_sites, len(active)):
            _extend(db, study, rnd, now, f"{len(folded.names)} of the {study.min_sites} "
                                         f"usable reports required")
            return
        try:
            _close(db, study, rnd, folded, now)
        except ValueError as exc:  # e.g. a column no site observed: the round waits
            db.rollback()
            _extend(db, study, rnd, now, str(exc))
            return


def _reported_ids(db: Session, rnd: Round) -> dict[int, int]:
    """site id -> update id of every report of `rnd` (no payload is read)."""
    return {site: update for update, site in db.execute(
        select(Update.id, Update.site_id).where(Update.round_id == rnd.id))}


FOLD_BATCH = 500  # updates decoded at a time when a round closes


@dataclass
class _Folded:
    """What a round's usable reports give, read a batch at a time: the sites' names (in
    site order), and the statistics' running totals, the decoded updates or the metrics."""

    names: list[str] = field(default_factory=list)
    # A statistics round keeps each release's (update id, count, mean, SD) per column;
    # the gate's factors come from them, and the releases are read again to be summed.
    moments: list[tuple[int, Moments]] = field(default_factory=list)
    updates: list[ClientUpdate] = field(default_factory=list)
    # A (robust) mean round keeps no update: (update id, num_samples, norm, train_loss)
    # each, and the aggregate is a running sum over the payloads read again in batches.
    streamed: list[tuple[int, int, float, float]] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    totals: dict[str, np.ndarray] | None = None  # an attribution step's sums
    privacy: dict[str, str] = field(default_factory=dict)  # what each site declared

    def sizes(self) -> list[int]:
        return ([n for _, n, _, _ in self.streamed] if self.streamed
                else [u.num_samples for u in self.updates])

    def losses(self) -> list[float]:
        return ([x for _, _, _, x in self.streamed] if self.streamed
                else [u.train_loss for u in self.updates])


def _fold(db: Session, study: Study, rnd: Round, update_ids: list[int]) -> _Folded:
    """Check every report again and fold it (payloads are read FOLD_BATCH at a time and
    dropped once folded); a report that no longer passes is quarantined with the reason,
    so one site's payload never stops a round."""
    names = {i: name for i, name in db.execute(
        select(Site.id, Site.name).where(Site.study_id == study.id))}
    streams = study_plan(study).robust_rule in (None, "mean")
    edges = _edges(study) if rnd.kind == STATISTICS else None
    out = _Folded()
    for start in range(0, len(update_ids), FOLD_BATCH):
        batch = update_ids[start:start + FOLD_BATCH]
        rows = {r.id: r for r in db.execute(
            select(Update.id, Update.site_id, Update.payload, Update.num_samples,
                   Update.quarantine).where(Update.id.in_(batch)))}
        for update_id in batch:
            row = rows[update_id]
            name = names[row.site_id]
            if row.quarantine is not None:
                continue
            checked = _checked_or_quarantined(db, study, rnd, name, update_id, row.payload)
            if checked is None:
                continue
            out.names.append(name)
            declared = checked.manifest.get("privacy")
            if rnd.number == 0 and declared in PRIVACY_MODES:  # a site's first report
                out.privacy[name] = declared
            if edges is not None:
                out.moments.append((update_id, site_moments(SiteStatistics(**checked.arrays),
                                                            edges)))
            elif rnd.kind == TRAIN:
                loss = float(checked.manifest.get("train_loss", "nan"))
                if streams:
                    out.streamed.append((update_id, row.num_samples,
                                         update_norm(checked.arrays), loss))
                else:
                    out.updates.append(ClientUpdate(site=name, delta=checked.arrays,
                                                    num_samples=row.num_samples,
                                                    num_steps=0, train_loss=loss))
            elif rnd.kind in attribution.ATTRIBUTION_STEPS:
                out.totals = add_sums(out.totals, checked.arrays)
            else:
                assert checked.metrics is not None
                out.metrics[name] = checked.metrics
    return out


def _edges(study: Study) -> np.ndarray:
    return bin_edges([(lo, hi) for lo, hi in study.feature_ranges], DEFAULT_BINS)


def _gated_statistics(db: Session, study: Study, rnd: Round, folded: _Folded
                      ) -> dict[int, SiteStatistics]:
    """The round's releases through the statistics gate
    (:mod:`cardiofed.aggregation.robust_statistics`), summed by bin count; what the gate
    cut is recorded in the round's aggregation report."""
    edges = _edges(study)
    ids = [i for i, _ in folded.moments]
    factors = gate_factors([m for _, m in folded.moments], edges[:, 0], edges[:, -1])
    cut = StatisticsGate(factors).down_weighted()
    rnd.aggregation = [{"site": name, "clipped": True,
                        "statistics_down_weighted": [study.feature_names[j] for j in cols]}
                       for name, cols in zip(folded.names, cut, strict=True) if cols]
    out: dict[int, SiteStatistics] = {}
    released = itertools.chain.from_iterable(_decoded_batches(db, ids))
    for arrays, factor in zip(released, factors, strict=True):
        stats = scaled(consistent(SiteStatistics(**arrays), edges), factor)
        bins = stats.histogram.shape[1]
        total = out.get(bins)
        out[bins] = stats if total is None else add_statistics(total, stats)
    return out


def _released_statistics(db: Session, folded: _Folded) -> list[SiteStatistics]:
    return [SiteStatistics(**arrays) for batch in
            _decoded_batches(db, [i for i, _ in folded.moments]) for arrays in batch]


def _decoded_batches(db: Session, ids: list[int]) -> Iterator[list[dict[str, np.ndarray]]]:
    """The updates' payloads decoded, FOLD_BATCH at a time, in the order of `ids`."""
    for start in range(0, len(ids), FOLD_BATCH):
        batch = ids[start:start + FOLD_BATCH]
        payloads = dict(db.execute(select(Update.id, Update.payload)
                                   .where(Update.id.in_(batch))).all())
        yield [decode_arrays(payloads[i])[0] for i in batch]


def _round_delta(db: Session, algorithm: FederatedAlgorithm, folded: _Folded
                 ) -> tuple[Weights, list[SiteAggregation]]:
    """A training round's aggregate delta and what robust aggregation did: a running sum
    over the payloads, read FOLD_BATCH at a time, for the (robust) mean; the decoded
    updates for the rules that need every update at once."""
    if not folded.streamed:
        return algorithm.aggregate(folded.updates)
    ids = [i for i, _, _, _ in folded.streamed]
    return streamed_mean(algorithm.robust, folded.names, folded.sizes(),
                         [n for _, _, n, _ in folded.streamed], _decoded_batches(db, ids))


def _extend(db: Session, study: Study, rnd: Round, now: Clock, why: str) -> None:
    rnd.deadline = now() + timedelta(seconds=study.round_timeout_s)
    rnd.outcome = f"deadline extended: {why}"[:200]
    db.commit()


def _checked_or_quarantined(db: Session, study: Study, rnd: Round, site_name: str,
                            update_id: int, payload: bytes) -> _Checked | None:
    """The update's payload checked again before it is folded; one that no longer passes
    is quarantined with the reason (shown in the status) and None returned, so one site's
    payload never stops a round."""
    try:
        return _check(db, study, rnd, site_name, payload)
    except CoordinatorError as exc:
        reason = str(exc)[:300]
        db.execute(update(Update).where(Update.id == update_id).values(quarantine=reason))
        log.warning("study %s round %d: update of site %s quarantined: %s", study.id,
                    rnd.number, site_name, reason)
        return None


def _close(db: Session, study: Study, rnd: Round, folded: _Folded, now: Clock) -> None:
    plan = study_plan(study)
    names = folded.names
    for mode in PRIVACY_MODES:
        declared = [n for n, m in folded.privacy.items() if m == mode]
        for start in range(0, len(declared), FOLD_BATCH):
            db.execute(update(Site).where(Site.study_id == study.id,
                                          Site.name.in_(declared[start:start + FOLD_BATCH]))
                       .values(privacy=mode))
    if study.relay:
        _close_relayed(db, study, plan, rnd, folded, now)
        return
    if plan.attribution is not None:
        attribution.close_round(db, study, plan.attribution, rnd, names, folded.totals, now())
        db.commit()
        return
    if rnd.kind == STATISTICS:
        stats = list(_gated_statistics(db, study, rnd, folded).values())
        edges = bin_edges([(lo, hi) for lo, hi in study.feature_ranges],
                          max(s.histogram.shape[1] for s in stats))
        pre = merge_statistics(stats, edges, study.feature_names,
                               plan.model_form(study.feature_names))
        study.preprocessor = encode_arrays(pre.to_arrays())
        next_kind, version = TRAIN, study.model_version
    elif rnd.kind == TRAIN:
        algorithm = plan.make_algorithm()
        weights = _load_model(db, study, study.model_version)
        state = _load_state(study, algorithm.init_server(weights))
        delta, report = _round_delta(db, algorithm, folded)
        new, state = _sane(rnd, study, (weights, state),
                           algorithm.server.step(weights, delta, state), report)
        study.model_version += 1
        _store_model(db, study, new, version=study.model_version, round_number=rnd.number,
                     participants=names)
        study.server_state = _dump_state(state)
        next_kind, version = (TRAIN if rnd.number < plan.rounds else EVALUATE,
                              study.model_version)
    else:
        model = model_blob(db, study.id, study.model_version)
        model.metrics = folded.metrics
        _card_metrics(db, study, model.metrics)
        next_kind, version = "", study.model_version
    rnd.closed_at = now()
    rnd.outcome = _closed_with(names)
    if next_kind:
        study.current_round += 1
        db.add(Round(study_id=study.id, number=study.current_round, kind=next_kind,
                     model_version=version, opened_at=now(),
                     deadline=now() + timedelta(seconds=study.round_timeout_s)))
        study.phase = next_kind
    else:
        study.phase = "done"
    db.commit()


def _closed_with(names: list[str]) -> str:
    return (f"closed with {len(names)} reports: {', '.join(names[:20])}"
            + (f" and {len(names) - 20} more" if len(names) > 20 else ""))[:200]


def _close_relayed(db: Session, study: Study, plan: SimulationConfig, rnd: Round,
                   folded: _Folded, now: Clock) -> None:
    """A relay study's round closes into the aggregate its region sends upward; the
    study then waits for the next round the region's node opens (done after evaluation)."""
    if rnd.kind == STATISTICS:
        # A region sends its sites' exact sum; the study above gates it as one site's.
        rnd.relay_result = relay.statistics_result(_released_statistics(db, folded))
    elif rnd.kind == TRAIN:
        delta, report = _round_delta(db, plan.make_algorithm(), folded)
        rnd.relay_result = relay.update_result(delta, folded.sizes(), folded.losses())
        rnd.aggregation = [r.to_dict() for r in report]
    else:
        rnd.relay_result = relay.metrics_result(folded.metrics)
        model_blob(db, study.id, study.model_version).metrics = folded.metrics
    rnd.closed_at = now()
    rnd.outcome = _closed_with(names=folded.names)
    study.phase = "done" if rnd.kind == EVALUATE else RELAY
    db.commit()


# bench/robustness.py and bench/targeted_attacks.py: the coordinate-wise median held
# against every untargeted attack but let two small colluding clinics move a chosen
# patient across a risk category; the weighted median (no site above 1 / (2f + 1) of
# the weight) held against both.
DEFAULT_NETWORK_RULE = "weighted-median"
DEFAULT_BYZANTINE = 2


def network_plan(plan: SimulationConfig, n_sites: int) -> SimulationConfig:
    """The plan a networked study of `n_sites` runs: robust by default (rule
    :data:`DEFAULT_NETWORK_RULE` tolerating f = min(2, (n - 1) // 2) malicious sites,
    where the plan leaves them out), and an asynchronous buffer of at least 2f + 1
    sites where the plan does not size it."""
    given = plan.model_fields_set
    changes: dict[str, object] = {}
    if plan.robust_rule is None:
        changes["robust_rule"] = DEFAULT_NETWORK_RULE
        if "robust_byzantine" not in given:
            changes["robust_byzantine"] = max(0, min(DEFAULT_BYZANTINE, (n_sites - 1) // 2))
    plan = plan.model_copy(update=changes)
    if plan.aggregation == "async" and "buffer_size" not in given:
        plan = plan.model_copy(update={
            "buffer_size": min(n_sites, max(plan.buffer_size, plan.min_buffer()))})
    return plan
MAX_ABS_WEIGHT = 1e4  # a logistic or MLP weight on standardised features never gets near


def _sane(rnd: Round, study: Study, old: tuple[Weights, ServerState],
          new: tuple[Weights, ServerState],
          report: list[SiteAggregation]) -> tuple[Weights, ServerState]:
    """The new global model if it is finite and plausible; else the previous one, kept
    (the version still advances, so the study goes on), with the reason. Records what
    robust aggregation did to each update on the round."""
    rnd.aggregation = [r.to_dict() for r in report]
    worst = max(float(np.max(np.abs(v))) if v.size else 0.0 for v in new[0].values())
    if math.isfinite(worst) and worst <= MAX_ABS_WEIGHT:
        return new
    log.warning("study %s round %d: aggregate refused (largest |weight| %s); the previous "
                "model is kept", study.id, rnd.number, worst)
    rnd.aggregation = [*rnd.aggregation, {"refused": f"aggregate refused: largest |weight| "
                                                     f"{worst:.3g} exceeds {MAX_ABS_WEIGHT:g}; "
                                                     f"the previous model is kept"}]
    return old  # the model and the server optimiser's state before this aggregate


def _buffered(db: Session, study: Study) -> list[Update]:
    return list(db.scalars(
        select(Update).join(Round, Update.round_id == Round.id)
        .where(Round.study_id == study.id, Round.kind == TRAIN, Round.closed_at.is_(None),
               Update.aggregated_into.is_(None))
        .order_by(Update.id)))


def _publish_buffered(db: Session, study: Study, now: Clock) -> bool:
    """Fold the buffer into a new model version if it is due; True if one was published."""
    plan = study_plan(study)
    rnd = _round(db, study)
    # A site that refused a training task (e.g. it ran its planned rounds) trains no more.
    refused_training = {r.site_id for r in _refusals(db, study) if r.round_number > 0}
    active = {s.id: s for s in _active_sites(db, study) if s.id not in refused_training}
    buffer = _one_per_site([u for u in _buffered(db, study)
                                if u.site_id in active  # revoked drop out
                                and u.quarantine is None])
    # The round's deadline bounds the wait too: a site that died without being revoked
    # cannot hold training up for longer than round_timeout_s.
    timeout = min(plan.buffer_timeout_s or math.inf, study.round_timeout_s)
    if len(active) < plan.min_buffer():
        why = (f"waiting: {len(active)} active sites; a version needs "
               f"{plan.min_buffer()} distinct sites")
        if rnd.outcome != why:
            rnd.outcome = why
            db.commit()
        return False
    if not buffer_ready(len(buffer), buffer_size=min(plan.buffer_size, len(active)),
                        since_publication_s=(now() - rnd.opened_at).total_seconds(),
                        timeout_s=timeout, min_count=plan.min_buffer()):
        return False
    rounds = {r.id: r for r in db.scalars(select(Round).where(Round.study_id == study.id))}
    buffer = [u for u in buffer if _checked_or_quarantined(
        db, study, rounds[u.round_id], active[u.site_id].name, u.id, u.payload) is not None]
    if len(buffer) < plan.min_buffer():
        db.commit()
        return False
    algorithm = plan.make_algorithm()
    weights = _load_model(db, study, study.model_version)
    state = _load_state(study, algorithm.init_server(weights))
    names = [active[u.site_id].name for u in buffer]
    new, new_state, report = publish_buffer(algorithm, weights,
                                            [(_client_update(u, name), u.staleness or 0)
                                             for u, name in zip(buffer, names, strict=True)],
                                            state, plan.staleness_rule())
    new, state = _sane(rnd, study, (weights, state), (new, new_state), report)
    study.model_version += 1
    _store_model(db, study, new, version=study.model_version, round_number=rnd.number,
                 participants=names)
    study.server_state = _dump_state(state)
    for u in buffer:
        u.aggregated_into = study.model_version
    rnd.outcome = (f"version {study.model_version} published from {len(buffer)} buffered "
                   f"updates: {', '.join(names)}")
    study.current_round += 1
    if study.model_version < plan.rounds:
        db.add(Round(study_id=study.id, number=study.current_round, kind=TRAIN,
                     model_version=study.model_version, opened_at=now(),
                     deadline=now() + timedelta(seconds=study.round_timeout_s)))
    else:  # training is over: late updates are discarded, metrics are gathered
        for train_round in db.scalars(select(Round).where(
                Round.study_id == study.id, Round.kind == TRAIN, Round.closed_at.is_(None))):
            train_round.closed_at = now()
        db.add(Round(study_id=study.id, number=study.current_round, kind=EVALUATE,
                     model_version=study.model_version, opened_at=now(),
                     deadline=now() + timedelta(seconds=study.round_timeout_s)))
        study.phase = EVALUATE
    db.commit()
    return True


def _client_update(update: Update, site_name: str) -> ClientUpdate:
    delta, manifest = decode_arrays(update.payload)
    return ClientUpdate(site=site_name, delta=delta, num_samples=update.num_samples,
                        num_steps=0, train_loss=float(manifest.get("train_loss", "nan")))


def update_share(db: Session, study: Study) -> dict[str, float]:
    """Each site's share of the training updates folded into the current model."""
    names = {s.id: s.name for s in db.scalars(select(Site).where(Site.study_id == study.id)
                                              .order_by(Site.index))}
    counts = dict.fromkeys(names.values(), 0)
    folded = db.scalars(select(Update).join(Round, Update.round_id == Round.id).where(
        Round.study_id == study.id, Round.kind == TRAIN))
    for u in folded:
        if u.aggregated_into is not None or not _is_async(study):
            counts[names[u.site_id]] += 1
    return shares(counts)


# What a node declares in its payloads' manifest: its own DP noise, or exact releases.
PRIVACY_MODES = ("dp", "off")


def _non_private_sites(db: Session, study: Study) -> list[str]:
    """The sites that declared exact releases (no DP noise of their own)."""
    return sorted(db.scalars(select(Site.name).where(Site.study_id == study.id,
                                                     Site.privacy == "off")))


def status(db: Session, study: Study, now: Clock = utcnow) -> dict[str, object]:
    """What the federation is doing and what it waits for."""
    advance(db, study, now)
    rnd = _round(db, study)
    reported = _round_updates(db, rnd)
    active = _active_sites(db, study)
    refused = _refused(db, study, rnd.number)
    waiting = [s.name for s in active if s.id not in reported and s.id not in refused]
    names = {s.id: s.name for s in db.scalars(select(Site).where(Site.study_id == study.id))}
    return {
        "study": study.id, "phase": study.phase, "round": rnd.number, "kind": rnd.kind,
        "model_version": study.model_version, "rounds_planned": study_plan(study).rounds,
        "reported": sorted(s.name for s in active if s.id in reported),
        "waiting_for": [] if study.phase == "done" else waiting,
        "deadline": rnd.deadline.isoformat() + "Z", "min_sites": study.min_sites,
        "round_outcome": rnd.outcome, "halted": study.halted,
        "revoked": sorted(s.name for s in db.scalars(
            select(Site).where(Site.study_id == study.id, Site.revoked))),
        "aggregation": "async" if _is_async(study) else "sync",
        "buffered": len(_buffered(db, study)) if _is_async(study) else 0,
        "update_share": update_share(db, study),
        "refusals": [{"site": names[r.site_id], "round": r.round_number, "reason": r.reason}
                     for r in _refusals(db, study)],
        "robust_aggregation": _robust_actions(db, study),
        "attribution": attribution.summary(study),
        "relay": bool(study.relay),
        "non_private_sites": _non_private_sites(db, study),
        "quarantined": [{"site": names[u.site_id], "round": number, "reason": u.quarantine}
                        for u, number in db.execute(
                            select(Update, Round.number).join(Round, Update.round_id == Round.id)
                            .where(Round.study_id == study.id, Update.quarantine.is_not(None))
                            .order_by(Update.id)).all()],
    }


def _robust_actions(db: Session, study: Study) -> list[dict[str, object]]:
    """Per round, the updates robust aggregation clipped or rejected, and any aggregate
    refused as not finite or implausible."""
    out: list[dict[str, object]] = []
    for rnd in db.scalars(select(Round).where(Round.study_id == study.id)
                          .order_by(Round.number)):
        for entry in rnd.aggregation or []:
            if entry.get("clipped") or entry.get("rejected") or "refused" in entry:
                out.append({"round": rnd.number, **{k: v for k, v in entry.items()
                                                    if k != "weight_share"}})
    return out


# ---------------------------------------------------------------- models

def _store_model(db: Session, study: Study, weights: Weights, *, version: int,
                 round_number: int, participants: list[str]) -> None:
    """Store a global model version; versions >= 1 also enter the model registry."""
    blob = encode_arrays(weights, {"study": study.id, "model_version": str(version)})
    db.add(ModelVersion(study_id=study.id, version=version, weights=blob, sha256=sha256(blob),
                        round_number=round_number, participants=participants))
    db.flush()
    if version >= 1 and study.preprocessor is not None:
        model = provenance.from_study(
            study=study.id, plan=study.plan, feature_names=study.feature_names,
            outcome=study.outcome, preprocessor_blob=study.preprocessor, weights=weights,
            participants=participants, round_number=round_number)
        try:
            registry.register(db, model, number=version, commit=False)
        except Conflict as exc:  # never let the registry hold training up
            log.warning("study %s, version %d not registered: %s", study.id, version, exc)


def _card_metrics(db: Session, study: Study, metrics: dict[str, Any]) -> None:
    """The sites' evaluation of the final model (and the epsilon each node reports it has
    spent) go into the registered model's card."""
    privacy = {site: {"epsilon_spent": float(m["epsilon_spent"]),
                      "delta": float(m.get("epsilon_delta") or 0.0)}
               for site, m in metrics.items() if m.get("epsilon_spent") is not None}
    cards = {site: {k: v for k, v in m.items() if not k.startswith("epsilon_")}
             for site, m in metrics.items()}
    cards = {site: m for site, m in cards.items() if m}  # a site may decline to publish
    exact = _non_private_sites(db, study)
    version = f"{study.id}-v{study.model_version}"
    try:
        notes = [*registry.load(db, version).card.notes,
                 "Metrics are as each site reported them: the coordinator checks their names "
                 "and ranges, not their truth."]
        if exact:
            notes = [*notes, f"Not private: {', '.join(exact)} released exact statistics and "
                             f"updates (no differential privacy of their own)."]
        registry.update_card(db, version, metrics=cards, privacy=privacy, notes=notes)
    except NotFound as exc:  # e.g. a version published before the registry existed
        log.warning("study %s: final metrics not added to the model card: %s", study.id, exc)


def model_blob(db: Session, study_id: str, version: int) -> ModelVersion:
    model = db.scalar(select(ModelVersion).where(ModelVersion.study_id == study_id,
                                                 ModelVersion.version == version))
    if model is None:
        raise NotFound(f"Study {study_id!r} has no model version {version}.")
    return model


def _load_model(db: Session, study: Study, version: int) -> Weights:
    return decode_arrays(model_blob(db, study.id, version).weights)[0]


def _dump_state(state: ServerState) -> bytes:
    arrays = {f"m/{k}": v for k, v in state.m.items()} | {f"v/{k}": v for k, v in state.v.items()}
    return encode_arrays({k: np.asarray(v) for k, v in arrays.items()}, {"step": str(state.step)})


def _load_state(study: Study, initial: ServerState) -> ServerState:
    if study.server_state is None:
        return initial
    arrays, meta = decode_arrays(study.server_state)
    return ServerState(step=int(meta["step"]),
                       m={k[2:]: v for k, v in arrays.items() if k.startswith("m/")},
                       v={k[2:]: v for k, v in arrays.items() if k.startswith("v/")})


def ensure_site_access(site: Site, study_id: str) -> None:
    if site.study_id != study_id:
        raise PermissionDenied(f"Site {site.name!r} belongs to study {site.study_id!r}, not "
                               f"{study_id!r}.")


# ---------------------------------------------------------------- relay (a regional study)

def _relay_study(db: Session, study_id: str) -> Study:
    study = get_study(db, study_id)
    if not study.relay:
        raise Conflict(f"Study {study_id!r} is not a relay study: only a regional study "
                       f"created with relay = true takes a national study's model from its "
                       f"region's node.")
    return study


def relay_info(db: Session, study_id: str) -> dict[str, object]:
    """What the region's node checks against its national task: the regional plan and
    columns, and where the regional study stands."""
    study = _relay_study(db, study_id)
    return {"study": study.id, "plan": study.plan, "feature_names": study.feature_names,
            "feature_ranges": study.feature_ranges, "outcome": study.outcome,
            "phase": study.phase, "round": study.current_round,
            "model_version": study.model_version,
            "preprocessor_sha256": None if study.preprocessor is None
            else sha256(study.preprocessor),
            "model_versions": list(db.scalars(select(ModelVersion.version).where(
                ModelVersion.study_id == study.id).order_by(ModelVersion.version)))}


def relay_model(db: Session, study_id: str, version: int, blob: bytes) -> None:
    """Store national model `version` in the relay study (a repeat of the same weights is
    acknowledged; other weights for a stored version are a conflict)."""
    study = _relay_study(db, study_id)
    try:
        weights, _ = decode_arrays(blob)
    except DataValidationError as exc:
        raise InvalidUpdate(f"Model version {version} is not a model: {exc}") from None
    expected = {k: (v.shape, v.dtype) for k, v in
                _initial_weights(study_plan(study), study.feature_names).items()}
    got = {k: (v.shape, v.dtype) for k, v in weights.items()}
    if got != expected:
        raise InvalidUpdate(f"Model version {version} holds tensors {got}; the study's model "
                            f"has {expected}.")
    with _serialised(db, study):
        existing = db.scalar(select(ModelVersion).where(ModelVersion.study_id == study.id,
                                                        ModelVersion.version == version))
        if existing is None:
            _store_model(db, study, weights, version=version,
                         round_number=study.current_round, participants=[])
        elif any(not np.array_equal(v, weights[k])
                 for k, v in decode_arrays(existing.weights)[0].items()):
            raise Conflict(f"Study {study.id!r} already holds a different model version "
                           f"{version}.")


def relay_preprocessor(db: Session, study_id: str, blob: bytes) -> None:
    """Set the national study's preprocessor in the relay study (once; a repeat of the
    same bytes is acknowledged)."""
    from cardiofed.data.preprocessing import Preprocessor

    study = _relay_study(db, study_id)
    try:
        Preprocessor.from_arrays(decode_arrays(blob)[0],
                                 study_plan(study).model_form(study.feature_names))
    except (DataValidationError, KeyError, TypeError, ValueError) as exc:
        raise InvalidUpdate(f"The preprocessor is not one of this study's columns: "
                            f"{type(exc).__name__}: {exc}") from None
    with _serialised(db, study):
        if study.preprocessor is not None and study.preprocessor != blob:
            raise Conflict(f"Study {study.id!r} already holds a different preprocessor.")
        study.preprocessor = blob


def relay_round(db: Session, study_id: str, *, number: int, kind: str, model_version: int,
                now: Clock = utcnow) -> None:
    """Open round `number` of the relay study (the national round's number) for its sites,
    to `kind` from stored model `model_version`. A round still open (its region fell
    behind) closes without an aggregate. Repeating an opened round is acknowledged."""
    if kind not in (TRAIN, EVALUATE):
        raise InvalidUpdate(f"A relayed round trains or evaluates; got kind {kind!r} (the "
                            f"statistics round opens with the study).")
    study = _relay_study(db, study_id)
    with _serialised(db, study):
        existing = db.scalar(select(Round).where(Round.study_id == study.id,
                                                 Round.number == number))
        if existing is not None:
            if (existing.kind, existing.model_version) != (kind, model_version):
                raise Conflict(f"Round {number} of study {study.id!r} is open to "
                               f"{existing.kind} from model version "
                               f"{existing.model_version}, not to {kind} from "
                               f"{model_version}.")
            return
        if number <= study.current_round:
            raise Conflict(f"Round {number} is behind study {study.id!r}'s round "
                           f"{study.current_round}: relayed rounds only move forward.")
        if study.preprocessor is None:
            raise Conflict(f"Study {study.id!r} has no preprocessor yet: relay the national "
                           f"one first.")
        if db.scalar(select(ModelVersion.id).where(ModelVersion.study_id == study.id,
                                                   ModelVersion.version == model_version)
                     ) is None:
            raise Conflict(f"Study {study.id!r} has no model version {model_version}: relay "
                           f"the national model first.")
        current = _round(db, study)
        if current.closed_at is None:
            current.closed_at = now()
            current.outcome = f"superseded: the national study moved on to round {number}"
        db.add(Round(study_id=study.id, number=number, kind=kind,
                     model_version=model_version, opened_at=now(),
                     deadline=now() + timedelta(seconds=study.round_timeout_s)))
        study.current_round, study.phase, study.model_version = number, kind, model_version


def relay_result(db: Session, study_id: str, number: int, now: Clock = utcnow
                 ) -> bytes | None:
    """Round `number`'s aggregate, or None while the round waits for its sites."""
    study = _relay_study(db, study_id)
    advance(db, study, now)
    rnd = _round(db, study, number)
    if rnd.relay_result is None and rnd.closed_at is not None:
        raise Conflict(f"Round {number} of study {study.id!r} closed without an aggregate "
                       f"({rnd.outcome}).")
    return rnd.relay_result
