"""Covariate-shift importance weights from federated histograms."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cardiofed.aggregation.covariate_shift import continuous_columns, covariate_weights
from cardiofed.data.preprocessing import bin_edges, site_statistics
from cardiofed.data.synthetic import synthetic_federation
from cardiofed.exceptions import ConfigurationError


def test_weights_by_hand_on_a_tiny_histogram() -> None:
    # One column on [0, 4] with 4 bins (coarse_bins=4 keeps them), smoothing 1.
    edges = np.array([[0.0, 1.0, 2.0, 3.0, 4.0]])
    site = np.array([[3.0, 1.0, 0.0, 0.0]])     # +1 -> (4, 2, 1, 1)/8
    glob = np.array([[3.0, 3.0, 3.0, 3.0]])     # +1 -> (4, 4, 4, 4)/16
    x = np.array([[0.5], [1.5], [3.9], [np.nan]])

    w = covariate_weights(x, site, glob, edges, columns=[0], coarse_bins=4, clip=(0.1, 10.0))

    # ratios p_global / p_site: bin 0: (4/16)/(4/8) = 0.5; bin 1: (4/16)/(2/8) = 1;
    # bin 3: (4/16)/(1/8) = 2; missing: 1. Mean of (0.5, 1, 2, 1) = 1.125.
    np.testing.assert_allclose(w, np.array([0.5, 1.0, 2.0, 1.0]) / 1.125)
    assert w.mean() == pytest.approx(1.0)


def test_product_over_columns_and_clipping_by_hand() -> None:
    edges = np.array([[0.0, 1.0, 2.0], [0.0, 1.0, 2.0]])
    site = np.array([[7.0, 1.0], [7.0, 1.0]])   # +1 -> (8, 2)/10 in both columns
    glob = np.array([[1.0, 7.0], [1.0, 7.0]])   # +1 -> (2, 8)/10
    x = np.array([[0.5, 0.5], [1.5, 1.5], [1.5, 0.5]])

    w = covariate_weights(x, site, glob, edges, columns=[0, 1], coarse_bins=2, clip=(0.2, 5.0))

    # ratio bin 0 = 2/8 = 1/4, bin 1 = 8/2 = 4.
    # row 0: 1/16 -> clipped to 0.2; row 1: 16 -> clipped to 5; row 2: 4 * 1/4 = 1.
    # mean (0.2 + 5 + 1)/3 = 6.2/3
    np.testing.assert_allclose(w, np.array([0.2, 5.0, 1.0]) / (6.2 / 3))


def test_coarsening_sums_adjacent_bins() -> None:
    # 20 fine bins on [0, 20] -> 10 coarse bins of width 2. The site has all its mass in
    # fine bin 0, the global histogram in fine bin 1: the same coarse bin, so ratio 1.
    edges = bin_edges([(0.0, 20.0)], n_bins=20)
    site = np.zeros((1, 20))
    site[0, 0] = 50
    glob = np.zeros((1, 20))
    glob[0, 1] = 50
    w = covariate_weights(np.array([[0.5], [1.5]]), site, glob, edges, columns=[0])
    np.testing.assert_allclose(w, [1.0, 1.0])


def test_default_columns_skip_binary_ones() -> None:
    edges = bin_edges([(30.0, 80.0), (0.0, 1.0), (0.0, 1.0), (90.0, 220.0)])
    assert continuous_columns(edges) == [0, 3]


def _shifted_federation() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Three sites with ages N(45), N(55), N(65); the site of interest is the oldest."""
    rng = np.random.default_rng(0)
    edges = bin_edges([(20.0, 100.0), (0.0, 1.0)])
    xs = []
    for mean in (45.0, 55.0, 65.0):
        age = rng.normal(mean, 8.0, 2000)
        male = (rng.random(2000) < 0.5).astype(float)
        xs.append(np.column_stack([age, male]))
    xs[2][rng.random(2000) < 0.05, 0] = np.nan  # some missing ages at the site
    glob = sum(site_statistics(x, edges).histogram for x in xs)
    return xs[2], site_statistics(xs[2], edges).histogram, np.asarray(glob), edges


