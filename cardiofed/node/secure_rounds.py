"""A node's side of a secure round (:mod:`cardiofed.protocol.secure_sums`): the message of
each step, from the task and the site's own state; no transport here.

The site's secrets of a sum (two X25519 keys and the self-mask seed) live in this
object's memory only: a node that restarts during a sum no longer holds them and leaves
that round (the sum goes on without it). A site takes part only with a privacy budget,
checks that the study's noise multiplier covers what its budget needs before it
shares a key, and charges its ledger before it computes its vector.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cardiofed.exceptions import CardioFedError, TaskRefused
from cardiofed.privacy.randomness import secure_numpy_rng
from cardiofed.privacy.release_gate import finite_or_zeros
from cardiofed.protocol import secure_sums as wire
from cardiofed.protocol.schemas import (
    SecureConfirm,
    SecureInput,
    SecureReveal,
    SecureShares,
    SecureTask,
    TaskResponse,
)
from cardiofed.secure import Advertisement, SecureSite, keys
from cardiofed.secure.identity import SiteIdentity
from cardiofed.secure.noise import DistributedNoise
from cardiofed.simulation.config import SimulationConfig


@dataclass
class _Sum:
    """One sum's secrets and, once the keys are shared, its state."""

    need: float
    length: int
    c_private: bytes
    s_private: bytes
    b_seed: bytes
    site: SecureSite | None = None
    noise: DistributedNoise | None = None
    multiplier: float = 0.0
    confirmed: list[str] | None = None  # the survivor list this site signed


Key = tuple[str, int, int]  # study, round, attempt


