"""Sites: enrolment (a one-time token for a long-lived credential), authenticating a
site and an upload, the task a site should run now, and a site's refusal of a task.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import (
    bindparam,
    select,
    update,
)
from sqlalchemy.orm import Session, defer

from cardiofed.coordinator import secure_sums
from cardiofed.coordinator.rounds import advance, advance_locked
from cardiofed.coordinator.studies import (
    RELAY,
    Clock,
    ensure_site_access,
    get_study,
    refused_ids,
    report_of,
    round_of,
    serialised,
    statement_transactions,
)
from cardiofed.exceptions import (
    AuthenticationError,
)
from cardiofed.protocol.schemas import SecureTask
from cardiofed.store import (
    Refusal,
    Round,
    Site,
    Study,
    hash_secret,
    new_secret,
    utcnow,
)

log = logging.getLogger("cardiofed.coordinator")


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
    """The site whose credential this is; `record_contact` sets its ``last_seen`` when
    it is older than :data:`CONTACT_RESOLUTION` (a write, and on SQLite an fsync, per
    request would cost more than the request: a secure round's four steps took one per
    poll, message and download of every site)."""
    site = _usable(db.scalar(select(Site).where(
        Site.credential_hash == _credential_hash(credential))))
    if record_contact:
        seen = now()
        if site.last_seen is None or not timedelta(0) <= seen - site.last_seen \
                < CONTACT_RESOLUTION:
            site.last_seen = seen
    return site


CONTACT_RESOLUTION = timedelta(seconds=10)


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
    statement_transactions(db)
    row = db.execute(_UPLOADER, {"credential_hash": _credential_hash(credential),
                                 "round_number": round_number}).one_or_none()
    site = _usable(row.Site if row else None)
    ensure_site_access(site, study_id)
    assert row is not None
    return UploadTarget(site, row.Study, row.Round, round_number)


def refuse(db: Session, site: Site, *, round_number: int, reason: str,
           now: Clock = utcnow) -> None:
    """Record that `site` refused its task of `round_number` (logged and in the status);
    the round goes on without it."""
    study = get_study(db, site.study_id)
    with serialised(db, study):
        round_of(db, study, round_number)  # NotFound for a round that does not exist
        if site.id not in refused_ids(db, study, round_number):
            db.add(Refusal(study_id=study.id, site_id=site.id, round_number=round_number,
                           reason=reason[:500], created_at=now()))
            log.warning("study %s: site %s refused round %d: %s", study.id, site.name,
                        round_number, reason[:500])
        db.commit()
        advance_locked(db, study, now)


@dataclass(frozen=True)
class Task:
    study_id: str
    round: int
    kind: str
    model_version: int
    deadline: datetime
    secure: SecureTask | None = None


def next_task(db: Session, site: Site, now: Clock = utcnow) -> Task | None:
    """The task `site` should run now, or None (finished, or already reported)."""
    study = get_study(db, site.study_id)
    advance(db, study, now)
    if study.phase in ("done", RELAY):
        return None
    rnd = round_of(db, study)
    if (study.halted is not None or rnd.closed_at is not None
            or report_of(db, rnd, site) is not None
            or site.id in refused_ids(db, study, rnd.number)):
        return None
    secure = None if rnd.secure_step is None else secure_sums.task(db, study, rnd, site)
    if rnd.secure_step is not None and secure is None:
        return None
    return Task(study.id, rnd.number, rnd.kind, rnd.model_version, rnd.deadline, secure)