def test_shifted_site_is_weighted_toward_the_global_distribution() -> None:
    x, site_hist, glob_hist, edges = _shifted_federation()
    w = covariate_weights(x, site_hist, glob_hist, edges)

    age = x[:, 0]
    seen = ~np.isnan(age)
    global_mean = 55.0
    plain = float(age[seen].mean())
    weighted = float(np.average(age[seen], weights=w[seen]))
    # The site's mean age (~65) moves most of the way toward the federation's (~55).
    assert plain > 64
    assert weighted < plain - 5
    assert abs(weighted - global_mean) < abs(plain - global_mean) / 2
    # The weighted histogram is closer to the global one (total variation distance).
    h_site = np.histogram(age[seen], bins=edges[0, ::16])[0]
    h_weighted = np.histogram(age[seen], bins=edges[0, ::16], weights=w[seen])[0]
    h_glob = glob_hist[0].reshape(-1, 16).sum(axis=1)

    def tv(h: np.ndarray) -> float:
        return 0.5 * float(np.abs(h / h.sum() - h_glob / h_glob.sum()).sum())

    assert tv(h_weighted) < tv(h_site) / 2
    # Mean 1, clipped (before normalisation, to [0.2, 5]), missing age -> ratio 1
    # (the binary column is not used by default).
    assert w.mean() == pytest.approx(1.0)
    assert w.max() / w.min() <= 25.0 + 1e-9
    assert np.all(w > 0)
    np.testing.assert_allclose(w[~seen], w[~seen][0])


def test_the_federation_itself_gets_weights_one() -> None:
    x, _, _, edges = _shifted_federation()
    hist = site_statistics(x, edges).histogram
    np.testing.assert_allclose(covariate_weights(x, hist, hist, edges), 1.0)


def test_synthetic_community_clinic_is_weighted_toward_the_federation() -> None:
    fed = synthetic_federation(seed=0)
    edges = bin_edges(fed.feature_ranges)
    hists = [site_statistics(s.x_train, edges).histogram for s in fed.sites]
    glob = np.sum(hists, axis=0)
    k = [s.name for s in fed.sites].index("community_01")
    x = fed.sites[k].x_train

    w = covariate_weights(x, hists[k], glob, edges)

    age = fed.feature_names.index("age")
    pooled = np.concatenate([s.x_train[:, age] for s in fed.sites])
    plain, weighted = x[:, age].mean(), np.average(x[:, age], weights=w)
    assert abs(weighted - pooled.mean()) < abs(plain - pooled.mean()) * 0.75
    assert w.mean() == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"clip": (0.0, 5.0)}, ConfigurationError, r"'clip' parameter .* got \(0.0, 5.0\)"),
        ({"clip": (1.5, 5.0)}, ConfigurationError, "'clip'"),
        ({"clip": (0.2,)}, ConfigurationError, "'clip'"),
        ({"smoothing": 0.0}, ConfigurationError, "'smoothing' parameter must be .* got 0.0"),
        ({"coarse_bins": 0}, ConfigurationError, "'coarse_bins'"),
        ({"columns": [5]}, ConfigurationError, r"'columns' .* \[0, 2\)"),
        ({"columns": [0, 0]}, ConfigurationError, "repeat"),
    ],
)
def test_covariate_weights_validation(kwargs: dict[str, object], error: type[Exception],
                                      match: str) -> None:
    edges = bin_edges([(0.0, 10.0), (0.0, 1.0)], n_bins=20)
    x = np.array([[1.0, 0.0], [2.0, 1.0]])
    hist = site_statistics(x, edges).histogram
    with pytest.raises(error, match=match):
        covariate_weights(x, hist, hist, edges, **kwargs)  # type: ignore[arg-type]


def test_covariate_weights_shape_validation() -> None:
    edges = bin_edges([(0.0, 10.0), (0.0, 1.0)], n_bins=20)
    x = np.array([[1.0, 0.0]])
    hist = site_statistics(x, edges).histogram
    with pytest.raises(ValueError, match=r"site_hist must have shape .* \(2, 20\)"):
        covariate_weights(x, hist[:, :10], hist, edges)
    with pytest.raises(ValueError, match=r"x_site must be \(n >= 1, 2\)"):
        covariate_weights(x[:, :1], hist, hist, edges)
    with pytest.raises(ValueError, match="global_hist must hold finite counts"):
        covariate_weights(x, hist, -hist - 1, edges)
    assert math.isclose(float(covariate_weights(x, hist, hist, edges)[0]), 1.0)
