"""Federated preprocessing: imputation and standardisation without moving rows.

Each site computes :class:`SiteStatistics` on its own training split: per column the
count of observed values, their sum and sum of squares, the count of missing values,
and a histogram over fixed bin edges taken from the schema's plausible ranges (the
edges depend on nothing in the data). Only these aggregates leave the site. The
coordinator merges them (:func:`merge_statistics`) into global means, standard
deviations and histogram medians, and each site applies the same
:class:`Preprocessor` to its rows.

Merged means and variances equal the pooled ones exactly; the histogram median is
exact to within one bin width (``(high - low) / n_bins``).

A site with a privacy budget releases :func:`private_site_statistics` instead: a
Gaussian mechanism on its histograms (coarser, :data:`PRIVATE_BINS` bins) and on its
record count; counts, sums and sums of squares are then derived from the noisy
histogram (post-processing, no further privacy cost). Sites of one federation may
release different bin counts: :func:`merge_statistics` re-bins to the coarsest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from cardiofed.data.model_form import ModelForm
from cardiofed.exceptions import DataValidationError

DEFAULT_BINS = 256
# Bins of a private release: fewer bins, less noise summed into each column's totals.
# DEFAULT_BINS is a multiple, so exact and private releases merge (re-binned).
PRIVATE_BINS = 16


@dataclass(frozen=True)
class SiteStatistics:
    """Aggregates one site releases about its training features (no rows)."""

    count: np.ndarray      # (d,) observed values per column
    total: np.ndarray      # (d,) sum of observed values
    total_sq: np.ndarray   # (d,) sum of squares of observed values
    n_missing: np.ndarray  # (d,) missing values per column
    histogram: np.ndarray  # (d, n_bins) counts of observed values, clipped to the range

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Named arrays, e.g. for a safetensors payload."""
        return {"count": self.count, "total": self.total, "total_sq": self.total_sq,
                "n_missing": self.n_missing, "histogram": self.histogram}


def bin_edges(feature_ranges: list[tuple[float, float]], n_bins: int = DEFAULT_BINS) -> np.ndarray:
    """(d, n_bins + 1) histogram edges from the schema's plausible ranges."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1; got {n_bins}.")
    return np.array([np.linspace(lo, hi, n_bins + 1) for lo, hi in feature_ranges])


def site_statistics(x: np.ndarray, edges: np.ndarray) -> SiteStatistics:
    """Compute a site's aggregates on its own training features (NaN = missing)."""
    if x.ndim != 2 or x.shape[1] != edges.shape[0]:
        raise ValueError(f"x must be (n, {edges.shape[0]}); got {x.shape}.")
    observed = ~np.isnan(x)
    values = np.where(observed, x, 0.0)
    n_bins = edges.shape[1] - 1
    hist = np.zeros((x.shape[1], n_bins))
    for j in range(x.shape[1]):
        col = np.clip(x[observed[:, j], j], edges[j, 0], edges[j, -1])
        hist[j] = np.histogram(col, bins=edges[j])[0]
    return SiteStatistics(count=observed.sum(axis=0).astype(float), total=values.sum(axis=0),
                          total_sq=(values**2).sum(axis=0),
                          n_missing=(~observed).sum(axis=0).astype(float), histogram=hist)


def statistics_sensitivity(n_features: int) -> float:
    """L2 sensitivity of :func:`private_site_statistics` to adding or removing one record:
    one histogram bin per observed column changes by 1, and so does the record count."""
    return math.sqrt(n_features + 1)


def private_site_statistics(x: np.ndarray, edges: np.ndarray, *, noise_std: float,
                            rng: np.random.Generator, released_n: float | None = None
                            ) -> tuple[SiteStatistics, float]:
    """A Gaussian-mechanism release of a site's statistics, and its noisy record count.

    Each column's histogram over `edges` and the number of rows get independent noise
    ``N(0, noise_std^2)`` (``noise_std`` = noise multiplier x
    :func:`statistics_sensitivity`). Everything else is computed from the noisy values:
    columns known to be binary (range [0, 1]) keep only their end bins; counts, sums and
    sums of squares come from the histogram's bin midpoints (plus the within-bin
    variance, width^2 / 12); missing counts are the noisy row count minus the column's.
    Noisy counts may be negative: they are unbiased, and the merge clips what must be.
    `rng` must be secret (:func:`cardiofed.privacy.randomness.secure_numpy_rng`).
    `released_n`: the noisy record count, when the site drew it already (to charge its
    ledger with it before computing the rest)."""
    if not (noise_std > 0 and math.isfinite(noise_std)):
        raise ValueError(f"The 'noise_std' parameter must be finite and > 0; got {noise_std!r}.")
    exact = site_statistics(x, edges)
    hist = exact.histogram + rng.normal(0.0, noise_std, exact.histogram.shape)
    n_rows = (float(len(x)) + float(rng.normal(0.0, noise_std)) if released_n is None
              else float(released_n))
    return statistics_from_histogram(hist, edges, n_rows), n_rows


