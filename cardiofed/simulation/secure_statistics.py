"""The preprocessing statistics of a secure study: one secure sum of every site's exact
histograms and record count, the distributed noise added once.

Each site sends its exact counts per histogram bin (:data:`~cardiofed.data.preprocessing.
PRIVATE_BINS` per column) and its record count, encoded exactly (counts are integers)
with its share of the noise. One record moves the vector by
:func:`~cardiofed.data.preprocessing.statistics_sensitivity` (one bin per observed column
and the count). The coordinator unmasks the federation's noisy histograms and count, and
computes the statistics from them as from any private release
(:func:`~cardiofed.data.preprocessing.statistics_from_histogram`): the noise of one
study's release on the sum, not one per site. Every site is charged at the study's noise
multiplier, the largest any site's statistics share needs. With ``secure_group_size``
each group of sites has its own sum, each carrying the whole noise; the statistics gate
then weighs each group's as one release.

:func:`secure_kaplan_meier` sums survival counts on a public grid the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from cardiofed.data.dataset import SiteData
from cardiofed.data.preprocessing import (
    SiteStatistics,
    site_statistics,
    statistics_from_histogram,
    statistics_sensitivity,
)
from cardiofed.exceptions import PrivacyBudgetExceeded
from cardiofed.privacy.randomness import secure_numpy_rng
from cardiofed.secure.noise import MIN_SITE_SIGMA, DistributedNoise
from cardiofed.secure.quantise import RingCodec
from cardiofed.secure.simulate import ring_sum

if TYPE_CHECKING:  # the coordinator imports this module for its codecs, without PyTorch
    from cardiofed.privacy.site_privacy import SitePrivacy
    from cardiofed.survival.kaplan_meier import GridCounts, SurvivalCurve

# The most records a site may hold: bounds each value a site encodes, hence the ring.
MAX_SITE_RECORDS = 10_000_000


def noise_sites(n_sites: int, dropout: float) -> int:
    """How many sites a secure sum's noise is split over: those it may not lose."""
    return max(2, math.ceil((1 - dropout) * n_sites))


def budgeted(names: Sequence[str], privacy: Mapping[str, SitePrivacy], kind: str,
             dropout: float) -> tuple[list[str], float, int]:
    """For a secure sum of `kind` released once per study over the sites `names`: those
    whose budget covers it, the sum's noise multiplier (the largest they need; 0 if
    none) and how many sites its noise is split over (fewer than that: no sum)."""
    needed = {}
    for name in names:
        try:
            needed[name] = privacy[name].secure_sum_noise(kind)
        except PrivacyBudgetExceeded:
            continue
    return list(needed), max(needed.values(), default=0.0), noise_sites(len(names), dropout)


def formable_sums(names: Sequence[str], groups: Sequence[Sequence[str]] | None,
                  needed: Collection[str], dropout: float) -> list[tuple[list[str], list[str]]]:
    """Each sum that can be formed (one of every site in `names`, or one per group of
    `groups`): its sites, and those of them with budget (`needed`), where these are at
    least as many as its noise is split over."""
    sums = []
    for group in groups or [list(names)]:
        members = [name for name in group if name in needed]
        if len(members) >= noise_sites(len(group), dropout):
            sums.append((list(group), members))
    return sums


