"""A secure study's rounds on the network: what the node and the coordinator agree on.

With ``secure_aggregation = true`` in a study's plan, its statistics round, each
training round and its evaluation round (or each step of a private attribution) are one
secure sum (:mod:`cardiofed.secure`) in four steps, each a task the node polls for and a
message it posts (``POST /v1/studies/{id}/rounds/{n}/secure/{step}``):

1. ``advertise``: the site's public keys and the noise multiplier its budget needs on
   the sum (a function of its epsilon, delta and the plan's rounds, never of its data);
2. ``share``: given every advertisement, its sealed share pairs for its neighbours;
   the study's noise multiplier is the largest any site advertised, which each site
   checks against its own need before it shares;
3. ``input``: its vector (histograms and record count, its clipped gradient sum and
   record count, or its test split's score histograms), encoded into the ring with its
   share of the noise, masked; charged to its ledger first;
4. ``confirm``, only when every advertisement is signed (nodes holding the roster,
   :mod:`cardiofed.secure.identity`): given the survivors (the sites of its sum whose
   input arrived), the site's signature of that list;
5. ``reveal``: given the survivors (and, after a confirm step, every confirmation), one
   share per neighbour. A node with a roster reveals only for the list it signed, and
   only once :func:`confirm_quorum` of its sum's sites signed that same list.

The coordinator then unmasks the survivors' sum and nothing else. The sum's parameters
(ring, noise, neighbours) follow from the plan, the advertisements and the noise
multiplier, so both ends derive them with :func:`group_setups`. Under
``secure_group_size`` a training round is one such sum per group of sites, dealt from
the advertisements; the coordinator unmasks each group's sum and its robust rule runs
across them.
"""

from __future__ import annotations

import base64
import binascii
import struct
from collections.abc import Mapping, Sequence

import numpy as np

from cardiofed.causal.study import STEPS as ATTRIBUTION_STEPS
from cardiofed.data.preprocessing import PRIVATE_BINS
from cardiofed.exceptions import InvalidUpdate
from cardiofed.protocol.schemas import SecureAdvert
from cardiofed.secure import Advertisement, SumPlan
from cardiofed.secure.noise import DistributedNoise
from cardiofed.secure.protocol import keys_digest
from cardiofed.simulation.config import SimulationConfig
from cardiofed.simulation.secure_attribution import attribution_codec_and_noise
from cardiofed.simulation.secure_evaluation import EVALUATION_LENGTH, evaluation_codec_and_noise
from cardiofed.simulation.secure_runner import secure_codec_and_noise, secure_groups
from cardiofed.simulation.secure_statistics import statistics_codec_and_noise

STEPS = ("advertise", "share", "input", "confirm", "reveal")
# Each step's step before. A reveal's is the inputs; where the sum has a confirm step
# (every advertisement signed), a site also reveals only after it confirmed.
BEFORE = {"share": "advertise", "input": "share", "confirm": "input", "reveal": "input"}
ATTRIBUTION_KINDS = ATTRIBUTION_STEPS[:-1]  # a private attribution's steps
SECURE_KINDS = ("statistics", "train", "evaluate", *ATTRIBUTION_KINDS)


def vector_length(kind: str, n_columns: int, n_weights: int) -> int:
    """How many values a site's vector holds: each column's histogram, or the model's
    gradient, and the record count; or the negatives' and positives' score histograms."""
    if kind == "evaluate":
        return EVALUATION_LENGTH
    return (n_columns * PRIVATE_BINS if kind == "statistics" else n_weights) + 1


def grouped(kind: str, plan: SimulationConfig) -> bool:
    """Whether a round of `kind` takes one secure sum per group of sites under
    ``secure_group_size``: a training round (the robust rule then runs across the
    groups), the statistics or the evaluation round (the statistics gate then weighs
    each group's sum as one release, :mod:`cardiofed.aggregation.robust_statistics`)."""
    return kind in ("train", "statistics", "evaluate") and plan.secure_group_size is not None


def group_setups(kind: str, plan: SimulationConfig, ads: Mapping[str, Advertisement],
                 length: int, noise_multiplier: float, *, study: str, round_number: int,
                 attempt: int) -> list[tuple[SumPlan, DistributedNoise]]:
    """The secure sums of round `round_number` (its `attempt`) over the sites that
    advertised `ads`, and the noise each site adds: one sum of every site, or, for a
    :func:`grouped` round, one per group. Groups are dealt at random (a hash of every
    public key and the round, :func:`~cardiofed.secure.protocol.keys_digest`: no party
    picks them), at least ``secure_group_size`` sites each; each group's sum carries the
    whole noise on its own and masks, shares and unmasks within the group."""
    names = sorted(ads)
    context = sum_context(study, round_number, attempt)
    if not grouped(kind, plan):
        return [sum_setup(kind, plan, names, length, noise_multiplier, context=context)]
    assert plan.secure_group_size is not None
    groups = secure_groups(names, plan.secure_group_size, keys_digest(context, ads))
    return [sum_setup(kind, plan, group, length, noise_multiplier,
                      context=context + f"/group {g}".encode())
            for g, group in enumerate(groups)]