class SecureRounds:
    """The sums this node is part of, by (study, round, attempt); with an `identity` (the
    site's signing key and the federation's roster,
    :mod:`cardiofed.secure.identity`) its advertisements are signed and it shares keys
    only when every advertisement of a sum is signed by a site on the roster."""

    def __init__(self, identity: SiteIdentity | None = None) -> None:
        self._sums: dict[Key, _Sum] = {}
        self.identity = identity

    def advertise(self, task: TaskResponse, name: str, need: float,
                  length: int) -> wire.SecureAdvert:
        """Fresh keys for the task's sum, advertised with the noise multiplier `need`
        this site's budget needs on it; `length` values in its vector."""
        sec = _secure(task)
        if self.identity is not None:
            try:
                self.identity.check_own(name)
            except CardioFedError as exc:
                raise TaskRefused(str(exc)) from None
        for key in [k for k in self._sums if k[:2] == (task.study, task.round)]:
            del self._sums[key]  # an earlier attempt of the round: its keys are spent
        pending = _Sum(need=need, length=length, c_private=keys.new_private_key(),
                       s_private=keys.new_private_key(), b_seed=keys.new_seed())
        self._sums[(task.study, task.round, sec.attempt)] = pending
        ad = wire.advert_to_wire(Advertisement(name, keys.public_key(pending.c_private),
                                               keys.public_key(pending.s_private)), need)
        if self.identity is None:
            return ad
        message = wire.advert_message(_context(task), name, ad)
        return ad.model_copy(update={"signature": wire.to_b64(self.identity.sign(message))})

    def _check_signatures(self, task: TaskResponse, adverts: dict[str, wire.SecureAdvert]
                          ) -> None:
        """With a roster, every advertisement must be a roster site's, signed by its key."""
        if self.identity is None:
            return
        context = _context(task)
        for site, ad in adverts.items():
            signature = (None if ad.signature is None
                         else wire.from_b64(ad.signature, f"{site!r}'s signature"))
            self.identity.verify(site, wire.advert_message(context, site, ad), signature)

    def share(self, task: TaskResponse, name: str, plan: SimulationConfig) -> SecureShares:
        """Sealed share pairs for this site's neighbours, once the study's noise is
        checked against this site's need."""
        sec, pending = _secure(task), self._pending(task)
        adverts = sec.adverts or {}
        multiplier = sec.noise_multiplier
        if multiplier is None or multiplier < pending.need or multiplier != max(
                (ad.noise_multiplier for ad in adverts.values()), default=0.0):
            raise TaskRefused(f"The sum's noise multiplier {multiplier!r} is not the largest "
                              f"the sites advertised, or is below this site's "
                              f"{pending.need:.4g}: its noise would not cover this site's "
                              f"budget.")
        try:
            self._check_signatures(task, adverts)
            ads = {site: wire.advert_from_wire(site, ad) for site, ad in adverts.items()}
            setups = wire.group_setups(task.kind, plan, ads, pending.length, multiplier,
                                       study=task.study, round_number=task.round,
                                       attempt=sec.attempt)
            sum_plan, noise = next(((p, n) for p, n in setups if name in p.sites),
                                   setups[0])  # not advertised: share_keys says so
            pending.site = SecureSite(name, sum_plan, _c_private=pending.c_private,
                                      _s_private=pending.s_private, _b_seed=pending.b_seed)
            sealed = pending.site.share_keys({s: ads[s] for s in sum_plan.sites})
        except (CardioFedError, ValueError) as exc:
            raise TaskRefused(f"The sum's advertisements are not ones this site can share "
                              f"keys with: {exc}") from None
        pending.noise, pending.multiplier = noise, multiplier
        return SecureShares(sealed={peer: wire.to_b64(box) for peer, box in sealed.items()})

    def input(self, task: TaskResponse, charge: Callable[[float], None],
              vector: Callable[[], np.ndarray]) -> SecureInput:
        """This site's vector with its noise share, masked: `charge` (the ledger, at the
        study's multiplier) runs first, then `vector` computes it. If that fails, or a
        value is not finite, the site sends zeros with the same noise instead (already
        charged), as every private release does: whether the computation failed on its
        rows never shows."""
        sec, pending = _secure(task), self._pending(task)
        if pending.site is None:
            raise TaskRefused("This site shared no keys in this sum; it sends no input.")
        charge(pending.multiplier)
        try:
            inbox = {peer: wire.from_b64(box, f"The share pair from {peer!r}")
                     for peer, box in (sec.inbox or {}).items()}
            x = finite_or_zeros(lambda: {"x": vector()}, {"x": (pending.length,)},
                                "secure sum input")["x"]
            masked = pending.site.masked_input(x, inbox, secure_numpy_rng(), pending.noise)
        except (CardioFedError, ValueError) as exc:
            raise TaskRefused(f"This site cannot mask its input with the shares it was "
                              f"sent: {exc}") from None
        return SecureInput(masked=wire.ring_to_wire(masked))

    def confirm(self, task: TaskResponse) -> SecureConfirm:
        """This site's signature of the survivor list the task names (once per sum: a
        node signs one list), where the list is one it would reveal shares for."""
        sec, pending = _secure(task), self._pending(task)
        if pending.site is None or self.identity is None:
            raise TaskRefused("This site shared no keys in this sum, or holds no roster "
                              "key: it signs no survivor list.")
        survivors = sorted(sec.survivors or [])
        if pending.confirmed is not None and pending.confirmed != survivors:
            raise TaskRefused("This site already signed another survivor list for this "
                              "sum: it signs one.")
        try:
            pending.site.check_survivors(survivors)
        except CardioFedError as exc:
            raise TaskRefused(f"This site does not sign this survivor list: {exc}") from None
        pending.confirmed = survivors
        message = wire.survivors_message(pending.site.plan.context, survivors)
        return SecureConfirm(signature=wire.to_b64(self.identity.sign(message)))

    def reveal(self, task: TaskResponse) -> SecureReveal:
        """One share per site this site holds shares of, for the survivors the task names;
        the sum's secrets are then forgotten. With a roster, only for the list this site
        signed, and only once enough of the sum's sites signed it too."""
        sec, pending = _secure(task), self._pending(task)
        if pending.site is None:
            raise TaskRefused("This site shared no keys in this sum; it reveals nothing.")
        if self.identity is not None:
            self._check_confirmed(sec, pending)
        try:
            shares = pending.site.unmask(sec.survivors or [])
        except CardioFedError as exc:
            raise TaskRefused(f"This site does not reveal shares for these survivors: "
                              f"{exc}") from None
        del self._sums[(task.study, task.round, sec.attempt)]
        return SecureReveal.model_validate({"shares": {
            site: {"kind": kind, "share": wire.to_b64(share)}
            for site, (kind, share) in shares.items()}})

    def _check_confirmed(self, sec: SecureTask, pending: _Sum) -> None:
        """Refuse unless the survivors are the list this site signed and at least the
        sum's quorum of its sites signed it (their roster keys; others do not count)."""
        assert self.identity is not None and pending.site is not None
        survivors = sorted(sec.survivors or [])
        if pending.confirmed != survivors:  # None where it signed nothing
            raise TaskRefused("This site reveals shares only for the survivor list it "
                              "signed in this sum's confirm step; this one is not it.")
        message = wire.survivors_message(pending.site.plan.context, survivors)
        signers = set()
        for site, signature in (sec.confirmations or {}).items():
            try:
                raw = wire.from_b64(signature, "A confirmation")
            except CardioFedError:
                continue
            if site in survivors and self.identity.signed_by(site, message, raw):
                signers.add(site)
        quorum = wire.confirm_quorum(pending.site.plan)
        if len(signers) < quorum:
            raise TaskRefused(f"{len(signers)} of the sum's sites signed this survivor list "
                              f"with their roster keys, fewer than the {quorum} a reveal "
                              f"needs: another list may have been sent to other sites.")

    def _pending(self, task: TaskResponse) -> _Sum:
        pending = self._sums.get((task.study, task.round, _secure(task).attempt))
        if pending is None:
            raise TaskRefused("This node holds no keys for this sum (it restarted, or "
                              "missed the advertisement): it leaves this round.")
        return pending


def _secure(task: TaskResponse) -> SecureTask:
    assert task.secure is not None
    return task.secure


def _context(task: TaskResponse) -> bytes:
    return wire.sum_context(task.study, task.round, _secure(task).attempt)