def statistics_from_histogram(hist: np.ndarray, edges: np.ndarray,
                              n_rows: float) -> SiteStatistics:
    """Statistics computed from (noisy) histograms and a (noisy) record count alone: what
    a private release holds (see :func:`private_site_statistics`)."""
    hist = np.array(hist, dtype=np.float64)
    binary = (edges[:, 0] == 0.0) & (edges[:, -1] == 1.0)
    hist[binary, 1:-1] = 0.0
    mids = (edges[:, :-1] + edges[:, 1:]) / 2
    width_sq = (edges[:, 1:] - edges[:, :-1]) ** 2
    within = np.where(binary[:, None], 0.0, width_sq / 12)
    count = hist.sum(axis=1)
    return SiteStatistics(count=count, total=(hist * mids).sum(axis=1),
                          total_sq=(hist * (mids**2 + within)).sum(axis=1),
                          n_missing=np.maximum(n_rows - count, 0.0), histogram=hist)


def add_statistics(a: SiteStatistics, b: SiteStatistics) -> SiteStatistics:
    """The statistics of two sites' rows together (same bins): what merging needs, so a
    federation of any size keeps one running total instead of every site's histograms."""
    return SiteStatistics(count=a.count + b.count, total=a.total + b.total,
                          total_sq=a.total_sq + b.total_sq, n_missing=a.n_missing + b.n_missing,
                          histogram=a.histogram + b.histogram)


def rebin(hist: np.ndarray, n_bins: int) -> np.ndarray:
    """(d, B) histogram summed into (d, n_bins) bins; B must be a multiple of n_bins."""
    d, b = hist.shape
    if n_bins < 1 or b % n_bins:
        raise ValueError(f"Cannot re-bin {b} bins into {n_bins}: {b} is not a multiple.")
    return hist.reshape(d, n_bins, b // n_bins).sum(axis=2)


@dataclass(frozen=True)
class Preprocessor:
    """Fill missing values, build the model form's terms, then standardise:
    ``(terms - mean) / std``.

    ``fill`` has one value per encoded column; ``mean`` and ``std`` one per model column
    (the encoded columns themselves when ``form`` is None, the raw form). A column that
    is constant in training (std 0) is only centred, so a test value that differs from
    the training constant stays finite.
    """

    fill: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    form: ModelForm | None = None

    def __post_init__(self) -> None:
        n_in = len(self.fill) if self.form is None else self.form.n_inputs
        n_out = len(self.fill) if self.form is None else self.form.n_columns
        if len(self.fill) != n_in or len(self.mean) != n_out or len(self.std) != n_out:
            raise ValueError(f"A preprocessor of {n_in} encoded and {n_out} model columns "
                             f"needs {n_in} fill values and {n_out} means and SDs; got "
                             f"{len(self.fill)}, {len(self.mean)} and {len(self.std)}.")

    @property
    def n_columns(self) -> int:
        """Model columns (what the network takes)."""
        return len(self.mean)

    def columns(self, x: np.ndarray) -> np.ndarray:
        """Encoded rows filled and turned into the form's terms (not standardised)."""
        filled = np.where(np.isnan(x), self.fill, x)
        return filled if self.form is None else self.form.apply(filled)

    def standardise(self, x: np.ndarray) -> np.ndarray:
        """Encoded rows -> standardised model columns, in float64."""
        out: np.ndarray = (self.columns(np.asarray(x, dtype=np.float64)) - self.mean) / self._scale
        return out

    @cached_property
    def _scale(self) -> np.ndarray:
        return np.where(self.std > 0, self.std, 1.0)

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Encoded rows -> standardised model columns, as float32 for the network."""
        return self.standardise(x).astype(np.float32)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Fill, means and SDs as named arrays (the form travels as the study's setting)."""
        return {"fill": self.fill, "mean": self.mean, "std": self.std}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], form: ModelForm | None = None,
                    prefix: str = "") -> Preprocessor:
        return cls(fill=arrays[f"{prefix}fill"], mean=arrays[f"{prefix}mean"],
                   std=arrays[f"{prefix}std"], form=form)


