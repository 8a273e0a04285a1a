"""Private preprocessing statistics: the Gaussian mechanism on a site's histograms and
record count, re-binning, and a merge that never crashes on noisy releases.

Statistical checks state their tolerance in standard errors (SE). The noise here is
drawn from seeded generators (``private_site_statistics`` takes the generator), so the
tests are deterministic; the tolerances would hold for any draw with overwhelming
probability, and the test through :class:`SitePrivacy` uses its secret source.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from cardiofed.algorithms.base import ClientUpdate
from cardiofed.data.preprocessing import (
    DEFAULT_BINS,
    PRIVATE_BINS,
    Preprocessor,
    SiteStatistics,
    bin_edges,
    histogram_median,
    merge_statistics,
    private_site_statistics,
    rebin,
    site_statistics,
    statistics_from_histogram,
    statistics_sensitivity,
)
from cardiofed.data.synthetic import synthetic_federation
from cardiofed.exceptions import ConfigurationError
from cardiofed.privacy.budget import PrivacyLedger, SiteBudget
from cardiofed.privacy.site_privacy import SitePrivacy
from cardiofed.simulation.prepare import prepare_federation

# Columns: total cholesterol (mg/dL), age (years), systolic BP (mmHg), a binary flag.
RANGES = [(70.0, 700.0), (18.0, 110.0), (60.0, 300.0), (0.0, 1.0)]
BINARY = np.array([False, False, False, True])


def site_rows(n: int, seed: int = 0) -> np.ndarray:
    """`n` rows of the four columns, about 10% of values missing."""
    rng = np.random.default_rng(seed)
    x = np.column_stack([rng.normal(210, 40, n), rng.normal(55, 12, n),
                         rng.normal(130, 20, n), (rng.random(n) < 0.3).astype(float)])
    x[rng.random(x.shape) < 0.1] = np.nan
    return x


# --- the mechanism ---------------------------------------------------------------------------

def test_sensitivity_is_one_bin_per_column_and_the_count() -> None:
    assert statistics_sensitivity(8) == 3.0
    assert statistics_sensitivity(3) == 2.0
    assert statistics_sensitivity(0) == 1.0


def test_histogram_noise_has_the_requested_std_per_bin() -> None:
    # The released histogram minus the exact one is pure noise: N(0, noise_std^2) in every
    # bin of every non-binary column. 3 columns x 16 bins x 100 releases = 4,800 draws:
    # the sample std has relative SE 1/sqrt(2 x 4800) = 1.0%, allow 5% (5 SE); the mean
    # has SE noise_std / sqrt(4800) = 0.014 noise_std, allow 0.07 noise_std (5 SE).
    x = site_rows(300)
    edges = bin_edges(RANGES, PRIVATE_BINS)
    exact = site_statistics(x, edges)
    rng = np.random.default_rng(1)
    noise_std = 3.0

    residuals, count_residuals = [], []
    for _ in range(100):
        stats, n_rows = private_site_statistics(x, edges, noise_std=noise_std, rng=rng)
        residuals.append((stats.histogram - exact.histogram)[~BINARY].ravel())
        count_residuals.append(n_rows - len(x))
    noise = np.concatenate(residuals)

    assert noise.size == 4800
    assert noise.std(ddof=1) == pytest.approx(noise_std, rel=0.05)
    assert abs(noise.mean()) < 0.07 * noise_std
    # The record count gets its own draw of the same noise: 100 draws, SE of the mean
    # 0.1 noise_std (allow 5 SE); the count is not rounded.
    assert abs(np.mean(count_residuals)) < 0.5 * noise_std
    assert len({round(c, 9) for c in count_residuals}) == 100


def test_released_statistics_derive_from_the_noisy_histogram_only() -> None:
    # Post-processing of the noisy histogram and count: no exact sum, sum of squares,
    # missing count or binary middle bin leaves the site.
    x = site_rows(200)
    edges = bin_edges(RANGES, PRIVATE_BINS)
    stats, n_rows = private_site_statistics(x, edges, noise_std=2.0,
                                            rng=np.random.default_rng(2))

    hist = stats.histogram
    assert hist.shape == (4, PRIVATE_BINS)
    assert np.all(hist[BINARY, 1:-1] == 0.0)  # a binary column: its two end bins only
    mids = (edges[:, :-1] + edges[:, 1:]) / 2
    within = np.where(BINARY[:, None], 0.0, (edges[:, 1:] - edges[:, :-1]) ** 2 / 12)
    np.testing.assert_allclose(stats.count, hist.sum(axis=1), rtol=1e-12)
    np.testing.assert_allclose(stats.total, (hist * mids).sum(axis=1), rtol=1e-12)
    np.testing.assert_allclose(stats.total_sq, (hist * (mids**2 + within)).sum(axis=1),
                               rtol=1e-12)
    np.testing.assert_allclose(stats.n_missing, np.maximum(n_rows - stats.count, 0.0),
                               rtol=1e-12)
    assert n_rows != len(x)  # noisy
    assert abs(n_rows - len(x)) < 5 * 2.0


@pytest.mark.parametrize("noise_std", [0.0, -1.0, math.inf, math.nan])
def test_noise_std_must_be_positive_and_finite(noise_std: float) -> None:
    with pytest.raises(ValueError, match=re.escape(
            f"The 'noise_std' parameter must be finite and > 0; got {noise_std!r}.")):
        private_site_statistics(site_rows(10), bin_edges(RANGES, PRIVATE_BINS),
                                noise_std=noise_std, rng=np.random.default_rng(0))


def test_a_site_releases_through_its_ledger_with_the_calibrated_noise() -> None:
    # Through SitePrivacy (secret noise): the histogram noise has std sigma x sqrt(d + 1),
    # sigma calibrated to the statistics share, and the release is charged. 20 columns
    # x 16 bins = 320 draws: the sample std has relative SE 4%, allow 20% (5 SE).
    rng = np.random.default_rng(3)
    d = 20
    x = rng.normal(0.0, 1.0, size=(500, d))
    edges = bin_edges([(-4.0, 4.0)] * d, PRIVATE_BINS)
    ledger = PrivacyLedger(site="a", budget=SiteBudget(epsilon_max=10.0), n_records=500)
    privacy = SitePrivacy(ledger=ledger, study="s1")

    stats = privacy.release_statistics(x, edges)

    [entry] = ledger.entries
    assert (entry["kind"], entry["study"], entry["what"]) == ("statistics", "s1",
                                                             "statistics release")
    sigma = float(entry["noise_multiplier"])  # type: ignore[arg-type]
    assert ledger.spent("statistics") == pytest.approx(0.1 * 10.0, rel=0.01)
    assert ledger.spent() <= ledger.target("statistics", "s1") + 1e-9
    noise = (stats.histogram - site_statistics(x, edges).histogram).ravel()
    assert noise.std(ddof=1) == pytest.approx(sigma * statistics_sensitivity(d), rel=0.20)
    # The noisy count is what the site declares as its sample size from now on.
    released = float(entry["released_n"])  # type: ignore[arg-type]
    assert privacy.released_n() == max(1, round(released))
    update = ClientUpdate(site="a", delta={}, num_samples=500, num_steps=1,
                          train_loss=0.3)
    declared = privacy.declare(update)
    assert declared.num_samples == privacy.released_n()
    assert math.isnan(declared.train_loss) and math.isnan(declared.global_loss)
    # A second statistics release of the study (the node refuses one, TaskPolicy) could
    # only use what is left of the statistics share: far more noise, total still within.
    privacy.release_statistics(x, edges)
    assert float(ledger.entries[-1]["noise_multiplier"]) > 10 * sigma  # type: ignore[arg-type]
    assert ledger.spent() <= ledger.target("statistics", "s1") + 1e-9


def test_a_site_without_a_statistics_release_declares_its_update_unchanged_but_lossless(
        ) -> None:
    privacy = SitePrivacy(ledger=PrivacyLedger(site="a", budget=SiteBudget(epsilon_max=1.0),
                                               n_records=50), study="s1")
    assert privacy.released_n() is None

    declared = privacy.declare(ClientUpdate(site="a", delta={}, num_samples=50, num_steps=1,
                                            train_loss=0.3))

    assert declared.num_samples == 50 and math.isnan(declared.train_loss)


# --- rebin -----------------------------------------------------------------------------------

def test_rebin_sums_adjacent_bins() -> None:
    hist = np.arange(24, dtype=float).reshape(2, 12)

    coarse = rebin(hist, 4)

    np.testing.assert_array_equal(coarse, [[3, 12, 21, 30], [39, 48, 57, 66]])
    np.testing.assert_array_equal(coarse.sum(axis=1), hist.sum(axis=1))
    np.testing.assert_array_equal(rebin(hist, 12), hist)
    np.testing.assert_array_equal(rebin(hist, 1), hist.sum(axis=1, keepdims=True))


def test_rebin_of_exact_statistics_equals_the_coarse_histogram() -> None:
    # DEFAULT_BINS is a multiple of PRIVATE_BINS and the edges nest, so re-binning an
    # exact release gives the histogram over the coarse edges.
    assert DEFAULT_BINS % PRIVATE_BINS == 0
    x = site_rows(500)
    fine = site_statistics(x, bin_edges(RANGES, DEFAULT_BINS)).histogram
    coarse = site_statistics(x, bin_edges(RANGES, PRIVATE_BINS)).histogram

    np.testing.assert_array_equal(rebin(fine, PRIVATE_BINS), coarse)


@pytest.mark.parametrize(("n_bins", "message"), [
    (5, "Cannot re-bin 12 bins into 5: 12 is not a multiple."),
    (24, "Cannot re-bin 12 bins into 24: 12 is not a multiple."),
    (0, "Cannot re-bin 12 bins into 0: 12 is not a multiple."),
])
def test_rebin_refuses_a_bin_count_that_does_not_divide(n_bins: int, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        rebin(np.ones((2, 12)), n_bins)


# --- merging ---------------------------------------------------------------------------------

def merge_before_rework(stats: list[SiteStatistics], edges: np.ndarray) -> Preprocessor:
    """merge_statistics as it was before private releases existed (exact releases only)."""
    count = np.sum([s.count for s in stats], axis=0)
    total = np.sum([s.total for s in stats], axis=0)
    total_sq = np.sum([s.total_sq for s in stats], axis=0)
    hist = np.sum([s.histogram for s in stats], axis=0)
    mean = total / count
    var = np.maximum(total_sq - count * mean**2, 0.0) / np.maximum(count - 1, 1)
    return Preprocessor(fill=histogram_median(hist, edges), mean=mean, std=np.sqrt(var))


def test_merge_of_exact_releases_is_unchanged() -> None:
    sites = [site_rows(n, seed=k) for k, n in enumerate([7, 40, 123, 310])]
    edges = bin_edges(RANGES)
    stats = [site_statistics(x, edges) for x in sites]

    merged = merge_statistics(stats, edges)

    before = merge_before_rework(stats, edges)
    np.testing.assert_array_equal(merged.mean, before.mean)
    np.testing.assert_array_equal(merged.std, before.std)
    np.testing.assert_array_equal(merged.fill, before.fill)
    pooled = np.vstack(sites)
    np.testing.assert_allclose(merged.mean, np.nanmean(pooled, axis=0), rtol=1e-12)
    np.testing.assert_allclose(merged.std, np.nanstd(pooled, axis=0, ddof=1), rtol=1e-10)


def test_private_and_exact_releases_merge_at_the_coarser_bins() -> None:
    edges = bin_edges(RANGES)
    exact = site_statistics(site_rows(400, seed=1), edges)
    private, _ = private_site_statistics(site_rows(400, seed=2), bin_edges(RANGES, PRIVATE_BINS),
                                         noise_std=1.0, rng=np.random.default_rng(4))

    merged = merge_statistics([exact, private], edges)

    low, high = np.array(RANGES).T
    assert np.all(np.isfinite(merged.mean)) and np.all((low <= merged.mean)
                                                       & (merged.mean <= high))
    assert np.all(merged.std > 0) and np.all(np.isfinite(merged.std))
    assert np.all((low <= merged.fill) & (merged.fill <= high))
    pooled = np.vstack([site_rows(400, seed=1), site_rows(400, seed=2)])
    # 800 rows and little noise: close to the pooled values (the median to about one
    # coarse bin; the mean and SD to a fraction of one).
    width = (high - low) / PRIVATE_BINS
    assert np.all(np.abs(merged.fill - np.nanmedian(pooled, axis=0)) <= width)
    continuous = ~BINARY
    assert np.all(np.abs(merged.mean - np.nanmean(pooled, axis=0))[continuous]
                  < width[continuous] / 2)


@pytest.mark.parametrize("noise_std", [0.3, 3.0, 30.0])
def test_noisy_merge_never_crashes_even_when_counts_are_tiny(noise_std: float) -> None:
    # One to four rows per site: noisy counts are often negative, sums meaningless. The
    # merged preprocessor must still be usable: finite mean inside each range, finite
    # fill, finite and positive SD for every non-binary column (a binary column that looks
    # constant may be only centred, like a constant column of an exact release), and
    # finite standardised values.
    edges = bin_edges(RANGES)
    private_edges = bin_edges(RANGES, PRIVATE_BINS)
    low, high = np.array(RANGES).T
    rng = np.random.default_rng(5)
    for trial in range(100):
        sites = [site_rows(int(rng.integers(1, 5)), seed=1000 * trial + k) for k in range(3)]
        stats = [private_site_statistics(x, private_edges, noise_std=noise_std, rng=rng)[0]
                 for x in sites]

        merged = merge_statistics(stats, edges)

        assert np.all(np.isfinite(merged.mean)), trial
        assert np.all((low <= merged.mean) & (merged.mean <= high)), trial
        assert np.all(np.isfinite(merged.std) & (merged.std >= 0)), trial
        assert np.all(merged.std[~BINARY] > 0), (trial, merged.std)
        assert np.all(np.isfinite(merged.fill)), trial
        assert np.all((low <= merged.fill) & (merged.fill <= high)), trial
        assert np.all(np.isfinite(merged.transform(np.vstack(sites)))), trial


def test_a_column_with_no_noisy_mass_falls_back_to_the_range() -> None:
    # Every bin of the first column came out negative: its merged count is below 1, so
    # mean and SD are the range's midpoint and a quarter of its width (data-independent).
    edges = bin_edges(RANGES, PRIVATE_BINS)
    stats, _ = private_site_statistics(site_rows(200), edges, noise_std=1.0,
                                       rng=np.random.default_rng(6))
    hist = stats.histogram.copy()
    hist[0] = -0.5
    mids = (edges[:, :-1] + edges[:, 1:]) / 2
    drained = SiteStatistics(count=hist.sum(axis=1), total=(hist * mids).sum(axis=1),
                             total_sq=(hist * mids**2).sum(axis=1),
                             n_missing=stats.n_missing, histogram=hist)

    merged = merge_statistics([drained], bin_edges(RANGES))

    assert merged.mean[0] == (70.0 + 700.0) / 2
    assert merged.std[0] == (700.0 - 70.0) / 4
    assert 70.0 <= merged.fill[0] <= 700.0
    assert np.all(merged.std[1:3] > 0)  # the other columns keep their own values


# --- the federation's statistics under DP ------------------------------------------------------

def test_private_statistics_need_global_standardisation_without_covariate_shift() -> None:
    fed = synthetic_federation(n_sites=2, seed=1, size_scale=0.1)
    privacy = {s.name: SitePrivacy(ledger=PrivacyLedger(
        site=s.name, budget=SiteBudget(epsilon_max=1.0), n_records=s.n_train), study="s")
        for s in fed.sites}

    for kwargs in ({"standardisation": "per-site"}, {"covariate_shift": True}):
        with pytest.raises(ConfigurationError, match=re.escape(
                "Private statistics support global standardisation only, without "
                "covariate_shift.")):
            prepare_federation(fed, privacy=privacy, **kwargs)  # type: ignore[arg-type]
    assert all(p.ledger.entries == [] for p in privacy.values())  # nothing released


def test_each_site_releases_its_statistics_once_through_its_ledger() -> None:
    fed = synthetic_federation(n_sites=3, seed=1, size_scale=0.2)
    privacy = {s.name: SitePrivacy(ledger=PrivacyLedger(
        site=s.name, budget=SiteBudget(epsilon_max=1.0), n_records=s.n_train), study="s")
        for s in fed.sites}

    sites = prepare_federation(fed, "global", privacy=privacy)

    for s in sites:
        ledger = privacy[s.name].ledger
        assert [e["kind"] for e in ledger.entries] == ["statistics"]
        assert ledger.spent() <= 0.1 * 1.0 + 1e-9
        assert np.all(np.isfinite(s.x_train)) and np.all(np.isfinite(s.x_test))
    # One merged preprocessor for all.
    first = sites[0].preprocessor
    for s in sites[1:]:
        np.testing.assert_array_equal(s.preprocessor.mean, first.mean)


def test_a_binary_columns_private_mean_is_its_prevalence_not_a_bin_midpoint() -> None:
    # 400 rows, 25% ones; noise 0.01 per bin is negligible: the merged mean must be 0.25
    # (bin midpoints 1/32 and 31/32 would give 0.266) and the SD sqrt(0.25 * 0.75).
    x = np.zeros((400, 1))
    x[:100, 0] = 1.0
    edges = bin_edges([(0.0, 1.0)], PRIVATE_BINS)
    stats, _ = private_site_statistics(x, edges, noise_std=0.01,
                                       rng=np.random.default_rng(0))

    pre = merge_statistics([stats], bin_edges([(0.0, 1.0)]))

    assert pre.mean[0] == pytest.approx(0.25, abs=1e-3)
    assert pre.std[0] == pytest.approx(math.sqrt(0.25 * 0.75), abs=1e-3)


def test_a_private_merge_never_leaves_a_continuous_column_unscaled() -> None:
    """All of a noisy histogram's mass in one bin (the rest clipped away) gives that
    bin's own spread, not an SD of 0 (which would leave the column unscaled); a 0/1
    column keeps its own."""
    edges = bin_edges(RANGES, PRIVATE_BINS)
    hist = np.zeros((len(RANGES), PRIVATE_BINS))
    hist[:, 3] = 50.0
    hist[3, :] = 0.0
    hist[3, 0] = 50.0  # a 0/1 column that is always 0
    stats = statistics_from_histogram(hist, edges, 50.0)
    merged = merge_statistics([stats], bin_edges(RANGES))
    widths = (edges[:, 1] - edges[:, 0])[:3]
    np.testing.assert_allclose(merged.std[:3], widths / math.sqrt(12))
    assert merged.std[3] == 0.0
