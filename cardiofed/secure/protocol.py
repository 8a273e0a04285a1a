"""One secure sum: the sites' four steps (:class:`SecureSite`) and the coordinator's
arithmetic (:func:`unmask_sum`), with dropouts.

1. **Advertise.** Each site draws two X25519 key pairs, one to seal shares (``c``), one to
   agree masks (``s``), and sends the public keys.
2. **Share keys.** From all advertisements each site derives the same neighbour graph
   (:func:`neighbour_graph`; its randomness is a hash of every public key, so no party
   picks it). It draws a self-mask seed ``b`` and Shamir-shares ``b`` and its ``s``
   private key among itself and its neighbours (``threshold`` of the shares recover a
   secret), each neighbour's pair sealed with the key it agrees with that neighbour.
3. **Masked input.** With the shares it received (from the neighbours still in the
   round), a site sends ``x + PRG(b) + sum_j +-PRG(s_ij)`` over its neighbours ``j``:
   each pair's masks cancel in the sum, the self-mask hides ``x`` even from a
   coordinator that later learns the pairwise keys of a site it wrongly thinks dropped.
4. **Unmask.** Told which sites' inputs arrived (the survivors), each site reveals, for
   every neighbour whose shares it holds, the share of ``b`` (a survivor) or of ``s``
   (a site that dropped), never both. The coordinator recovers each survivor's ``b`` and
   each dropped site's ``s`` key, removes the self-masks and the dropped sites' pairwise
   masks, and is left with the survivors' exact sum.

Threat model: a coordinator that follows these steps but tries to learn more, colluding
with fewer than ``threshold`` sites of any neighbourhood, learns only the sum. Nodes
holding the federation's roster (:mod:`cardiofed.secure.identity`) also hold against
an active one: they refuse substituted public keys (signed advertisements), and reveal
only for a survivor list that a quorum of the sum's sites signed
(:func:`cardiofed.protocol.secure_sums.confirm_quorum`), so telling sites different
survivor lists gains nothing without ``threshold`` colluding sites.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from cryptography.exceptions import InvalidTag

from cardiofed.exceptions import ConfigurationError, InvalidUpdate
from cardiofed.secure import keys, shamir
from cardiofed.secure.noise import DistributedNoise
from cardiofed.secure.quantise import RingCodec

SHARE_PAIR_BYTES = 2 * shamir.SHARE_BYTES


@dataclass(frozen=True)
class SumPlan:
    """What every party of one secure sum agrees on beforehand.

    ``context`` names the sum (study, round, release) and enters every derived key, so
    masks and shares of one sum are useless in another. ``neighbours`` (k) is how many
    other sites each site masks with and shares its keys among; ``threshold`` (t) how
    many of the k + 1 holders recover a site's secrets. Defaults: every other site up to
    16 sites, else ``2 * ceil(1.5 * log2 n)`` (SecAgg+'s logarithmic degree); t a
    majority of the holders. No site reveals shares for a sum of fewer than
    ``min_inputs`` inputs (a distributed-DP sum's ``min_sites``).
    """

    context: bytes
    codec: RingCodec
    sites: tuple[str, ...]
    neighbours: int = 0
    threshold: int = 0
    length: int = 0
    min_inputs: int = 2

    def __post_init__(self) -> None:
        n = len(self.sites)
        if n < 2 or len(set(self.sites)) != n:
            raise ConfigurationError(f"A secure sum needs at least 2 distinct sites; got "
                                     f"{list(self.sites)[:5]}.")
        if not 2 <= self.min_inputs <= n:
            raise ConfigurationError(f"The 'min_inputs' parameter must be in [2, {n}]; got "
                                     f"{self.min_inputs!r}.")
        if self.length < 1:
            raise ConfigurationError(f"The 'length' parameter must be >= 1; got "
                                     f"{self.length!r}.")
        k = self.neighbours or default_neighbours(n)
        if not 1 <= k <= n - 1:
            raise ConfigurationError(f"The 'neighbours' parameter must be in [1, {n - 1}]; "
                                     f"got {k!r}.")
        t = self.threshold or ((k + 1) // 2 + 1 if k > 1 else 1)
        if not 1 <= t <= k + 1:
            raise ConfigurationError(f"The 'threshold' parameter must be in [1, {k + 1}] "
                                     f"(a site and its neighbours); got {t!r}.")
        object.__setattr__(self, "neighbours", k)
        object.__setattr__(self, "threshold", t)
        object.__setattr__(self, "sites", tuple(sorted(self.sites)))

    def holder_id(self, site: str) -> int:
        """The Shamir id of `site` (its position among the sorted sites, from 1)."""
        return self._ids[site]

    @cached_property
    def _ids(self) -> dict[str, int]:
        return {site: k + 1 for k, site in enumerate(self.sites)}

    def purpose(self, use: str, *pair: str) -> bytes:
        return b"/".join([self.context, use.encode(), *(p.encode() for p in sorted(pair))])


def default_neighbours(n_sites: int) -> int:
    if n_sites <= 17:
        return n_sites - 1
    return min(n_sites - 1, 2 * math.ceil(1.5 * math.log2(n_sites)))


@dataclass(frozen=True)
class Advertisement:
    """A site's public keys for one sum."""

    site: str
    c_public: bytes
    s_public: bytes

    def __post_init__(self) -> None:
        for name in ("c_public", "s_public"):
            if len(getattr(self, name)) != keys.KEY_BYTES:
                raise InvalidUpdate(f"Advertisement of {self.site!r}: {name} must be "
                                    f"{keys.KEY_BYTES} bytes.")


def keys_digest(context: bytes, ads: Mapping[str, Advertisement]) -> int:
    """A hash of a sum's context and every advertised public key: randomness no party
    picks (each site's keys are fresh and drawn before it sees the others')."""
    digest = hashlib.sha256(context)
    for name in sorted(ads):
        digest.update(name.encode() + b"\0" + ads[name].c_public + ads[name].s_public)
    return int.from_bytes(digest.digest(), "big")


def neighbour_graph(plan: SumPlan, ads: Mapping[str, Advertisement]) -> dict[str, list[str]]:
    """Each advertised site's neighbours: a Harary graph (each site linked to k/2 sites on
    either side, rounding up on one) on a ring ordered by a hash of all the public keys and
    the sum's context: no party picks who masks with whom (a coordinator that withholds
    advertisements to reshuffle the ring is an active one, outside the threat model)."""
    names = sorted(ads)
    order = [names[i] for i in
             np.random.default_rng(keys_digest(plan.context, ads)).permutation(len(names))]
    n = len(order)
    k = min(plan.neighbours, n - 1)
    graph: dict[str, set[str]] = {name: set() for name in order}
    for pos, name in enumerate(order):
        for step in range(1, k // 2 + 1):
            graph[name] |= {order[(pos + step) % n], order[(pos - step) % n]}
        if k % 2:
            graph[name].add(order[(pos + n // 2) % n])
            graph[order[(pos + n // 2) % n]].add(name)
    for name in order:
        graph[name].discard(name)
    return {name: sorted(peers) for name, peers in graph.items()}


@dataclass
class SecureSite:
    """A site's side of one secure sum (see the module docstring); its secrets never
    leave it except as the sealed shares and the one share per neighbour it reveals."""

    name: str
    plan: SumPlan
    _c_private: bytes = field(default_factory=keys.new_private_key, repr=False)
    _s_private: bytes = field(default_factory=keys.new_private_key, repr=False)
    _b_seed: bytes = field(default_factory=keys.new_seed, repr=False)
    _ads: dict[str, Advertisement] = field(default_factory=dict, repr=False)
    _peers: list[str] = field(default_factory=list, repr=False)
    _held: dict[str, tuple[bytes, bytes]] = field(default_factory=dict, repr=False)
    _sent_input: bool = False
    _revealed: bool = False

    def __post_init__(self) -> None:
        if self.name not in self.plan.sites:
            raise ConfigurationError(f"Site {self.name!r} is not one of the sum's sites.")

    def advertise(self) -> Advertisement:
        return Advertisement(self.name, keys.public_key(self._c_private),
                             keys.public_key(self._s_private))

    def share_keys(self, ads: Mapping[str, Advertisement]) -> dict[str, bytes]:
        """Sealed share pairs for each neighbour, from every advertisement received."""
        if self._ads:
            raise InvalidUpdate(f"Site {self.name!r} has already shared its keys.")
        if ads.get(self.name) != self.advertise():
            raise InvalidUpdate(f"The advertisements do not hold site {self.name!r}'s own "
                                f"keys as it sent them.")
        unknown = sorted(set(ads) - set(self.plan.sites))
        if unknown or any(ad.site != name for name, ad in ads.items()):
            raise InvalidUpdate(f"Advertisements of sites outside the sum or under another "
                                f"name: {unknown[:5]}.")
        peers = neighbour_graph(self.plan, ads)[self.name]
        if len(peers) + 1 < self.plan.threshold:
            raise InvalidUpdate(f"Site {self.name!r} has {len(peers)} neighbours; its keys "
                                f"need {self.plan.threshold} holders.")
        self._ads, self._peers = dict(ads), peers
        holders = [self.plan.holder_id(s) for s in [self.name, *peers]]
        b_shares = shamir.split(self._b_seed, self.plan.threshold, holders)
        s_shares = shamir.split(self._s_private, self.plan.threshold, holders)
        me = self.plan.holder_id(self.name)
        self._held[self.name] = (b_shares[me], s_shares[me])
        return {peer: keys.seal(self._seal_key(peer),
                                b_shares[self.plan.holder_id(peer)]
                                + s_shares[self.plan.holder_id(peer)],
                                self._associated(self.name, peer))
                for peer in peers}

    def masked_input(self, x: np.ndarray, inbox: Mapping[str, bytes],
                     rng: np.random.Generator, noise: DistributedNoise | None = None
                     ) -> np.ndarray:
        """`x` encoded (plus the site's share of `noise`) and masked, given the sealed
        shares its neighbours sent (those that sent none have left the sum: no mask is
        agreed with them). `rng` is the site's secret generator (rounding and noise)."""
        if not self._ads or self._sent_input:
            raise InvalidUpdate(f"Site {self.name!r}: a masked input comes once, after "
                                f"the keys were shared.")
        outsiders = sorted(set(inbox) - set(self._peers))
        if outsiders:
            raise InvalidUpdate(f"Site {self.name!r} got shares from non-neighbours "
                                f"{outsiders[:5]}.")
        if len(inbox) + 1 < self.plan.threshold:
            raise InvalidUpdate(f"Site {self.name!r}: {len(inbox)} neighbours remain; the "
                                f"sum needs {self.plan.threshold - 1} to recover its keys.")
        for peer, sealed in inbox.items():
            try:
                plain = keys.open_sealed(self._seal_key(peer), sealed,
                                         self._associated(peer, self.name))
            except InvalidTag:
                raise InvalidUpdate(f"The share pair from {peer!r} does not open: it was not "
                                    f"sealed for {self.name!r} in this sum, or was "
                                    f"changed.") from None
            if len(plain) != SHARE_PAIR_BYTES:
                raise InvalidUpdate(f"Site {peer!r} sent a malformed share pair.")
            self._held[peer] = (plain[:shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES:])
        codec, length = self.plan.codec, self.plan.length
        if np.shape(x) != (length,):
            raise ValueError(f"A secure sum of length {length} got a vector of shape "
                             f"{np.shape(x)}.")
        y = codec.encode(x, rng)
        if noise is not None:
            if noise.min_sites > self.plan.min_inputs:
                raise ConfigurationError(f"Noise split over {noise.min_sites} sites needs "
                                         f"a plan refusing sums of fewer inputs; the plan's "
                                         f"min_inputs is {self.plan.min_inputs}.")
            y = codec.add(y, codec.wrap(noise.sample(length, rng)))
        y = codec.add(y, keys.mask(self._b_seed, length))
        for peer in inbox:
            pair = keys.mask(keys.agree(self._s_private, self._ads[peer].s_public,
                                        self.plan.purpose("mask", self.name, peer)), length)
            y = codec.add(y, pair) if self.name < peer else codec.sub(y, pair)
        self._sent_input = True
        return y

    def unmask(self, survivors: Collection[str]) -> dict[str, tuple[str, bytes]]:
        """For each site whose shares this site holds: ``("b", share)`` when the
        coordinator says its input arrived, ``("s", share)`` when it says it did not.
        Once only, and only after sending its own input."""
        if not self._sent_input or self._revealed:
            raise InvalidUpdate(f"Site {self.name!r} reveals shares once, after its input.")
        alive = self.check_survivors(survivors)
        self._revealed = True
        return {site: ("b", b) if site in alive else ("s", s)
                for site, (b, s) in self._held.items()}

    def check_survivors(self, survivors: Collection[str]) -> set[str]:
        """`survivors` as a set, refused (:class:`InvalidUpdate`) unless they hold this
        site, only sites of the sum, and at least the plan's ``min_inputs``."""
        alive = set(survivors)
        if self.name not in alive:
            raise InvalidUpdate(f"Site {self.name!r} sent its input but is not listed as a "
                                f"survivor.")
        if not alive <= set(self._ads):
            raise InvalidUpdate("Survivors outside the sum.")
        if len(alive) < self.plan.min_inputs:
            raise InvalidUpdate(f"A sum of {len(alive)} input{'s' * (len(alive) != 1)} is "
                                f"below the plan's "
                                f"{self.plan.min_inputs}: refused (one input would be "
                                f"revealed, or too little noise summed).")
        return alive

    def _seal_key(self, peer: str) -> bytes:
        return keys.agree(self._c_private, self._ads[peer].c_public,
                          self.plan.purpose("seal", self.name, peer))

    def _associated(self, sender: str, recipient: str) -> bytes:
        return self.plan.context + b"/" + sender.encode() + b"->" + recipient.encode()


@dataclass(frozen=True)
class SecureSum:
    """What the coordinator learns: the survivors' sum (decoded) and who they were."""

    total: np.ndarray
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]


def unmask_sum(plan: SumPlan, ads: Mapping[str, Advertisement],
               shared: Collection[str], inputs: Mapping[str, np.ndarray],
               revealed: Mapping[str, Mapping[str, tuple[str, bytes]]]) -> SecureSum:
    """The survivors' exact sum from their masked `inputs` and the shares `revealed` in
    step 4 (revealer -> site -> (kind, share)); `shared` are the sites whose shares were
    relayed in step 2 (the others never masked with anyone)."""
    codec, length = plan.codec, plan.length
    survivors = sorted(inputs)
    dropped = sorted(set(shared) - set(inputs))
    if len(survivors) < plan.min_inputs:
        raise InvalidUpdate(f"{len(survivors)} inputs, fewer than the plan's "
                            f"{plan.min_inputs}: the sum is not unmasked.")
    graph = neighbour_graph(plan, ads)
    total = np.zeros(length, np.uint64)
    for site in survivors:
        if np.shape(inputs[site]) != (length,):
            raise InvalidUpdate(f"Masked input of {site!r} has shape "
                                f"{np.shape(inputs[site])}; expected ({length},).")
        total = codec.add(total, inputs[site])
    for site in survivors:
        b_seed = _recover(plan, site, "b", revealed)
        total = codec.sub(total, keys.mask(b_seed, length))
    for site in dropped:
        s_private = _recover(plan, site, "s", revealed)
        for peer in graph[site]:
            if peer not in inputs:
                continue  # a peer that dropped too never added this mask
            pair = keys.mask(keys.agree(s_private, ads[peer].s_public,
                                        plan.purpose("mask", site, peer)), length)
            # peer added +pair if peer < site, else -pair: take it back out
            total = codec.sub(total, pair) if peer < site else codec.add(total, pair)
    return SecureSum(total=codec.decode(total), survivors=tuple(survivors),
                     dropped=tuple(dropped))


def _recover(plan: SumPlan, site: str, kind: str,
             revealed: Mapping[str, Mapping[str, tuple[str, bytes]]]) -> bytes:
    shares = {plan.holder_id(holder): share for holder, answer in revealed.items()
              for s, (k, share) in answer.items() if s == site and k == kind}
    if len(shares) < plan.threshold:
        what = "self-mask" if kind == "b" else "mask key"
        raise InvalidUpdate(f"Only {len(shares)} shares of the {what} of site {site!r} were "
                            f"revealed; {plan.threshold} are needed.")
    return shamir.combine(shares, plan.threshold)
