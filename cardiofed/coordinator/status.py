"""A study's status: what the federation is doing, whom it waits for, and what robust
aggregation, the statistics gate and quarantine did.
"""

from __future__ import annotations

from sqlalchemy import (
    select,
)
from sqlalchemy.orm import Session

from cardiofed.coordinator import attribution, secure_sums
from cardiofed.coordinator.buffer import buffered, update_share
from cardiofed.coordinator.rounds import advance
from cardiofed.coordinator.studies import (
    INTERCEPT,
    Clock,
    active_sites,
    is_async,
    non_private_sites,
    refusals_of,
    refused_ids,
    round_of,
    round_updates,
    study_plan,
    takes_intercept_step,
)
from cardiofed.store import (
    Round,
    Site,
    Study,
    Update,
    utcnow,
)


def status(db: Session, study: Study, now: Clock = utcnow) -> dict[str, object]:
    """What the federation is doing and what it waits for."""
    advance(db, study, now)
    rnd = round_of(db, study)
    reported = round_updates(db, rnd)
    active = active_sites(db, study)
    refused = refused_ids(db, study, rnd.number)
    waiting = [s.name for s in active if s.id not in reported and s.id not in refused]
    names = {s.id: s.name for s in db.scalars(select(Site).where(Site.study_id == study.id))}
    plan = study_plan(study)
    secure, done = None, sorted(s.name for s in active if s.id in reported)
    if rnd.secure_step is not None and rnd.closed_at is None:  # who took the sum's step
        done, waiting = secure_sums.step_status(db, study, rnd)
        secure = {"step": rnd.secure_step, "attempt": rnd.secure_attempt}
    return {
        "study": study.id, "phase": study.phase, "round": rnd.number, "kind": rnd.kind,
        "model_version": study.model_version, "rounds_planned": plan.rounds,
        # the evaluation's round: after the training rounds and any intercept step
        "final_round": plan.rounds + 1 + takes_intercept_step(db, study, plan),
        "reported": done,
        "waiting_for": [] if study.phase == "done" else waiting,
        "deadline": rnd.deadline.isoformat() + "Z", "min_sites": study.min_sites,
        "round_outcome": rnd.outcome, "halted": study.halted,
        "secure_sum": secure,
        "revoked": sorted(s.name for s in db.scalars(
            select(Site).where(Site.study_id == study.id, Site.revoked))),
        "aggregation": "async" if is_async(study) else "sync",
        "buffered": len(buffered(db, study)) if is_async(study) else 0,
        "update_share": update_share(db, study),
        "refusals": [{"site": names[r.site_id], "round": r.round_number, "reason": r.reason}
                     for r in refusals_of(db, study)],
        "robust_aggregation": _robust_actions(db, study),
        "intercept_step": _intercept_step(db, study),
        "attribution": attribution.summary(study),
        "relay": bool(study.relay),
        "non_private_sites": non_private_sites(db, study),
        "quarantined": [{"site": names[u.site_id], "round": number, "reason": u.quarantine}
                        for u, number in db.execute(
                            select(Update, Round.number).join(Round, Update.round_id == Round.id)
                            .where(Round.study_id == study.id, Update.quarantine.is_not(None))
                            .order_by(Update.id)).all()],
    }


def _intercept_step(db: Session, study: Study) -> dict[str, object] | None:
    """The intercept step that ended the study's training: its round, the step, the sites
    it was computed from, those left out and each site's z (None before it)."""
    rnd = db.scalar(select(Round).where(Round.study_id == study.id, Round.kind == INTERCEPT,
                                        Round.closed_at.is_not(None)))
    if rnd is None or not rnd.aggregation:
        return None
    return {"round": rnd.number, **rnd.aggregation[0]}


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