def merge_statistics(stats: list[SiteStatistics], edges: np.ndarray,
                     names: list[str] | None = None,
                     form: ModelForm | None = None) -> Preprocessor:
    """Combine sites' aggregates into one global preprocessor.

    Mean and (sample, ddof=1) standard deviation are those of the pooled observed
    values; the fill value is the pooled median read off the merged histogram.
    Histograms are re-binned to the coarsest bin count among the sites (`edges` may have
    any multiple of it). When a private release is among them (fewer bins than
    :data:`DEFAULT_BINS`), mean and SD are the moments of the clipped merged histogram;
    a column whose merged count is below 1, or whose mean falls outside its range, takes
    the range's midpoint and a quarter of its width: data-independent, never a crash.
    With a model `form`, the terms' means and SDs come from the merged histogram
    (:meth:`ModelForm.moments`).
    """
    if not stats:
        raise ValueError("merge_statistics needs at least one site's statistics.")
    n_bins = min(s.histogram.shape[1] for s in stats)
    count = np.sum([s.count for s in stats], axis=0)
    total = np.sum([s.total for s in stats], axis=0)
    total_sq = np.sum([s.total_sq for s in stats], axis=0)
    hist = np.sum([rebin(s.histogram, n_bins) for s in stats], axis=0)
    empty = np.flatnonzero(count == 0)
    if empty.size:
        shown = [names[j] for j in empty] if names else empty.tolist()
        raise DataValidationError(
            f"Columns {shown} have no observed value at any site: every site's export is "
            f"missing them. Map them in the sites' mapping files, or leave them out of the "
            f"study's features.")
    low, high = edges[:, 0], edges[:, -1]
    coarse = np.array([np.linspace(lo, hi, n_bins + 1) for lo, hi in zip(low, high,
                                                                           strict=True)])
    clipped = np.maximum(hist, 0.0)
    if n_bins < DEFAULT_BINS:
        # A private (coarser, noisy) release is among them: noisy sums of squares can make
        # the variance vanish, and a feature left unscaled wrecks training. Moments of the
        # clipped merged histogram are those of a real distribution on the range instead
        # (empty bins' clipped noise widens them a little: a safe error).
        mids = (coarse[:, :-1] + coarse[:, 1:]) / 2
        binary = (low == 0.0) & (high == 1.0)
        mids[binary, 0], mids[binary, -1] = 0.0, 1.0  # a 0/1 column's values, not midpoints
        mass = clipped.sum(axis=1)
        weights = clipped / np.where(mass > 0, mass, 1.0)[:, None]
        mean = (weights * mids).sum(axis=1)
        # At least the spread within one bin: all the mass in one bin says the values are
        # somewhere in it, and an SD of 0 would leave the column unscaled (a 0/1 column
        # unscaled is harmless and keeps its own).
        within = np.where(binary, 0.0, (coarse[:, 1] - coarse[:, 0]) ** 2 / 12)
        var = np.maximum((weights * (mids - mean[:, None]) ** 2).sum(axis=1), within)
        count = mass
    else:
        mean = total / count
        var = np.maximum(total_sq - count * mean**2, 0.0) / np.maximum(count - 1, 1)
    unusable = (count < 1) | (mean < low) | (mean > high)
    mean = np.where(unusable, (low + high) / 2, mean)
    std = np.where(unusable, (high - low) / 4, np.sqrt(var))
    if form is not None:
        mean, std = form.moments(clipped, coarse)
    return Preprocessor(fill=histogram_median(clipped, coarse), mean=mean, std=std, form=form)


def histogram_median(hist: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Median of each row's histogram, interpolated linearly inside the median bin."""
    medians = np.empty(hist.shape[0])
    for j, row in enumerate(hist):
        cum = np.cumsum(row)
        half = cum[-1] / 2.0
        k = int(np.searchsorted(cum, half))
        below = cum[k - 1] if k > 0 else 0.0
        frac = (half - below) / row[k] if row[k] > 0 else 0.5
        medians[j] = edges[j, k] + frac * (edges[j, k + 1] - edges[j, k])
        # An even count split exactly at bin k's upper edge: the median lies midway
        # between this bin and the next non-empty one (which need not be adjacent).
        later = np.flatnonzero(row[k + 1:])
        if half > 0 and cum[k] == half and later.size:
            medians[j] = (edges[j, k + 1] + edges[j, k + 1 + later[0]]) / 2
        # Binary and one-hot columns: the median is a category, not a midpoint.
        if edges[j, 0] == 0.0 and edges[j, -1] == 1.0 and row[1:-1].sum() == 0:
            medians[j] = float(row[-1] > row[0])
    return medians


def local_preprocessor(x: np.ndarray, fill: np.ndarray,
                       form: ModelForm | None = None) -> Preprocessor:
    """A site's own standardisation (FLamby's per-centre option), filling with `fill`."""
    filled = np.where(np.isnan(x), fill, x)
    terms = filled if form is None else form.apply(filled)
    std = terms.std(axis=0, ddof=1) if len(terms) > 1 else np.zeros(terms.shape[1])
    return Preprocessor(fill=fill, mean=terms.mean(axis=0), std=std, form=form)
