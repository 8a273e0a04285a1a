"""The statistics gate: one site cannot move the federation's means, SDs or fills far."""

from __future__ import annotations

from functools import cache

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cardiofed.aggregation.robust_statistics import (
    consistent,
    robust_site_statistics,
)
from cardiofed.data.preprocessing import (
    DEFAULT_BINS,
    SiteStatistics,
    bin_edges,
    merge_statistics,
    site_statistics,
)
from cardiofed.data.synthetic import synthetic_federation


@cache
def _federation() -> tuple[list[SiteStatistics], np.ndarray, list[str]]:
    data = synthetic_federation(8, seed=0)
    edges = bin_edges(data.feature_ranges)
    return [site_statistics(s.x_train, edges) for s in data.sites], edges, data.feature_names


def _merged(stats: list[SiteStatistics], edges: np.ndarray, robust: bool = True):
    if robust:
        stats = robust_site_statistics(stats, edges)[0]
    return merge_statistics(stats, edges)


def _release(edges: np.ndarray, bins: list[list[int]], records: float,
             skew: float) -> SiteStatistics:
    """A release that passes the coordinator's checks: `records` in the given bins."""
    d = len(edges)
    hist = np.zeros((d, DEFAULT_BINS))
    for j in range(d):
        chosen = bins[j % len(bins)]
        hist[j, chosen] = np.floor(records / len(chosen))
    mids = (edges[:, :-1] + edges[:, 1:]) / 2
    count = hist.sum(axis=1)
    low, high = edges[:, 0], edges[:, -1]
    total = count * (low + skew * (high - low))  # any total inside count x range
    return SiteStatistics(count=count, total=total,
                          total_sq=(hist * mids**2).sum(axis=1) * (1 + 100 * skew),
                          n_missing=count.max() - count, histogram=hist)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(victim=st.integers(0, 7),
       bins=st.lists(st.lists(st.integers(0, DEFAULT_BINS - 1), min_size=1, max_size=3),
                     min_size=1, max_size=4),
       records=st.sampled_from([1.0, 50.0, 300.0, 3_000.0, 1e7]),
       skew=st.floats(0.0, 1.0))
def test_one_site_of_eight_moves_no_mean_or_sd_far(victim, bins, records, skew) -> None:
    stats, edges, _ = _federation()
    clean = _merged(stats, edges)
    attacked = list(stats)
    attacked[victim] = _release(edges, bins, records, skew)
    merged = _merged(attacked, edges)
    width = edges[:, -1] - edges[:, 0]
    assert np.max(np.abs(merged.mean - clean.mean) / width) <= 0.12
    assert np.max(np.abs(merged.std / clean.std - 1)) <= 0.30  # 0.45 before the
    # second-moment cap (a release split between both ends of a range)
    continuous = width > 1  # a 0/1 column's fill is its majority category, and sex is 50:50
    assert np.max(np.abs(merged.fill - clean.fill)[continuous] / width[continuous]) <= 0.10


def test_without_the_gate_the_same_site_owns_every_mean() -> None:
    stats, edges, _ = _federation()
    attacked = [*stats[:-1], _release(edges, [[DEFAULT_BINS - 1]], 1e7, 1.0)]
    width = edges[:, -1] - edges[:, 0]
    plain = _merged(attacked, edges, robust=False)
    assert np.max(np.abs(plain.mean - _merged(stats, edges, robust=False).mean) / width) > 0.5
    gated = _merged(attacked, edges)
    assert np.max(np.abs(gated.mean - _merged(stats, edges).mean) / width) < 0.10


def test_similar_sites_keep_their_full_weight_and_the_merge_is_pooled() -> None:
    rng = np.random.default_rng(0)
    edges = bin_edges([(18, 110), (70, 700), (0.0, 1.0)])
    rows = [np.column_stack([rng.normal(55, 10, n), rng.normal(210, 40, n),
                             rng.random(n) < 0.3]) for n in (300, 250, 400, 350, 280)]
    stats = [site_statistics(x, edges) for x in rows]
    gated, gate = robust_site_statistics(stats, edges)
    assert gate.down_weighted() == [[]] * 5
    pooled = np.concatenate(rows)
    merged = merge_statistics(gated, edges)
    np.testing.assert_allclose(merged.mean, pooled.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(merged.std, pooled.std(axis=0, ddof=1), rtol=1e-10)


def test_a_total_its_histogram_cannot_back_is_clamped() -> None:
    stats, edges, _ = _federation()
    honest = stats[0]
    forged = SiteStatistics(count=honest.count, total=honest.total * 1.5,
                            total_sq=honest.total_sq * 1e6, n_missing=honest.n_missing,
                            histogram=honest.histogram)
    fixed = consistent(forged, edges)
    width = edges[:, 1] - edges[:, 0]
    assert np.all(np.abs(fixed.total - honest.total) <= honest.count * width + 1e-6)
    assert np.all(fixed.total_sq <= honest.total_sq * 1.1 + 1e-6)
    assert consistent(honest, edges).total == pytest.approx(honest.total)


def test_the_gate_names_the_site_and_columns_it_cut() -> None:
    stats, edges, names = _federation()
    attacked = [*stats[:-1], _release(edges, [[DEFAULT_BINS - 1]], 1e7, 1.0)]
    _, gate = robust_site_statistics(attacked, edges)
    cut = gate.down_weighted()
    assert len(cut[-1]) == len(names)
    assert gate.factors[-1].max() < 0.5


def test_a_release_at_both_ends_of_a_range_moves_no_sd_far() -> None:
    # Honest sites whose SDs differ (3 to 24) hide a spread release from the log-SD
    # distance; half of 10,000,000 records at each end (SD 50) then moved the merged SD
    # by 73%. Its second moment is about 14 times the median site's, so its weight is
    # cut until its pull on the variance is at most 4 times the median site's.
    rng = np.random.default_rng(0)
    edges = bin_edges([(0.0, 100.0)])
    stats = [site_statistics(np.clip(rng.normal(50, sd, (300, 1)), 0, 100), edges)
             for sd in (3, 6, 9, 12, 15, 18, 21, 24)]
    attacked = [*stats[:-1], _release(edges, [[0, DEFAULT_BINS - 1]], 1e7, 0.5)]
    clean, merged = _merged(stats, edges), _merged(attacked, edges)
    assert abs(merged.std[0] / clean.std[0] - 1) <= 0.30
    plain = _merged(attacked, edges, robust=False)
    assert plain.std[0] / _merged(stats, edges, robust=False).std[0] > 2
