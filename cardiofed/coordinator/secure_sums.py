"""A secure round's sum on the coordinator (:mod:`cardiofed.protocol.secure_sums`): the
task of each step, the sites' messages checked and stored, and the step's close.

A step closes once every site it waits for has posted, or at its deadline (the study's
``round_timeout_s`` per step) with enough of them: at least 2 (and ``min_sites``)
advertisements; at least the sum's ``min_inputs`` (the sites its noise is split over)
sharers and inputs; where every advertisement was signed, a quorum of signatures of the
survivor list (:func:`~cardiofed.protocol.secure_sums.confirm_quorum`). Too few sharers
start the sum again with fresh keys (no site has released anything yet); too few
inputs, signatures or revealed shares give the sum up, and nothing is unmasked. What is
stored is keys, sealed shares, masked vectors, signatures and revealed shares; all of it
is deleted when the sum is unmasked or given up.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property
from typing import Any

import numpy as np
from pydantic import BaseModel
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from cardiofed.coordinator.models import load_model
from cardiofed.coordinator.studies import (
    TRAIN,
    Clock,
    active_ids,
    refused_ids,
    round_of,
    study_plan,
)
from cardiofed.exceptions import Conflict, InvalidUpdate, RoundClosed
from cardiofed.protocol import secure_sums as wire
from cardiofed.protocol.schemas import (
    SecureAdvert,
    SecureConfirm,
    SecureInput,
    SecureReveal,
    SecureShares,
    SecureTask,
)
from cardiofed.secure import Advertisement, SecureSum, SumPlan, shamir, unmask_sum
from cardiofed.secure.identity import SIGNATURE_BYTES
from cardiofed.secure.noise import DistributedNoise
from cardiofed.secure.protocol import neighbour_graph
from cardiofed.simulation.secure_attribution import attribution_length
from cardiofed.store import Round, SecureMessage, Site, Study

log = logging.getLogger("cardiofed.coordinator")

BODIES: dict[str, type[BaseModel]] = {"advertise": SecureAdvert, "share": SecureShares,
                                      "input": SecureInput, "confirm": SecureConfirm,
                                      "reveal": SecureReveal}
SEALED_MAX = 1024  # bytes of one sealed share pair (about 100 in fact)


def open_step(plan_secure: bool, kind: str) -> tuple[str | None, int | None]:
    """A new round's (secure_step, secure_attempt)."""
    return ("advertise", 0) if plan_secure and kind in wire.SECURE_KINDS else (None, None)


# What a closed step of an attempt derives from its messages (parsed bodies, the
# advertisements, the neighbour graph, each site's inbox), per process. A closed step's
# messages never change (a message for any step but the current one is refused, and a
# new attempt has a new number), and at 200 sites reparsing every advertisement for each
# share message, and every site's share pairs for each site's input task, was most of a
# secure round's work on the coordinator.
_CLOSED: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
_CLOSED_MAX = 64
_CLOSED_LOCK = threading.Lock()


def _attempt_of(rnd: Round) -> tuple[Any, ...]:
    return (SecureMessage.round_id == rnd.id, SecureMessage.attempt == rnd.secure_attempt)


