"""Federated preprocessing: merged site statistics equal pooled ones, without rows."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest

from cardiofed.data.dataset import FederatedDataset, SiteData
from cardiofed.data.preprocessing import (
    DEFAULT_BINS,
    Preprocessor,
    SiteStatistics,
    bin_edges,
    merge_statistics,
    site_statistics,
)
from cardiofed.exceptions import ConfigurationError, DataValidationError
from cardiofed.simulation.prepare import prepare_federation, prepare_local_only

# Columns: total cholesterol (mg/dL), age (years), a binary flag.
RANGES = [(70.0, 700.0), (18.0, 110.0), (0.0, 1.0)]
SITE_SIZES = [7, 40, 123, 310, 1000]


@pytest.fixture(scope="module")
def site_arrays() -> list[np.ndarray]:
    """Five sites of different sizes, about 15% of values missing (NaN) at random."""
    rng = np.random.default_rng(0)
    sites = []
    for n in SITE_SIZES:
        x = np.column_stack([rng.normal(210, 40, n), rng.normal(55, 12, n),
                             (rng.random(n) < 0.3).astype(float)])
        x[rng.random(x.shape) < 0.15] = np.nan
        sites.append(x)
    return sites


@pytest.fixture(scope="module")
def merged(site_arrays: list[np.ndarray]) -> Preprocessor:
    edges = bin_edges(RANGES)
    return merge_statistics([site_statistics(x, edges) for x in site_arrays], edges)


def observed(site_arrays: list[np.ndarray], j: int) -> np.ndarray:
    col = np.concatenate([x[:, j] for x in site_arrays])
    return col[~np.isnan(col)]


def test_merged_mean_and_std_equal_pooled_statistics(site_arrays: list[np.ndarray],
                                                     merged: Preprocessor) -> None:
    for j in range(len(RANGES)):
        values = observed(site_arrays, j)
        # Exact up to floating-point rounding: rtol 1e-10.
        assert merged.mean[j] == pytest.approx(values.mean(), rel=1e-10)
        assert merged.std[j] == pytest.approx(values.std(ddof=1), rel=1e-10)


def test_histogram_median_within_one_bin_width_of_pooled_median(
        site_arrays: list[np.ndarray], merged: Preprocessor) -> None:
    pooled = np.concatenate(site_arrays)
    for j in (0, 1):  # continuous columns
        low, high = RANGES[j]
        width = (high - low) / DEFAULT_BINS
        assert abs(merged.fill[j] - np.nanmedian(pooled[:, j])) <= width


def test_binary_column_is_filled_with_its_majority_category(merged: Preprocessor) -> None:
    # About 30% ones: the fill is the category 0, not an interpolated midpoint.
    assert merged.fill[2] == 0.0


def test_binary_majority_of_ones_fills_with_one() -> None:
    edges = bin_edges([(0.0, 1.0)])
    x = np.array([[1.0], [1.0], [0.0], [np.nan], [1.0]])

    pre = merge_statistics([site_statistics(x, edges)], edges)

    assert pre.fill.tolist() == [1.0]


def test_median_of_an_even_count_split_across_distant_bins() -> None:
    # Pooled median of 100, 100, 300, 300 is 200: the two middle values lie in bins far
    # apart, and the estimate must still be within one bin width of it.
    edges = bin_edges([(70.0, 700.0)])
    stats = [site_statistics(np.array([[100.0], [300.0]]), edges),
             site_statistics(np.array([[100.0], [300.0]]), edges)]

    pre = merge_statistics(stats, edges)

    assert abs(pre.fill[0] - 200.0) <= (700.0 - 70.0) / DEFAULT_BINS


def test_column_never_observed_at_any_site_is_an_error() -> None:
    edges = bin_edges(RANGES)
    x = np.array([[200.0, np.nan, 1.0], [220.0, np.nan, 0.0]])

    with pytest.raises(DataValidationError, match=re.escape(
            "Columns [1] have no observed value at any site: every site's export")):
        merge_statistics([site_statistics(x, edges), site_statistics(x[:1], edges)], edges)


def test_a_column_no_site_records_is_a_clean_command_line_error(tmp_path: Path) -> None:
    """No traceback from any command on bad data: the error names the column."""
    from typer.testing import CliRunner

    from cardiofed.cli import app

    csv = tmp_path / "a.csv"
    csv.write_text("AGE,SEX,Y\n,M,1\n,F,0\n,M,0\n,F,1\n")
    mapping = tmp_path / "a.toml"
    mapping.write_text('site = "a"\noutcome = "chd_10y"\n[label]\ncolumn = "Y"\n'
                       '[columns.age]\nsource = "AGE"\n[columns.sex]\nsource = "SEX"\n'
                       'codes = { M = "male", F = "female" }\n')
    result = CliRunner().invoke(app, ["simulate", "--dataset", "csv", "--csv", str(csv),
                                      "--mapping", str(mapping), "--rounds", "1",
                                      "--no-effective-data", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2, result.output
    assert "['age'] have no observed value at any site" in result.output
    assert "Traceback" not in result.output


def test_merge_needs_at_least_one_site() -> None:
    with pytest.raises(ValueError, match="at least one site"):
        merge_statistics([], bin_edges(RANGES))


def test_site_statistics_release_only_aggregates(site_arrays: list[np.ndarray]) -> None:
    x = site_arrays[3]  # 310 rows, 3 columns
    d = x.shape[1]
    edges = bin_edges(RANGES, n_bins=16)

    stats = site_statistics(x, edges)

    shapes = {k: v.shape for k, v in stats.to_arrays().items()}
    assert shapes == {"count": (d,), "total": (d,), "total_sq": (d,), "n_missing": (d,),
                      "histogram": (d, 16)}
    assert {f.name for f in dataclasses.fields(SiteStatistics)} == set(shapes)
    assert not any(len(x) in v.shape for v in stats.to_arrays().values())  # no row axis
    np.testing.assert_array_equal(stats.count + stats.n_missing, [len(x)] * d)
    np.testing.assert_array_equal(stats.histogram.sum(axis=1), stats.count)


def test_site_statistics_rejects_a_wrong_width() -> None:
    with pytest.raises(ValueError, match=re.escape("x must be (n, 3); got (4, 2).")):
        site_statistics(np.zeros((4, 2)), bin_edges(RANGES))


def test_preprocessor_fills_then_standardises() -> None:
    pre = Preprocessor(fill=np.array([5.0, 0.0]), mean=np.array([4.0, 1.0]),
                       std=np.array([2.0, 0.5]))
    x = np.array([[np.nan, 2.0], [8.0, np.nan]])

    out = pre.transform(x)

    # (value - mean) / std; NaN replaced by the fill first.
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.5, 2.0], [2.0, -2.0]], rtol=1e-6)


def test_preprocessor_maps_a_constant_column_to_zero() -> None:
    pre = Preprocessor(fill=np.array([3.0]), mean=np.array([3.0]), std=np.array([0.0]))

    out = pre.transform(np.array([[3.0], [np.nan]]))

    np.testing.assert_array_equal(out, [[0.0], [0.0]])


# --- Standardisation of a federation ------------------------------------------------------

def test_per_site_standardisation_centres_and_scales_each_site(
        small_federation: FederatedDataset) -> None:
    prepared = prepare_federation(small_federation, "per-site")

    for site in prepared:
        x = site.x_train.astype(np.float64)
        assert not np.isnan(x).any()
        # Each site's own training mean and sample std: tolerance 1e-5 (float32 output).
        np.testing.assert_allclose(x.mean(axis=0), 0.0, atol=1e-5)
        std = x.std(axis=0, ddof=1)
        constant = site.preprocessor.std == 0
        np.testing.assert_allclose(std[~constant], 1.0, atol=1e-5)
        np.testing.assert_array_equal(std[constant], 0.0)


def test_per_site_standardisation_fills_with_the_federated_median(
        small_federation: FederatedDataset) -> None:
    global_sites = prepare_federation(small_federation, "global")
    per_site = prepare_federation(small_federation, "per-site")

    for g, p in zip(global_sites, per_site, strict=True):
        np.testing.assert_array_equal(g.preprocessor.fill, p.preprocessor.fill)


def test_global_standardisation_equals_pooled_standardisation(
        small_federation: FederatedDataset) -> None:
    pooled = np.concatenate([s.x_train for s in small_federation.sites])
    mean = np.nanmean(pooled, axis=0)
    std = np.nanstd(pooled, axis=0, ddof=1)

    prepared = prepare_federation(small_federation, "global")

    for site, raw in zip(prepared, small_federation.sites, strict=True):
        np.testing.assert_allclose(site.preprocessor.mean, mean, rtol=1e-10)
        np.testing.assert_allclose(site.preprocessor.std, std, rtol=1e-10)
        filled = np.where(np.isnan(raw.x_train), site.preprocessor.fill, raw.x_train)
        np.testing.assert_allclose(site.x_train, (filled - mean) / std, rtol=1e-5, atol=1e-5)
        assert site.x_train.dtype == np.float32
        assert not np.isnan(site.x_test).any()


def test_unknown_standardisation_is_a_configuration_error(
        small_federation: FederatedDataset) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(
            "The 'standardisation' parameter must be 'global' or 'per-site'; "
            "got 'per-centre'.")):
        prepare_federation(small_federation, "per-centre")  # type: ignore[arg-type]


def test_local_only_site_that_never_records_a_column(
        small_federation: FederatedDataset) -> None:
    site = small_federation.sites[2]
    j = small_federation.feature_names.index("total_cholesterol")
    x_train, x_test = site.x_train.copy(), site.x_test.copy()
    x_train[:, j] = np.nan  # this clinic never measures total cholesterol
    x_test[:, j] = np.nan
    blind = dataclasses.replace(site, x_train=x_train, x_test=x_test)

    prepared = prepare_local_only(blind, small_federation.feature_ranges)

    assert np.isfinite(prepared.x_train).all()
    assert np.isfinite(prepared.x_test).all()
    # The column is constant, so it standardises to 0 and carries no signal.
    np.testing.assert_array_equal(prepared.x_train[:, j], 0.0)
    np.testing.assert_array_equal(prepared.x_test[:, j], 0.0)


def test_local_only_single_row_site() -> None:
    # One training row: no spread to estimate, so every training column standardises to 0.
    site = SiteData(name="tiny", site_type="community", x_train=np.array([[200.0, np.nan]]),
                    y_train=np.array([1]), x_test=np.array([[200.0, np.nan]]),
                    y_test=np.array([0]))

    prepared = prepare_local_only(site, RANGES[:2])

    np.testing.assert_array_equal(prepared.x_train, [[0.0, 0.0]])
    np.testing.assert_array_equal(prepared.x_test, [[0.0, 0.0]])


def test_constant_training_column_keeps_other_test_values_finite() -> None:
    # A site whose training column is constant (std 0) must not blow up a test row
    # that differs from that constant: the column is centred, not divided by ~0.
    pre = Preprocessor(fill=np.array([0.0]), mean=np.array([5.0]), std=np.array([0.0]))
    np.testing.assert_allclose(pre.transform(np.array([[5.0], [7.0]])), [[0.0], [2.0]])
