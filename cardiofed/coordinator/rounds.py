"""Rounds: when the current round closes (every active site reported, or the deadline
passed with at least ``min_sites`` reports; with fewer it is extended and the status says
which sites it waits for), what its reports fold into, and the round that opens next.

Statistics pass through the statistics gate
(:mod:`cardiofed.aggregation.robust_statistics`); training updates are folded by the
plan's algorithm, the same ``server_update`` the simulator uses, a batch of payloads at a
time; the final round's metrics go into the model card. A relay study's round closes
into the aggregate its region sends upward (:mod:`cardiofed.coordinator.regional`).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import numpy as np
from sqlalchemy import (
    bindparam,
    case,
    func,
    inspect,
    select,
    update,
)
from sqlalchemy.orm import Session

from cardiofed.aggregation.intercept_step import intercept_step, shift_intercept
from cardiofed.aggregation.robust import SiteAggregation, streamed_mean, update_norm
from cardiofed.aggregation.robust_statistics import (
    Moments,
    StatisticsGate,
    consistent,
    gate_factors,
    scaled,
    site_moments,
)
from cardiofed.aggregation.weighted_mean import tail_average
from cardiofed.algorithms import ClientUpdate, FederatedAlgorithm
from cardiofed.algorithms.stopping import round_loss
from cardiofed.causal.combine import add as add_sums
from cardiofed.coordinator import attribution, secure_sums
from cardiofed.coordinator.buffer import publish_buffered
from cardiofed.coordinator.checks import checked_or_quarantined
from cardiofed.coordinator.gates import gate_report, secure_evaluation, secure_statistics
from cardiofed.coordinator.models import (
    card_metrics,
    dump_state,
    load_model,
    load_state,
    model_blob,
    plausible_model,
    store_model,
)
from cardiofed.coordinator.studies import (
    EVALUATE,
    INTERCEPT,
    PRIVACY_MODES,
    RELAY,
    STATISTICS,
    TRAIN,
    Clock,
    active_ids,
    held,
    is_async,
    refused_ids,
    round_of,
    serialised,
    study_plan,
    takes_intercept_step,
)
from cardiofed.data.preprocessing import (
    DEFAULT_BINS,
    SiteStatistics,
    add_statistics,
    bin_edges,
    merge_statistics,
)
from cardiofed.models.kinds import Weights
from cardiofed.protocol import relay
from cardiofed.protocol import secure_sums as secure_wire
from cardiofed.simulation.config import SimulationConfig
from cardiofed.simulation.secure_attribution import attribution_from_sum
from cardiofed.simulation.secure_runner import group_step
from cardiofed.store import (
    Refusal,
    ReportTally,
    Round,
    SecureMessage,
    Site,
    Study,
    Update,
    utcnow,
)
from cardiofed.wire import decode_arrays, encode_arrays

log = logging.getLogger("cardiofed.coordinator")


def advance(db: Session, study: Study, now: Clock = utcnow) -> None:
    """Close the current round if it is complete (or past its deadline), and open the next.

    Every poll and upload asks; one query without a lock answers a synchronous round
    that is still waiting, so thousands of sites do not queue behind each other."""
    identity = inspect(study).identity  # its id, without re-reading an expired study
    if identity is not None and still_waiting(db, identity[0], now):
        return
    with serialised(db, study):
        advance_locked(db, study, now)


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
    # A secure round: the messages of its current step, and of the step before.
    before = case(*[(Round.secure_step == later, earlier) for later, earlier in
                    secure_wire.BEFORE.items()], else_="")

    def posted(step: Any) -> Any:
        return select(func.count()).select_from(SecureMessage).where(
            SecureMessage.round_id == Round.id, SecureMessage.step == step,
            SecureMessage.attempt == Round.secure_attempt).scalar_subquery()

    return (select(Study.phase, Study.plan["aggregation"].as_string(), Round.closed_at,
                   Round.deadline, active, refused, reported, Study.min_sites, Study.halted,
                   Round.secure_step, posted(Round.secure_step), posted(before))
            .join(Round, (Round.study_id == Study.id) & (Round.number == Study.current_round))
            .where(Study.id == bindparam("study_id")))


_WAITING = _waiting_query()


def still_waiting(db: Session, study_id: str, now: Clock) -> bool:
    """The current synchronous round is open, before its deadline, with reports missing."""
    row = db.connection().execute(_WAITING, {"study_id": study_id}).one_or_none()
    if row is None:
        return False
    (phase, aggregation, closed_at, deadline, n_active, n_refused, n_reported, min_sites,
     halted, secure_step, posted_now, posted_before) = row
    if phase == RELAY:  # nothing to close until the region's node opens a round
        return True
    if halted is not None or n_active < min_sites:
        return False  # advance_locked says why it holds, or lets it go on
    if phase == "done" or (phase == TRAIN and aggregation == "async"):
        return False
    if secure_step is not None:
        # At most the sites the step waits for (a site that refused after the step before,
        # or did not confirm before a reveal, is still counted): a refusal and every
        # message run the full check themselves.
        expected = n_active - n_refused if secure_step == secure_wire.STEPS[0] \
            else posted_before
        return closed_at is None and now() < deadline and posted_now < expected
    return closed_at is None and now() < deadline and n_reported < n_active - n_refused


def advance_locked(db: Session, study: Study, now: Clock) -> None:
    if study.phase in ("done", RELAY) or held(db, study, now):
        return
    while study.phase not in ("done", RELAY):
        if study.phase == TRAIN and is_async(study):
            if not publish_buffered(db, study, now):
                return
            continue
        # Exclusively on PostgreSQL: uploads in flight (a shared lock) commit first and
        # are folded; later ones see the round closed.
        rnd = round_of(db, study, lock=True)
        if rnd.secure_step is not None:
            if not _advance_secure(db, study, rnd, now):
                return
            continue
        refused = refused_ids(db, study, rnd.number)
        active = [i for i in active_ids(db, study) if i not in refused]
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
    # A training round: the global model's loss each site reported (NaN where none).
    global_losses: list[float] = field(default_factory=list)
    totals: dict[str, np.ndarray] | None = None  # an analysis step's sums
    # An analysis step kept per site (a stratified Cox model's baselines): site -> arrays
    reports: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    secure: secure_sums.Unmasked | None = None  # a secure round's unmasked sum
    # An intercept round: each site's (D, I, noise SD, declared records)
    intercepts: dict[str, tuple[float, float, float, int]] = field(default_factory=dict)
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
            checked = checked_or_quarantined(db, study, rnd, name, update_id, row.payload)
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
                out.global_losses.append(float(checked.manifest.get("global_loss", "nan")))
                if streams:
                    out.streamed.append((update_id, row.num_samples,
                                         update_norm(checked.arrays), loss))
                else:
                    out.updates.append(ClientUpdate(site=name, delta=checked.arrays,
                                                    num_samples=row.num_samples,
                                                    num_steps=0, train_loss=loss))
            elif rnd.kind in attribution.PER_SITE_STEPS:
                out.reports[name] = checked.arrays
            elif rnd.kind in attribution.ANALYSIS_STEPS:
                out.totals = add_sums(out.totals, checked.arrays)
            elif rnd.kind == INTERCEPT:
                (d, i), noise = checked.arrays["sums"], checked.arrays["noise_std"][0]
                out.intercepts[name] = (float(d), float(i), float(noise), row.num_samples)
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
    gate_report(rnd, folded.names, StatisticsGate(factors), study.feature_names)
    out: dict[int, SiteStatistics] = {}
    released = itertools.chain.from_iterable(decoded_batches(db, ids))
    for arrays, factor in zip(released, factors, strict=True):
        stats = scaled(consistent(SiteStatistics(**arrays), edges), factor)
        bins = stats.histogram.shape[1]
        total = out.get(bins)
        out[bins] = stats if total is None else add_statistics(total, stats)
    return out


def _released_statistics(db: Session, folded: _Folded) -> list[SiteStatistics]:
    return [SiteStatistics(**arrays) for batch in
            decoded_batches(db, [i for i, _ in folded.moments]) for arrays in batch]


def decoded_batches(db: Session, ids: list[int]) -> Iterator[list[dict[str, np.ndarray]]]:
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
                         [n for _, _, n, _ in folded.streamed], decoded_batches(db, ids))


def _extend(db: Session, study: Study, rnd: Round, now: Clock, why: str) -> None:
    rnd.deadline = now() + timedelta(seconds=study.round_timeout_s)
    rnd.outcome = f"deadline extended: {why}"[:200]
    db.commit()


def _close(db: Session, study: Study, rnd: Round, folded: _Folded, now: Clock) -> None:
    plan = study_plan(study)
    names = folded.names
    converged, prefix = False, ""
    for mode in PRIVACY_MODES:
        declared = [n for n, m in folded.privacy.items() if m == mode]
        for start in range(0, len(declared), FOLD_BATCH):
            db.execute(update(Site).where(Site.study_id == study.id,
                                          Site.name.in_(declared[start:start + FOLD_BATCH]))
                       .values(privacy=mode))
    if study.relay:
        _close_relayed(db, study, plan, rnd, folded, now)
        return
    if plan.analysis is not None:
        totals = folded.totals
        if folded.secure is not None:  # a private attribution's step over a secure sum
            assert plan.attribution is not None
            totals = attribution_from_sum(plan.attribution, attribution.task_state(study) or {},
                                          folded.secure.total, folded.secure.noise_sds[0])
        attribution.close_round(db, study, plan.analysis, rnd, names, totals, now(),
                                reports=folded.reports)
        db.commit()
        return
    if rnd.kind == STATISTICS:
        stats = (secure_statistics(study, rnd, folded.secure.totals, _edges(study))
                 if folded.secure is not None
                 else list(_gated_statistics(db, study, rnd, folded).values()))
        edges = bin_edges([(lo, hi) for lo, hi in study.feature_ranges],
                          max(s.histogram.shape[1] for s in stats))
        pre = merge_statistics(stats, edges, study.feature_names,
                               plan.model_form(study.feature_names))
        study.preprocessor = encode_arrays(pre.to_arrays())
        next_kind, version = TRAIN, study.model_version
    elif rnd.kind == TRAIN:
        algorithm = plan.make_algorithm()
        weights = load_model(db, study, study.model_version)
        state = load_state(study, algorithm.init_server(weights))
        delta, report = (group_step(folded.secure.totals, weights, algorithm.robust)
                         if folded.secure is not None
                         else _round_delta(db, algorithm, folded))
        new, state = plausible_model(rnd, study, (weights, state),
                           algorithm.server.step(weights, delta, state), report)
        study.model_version += 1
        store_model(db, study, new, version=study.model_version, round_number=rnd.number,
                     participants=names)
        study.server_state = dump_state(state)
        loss = round_loss(folded.global_losses)
        rnd.loss = loss if math.isfinite(loss) else None
        converged = rnd.number < plan.rounds and _converged(db, study, plan)
        next_kind, version = (TRAIN if rnd.number < plan.rounds and not converged
                              else EVALUATE, study.model_version)
        if next_kind == EVALUATE and plan.average_last > 1:
            version = _store_tail_average(db, study, plan.average_last, rnd.number)
        if next_kind == EVALUATE and takes_intercept_step(db, study, plan):
            next_kind = INTERCEPT
    elif rnd.kind == INTERCEPT:
        prefix = _store_intercept_step(db, study, rnd, folded)
        next_kind, version = EVALUATE, study.model_version
    else:
        model = model_blob(db, study.id, study.model_version)
        model.metrics = (folded.metrics if folded.secure is None
                         else secure_evaluation(rnd, folded.secure))
        card_metrics(db, study, model.metrics)
        next_kind, version = "", study.model_version
    rnd.closed_at = now()
    if rnd.kind == TRAIN and converged:
        prefix = "converged (the sites' loss stopped improving); "
    rnd.outcome = _closed_with(names, prefix)
    if next_kind:
        _open(db, study, next_kind, version, now)
    else:
        study.phase = "done"
    db.commit()


def _open(db: Session, study: Study, kind: str, version: int, now: Clock) -> None:
    """Open the study's next round, of `kind` on model `version`."""
    study.current_round += 1
    step, attempt = secure_sums.open_step(study_plan(study).secure_aggregation, kind)
    db.add(Round(study_id=study.id, number=study.current_round, kind=kind,
                 model_version=version, opened_at=now(),
                 deadline=now() + timedelta(seconds=study.round_timeout_s),
                 secure_step=step, secure_attempt=attempt))
    study.phase = kind