class _State:
    """The current attempt's messages: who posted each step (read at once), the bodies of
    a step (read and parsed when asked for; a closed step's once per process), and the
    sum's plan once keys are out."""

    def __init__(self, db: Session, study: Study, rnd: Round) -> None:
        self.db, self.study, self.rnd = db, study, rnd
        self.names = dict(db.execute(select(Site.id, Site.name)
                                     .where(Site.study_id == study.id)).all())
        self._posted: dict[str, set[str]] = {}
        for site_id, step in db.execute(select(SecureMessage.site_id, SecureMessage.step)
                                        .where(*_attempt_of(rnd))):
            self._posted.setdefault(step, set()).add(self.names[site_id])
        self._bodies: dict[str, dict[str, Any]] = {}

    def posted(self, step: str) -> set[str]:
        return set(self._posted.get(step, ()))

    def _closed(self, step: str, what: str, make: Callable[[], Any]) -> Any:
        """`make()`, from the messages of `step`, cached per process once `step` has
        closed; computed afresh while it is open."""
        if step == self.rnd.secure_step:
            return make()
        key = (str(self.db.get_bind().engine.url), self.study.id, self.rnd.id, self.rnd.number,
               self.rnd.secure_attempt, step, tuple(sorted(self._posted.get(step, ()))), what)
        with _CLOSED_LOCK:
            if key in _CLOSED:
                _CLOSED.move_to_end(key)
                return _CLOSED[key]
        value = make()
        with _CLOSED_LOCK:
            _CLOSED[key] = value
            while len(_CLOSED) > _CLOSED_MAX:
                _CLOSED.popitem(last=False)
        return value

    def bodies(self, step: str) -> dict[str, Any]:
        """Site name -> the parsed message of `step`, in the order they arrived."""
        if step not in self._bodies:
            self._bodies[step] = self._closed(step, "bodies", lambda: {
                self.names[site_id]: BODIES[step].model_validate_json(body)
                for site_id, body in self.db.execute(
                    select(SecureMessage.site_id, SecureMessage.body)
                    .where(*_attempt_of(self.rnd), SecureMessage.step == step)
                    .order_by(SecureMessage.id))})
        return self._bodies[step]

    @cached_property
    def multiplier(self) -> float:
        """The study's noise multiplier: the largest any site advertised."""
        return max((ad.noise_multiplier for ad in self.bodies("advertise").values()),
                   default=0.0)

    @cached_property
    def ads(self) -> dict[str, Advertisement]:
        return self._closed("advertise", "ads", lambda: {
            name: wire.advert_from_wire(name, ad)
            for name, ad in self.bodies("advertise").items()})

    def peers(self, site: str) -> list[str]:
        """`site`'s neighbours in its sum (once the advertise step has closed)."""
        graph = self._closed("advertise", "graph", lambda: {
            name: peers for plan, _ in self.setups
            for name, peers in neighbour_graph(plan, self.ads_of(plan)).items()})
        return list(graph[site])

    def ads_of(self, plan: SumPlan) -> dict[str, Advertisement]:
        return {name: self.ads[name] for name in plan.sites}

    def inbox(self, site: str) -> dict[str, str]:
        """The share pairs sealed for `site`: sender -> sealed box."""
        boxes = self._closed("share", "inboxes", self._inboxes)
        return dict(boxes.get(site, {}))

    def _inboxes(self) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        for sender, body in self.bodies("share").items():
            for recipient, box in body.sealed.items():
                out.setdefault(recipient, {})[sender] = box
        return out

    @cached_property
    def setups(self) -> list[tuple[SumPlan, DistributedNoise]]:
        """The sums over the sites that advertised (once the advertise step has closed:
        one, or one per group), and each site's noise in them."""
        rnd, study = self.rnd, self.study
        return self._closed("advertise", "setups", lambda: wire.group_setups(
            rnd.kind, study_plan(study), self.ads, _length(self.db, study, rnd),
            self.multiplier, study=study.id, round_number=rnd.number,
            attempt=rnd.secure_attempt or 0))

    def plan_of(self, site: str) -> SumPlan:
        """The sum `site` is in."""
        return next(plan for plan, _ in self.setups if site in plan.sites)

    def live(self) -> list[SumPlan]:
        """The sums with enough masked inputs to unmask (at least their ``min_inputs``)."""
        inputs = self.posted("input")
        return [plan for plan, _ in self.setups
                if len(inputs.intersection(plan.sites)) >= plan.min_inputs]

    @cached_property
    def signed(self) -> bool:
        """Whether every advertisement is signed: the sum then has a confirm step."""
        return all(ad.signature is not None for ad in self.bodies("advertise").values())

    def unmaskable(self) -> list[SumPlan]:
        """The live sums whose survivor list enough of their sites signed (where there
        is a confirm step, :func:`~cardiofed.protocol.secure_sums.confirm_quorum`)."""
        if not self.signed:
            return self.live()
        confirmed = self.posted("confirm")
        return [plan for plan in self.live()
                if len(confirmed.intersection(plan.sites)) >= wire.confirm_quorum(plan)]


# A vector's length by what sets it: the round's kind, the plan (its model) and the
# study's columns (cached: reading it from a stored model took a tenth of a message's time).
_LENGTHS: dict[tuple[str, str, tuple[str, ...]], int] = {}


def _length(db: Session, study: Study, rnd: Round) -> int:
    key = (rnd.kind, json.dumps(study.plan, sort_keys=True), tuple(study.feature_names))
    if key not in _LENGTHS:
        if len(_LENGTHS) > 1000:
            _LENGTHS.clear()
        plan = study_plan(study)
        if plan.attribution is not None:
            _LENGTHS[key] = attribution_length(plan.attribution, {
                "step": rnd.kind, "columns": study.feature_names, "inputs": {}})
        else:
            n_weights = 0 if rnd.kind != TRAIN else sum(
                v.size for v in load_model(db, study, rnd.model_version).values())
            _LENGTHS[key] = wire.vector_length(rnd.kind, len(study.feature_names), n_weights)
    return _LENGTHS[key]


