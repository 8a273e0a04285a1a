"""Kaplan-Meier counts released under differential privacy, through the site's ledger.

A site's counts on a public grid (:func:`~cardiofed.survival.kaplan_meier.site_counts`)
hold each patient in exactly one cell (an event, or the end of follow-up, at one grid
point), so adding or removing a patient changes one count by 1: the L2 sensitivity is 1.
:func:`private_site_counts` charges one Gaussian release to the site's ledger (kind
``statistics``) before counting, and adds noise from a secret source to every cell.
The grid must be public and fixed in advance (months, say), never the sites' event
times, which would themselves be a release. :func:`private_kaplan_meier` post-processes
the summed noisy counts (no further privacy cost): negative counts become 0.

:func:`secure_kaplan_meier` releases the same counts as one secure sum with distributed
noise (:mod:`cardiofed.secure`): each site adds a share, so the federation's counts
carry the noise of one release instead of one per site (``sqrt(n)`` times less).

Cox models are not private yet: their sums at each grid point weigh a patient by
``exp(x beta)`` in every risk set they belong to, which needs bounds this package does
not set.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from cardiofed.exceptions import PrivacyBudgetExceeded
from cardiofed.privacy.randomness import secure_numpy_rng
from cardiofed.privacy.site_privacy import SitePrivacy
from cardiofed.survival._checks import check_grid
from cardiofed.survival.kaplan_meier import GridCounts, SurvivalCurve, kaplan_meier, site_counts

__all__ = ["private_kaplan_meier", "private_site_counts", "secure_kaplan_meier"]


def private_site_counts(time: object, event: object, grid: object,
                        privacy: SitePrivacy) -> tuple[GridCounts, float]:
    """The site's counts on the public `grid` with Gaussian noise (charged first), and
    the noise's standard deviation."""
    sigma = privacy.charge_release("statistics", "survival counts release")
    exact = site_counts(time, event, grid)
    rng = secure_numpy_rng()
    noisy = GridCounts(grid=exact.grid,
                       events=exact.events + rng.normal(0.0, sigma, exact.grid.size),
                       censored=exact.censored + rng.normal(0.0, sigma, exact.grid.size))
    return noisy, sigma


def private_kaplan_meier(counts: GridCounts) -> SurvivalCurve:
    """Kaplan-Meier and Nelson-Aalen from (summed) noisy counts, negatives set to 0."""
    return kaplan_meier(GridCounts(grid=counts.grid, events=np.maximum(counts.events, 0.0),
                                   censored=np.maximum(counts.censored, 0.0)))


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
    from cardiofed.secure.simulate import ring_sum  # loads cryptography
    from cardiofed.simulation.secure_statistics import budgeted, count_codec_and_noise

    needed, multiplier, min_sites = budgeted(list(sites), privacy, "statistics", dropout)
    if len(needed) < min_sites:
        raise PrivacyBudgetExceeded(
            f"{len(needed)} sites have budget for the survival counts' sum, fewer than the "
            f"{min_sites} its noise is split over.")
    codec, noise = count_codec_and_noise(len(sites), 1.0, multiplier, dropout)
    vectors, rngs = {}, {}
    for name in needed:
        privacy[name].charge_secure_sum("statistics", multiplier)
        counts = site_counts(*sites[name], grid)
        vectors[name] = np.concatenate([counts.events, counts.censored]).astype(np.float64)
        rngs[name] = secure_numpy_rng()
    total = ring_sum(codec, vectors, rngs, noise)
    g = check_grid(grid)
    pooled = GridCounts(grid=g, events=total[:g.size], censored=total[g.size:])
    return private_kaplan_meier(pooled), pooled