def _advance_secure(db: Session, study: Study, rnd: Round, now: Clock) -> bool:
    """Move a secure round's sum on (:mod:`cardiofed.coordinator.secure_sums`); True
    once the round has closed. Its sites are private (a node without a budget refuses a
    secure round). A training round whose sum is given up leaves the model as it was; a
    statistics, evaluation or analysis round's stops the study (an evaluation's with no
    metrics)."""
    result = secure_sums.progress(db, study, rnd, now)
    if result is None:
        return False
    if not isinstance(result, str):
        order = db.scalars(select(Site.name).where(Site.study_id == study.id)
                           .order_by(Site.index))
        survivors = [name for name in order if name in result.survivors]  # site order
        _close(db, study, rnd, _Folded(names=survivors, secure=result,
                                       privacy=dict.fromkeys(survivors, "dp")
                                       if rnd.number == 0 else {}), now)
        return True
    rnd.closed_at = now()
    if rnd.kind in (STATISTICS, EVALUATE) or study_plan(study).analysis is not None:
        rnd.outcome = (f"study stopped: the {rnd.kind} round's secure sum was given up: "
                       f"{result}")[:200]
        study.phase = "done"
    else:
        rnd.outcome = (f"secure sum given up ({result}); the model stays at version "
                       f"{study.model_version}")[:200]
        last = rnd.number >= study_plan(study).rounds
        _open(db, study, EVALUATE if last else TRAIN, study.model_version, now)
    db.commit()
    return True


