"""Kaplan-Meier counts released under differential privacy, through the site's ledger.

A site's counts on a public grid (:func:`~cardiofed.survival.kaplan_meier.site_counts`)
hold each patient in exactly one cell (an event, or the end of follow-up, at one grid
point), so adding or removing a patient changes one count by 1: the L2 sensitivity is 1.
:func:`private_site_counts` charges one Gaussian release to the site's ledger (kind
``statistics``) before counting, and adds noise from a secret source to every cell.
The grid must be public and fixed in advance (months, say), never the sites' event
times, which would themselves be a release. :func:`private_kaplan_meier` post-processes
the summed noisy counts (no further privacy cost): negative counts become 0.

:func:`cardiofed.simulation.secure_statistics.secure_kaplan_meier` releases the same
counts as one secure sum with distributed noise: each site adds a share, so the
federation's counts carry the noise of one release instead of one per site.

Cox models are not private yet: their sums at each grid point weigh a patient by
``exp(x beta)`` in every risk set they belong to, which needs bounds this package does
not set.
"""

from __future__ import annotations

import numpy as np

from cardiofed.privacy.randomness import secure_numpy_rng
from cardiofed.privacy.site_privacy import SitePrivacy
from cardiofed.survival.kaplan_meier import GridCounts, SurvivalCurve, kaplan_meier, site_counts

__all__ = ["private_kaplan_meier", "private_site_counts"]


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
