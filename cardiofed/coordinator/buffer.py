"""Asynchronous aggregation (``aggregation = "async"``; see
:mod:`cardiofed.algorithms.staleness`): training has no barrier. Training round ``r``
means "trained from model version ``r - 1``" and stays open while newer versions
appear. Updates wait in a buffer (rows with ``aggregated_into`` NULL; one per site);
once ``buffer_size`` have arrived (or ``buffer_timeout_s`` after the last publication,
from at least 2f + 1 distinct sites under a robust rule tolerating f) they are folded,
discounted by staleness, into a new version and the next round opens. Under a robust
rule the version aggregates a window: the buffer and every other active site's latest
folded update (:func:`cardiofed.algorithms.staleness.window`), so sites that upload
first after each publication are f of the sites, not f of the buffer. After ``rounds``
versions the evaluation round gathers metrics as in a synchronous study.
"""

from __future__ import annotations

import math
from datetime import timedelta

from sqlalchemy import (
    func,
    select,
)
from sqlalchemy.orm import Session

from cardiofed.aggregation.weighted_mean import shares
from cardiofed.algorithms import ClientUpdate
from cardiofed.algorithms.staleness import buffer_ready, publish_buffer, window
from cardiofed.coordinator.checks import checked_or_quarantined
from cardiofed.coordinator.models import (
    dump_state,
    load_model,
    load_state,
    plausible_model,
    store_model,
)
from cardiofed.coordinator.studies import (
    EVALUATE,
    INTERCEPT,
    TRAIN,
    Clock,
    active_sites,
    is_async,
    refusals_of,
    round_of,
    study_plan,
    takes_intercept_step,
)
from cardiofed.store import (
    Round,
    Site,
    Study,
    Update,
)
from cardiofed.wire import decode_arrays


def one_per_site(buffer: list[Update]) -> list[Update]:
    """The buffer with each site's first update only; any later one (two uploads that
    raced past :func:`_refuse_second_in_buffer`) is quarantined, never folded."""
    kept: dict[int, Update] = {}
    for u in buffer:
        if u.site_id in kept:
            u.quarantine = "a second update of the same site in one buffer"
        else:
            kept[u.site_id] = u
    return list(kept.values())


def buffered(db: Session, study: Study) -> list[Update]:
    return list(db.scalars(
        select(Update).join(Round, Update.round_id == Round.id)
        .where(Round.study_id == study.id, Round.kind == TRAIN, Round.closed_at.is_(None),
               Update.aggregated_into.is_(None))
        .order_by(Update.id)))


def publish_buffered(db: Session, study: Study, now: Clock) -> bool:
    """Fold the buffer into a new model version if it is due; True if one was published."""
    plan = study_plan(study)
    rnd = round_of(db, study)
    # A site that refused a training task (e.g. it ran its planned rounds) trains no more.
    refused_training = {r.site_id for r in refusals_of(db, study) if r.round_number > 0}
    active = {s.id: s for s in active_sites(db, study) if s.id not in refused_training}
    buffer = one_per_site([u for u in buffered(db, study)
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
    buffer = [u for u in buffer if checked_or_quarantined(
        db, study, rounds[u.round_id], active[u.site_id].name, u.id, u.payload) is not None]
    # Staleness as of now, from the version each update was trained from (the count
    # stored at upload can be one short when an upload raced a publication); one that a
    # race left past max_staleness is not folded.
    age = {u.id: study.model_version - rounds[u.round_id].model_version for u in buffer}
    for u in buffer:
        if age[u.id] > plan.max_staleness:
            u.quarantine = "older than max_staleness when its version was published"
    buffer = [u for u in buffer if u.quarantine is None]
    if len(buffer) < plan.min_buffer():
        db.commit()
        return False
    algorithm = plan.make_algorithm()
    weights = load_model(db, study, study.model_version)
    state = load_state(study, algorithm.init_server(weights))
    names = [active[u.site_id].name for u in buffer]
    rule = plan.staleness_rule()
    folded = [(_client_update(u, name), age[u.id])
              for u, name in zip(buffer, names, strict=True)]
    if plan.windowed:
        in_buffer = {u.site_id for u in buffer}
        others = {k: site for k, site in active.items() if k not in in_buffer}
        folded = window(folded, _latest_folded(db, study, others, rounds,
                                               study.model_version - plan.max_staleness),
                        study.model_version, rule)
    new, new_state, report = publish_buffer(algorithm, weights, folded, state, rule)
    new, state = plausible_model(rnd, study, (weights, state), (new, new_state), report)
    study.model_version += 1
    store_model(db, study, new, version=study.model_version, round_number=rnd.number,
                 participants=names)
    study.server_state = dump_state(state)
    for u in buffer:
        u.aggregated_into = study.model_version
    earlier = len(folded) - len(buffer)
    rnd.outcome = (f"version {study.model_version} published from {len(buffer)} buffered "
                   f"updates" + (f" and {earlier} other site(s)' latest earlier update"
                                 if earlier else "") + f": {', '.join(names)}")[:200]
    study.current_round += 1
    if study.model_version < plan.rounds:
        db.add(Round(study_id=study.id, number=study.current_round, kind=TRAIN,
                     model_version=study.model_version, opened_at=now(),
                     deadline=now() + timedelta(seconds=study.round_timeout_s)))
    else:  # training is over: late updates are discarded, metrics are gathered
        for train_round in db.scalars(select(Round).where(
                Round.study_id == study.id, Round.kind == TRAIN, Round.closed_at.is_(None))):
            train_round.closed_at = now()
        kind = INTERCEPT if takes_intercept_step(db, study, plan) else EVALUATE
        db.add(Round(study_id=study.id, number=study.current_round, kind=kind,
                     model_version=study.model_version, opened_at=now(),
                     deadline=now() + timedelta(seconds=study.round_timeout_s)))
        study.phase = kind
    db.commit()
    return True


def _latest_folded(db: Session, study: Study, sites: dict[int, Site],
                   rounds: dict[int, Round], oldest: int) -> dict[str, tuple[ClientUpdate, int]]:
    """The latest update of each of `sites` already folded into a version and trained
    from version `oldest` or later: site name -> (update, the version it was trained
    from). Only those rows are read."""
    latest = (select(func.max(Update.id)).join(Round, Update.round_id == Round.id)
              .where(Round.study_id == study.id, Round.kind == TRAIN,
                     Update.site_id.in_(list(sites)), Update.aggregated_into.is_not(None),
                     Update.quarantine.is_(None))
              .group_by(Update.site_id))
    out = {}
    for u in db.scalars(select(Update).where(Update.id.in_(latest))):
        base = rounds[u.round_id].model_version
        if base >= oldest:
            name = sites[u.site_id].name
            out[name] = (_client_update(u, name), base)
    return out


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
        if u.aggregated_into is not None or not is_async(study):
            counts[names[u.site_id]] += 1
    return shares(counts)