def _store_tail_average(db: Session, study: Study, last: int, round_number: int) -> int:
    """Store the mean of the study's `last` trained versions (fewer if it stopped
    earlier) as its next version, the one the sites evaluate and the registry serves
    (the plan's ``average_last``); returns its number."""
    first = max(1, study.model_version - last + 1)
    versions = [model_blob(db, study.id, v) for v in range(first, study.model_version + 1)]
    if len(versions) < 2:
        return study.model_version
    average = tail_average([decode_arrays(v.weights)[0] for v in versions])
    participants = sorted({name for v in versions for name in v.participants})
    study.model_version += 1
    store_model(db, study, average, version=study.model_version, round_number=round_number,
                participants=participants)
    return study.model_version


def _store_intercept_step(db: Session, study: Study, rnd: Round, folded: _Folded) -> str:
    """Step the intercept of the round's model from the sites' sums
    (:func:`~cardiofed.aggregation.intercept_step.intercept_step`; a site's records are
    the fewer of what it declares here and in the statistics round) and store the result
    as the study's next version; returns the round outcome's prefix."""
    counts = _statistics_counts(db, study)
    result = intercept_step(
        {name: (d, i) for name, (d, i, _, _) in folded.intercepts.items()},
        {name: noise for name, (_, _, noise, _) in folded.intercepts.items()},
        {name: float(min(n, counts.get(name, n)))
         for name, (_, _, _, n) in folded.intercepts.items()})
    weights = shift_intercept(load_model(db, study, rnd.model_version), result.step,
                              study_plan(study).model)
    study.model_version += 1
    store_model(db, study, weights, version=study.model_version, round_number=rnd.number,
                participants=result.kept)
    rnd.aggregation = [{"step": result.step, "kept": result.kept,
                        "left_out": result.left_out,
                        "z": {k: round(v, 3) for k, v in result.z.items()}}]
    left = f", {', '.join(result.left_out)} left out" if result.left_out else ""
    return f"intercept step {result.step:+.3f} from {len(result.kept)} sites{left}; "


