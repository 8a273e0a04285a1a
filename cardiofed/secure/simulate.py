"""Secure sums in process: the whole protocol (for tests and the cost benchmark), and its
arithmetic alone (for simulating federations at scale).

The masks cancel exactly, so what the coordinator unmasks equals the ring sum of the
sites' encodings plus their noise shares; :func:`ring_sum` computes that without keys,
and ``tests/test_secure_aggregation.py`` holds it equal to :func:`run_protocol`'s result
for the same sites' generators.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np

from cardiofed.secure.noise import DistributedNoise
from cardiofed.secure.protocol import SecureSite, SecureSum, unmask_sum
from cardiofed.secure.quantise import RingCodec


def ring_sum(codec: RingCodec, vectors: Mapping[str, np.ndarray],
             rngs: Mapping[str, np.random.Generator],
             noise: DistributedNoise | None = None) -> np.ndarray:
    """The decoded ring sum of each site's encoding plus its noise share, drawn from its
    generator in the order :meth:`SecureSite.masked_input` draws them."""
    total = np.zeros(len(next(iter(vectors.values()))), np.uint64)
    for name, x in vectors.items():
        y = codec.encode(x, rngs[name])
        if noise is not None:
            y = codec.add(y, codec.wrap(noise.sample(len(x), rngs[name])))
        total = codec.add(total, y)
    return codec.decode(total)


def run_protocol(sites: Mapping[str, SecureSite], vectors: Mapping[str, np.ndarray],
                 rngs: Mapping[str, np.random.Generator], *,
                 noise: DistributedNoise | None = None,
                 drop_before_sharing: Collection[str] = (),
                 drop_before_input: Collection[str] = (),
                 drop_before_unmask: Collection[str] = ()) -> tuple[SecureSum, list[object]]:
    """One secure sum of `vectors` with every step of every site in `sites` run, relayed
    as a coordinator relays it, sites dropping where told; returns the sum and everything
    the coordinator received (advertisements, sealed shares, masked inputs, revealed
    shares)."""
    plan = next(iter(sites.values())).plan
    ads = {name: s.advertise() for name, s in sites.items()}
    sharing = [n for n in sites if n not in drop_before_sharing]
    outbox = {n: sites[n].share_keys(ads) for n in sharing}
    inbox: dict[str, dict[str, bytes]] = {n: {} for n in sharing}
    for sender, sealed in outbox.items():
        for recipient, box in sealed.items():
            if recipient in inbox:
                inbox[recipient][sender] = box
    inputs = {n: sites[n].masked_input(vectors[n], inbox[n], rngs[n], noise)
              for n in sharing if n not in drop_before_input}
    revealed = {n: sites[n].unmask(inputs) for n in inputs if n not in drop_before_unmask}
    return (unmask_sum(plan, ads, sharing, inputs, revealed),
            [ads, outbox, inputs, revealed])
