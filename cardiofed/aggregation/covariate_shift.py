"""Importance weights that let a site train as if its patients came from the federation.

A community clinic's patients are younger and healthier than the federation as a whole;
under covariate shift (``p(y | x)`` shared, ``p(x)`` different) a site can correct its
local objective by weighting each of its samples with ``w(x) = p_global(x) / p_site(x)``
(Shimodaira, "Improving predictive inference under covariate shift by weighting the
log-likelihood function", J. Stat. Plan. Inference 2000). Both densities are estimated
from the federated statistics of :mod:`cardiofed.data.preprocessing` only: the site's own
histograms and the federation's merged ones (the sum of every site's
``SiteStatistics.histogram``); no row leaves a site.

Naive-Bayes approximation: the ratio of joint densities is replaced by the product of
per-column ratios, ``w(x) = prod_j p_global(x_j) / p_site(x_j)``. This is exact when the
columns are independent under both distributions, and more generally when the shift is
confined to the marginals (both share one copula); correlated columns (age and systolic
blood pressure) count their shared shift more than once, which the clipping bounds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from cardiofed.exceptions import ConfigurationError

__all__ = ["continuous_columns", "covariate_weights"]


def continuous_columns(edges: np.ndarray) -> list[int]:
    """Columns whose histogram range is not exactly [0, 1] (binary and one-hot are)."""
    return [j for j in range(edges.shape[0]) if not (edges[j, 0] == 0.0 and edges[j, -1] == 1.0)]


def _coarsen(hist: np.ndarray, edges: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Sum adjacent bins into ``n_bins`` groups (as equal in size as possible)."""
    fine = hist.shape[1]
    starts = np.array([g[0] for g in np.array_split(np.arange(fine), min(n_bins, fine))])
    return (np.add.reduceat(hist, starts, axis=1),
            edges[:, np.append(starts, fine)])


def _check(x_site: np.ndarray, site_hist: np.ndarray, global_hist: np.ndarray,
           edges: np.ndarray) -> None:
    if edges.ndim != 2 or edges.shape[1] < 2:
        raise ValueError(f"edges must be (d, bins + 1) with bins >= 1; got shape {edges.shape}.")
    d, bins = edges.shape[0], edges.shape[1] - 1
    for name, h in (("site_hist", site_hist), ("global_hist", global_hist)):
        if h.shape != (d, bins):
            raise ValueError(f"{name} must have shape (d, bins) = {(d, bins)} to match edges; "
                             f"got {h.shape}.")
        if not np.all(np.isfinite(h)) or np.any(h < 0):
            raise ValueError(f"{name} must hold finite counts >= 0.")
    if x_site.ndim != 2 or x_site.shape[1] != d or x_site.shape[0] == 0:
        raise ValueError(f"x_site must be (n >= 1, {d}); got shape {x_site.shape}.")


def covariate_weights(x_site: np.ndarray, site_hist: np.ndarray, global_hist: np.ndarray,
                      edges: np.ndarray, *, columns: Sequence[int] | None = None,
                      clip: tuple[float, float] = (0.2, 5.0), smoothing: float = 1.0,
                      coarse_bins: int = 10) -> np.ndarray:
    """Per-sample importance weights toward the federation's feature distribution.

    Args:
        x_site: the site's raw encoded features (before imputation and scaling), shape
            (n, d); NaN marks a missing value, whose ratio is taken as 1.
        site_hist: the site's histograms, (d, bins), over ``edges``.
        global_hist: the federation's merged histograms, (d, bins).
        edges: bin edges, (d, bins + 1), as from
            :func:`cardiofed.data.preprocessing.bin_edges`.
        columns: the columns to weight on; by default :func:`continuous_columns`.
        clip: (low, high) bounds on each weight before normalisation, 0 < low <= 1 <= high.
        smoothing: Laplace pseudo-count added to each coarse bin (> 0).
        coarse_bins: adjacent bins are summed down to this many per column (default 10)
            so that the ratio is not driven by a handful of patients per bin.

    Returns:
        float64 weights of shape (n,), mean 1. Computed as ``exp(sum_j log ratio_j)``,
        clipped to ``clip`` and then divided by its mean.
    """
    x_site = np.asarray(x_site, dtype=np.float64)
    site_hist = np.asarray(site_hist, dtype=np.float64)
    global_hist = np.asarray(global_hist, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.float64)
    _check(x_site, site_hist, global_hist, edges)
    try:
        low, high = (float(c) for c in clip)
    except (TypeError, ValueError):
        low = high = math.nan
    if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= 1 <= high):
        raise ConfigurationError(f"The 'clip' parameter must be (low, high) with "
                                 f"0 < low <= 1 <= high; got {clip!r}.")
    if not (math.isfinite(smoothing) and smoothing > 0):
        raise ConfigurationError(f"The 'smoothing' parameter must be a finite number > 0; "
                                 f"got {smoothing!r}.")
    if isinstance(coarse_bins, bool) or not isinstance(coarse_bins, int) or coarse_bins < 1:
        raise ConfigurationError(f"The 'coarse_bins' parameter must be an integer >= 1; "
                                 f"got {coarse_bins!r}.")
    d = edges.shape[0]
    cols = continuous_columns(edges) if columns is None else list(columns)
    for j in cols:
        if isinstance(j, bool) or not isinstance(j, int | np.integer) or not 0 <= j < d:
            raise ConfigurationError(f"The 'columns' parameter must hold column indices in "
                                     f"[0, {d}); got {cols!r}.")
    if len(set(cols)) != len(cols):
        raise ConfigurationError(f"The 'columns' parameter must not repeat a column; "
                                 f"got {cols!r}.")

    h_site, coarse_edges = _coarsen(site_hist, edges, coarse_bins)
    h_glob, _ = _coarsen(global_hist, edges, coarse_bins)
    n_coarse = h_site.shape[1]

    def log_prob(h: np.ndarray) -> np.ndarray:
        smoothed = h + smoothing
        return np.log(smoothed) - np.log(smoothed.sum(axis=1, keepdims=True))

    log_ratio = log_prob(h_glob) - log_prob(h_site)  # (d, n_coarse)
    log_w = np.zeros(x_site.shape[0])
    for j in cols:
        col = x_site[:, j]
        observed = ~np.isnan(col)
        # Same binning as np.histogram after clipping to the range: the last bin is closed.
        values = np.clip(col[observed], coarse_edges[j, 0], coarse_edges[j, -1])
        idx = np.clip(np.searchsorted(coarse_edges[j], values, side="right") - 1,
                      0, n_coarse - 1)
        log_w[observed] += log_ratio[j, idx]
    w = np.exp(np.clip(log_w, math.log(low), math.log(high)))
    return w / w.mean()