def _waits_for(db: Session, study: Study, rnd: Round, state: _State) -> set[str]:
    """The sites the current step waits for: those that took the step before (every
    active site for the first), less those that refused the round."""
    refused = refused_ids(db, study, rnd.number)
    step = rnd.secure_step
    assert step is not None
    if step == wire.STEPS[0]:
        waiting = {state.names[i] for i in active_ids(db, study) if i not in refused}
    elif step == "confirm":  # a sum with too few inputs to unmask needs no confirmation
        waiting = state.posted("input") & _sites(state.live())
    elif step == "reveal":  # nor shares, nor does one whose survivors too few signed
        waiting = (state.posted("confirm" if state.signed else "input")
                   & _sites(state.unmaskable()))
    else:
        waiting = state.posted(wire.BEFORE[step])
    return waiting - {state.names[i] for i in refused}


def _sites(plans: list[SumPlan]) -> set[str]:
    return {site for plan in plans for site in plan.sites}


def task(db: Session, study: Study, rnd: Round, site: Site) -> SecureTask | None:
    """`site`'s task at the round's current step, None when it has none (it posted this
    step already, missed an earlier one of this attempt, or refused the round). Whether
    it has one is read from its own messages alone: a long poll that finds nothing to do
    costs the same at 200 sites as at 2."""
    step, attempt = rnd.secure_step, rnd.secure_attempt or 0
    assert step is not None
    mine = set(db.scalars(select(SecureMessage.step).where(
        *_attempt_of(rnd), SecureMessage.site_id == site.id)))
    before = wire.BEFORE.get(step)
    if step in mine or (before is not None and before not in mine) \
            or site.id in refused_ids(db, study, rnd.number):
        return None  # an authenticated site is not revoked: the first step waits for it
    state = _State(db, study, rnd)
    if step in ("confirm", "reveal") and site.name not in _waits_for(db, study, rnd, state):
        return None  # its sum cannot be unmasked, or (reveal) it confirmed nothing
    fields: dict[str, object] = {"step": step, "attempt": attempt}
    if step == "advertise":
        fields["sites"] = sorted(state.names[i] for i in active_ids(db, study))
    elif step == "share":
        fields.update(noise_multiplier=state.multiplier, adverts=state.bodies("advertise"))
    elif step == "input":
        fields.update(noise_multiplier=state.multiplier, inbox=state.inbox(site.name))
    else:
        fields["survivors"] = _survivors(state, site.name)
        if step == "reveal" and state.signed:
            group = state.plan_of(site.name).sites
            fields["confirmations"] = {name: body.signature for name, body in
                                       state.bodies("confirm").items() if name in group}
    return SecureTask.model_validate(fields)


def _survivors(state: _State, site: str) -> list[str]:
    """The sites of `site`'s sum whose masked inputs arrived."""
    return sorted(state.posted("input").intersection(state.plan_of(site).sites))


def step_status(db: Session, study: Study, rnd: Round) -> tuple[list[str], list[str]]:
    """The sites that posted the current step's message, and those it still waits for."""
    state = _State(db, study, rnd)
    posted = state.posted(rnd.secure_step or "")
    return sorted(posted), sorted(_waits_for(db, study, rnd, state) - posted)


def submit(db: Session, site: Site, study: Study, round_number: int, step: str,
           attempt: int, body: BaseModel, now: Clock) -> bool:
    """Check and add `site`'s message for `step` of the round's secure sum (the caller
    holds the study still, :func:`~cardiofed.coordinator.studies.serialised`, and
    commits); a repeat of the same message is accepted once more, another one is a
    conflict. True when every site the step waits for has now posted."""
    rnd = round_of(db, study, round_number)
    if rnd.secure_step is None:
        raise Conflict(f"Round {round_number} of study {study.id!r} is not a secure round.")
    if rnd.closed_at is not None:
        raise RoundClosed(f"Round {round_number} of study {study.id!r} has closed.")
    if (step, attempt) != (rnd.secure_step, rnd.secure_attempt):
        raise Conflict(f"Round {round_number}'s secure sum is at step {rnd.secure_step!r} "
                       f"of attempt {rnd.secure_attempt}; this message is for step "
                       f"{step!r} of attempt {attempt}.")
    state = _State(db, study, rnd)
    encoded = body.model_dump_json().encode()
    earlier = state.bodies(step)[site.name] if site.name in state.posted(step) else None
    if earlier is not None:
        if earlier.model_dump_json().encode() != encoded:
            raise Conflict(f"Site {site.name!r} already posted another {step} message for "
                           f"this sum.")
        return False
    waiting = _waits_for(db, study, rnd, state)
    if site.name not in waiting:
        raise Conflict(f"Site {site.name!r} is not in this step of the sum (it missed an "
                       f"earlier step of attempt {attempt}, or refused the round).")
    _check(step, site.name, body, state)
    db.add(SecureMessage(round_id=rnd.id, site_id=site.id, step=step, attempt=attempt,
                         body=encoded, received_at=now()))
    return waiting <= state.posted(step) | {site.name}


