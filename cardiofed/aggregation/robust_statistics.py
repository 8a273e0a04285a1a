"""Robust merging of the sites' statistics: one site cannot move the federation's
means, SDs or imputation fills far, whatever it declares.

The statistics round is summed (:func:`cardiofed.data.preprocessing.merge_statistics`),
so without a gate one site declaring 10,000,000 records at the top of every range owns
every mean. :func:`robust_site_statistics` scales each site's statistics, column by
column, by a factor in (0, 1] before they are summed; a scaled release keeps its
distribution and loses weight:

1. **consistency**: an exact release's ``total`` and ``total_sq`` are clamped into what
   its own histogram allows (honest releases already lie there);
2. **count cap**: no site counts for more than :data:`COUNT_CAP` x the median site's
   count in that column;
3. **distance**: a site whose column mean lies ``d`` > :data:`DISTANCE_K` robust
   spreads from the median of the sites' means (or whose log SD does, likewise) has its
   weight multiplied by ``(DISTANCE_K / d)^2``, so its pull on the mean (and on the
   variance) falls as it goes farther. The spread is 1.4826 x the median absolute
   deviation across sites, floored at :data:`SPREAD_FLOOR` of the column's range
   (identical sites do not make every small difference an outlier);
4. **second moment**: a site whose second moment about the sites' median mean
   (``SD^2 + (mean - median)^2``) is ``q`` times the median site's, with ``q`` >
   :data:`SECOND_MOMENT_CAP`, has its weight multiplied by ``SECOND_MOMENT_CAP / q``,
   so its pull on the merged variance stays bounded however spread its release: at
   most ``COUNT_CAP x SECOND_MOMENT_CAP`` (8) times the median site's (the log-SD
   distance alone let a release split between both ends of a range move an SD by 56%).

What this tolerates: the median and the spread break down at half the sites, so f
malicious sites of n need f < n / 2; each then moves a column's merged mean by at most
about ``COUNT_CAP x DISTANCE_K x spread`` times the median site's share of the weight:
little where honest sites agree, more where they differ (bench/targeted_attacks.py:
one forged release of 8 moves a mean by at most 9% of its range on the demo
federation, 15% on Framingham's heterogeneous split, against 84% and 99% summed).
Honest sites within ``DISTANCE_K`` spreads of the median and under the cap keep their
full weight, so a homogeneous honest federation's merge is the pooled one. All of it
is post-processing of the sites' releases: no privacy cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from cardiofed.data.preprocessing import DEFAULT_BINS, SiteStatistics

COUNT_CAP = 2.0        # a site's weight <= COUNT_CAP x the median site's count
DISTANCE_K = 2.0       # robust spreads from the sites' median before weight is lost
SPREAD_FLOOR = 0.02    # of the column's range: the smallest spread of site means
LOG_SD_FLOOR = 0.1     # the smallest spread of the sites' log SDs
SECOND_MOMENT_CAP = 4.0  # with COUNT_CAP: a pull on a variance <= 8 x the median site's
_MAD_TO_SD = 1.4826

Moments = tuple[np.ndarray, np.ndarray, np.ndarray]  # per column: count, mean, SD


@dataclass(frozen=True)
class StatisticsGate:
    """What the gate did: per site (rows, in input order) and column, the factor its
    statistics were scaled by."""

    factors: np.ndarray  # (n_sites, d), in (0, 1]

    def down_weighted(self, threshold: float = 0.999) -> list[list[int]]:
        """Per site, the columns whose weight the gate cut."""
        return [np.flatnonzero(row < threshold).tolist() for row in self.factors]


def site_moments(stats: SiteStatistics, edges: np.ndarray) -> Moments:
    """(count, mean, SD) per column, read off the site's histogram (negative noisy bins
    clipped): the same for an exact and a private release, and never from fields the
    histogram does not back."""
    n_bins = stats.histogram.shape[1]
    low, high = edges[:, 0], edges[:, -1]
    grid = np.linspace(0.0, 1.0, n_bins + 1)
    cuts = low[:, None] + (high - low)[:, None] * grid[None, :]
    mids = (cuts[:, :-1] + cuts[:, 1:]) / 2
    binary = (low == 0.0) & (high == 1.0)
    mids[binary, 0], mids[binary, -1] = 0.0, 1.0
    mass = np.maximum(stats.histogram, 0.0)
    count = mass.sum(axis=1)
    weights = mass / np.where(count > 0, count, 1.0)[:, None]
    mean = (weights * mids).sum(axis=1)
    sd = np.sqrt(np.maximum((weights * (mids - mean[:, None]) ** 2).sum(axis=1), 0.0))
    return count, mean, sd


def consistent(stats: SiteStatistics, edges: np.ndarray) -> SiteStatistics:
    """An exact release with ``total`` and ``total_sq`` clamped into the interval its
    histogram allows (each bin's values lie within the bin's edges); a private release
    (whose sums are derived from its histogram) is returned as is."""
    n_bins = stats.histogram.shape[1]
    if n_bins != DEFAULT_BINS:
        return stats
    hist = np.maximum(stats.histogram, 0.0)
    lo_e, hi_e = edges[:, :-1], edges[:, 1:]
    total = np.clip(stats.total, (hist * lo_e).sum(axis=1), (hist * hi_e).sum(axis=1))
    sq_lo = np.where((lo_e <= 0) & (hi_e >= 0), 0.0, np.minimum(lo_e**2, hi_e**2))
    sq_hi = np.maximum(lo_e**2, hi_e**2)
    total_sq = np.clip(stats.total_sq, (hist * sq_lo).sum(axis=1), (hist * sq_hi).sum(axis=1))
    return replace(stats, total=total, total_sq=total_sq)


def gate_factors(moments: Sequence[Moments], low: np.ndarray, high: np.ndarray
                 ) -> np.ndarray:
    """(n_sites, d) factors in (0, 1] from each site's :func:`site_moments`."""
    count, mean, sd = (np.array([m[k] for m in moments], dtype=np.float64) for k in range(3))
    width = np.asarray(high, dtype=np.float64) - np.asarray(low, dtype=np.float64)
    present = count >= 1
    factors = np.ones_like(count)
    binary = (np.asarray(low) == 0.0) & (np.asarray(high) == 1.0)
    for j in range(count.shape[1]):
        rows = np.flatnonzero(present[:, j])
        if rows.size == 0:
            continue
        n = count[rows, j]
        cap = COUNT_CAP * float(np.median(n))
        factor = np.minimum(1.0, cap / n)
        m = mean[rows, j]
        distance = _distance(m, SPREAD_FLOOR * width[j])
        if not binary[j]:
            log_sd = np.log(sd[rows, j] + SPREAD_FLOOR * width[j])
            distance = np.maximum(distance, _distance(log_sd, LOG_SD_FLOOR))
        factor = factor * np.minimum(1.0, (DISTANCE_K / np.maximum(distance, 1e-12)) ** 2)
        if not binary[j]:
            factor = factor * _second_moment_factor(m, sd[rows, j], SPREAD_FLOOR * width[j])
        factors[rows, j] = factor
    return factors