def charged_sum(kind: str, members: Sequence[str], privacy: Mapping[str, SitePrivacy],
                multiplier: float, codec: RingCodec, noise: DistributedNoise,
                vector: Callable[[str], np.ndarray],
                attack: Callable[[str, np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """The ring sum of `members`' vectors, each site charged one release of `kind` at the
    sum's noise multiplier before its vector is made, its noise share drawn from a
    secret source. `attack(site, vector)`, for benchmarks and tests, replaces what a
    site sends."""
    vectors, rngs = {}, {}
    for name in members:
        privacy[name].charge_secure_sum(kind, multiplier)
        vectors[name] = vector(name) if attack is None else attack(name, vector(name))
        rngs[name] = secure_numpy_rng()
    return ring_sum(codec, vectors, rngs, noise)


def statistics_codec_and_noise(n_sites: int, n_columns: int, noise_multiplier: float,
                               dropout: float) -> tuple[RingCodec, DistributedNoise]:
    """The ring and the noise of the secure sum of `n_sites` sites' histograms of
    `n_columns` columns and record counts."""
    return count_codec_and_noise(n_sites, statistics_sensitivity(n_columns),
                                 noise_multiplier, dropout)


def count_codec_and_noise(n_sites: int, sensitivity: float, noise_multiplier: float,
                          dropout: float) -> tuple[RingCodec, DistributedNoise]:
    """The ring and the noise of a secure sum of `n_sites` sites' vectors of counts, one
    record moving a vector by `sensitivity` (L2)."""
    min_sites = noise_sites(n_sites, dropout)
    # Counts are integers: encoded at an integer scale, they are exact (no rounding term
    # in the sensitivity); the scale only lifts each share above the accounting's floor.
    floor = MIN_SITE_SIGMA * math.sqrt(min_sites) / (noise_multiplier * sensitivity)
    scale = float(2 ** max(0, math.ceil(math.log2(floor))))
    noise = DistributedNoise(noise_multiplier=noise_multiplier,
                             sensitivity=sensitivity * scale, min_sites=min_sites)
    codec = RingCodec.for_sum(n_sites, bound=MAX_SITE_RECORDS, scale=scale,
                              noise_bound=noise.noise_bound(n_sites))
    return codec, noise


def statistics_vector(x: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """A site's part of the statistics sum: its exact histograms (`edges`) of the rows
    `x`, and their count."""
    return np.concatenate([site_statistics(x, edges).histogram.ravel(), [len(x)]])


def statistics_from_sum(total: np.ndarray, edges: np.ndarray) -> SiteStatistics:
    """The federation's statistics from the unmasked sum of the sites' vectors."""
    n_columns, n_bins = edges.shape[0], edges.shape[1] - 1
    return statistics_from_histogram(total[:-1].reshape(n_columns, n_bins), edges,
                                     float(total[-1]))


def secure_statistics(sites: Sequence[SiteData], edges: np.ndarray,
                      privacy: Mapping[str, SitePrivacy], dropout: float, *,
                      groups: Sequence[Sequence[str]] | None = None,
                      attack: Callable[[str, np.ndarray], np.ndarray] | None = None
                      ) -> list[SiteStatistics]:
    """The federation's statistics from one secure sum (see the module docstring), or one
    per group of site names in `groups` (each group's sum carries the whole noise, split
    over ``ceil((1 - dropout) * k)`` of its k sites, as on the network); the noise is
    split over ``ceil((1 - dropout) * n)`` sites. A site whose budget refuses sends
    nothing; a group left with fewer sites than its noise is split over is left out;
    no sum left (or fewer than 3 groups) raises :class:`PrivacyBudgetExceeded`.
    `attack(site, vector)`, for benchmarks and tests, replaces what a site sends."""
    by_name = {s.name: s for s in sites}
    needed, multiplier, _ = budgeted(list(by_name), privacy, "statistics", dropout)
    sums = formable_sums(list(by_name), groups, needed, dropout)
    if groups is None and not sums:
        raise PrivacyBudgetExceeded(
            f"{len(needed)} sites have budget for the statistics sum, fewer than the "
            f"{noise_sites(len(by_name), dropout)} its noise is split over: the federation "
            f"cannot start.")
    if groups is not None and len(sums) < 3:
        raise PrivacyBudgetExceeded(
            f"{len(sums)} group(s) have as many sites with budget for the statistics "
            f"sum as their noise is split over, fewer than the 3 a robust rule needs: the "
            f"federation cannot start.")
    released = []
    for group, members in sums:  # nothing is charged before every sum can be formed
        codec, noise = statistics_codec_and_noise(len(group), edges.shape[0], multiplier,
                                                  dropout)
        total = charged_sum("statistics", members, privacy, multiplier, codec, noise,
                            lambda name: statistics_vector(by_name[name].x_train, edges),
                            attack)
        released.append(statistics_from_sum(total, edges))
    return released


def secure_kaplan_meier(sites: Mapping[str, tuple[object, object]], grid: object,
                        privacy: Mapping[str, SitePrivacy], dropout: float = 0.2
                        ) -> tuple[SurvivalCurve, GridCounts]:
    """The pooled Kaplan-Meier curve from one secure sum of every site's counts on the
    public `grid` (`sites`: name -> follow-up and event), and the noisy pooled counts.

    Each site is charged one release of kind ``statistics`` at the sum's noise
    multiplier, the largest any site's budget needs, before it counts; the noise is split
    over the ``ceil((1 - dropout) * n)`` sites the sum may not lose. A site whose budget
    refuses sends nothing; fewer sites than that raise :class:`PrivacyBudgetExceeded`.
    The arithmetic is the protocol's (the masks cancel exactly); each site's noise comes
    from a secret source."""
    from cardiofed.survival._checks import check_grid
    from cardiofed.survival.kaplan_meier import GridCounts, site_counts
    from cardiofed.survival.private import private_kaplan_meier

    needed, multiplier, min_sites = budgeted(list(sites), privacy, "statistics", dropout)
    if len(needed) < min_sites:
        raise PrivacyBudgetExceeded(
            f"{len(needed)} sites have budget for the survival counts' sum, fewer than the "
            f"{min_sites} its noise is split over.")
    codec, noise = count_codec_and_noise(len(sites), 1.0, multiplier, dropout)

    def vector(name: str) -> np.ndarray:
        counts = site_counts(*sites[name], grid)
        return np.concatenate([counts.events, counts.censored]).astype(np.float64)

    total = charged_sum("statistics", needed, privacy, multiplier, codec, noise, vector)
    g = check_grid(grid)
    pooled = GridCounts(grid=g, events=total[:g.size], censored=total[g.size:])
    return private_kaplan_meier(pooled), pooled