def _check(step: str, name: str, body: BaseModel, state: _State) -> None:
    """Refuse a message the sum cannot use (:class:`InvalidUpdate`, naming what)."""
    if isinstance(body, SecureAdvert):
        wire.advert_from_wire(name, body)
        return
    if isinstance(body, SecureShares):
        peers = state.peers(name)
        if sorted(body.sealed) != peers:
            raise InvalidUpdate(f"Site {name!r} must seal one share pair for each of its "
                                f"neighbours {peers[:10]}; got {sorted(body.sealed)[:10]}.")
        if any(len(wire.from_b64(box, "A sealed share pair")) > SEALED_MAX
               for box in body.sealed.values()):
            raise InvalidUpdate(f"A sealed share pair of {name!r} is over {SEALED_MAX} bytes.")
    elif isinstance(body, SecureInput):
        wire.ring_from_wire(body.masked, state.plan_of(name).length, name)
    elif isinstance(body, SecureConfirm):
        if len(wire.from_b64(body.signature, f"{name!r}'s signature")) != SIGNATURE_BYTES:
            raise InvalidUpdate(f"The signature {name!r} confirmed the survivors with is not "
                                f"{SIGNATURE_BYTES} bytes (Ed25519).")
    elif isinstance(body, SecureReveal):
        survivors = _survivors(state, name)
        group = state.plan_of(name).sites
        for site, revealed in body.shares.items():
            kind, share = revealed.kind, revealed.share
            if site not in state.posted("share"):
                raise InvalidUpdate(f"Site {name!r} revealed a share of {site!r}, which "
                                    f"shared no keys in this sum.")
            if site not in group:
                raise InvalidUpdate(f"Site {name!r} revealed a share of {site!r}, which is "
                                    f"not in its group's sum.")
            if kind != ("b" if site in survivors else "s"):
                raise InvalidUpdate(f"Site {name!r} revealed the wrong share of {site!r}: "
                                    f"a survivor's self-mask or a dropped site's mask key, "
                                    f"never the other.")
            if len(wire.from_b64(share, "A revealed share")) != shamir.SHARE_BYTES:
                raise InvalidUpdate(f"A share {name!r} revealed is not "
                                    f"{shamir.SHARE_BYTES} bytes.")


@dataclass(frozen=True)
class Unmasked:
    """What the coordinator unmasked: each sum's total (decoded; one per group of a
    grouped round), the survivors, and the SD of each sum's noise (decoded units)."""

    totals: tuple[np.ndarray, ...]
    survivors: tuple[str, ...]
    noise_sds: tuple[float, ...]

    @property
    def total(self) -> np.ndarray:
        return np.sum(self.totals, axis=0)


