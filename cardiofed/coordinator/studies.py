"""What every room of the coordinator shares about a study: its plan, its rounds and
sites as stored, the lock that serialises its transitions, and whether it may advance.

A study runs in rounds: round 0 gathers federated statistics, rounds 1..R train, round
R+1 gathers each site's evaluation metrics (:mod:`cardiofed.coordinator.rounds`). An
operator can pause it, or it pauses itself while fewer than ``min_sites`` sites are
active (:func:`held`). Accepting an update and closing a round are serialised
(:func:`serialised`), so concurrent requests never close a round twice nor accept an
update into a round that has just closed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta

from sqlalchemy import (
    func,
    select,
)
from sqlalchemy.orm import Session

from cardiofed.exceptions import (
    NotFound,
    PermissionDenied,
)
from cardiofed.simulation.config import FIXED_ROUNDS, SimulationConfig
from cardiofed.store import (
    Refusal,
    Round,
    Site,
    Study,
    Update,
)

Clock = Callable[[], datetime]


STATISTICS, TRAIN, EVALUATE = "statistics", "train", "evaluate"
# After the last training round, where the plan takes it: each site's intercept sums
# (cardiofed.aggregation.intercept_step) step the final model's intercept.
INTERCEPT = "intercept"


# A relay study between rounds: it waits for its region's node to open the next one.
RELAY = "relay"


# One coordinator process serves many threads (uvicorn's thread pool, long polls).
_TRANSITIONS = threading.RLock()


@contextmanager
def serialised(db: Session, study: Study) -> Iterator[None]:
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


PAUSED, CANCELLED, FEW_SITES = "paused", "cancelled", "waiting for sites"


def _active_count(db: Session, study: Study) -> int:
    return int(db.scalar(select(func.count()).select_from(Site)
                         .where(Site.study_id == study.id, ~Site.revoked)) or 0)


def held(db: Session, study: Study, now: Clock) -> bool:
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
        rnd = round_of(db, study)
        if rnd.closed_at is None:
            rnd.deadline = max(rnd.deadline, now() + timedelta(seconds=study.round_timeout_s))
        db.commit()
    return False


def statement_transactions(db: Session) -> None:
    """On PostgreSQL, run each of a fresh session's statements as its own transaction
    (no BEGIN and COMMIT round trips): for an upload's reads, and its write, which is
    one statement."""
    if shared_locks(db):
        db.connection(execution_options={"isolation_level": "AUTOCOMMIT"})


def get_study(db: Session, study_id: str) -> Study:
    study = db.get(Study, study_id)
    if study is None:
        raise NotFound(f"No study {study_id!r}.")
    return study


def takes_intercept_step(db: Session, study: Study, plan: SimulationConfig) -> bool:
    """Whether the study's training ends with the intercept step: as its plan's
    ``dp_intercept_step`` says, by default where a site declared private releases."""
    private = db.scalar(select(Site.id).where(Site.study_id == study.id,
                                              Site.privacy == "dp").limit(1)) is not None
    return plan.intercept_step_for(private)


def study_plan(study: Study) -> SimulationConfig:
    return SimulationConfig.model_validate(study.plan)


def round_of(db: Session, study: Study, number: int | None = None, *,
           lock: bool = False) -> Round:
    number = study.current_round if number is None else number
    query = select(Round).where(Round.study_id == study.id, Round.number == number)
    if lock and shared_locks(db):
        query = query.with_for_update()
    rnd = db.scalar(query)
    if rnd is None:
        raise NotFound(f"Study {study.id!r} has no round {number}.")
    return rnd


def active_sites(db: Session, study: Study) -> list[Site]:
    return list(db.scalars(select(Site).where(Site.study_id == study.id, ~Site.revoked)
                           .order_by(Site.index)))


def active_ids(db: Session, study: Study) -> list[int]:
    """The ids of :func:`active_sites`, without loading a site."""
    return list(db.scalars(select(Site.id).where(Site.study_id == study.id, ~Site.revoked)
                           .order_by(Site.index)))


def report_of(db: Session, rnd: Round, site: Site) -> Update | None:
    return db.scalar(select(Update).where(Update.round_id == rnd.id,
                                          Update.site_id == site.id))


def round_updates(db: Session, rnd: Round) -> dict[int, Update]:
    return {u.site_id: u for u in db.scalars(select(Update).where(Update.round_id == rnd.id))}


def refusals_of(db: Session, study: Study) -> list[Refusal]:
    return list(db.scalars(select(Refusal).where(Refusal.study_id == study.id)
                           .order_by(Refusal.id)))


def refused_ids(db: Session, study: Study, round_number: int) -> set[int]:
    """Sites that refused this round's task: the round does not wait for them."""
    return set(db.scalars(select(Refusal.site_id).where(Refusal.study_id == study.id,
                                                        Refusal.round_number == round_number)))


def shared_locks(db: Session) -> bool:
    """The database serialises round transitions itself (several coordinator processes
    may share it): PostgreSQL."""
    bind = db.get_bind()
    return bind.dialect.name == "postgresql"


def is_async(study: Study) -> bool:
    return study.plan.get("aggregation") == "async"


# bench/robustness.py and bench/targeted_attacks.py: the coordinate-wise median held
# against every untargeted attack but let two small colluding clinics move a chosen
# patient across a risk category; the weighted median (no site above 1 / (2f + 1) of
# the weight) held against both.
DEFAULT_NETWORK_RULE = "weighted-median"


DEFAULT_BYZANTINE = 2


def network_plan(plan: SimulationConfig, n_sites: int) -> SimulationConfig:
    """The plan a networked study of `n_sites` runs: :data:`FIXED_ROUNDS` rounds at most
    where the plan does not say (its nodes are private by default), robust by default (rule
    :data:`DEFAULT_NETWORK_RULE` tolerating f = min(2, (n - 1) // 2) of n malicious sites,
    or of n groups of a grouped secure study, where the plan leaves them out), and an
    asynchronous buffer of at least 2f + 1 sites where the plan does not size it."""
    given = plan.model_fields_set
    changes: dict[str, object] = {}
    if "rounds" not in given:
        # Nodes are private unless they opt out, and a private node releases no loss to
        # stop on: DP-SGD spreads its budget over every planned round.
        changes["rounds"] = FIXED_ROUNDS
    size = plan.secure_group_size
    if plan.robust_rule is None and (not plan.secure_aggregation or size is not None):
        changes["robust_rule"] = DEFAULT_NETWORK_RULE  # (one secure sum: nothing to rule)
        if "robust_byzantine" not in given:
            inputs = n_sites if size is None else n_sites // size  # sites, or groups
            changes["robust_byzantine"] = max(0, min(DEFAULT_BYZANTINE, (inputs - 1) // 2))
    plan = plan.model_copy(update=changes)
    if plan.aggregation == "async" and "buffer_size" not in given:
        plan = plan.model_copy(update={
            "buffer_size": min(n_sites, max(plan.buffer_size, plan.min_buffer()))})
    return plan


# What a node declares in its payloads' manifest: its own DP noise, or exact releases.
PRIVACY_MODES = ("dp", "off")


def non_private_sites(db: Session, study: Study) -> list[str]:
    """The sites that declared exact releases (no DP noise of their own)."""
    return sorted(db.scalars(select(Site.name).where(Site.study_id == study.id,
                                                     Site.privacy == "off")))


def ensure_site_access(site: Site, study_id: str) -> None:
    if site.study_id != study_id:
        raise PermissionDenied(f"Site {site.name!r} belongs to study {site.study_id!r}, not "
                               f"{study_id!r}.")