def _statistics_counts(db: Session, study: Study) -> dict[str, int]:
    """The records each site declared in the study's statistics round."""
    return {name: n for name, n in db.execute(
        select(Site.name, Update.num_samples).join(Update, Update.site_id == Site.id)
        .join(Round, Update.round_id == Round.id)
        .where(Round.study_id == study.id, Round.number == 0))}


def _converged(db: Session, study: Study, plan: SimulationConfig) -> bool:
    """Whether the study's training rounds so far (this one included) show the sites'
    loss has stopped improving: the plan's stopping rule, None runs every round."""
    rule = plan.stopping_rule()
    if rule is None:
        return False
    db.flush()
    losses = db.scalars(select(Round.loss).where(Round.study_id == study.id,
                                                 Round.kind == TRAIN).order_by(Round.number))
    return rule.stalled([math.nan if x is None else x for x in losses])


def _closed_with(names: list[str], prefix: str = "") -> str:
    return (f"{prefix}closed with {len(names)} reports: {', '.join(names[:20])}"
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
        rnd.relay_result = relay.update_result(delta, folded.sizes(), folded.losses(),
                                               round_loss(folded.global_losses))
        rnd.aggregation = [r.to_dict() for r in report]
    elif rnd.kind == INTERCEPT:
        rnd.relay_result = relay.intercept_result(list(folded.intercepts.values()))
    else:
        rnd.relay_result = relay.metrics_result(folded.metrics)
        model_blob(db, study.id, study.model_version).metrics = folded.metrics
    rnd.closed_at = now()
    rnd.outcome = _closed_with(names=folded.names)
    study.phase = "done" if rnd.kind == EVALUATE else RELAY
    db.commit()
