"""Uploads: a site's payload for a round, checked before any lock and stored durably
before it is acknowledged. A repeated identical upload is acknowledged again, a
different one for the same round is a conflict. An asynchronous study refuses an update
older than the plan's ``max_staleness`` and a second update of a site still waiting in
the buffer (:mod:`cardiofed.coordinator.buffer`).
"""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import (
    Integer,
    Table,
    bindparam,
    exists,
    func,
    insert,
    literal,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cardiofed.algorithms.staleness import StaleUpdate
from cardiofed.coordinator import wakeups
from cardiofed.coordinator.checks import check_report
from cardiofed.coordinator.enrolment import UploadTarget
from cardiofed.coordinator.rounds import advance, still_waiting
from cardiofed.coordinator.studies import (
    EVALUATE,
    TRAIN,
    Clock,
    is_async,
    report_of,
    round_of,
    serialised,
    shared_locks,
    statement_transactions,
    study_plan,
)
from cardiofed.exceptions import (
    Conflict,
    CoordinatorError,
    NotFound,
    PayloadTooLarge,
    RoundClosed,
    StaleUpdateRefused,
)
from cardiofed.store import (
    TALLY_SHARDS,
    ReportTally,
    Round,
    Site,
    Study,
    Update,
    sha256,
    utcnow,
)

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
    statement_transactions(db)
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
        num_samples = check_report(db, study, rnd, site.name, payload).num_samples
    except CoordinatorError:
        if _acknowledged(db, rnd, site, digest):  # a retry of what was accepted
            return digest, False
        raise
    row = {"round_id": rnd.id, "site_id": site.id, "payload": payload, "sha256": digest,
           "num_samples": num_samples, "received_at": now(), "staleness": staleness,
           "shard": site.id % TALLY_SHARDS}
    try:
        if shared_locks(db):
            admitted = db.connection().execute(_ADMIT, row).scalar_one() == 1
        else:
            admitted = _admit_serialised(db, study, rnd, row)
    except IntegrityError:  # the site's report of the round is in: a retry, or a race
        db.rollback()
        if not _acknowledged(db, rnd, site, digest):
            raise
        return digest, False
    if not admitted:  # the round closed while the payload arrived
        rnd = round_of(db, study, rnd.number)
        if _acknowledged(db, rnd, site, digest):
            return digest, False
        _refuse_closed(study, rnd, site)
    # The update is committed (durable); does the round close now?
    if not still_waiting(db, study.id, now):
        advance(db, db.merge(study, load=False), now)
        wakeups.notify(study.id)  # the sites' polls may have a new task
    return digest, True


def _acknowledged(db: Session, rnd: Round, site: Site, digest: str) -> bool:
    """True if `site` already reported exactly `digest` for `rnd`; a different report
    for the round is a conflict."""
    existing = report_of(db, rnd, site)
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
    with serialised(db, study):
        db.refresh(rnd)
        if rnd.closed_at is not None:
            return False
        conn = db.connection()
        conn.execute(_INSERT_UPDATE, {k: v for k, v in row.items() if k != "shard"})
        conn.execute(_TALLY, {"t_round": row["round_id"], "t_shard": row["shard"]})
        conn.execute(_TOUCH, {"t_site": row["site_id"], "t_seen": row["received_at"]})
    return True


def _refuse_closed(study: Study, rnd: Round, site: Site) -> None:
    if rnd.closed_at is not None and is_async(study) and rnd.kind == TRAIN:
        raise StaleUpdateRefused(f"Stale update from site {site.name!r}: training "
                                 f"finished at version {study.model_version}; the "
                                 f"update is discarded.")
    if rnd.closed_at is not None:
        raise RoundClosed(f"Round {rnd.number} of study {study.id!r} is closed "
                       f"({rnd.outcome}); the current round is {study.current_round}.")


def _staleness(study: Study, rnd: Round, site: Site) -> int | None:
    """Versions published since `rnd`'s model (asynchronous training only); refuses an
    update older than the plan's ``max_staleness``."""
    if not (is_async(study) and rnd.kind == TRAIN):
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