def sum_setup(kind: str, plan: SimulationConfig, sites: list[str], length: int,
              noise_multiplier: float, *, context: bytes
              ) -> tuple[SumPlan, DistributedNoise]:
    """The secure sum named `context` over `sites` and the noise each adds."""
    n = len(sites)
    if kind == "statistics":
        codec, noise = statistics_codec_and_noise(n, (length - 1) // PRIVATE_BINS,
                                                  noise_multiplier, plan.secure_dropout)
    elif kind == "evaluate":
        codec, noise = evaluation_codec_and_noise(n, noise_multiplier, plan.secure_dropout)
    elif kind in ATTRIBUTION_KINDS:
        codec, noise = attribution_codec_and_noise(n, length, noise_multiplier,
                                                   plan.secure_dropout)
    else:
        codec, noise = secure_codec_and_noise(plan, n, length, noise_multiplier)
    return (SumPlan(context=context, codec=codec, sites=tuple(sites), length=length,
                    min_inputs=noise.min_sites), noise)


def sum_context(study: str, round_number: int, attempt: int) -> bytes:
    """The name of one sum: it enters every key derived for it, and what sites sign."""
    return f"cardiofed/{study}/round {round_number}/attempt {attempt}".encode()


def advert_message(context: bytes, site: str, body: SecureAdvert) -> bytes:
    """What a site signs of its advertisement: the sum, its name, its public keys and the
    noise multiplier it asks for, each length-prefixed (two different advertisements
    never give the same bytes)."""
    return _framed([b"cardiofed secure advertisement v1", context, site.encode(),
                    body.c_public.encode(), body.s_public.encode(),
                    struct.pack("<d", body.noise_multiplier)])


def survivors_message(context: bytes, survivors: Sequence[str]) -> bytes:
    """What a site signs in a confirm step: the sum (`context`, a group's own) and its
    survivors, sorted, each length-prefixed."""
    return _framed([b"cardiofed secure survivors v1", context,
                    *(s.encode() for s in sorted(survivors))])


def _framed(parts: list[bytes]) -> bytes:
    """`parts` each length-prefixed: two different lists never give the same bytes."""
    return b"".join(struct.pack("<I", len(p)) + p for p in parts)


def confirm_quorum(plan: SumPlan) -> int:
    """How many of a sum's `n` sites must sign the same survivor list before any site
    reveals a share: ``ceil((n + t) / 2)`` with ``t`` the Shamir threshold. An honest
    site signs one list, so two different lists both reach the quorum only when at least
    ``2 * quorum - n >= t`` sites sign both: a coordinator colluding with fewer than `t`
    sites cannot have one site's self-mask revealed by some holders and its mask key by
    others (which would unmask that site's input)."""
    return (len(plan.sites) + plan.threshold + 1) // 2


def to_b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def from_b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidUpdate(f"{what} is not valid base64.") from None


def advert_to_wire(ad: Advertisement, noise_multiplier: float) -> SecureAdvert:
    return SecureAdvert(c_public=to_b64(ad.c_public), s_public=to_b64(ad.s_public),
                        noise_multiplier=noise_multiplier, signature=None)


def advert_from_wire(site: str, body: SecureAdvert) -> Advertisement:
    """The advertisement, its keys checked for length (:class:`InvalidUpdate`)."""
    return Advertisement(site, from_b64(body.c_public, f"{site!r}'s c_public"),
                         from_b64(body.s_public, f"{site!r}'s s_public"))


def ring_to_wire(y: np.ndarray) -> str:
    return to_b64(np.asarray(y, np.uint64).astype("<u8").tobytes())


def ring_from_wire(text: str, length: int, site: str) -> np.ndarray:
    raw = from_b64(text, f"The masked input of {site!r}")
    if len(raw) != 8 * length:
        raise InvalidUpdate(f"The masked input of {site!r} holds {len(raw)} bytes; the sum's "
                            f"{length} values take {8 * length}.")
    return np.frombuffer(raw, "<u8").astype(np.uint64)