def progress(db: Session, study: Study, rnd: Round, now: Clock) -> Unmasked | str | None:
    """Close the current step if it is complete or past its deadline: the unmasked sum
    once the last step closes, a reason when the sum is given up, else None."""
    state = _State(db, study, rnd)
    step = rnd.secure_step
    assert step is not None
    posted = state.posted(step)
    waiting = _waits_for(db, study, rnd, state)
    if not (waiting <= posted and posted) and now() < rnd.deadline:
        return None
    if step == "advertise":
        needed = max(2, min(study.min_sites, len(waiting)), _least_to_group(study, rnd))
        if len(posted) < needed:
            _next(db, study, rnd, now, step, f"{len(posted)} of the {needed} sites needed "
                                             f"advertised keys; waiting")
            return None
        _next(db, study, rnd, now, "share", f"{len(posted)} sites advertised keys")
        return None
    least = min(plan.min_inputs for plan, _ in state.setups)
    if step == "share":
        short = [plan for plan, _ in state.setups
                 if len(posted.intersection(plan.sites)) < plan.min_inputs]
        if short:
            _restart(db, study, rnd, now, (
                f"{len(posted)} sites shared keys, fewer than the {least} the noise is "
                f"split over" if len(state.setups) == 1 else
                f"{len(short)} group(s) with fewer sites sharing keys than the "
                f"{short[0].min_inputs} a group's noise is split over"))
            return None
        _next(db, study, rnd, now, "input", f"{len(posted)} sites shared keys")
        return None
    needed = 3 if len(state.setups) > 1 else 1  # a robust rule runs across 3 groups
    if step == "input":
        live = state.live()
        if len(live) < needed:
            return _give_up(db, rnd, f"{len(posted)} masked inputs, fewer than the {least} "
                                     f"the noise is split over" if needed == 1 else
                                     f"{len(live)} groups with enough masked inputs to "
                                     f"unmask, fewer than a robust rule's 3")
        _next(db, study, rnd, now, "confirm" if state.signed else "reveal",
              f"{len(posted)} masked inputs")
        return None
    if step == "confirm":
        signed = state.unmaskable()
        if len(signed) < needed:
            quorum = wire.confirm_quorum(state.setups[0][0])
            return _give_up(db, rnd, f"{len(posted)} sites signed the survivor list, fewer "
                                     f"than the {quorum} a reveal needs" if needed == 1 else
                                     f"{len(signed)} groups whose survivor list enough of "
                                     f"their sites signed, fewer than a robust rule's 3")
        _next(db, study, rnd, now, "reveal", f"{len(posted)} sites signed the survivors")
        return None
    results, noise_sds, failed = [], [], []
    noise_of = {plan.context: noise for plan, noise in state.setups}
    for plan in state.unmaskable():
        try:
            results.append(_unmasked(state, plan))
        except InvalidUpdate as exc:
            failed.append(str(exc))
            continue
        noise_sds.append(noise_of[plan.context].sum_sd(len(results[-1].survivors),
                                                       plan.codec.scale))
    if len(results) < needed:
        return _give_up(db, rnd, "; ".join(failed[:3] + [
            f"{len(results)} groups unmasked, fewer than a robust rule's 3"] * (needed > 1)))
    _forget(db, rnd)
    survivors = tuple(sorted(s for r in results for s in r.survivors))
    log.info("study %s round %d: secure sum of %d sites unmasked in %d sum(s) (%d dropped)",
             study.id, rnd.number, len(survivors), len(results),
             sum(len(r.dropped) for r in results))
    return Unmasked(tuple(r.total for r in results), survivors, tuple(noise_sds))


def _least_to_group(study: Study, rnd: Round) -> int:
    """The advertisements a grouped round needs: three groups' worth."""
    plan = study_plan(study)
    return 3 * (plan.secure_group_size or 0) if wire.grouped(rnd.kind, plan) else 0


def _unmasked(state: _State, plan: SumPlan) -> SecureSum:
    """The survivors' sum of one (group's) sum."""
    inputs = {name: wire.ring_from_wire(body.masked, plan.length, name)
              for name, body in state.bodies("input").items() if name in plan.sites}
    revealed = {name: {site: (r.kind, wire.from_b64(r.share, "A revealed share"))
                       for site, r in body.shares.items()}
                for name, body in state.bodies("reveal").items() if name in plan.sites}
    return unmask_sum(plan, state.ads_of(plan), state.posted("share") & set(plan.sites),
                      inputs, revealed)


def _next(db: Session, study: Study, rnd: Round, now: Clock, step: str, why: str) -> None:
    rnd.secure_step = step
    rnd.deadline = now() + timedelta(seconds=study.round_timeout_s)
    rnd.outcome = f"secure sum, attempt {rnd.secure_attempt}: {why}; step {step}"[:200]
    db.commit()


def _restart(db: Session, study: Study, rnd: Round, now: Clock, why: str) -> None:
    _forget(db, rnd)
    rnd.secure_attempt = (rnd.secure_attempt or 0) + 1
    _next(db, study, rnd, now, "advertise", f"{why}: starting again with fresh keys")


def _give_up(db: Session, rnd: Round, why: str) -> str:
    _forget(db, rnd)
    log.warning("round %d: secure sum given up: %s", rnd.number, why)
    return why


def _forget(db: Session, rnd: Round) -> None:
    db.execute(delete(SecureMessage).where(SecureMessage.round_id == rnd.id))