def _second_moment_factor(mean: np.ndarray, sd: np.ndarray, floor: float) -> np.ndarray:
    """Per site, ``min(1, SECOND_MOMENT_CAP / q)`` with ``q`` its second moment about the
    sites' median mean over the median site's: with the count cap, a site's pull on the
    merged variance is at most COUNT_CAP x SECOND_MOMENT_CAP times the median site's."""
    second = sd**2 + (mean - np.median(mean)) ** 2
    q = second / max(float(np.median(second)), floor**2)
    return np.minimum(1.0, SECOND_MOMENT_CAP / np.maximum(q, 1e-12))


def _distance(values: np.ndarray, floor: float) -> np.ndarray:
    centre = float(np.median(values))
    spread = max(_MAD_TO_SD * float(np.median(np.abs(values - centre))), floor)
    return np.abs(values - centre) / spread


def scaled(stats: SiteStatistics, factor: np.ndarray) -> SiteStatistics:
    """The release with every column's fields multiplied by its factor."""
    return SiteStatistics(count=stats.count * factor, total=stats.total * factor,
                          total_sq=stats.total_sq * factor,
                          n_missing=stats.n_missing * factor,
                          histogram=stats.histogram * factor[:, None])


def robust_site_statistics(stats: list[SiteStatistics], edges: np.ndarray
                           ) -> tuple[list[SiteStatistics], StatisticsGate]:
    """The sites' releases made consistent and scaled by the gate (see the module),
    ready for :func:`~cardiofed.data.preprocessing.merge_statistics`; `edges` are the
    finest edges among them (only the ranges and, for exact releases, the bins count)."""
    checked = [consistent(s, edges) for s in stats]
    moments = [site_moments(s, edges) for s in checked]
    factors = gate_factors(moments, edges[:, 0], edges[:, -1])
    return ([scaled(s, f) for s, f in zip(checked, factors, strict=True)],
            StatisticsGate(factors))
