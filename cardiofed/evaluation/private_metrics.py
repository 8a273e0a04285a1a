"""Differentially private evaluation of a risk model from noisy score histograms.

The mechanism. A site bins its predicted risks on fixed, public, data-independent edges
(:func:`score_bin_edges`) and counts, per bin, its negatives and its positives. It
releases both histograms with independent Gaussian noise N(0, noise_std^2) on every bin
(:func:`release_score_histograms`). Adding or removing one patient changes exactly one
bin of one histogram by 1, so the L2 sensitivity is 1 and ``noise_std`` is the noise
multiplier of a Gaussian mechanism (zCDP with rho = 1 / (2 noise_std^2)); the site's
privacy accountant turns it into (epsilon, delta). The edges must not depend on the data,
and the noise must come from a secret source at the site
(:func:`cardiofed.privacy.randomness.secure_numpy_rng`), never from a seed another party
knows: this module only draws from the generator the caller passes in.

Everything after the release is post-processing of the released counts and costs no
further privacy: the coordinator clips negative counts to 0, computes the same metrics as
:func:`cardiofed.evaluation.metrics.binary_metrics` from the histograms
(:func:`metrics_from_histograms`), and attaches parametric-bootstrap intervals that
reflect both the sampling variation of the cohort and the noise of the mechanism
(:func:`metrics_with_uncertainty`).
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import numpy.typing as npt

from cardiofed.evaluation.metrics import _MAX_HALVINGS as _SLOPE_MAX_HALVINGS
from cardiofed.evaluation.metrics import _MAX_ITER as _SLOPE_MAX_ITER
from cardiofed.evaluation.metrics import _TOL as _SLOPE_TOL
from cardiofed.evaluation.metrics import validate_binary_inputs
from cardiofed.exceptions import ConfigurationError, DataValidationError

__all__ = [
    "as_probabilities",
    "metrics_from_histograms",
    "metrics_with_uncertainty",
    "release_score_histograms",
    "score_bin_edges",
    "score_histograms",
]

FloatArray = npt.NDArray[np.float64]

_LOGIT_SPAN = 5.0
"""Interior edges are equally spaced in logit on [-_LOGIT_SPAN, +_LOGIT_SPAN]."""

_REP_CLIP = 1e-4
"""Edges 0 and 1 are clipped to [_REP_CLIP, 1 - _REP_CLIP] for the representative risks."""

_SPURIOUS_PER_CELL = 1.0 / math.sqrt(2.0 * math.pi)
"""E[max(0, Z)] for a standard normal Z: the mass clipping leaves in an empty cell, per
unit of noise_std."""

MAX_SPURIOUS_SHARE = 0.05
"""The most spurious (clipped-noise) mass, as a share of the released count, under which
the calibration slope of a release is reported."""

_CI_KEYS = ("auc", "calibration_slope", "calibration_intercept", "ece", "brier", "prevalence")
_PROPORTIONS = ("auc", "ece", "brier", "prevalence")  # their intervals stay in [0, 1]


def _expit(x: FloatArray) -> FloatArray:
    return np.exp(-np.logaddexp(0.0, -x))


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def score_bin_edges(n_bins: int = 24) -> FloatArray:
    """Public bin edges on predicted risk: 0, then n_bins - 1 edges equally spaced in
    logit on [-5, 5] (0.5 among them), then 1.

    ``n_bins`` must be an even integer >= 4, so that the middle interior edge is 0.5.
    """
    if (isinstance(n_bins, bool) or not isinstance(n_bins, int | np.integer)
            or n_bins < 4 or n_bins % 2):
        raise ConfigurationError(f"n_bins must be an even integer >= 4; got {n_bins!r}")
    n_bins = int(n_bins)
    interior = _expit(np.linspace(-_LOGIT_SPAN, _LOGIT_SPAN, n_bins - 1))
    interior[(n_bins - 2) // 2] = 0.5  # logit 0; set exactly so threshold 0.5 is an edge
    return np.concatenate([[0.0], interior, [1.0]])


def _check_edges(edges: npt.ArrayLike) -> FloatArray:
    e = np.asarray(edges, dtype=np.float64)
    if e.ndim != 1 or e.size < 2:
        raise ConfigurationError(f"edges must be 1-D with at least 2 values; got shape {e.shape}")
    if not np.all(np.isfinite(e)) or e[0] != 0.0 or e[-1] != 1.0 or np.any(np.diff(e) <= 0):
        raise ConfigurationError(
            f"edges must increase strictly from 0.0 to 1.0; got {e[0]:g} .. {e[-1]:g} "
            f"with {int(np.sum(np.diff(e) <= 0))} non-increasing steps")
    return e


def _check_noise_std(noise_std: object) -> float:
    if isinstance(noise_std, numbers.Real) and not isinstance(noise_std, bool):
        value = float(noise_std)
        if math.isfinite(value) and value >= 0.0:
            return value
    raise ConfigurationError(f"noise_std must be finite and >= 0; got {noise_std!r}")


def _check_rng(rng: object) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise ConfigurationError(f"rng must be a numpy Generator; got {type(rng).__name__}")
    return rng


def _check_counts(name: str, counts: npt.ArrayLike, n_bins: int) -> FloatArray:
    c = np.asarray(counts, dtype=np.float64)
    if c.shape != (n_bins,):
        raise DataValidationError(
            f"{name} must have one count per bin, shape ({n_bins},); got shape {c.shape}")
    n_bad = int((~np.isfinite(c)).sum())
    if n_bad:
        raise DataValidationError(f"{name} must be finite; got {n_bad} non-finite counts")
    return c


def _threshold_index(threshold: object, edges: FloatArray) -> int:
    # The last edge is excluded: the last bin is closed, so p == 1.0 could not be told apart.
    hits = np.flatnonzero(edges[:-1] == threshold) if _is_real(threshold) else np.array([])
    if hits.size != 1:
        raise ConfigurationError(
            f"threshold must be one of the bin edges except the last, so that it falls on a "
            f"bin boundary; got {threshold!r}")
    return int(hits[0])


def _representative_logits(edges: FloatArray) -> FloatArray:
    """Midpoint in logit of each bin's edges, edges 0 and 1 clipped to 1e-4 and 1 - 1e-4."""
    e = np.clip(edges, _REP_CLIP, 1.0 - _REP_CLIP)
    lg = np.log(e) - np.log1p(-e)
    return 0.5 * (lg[:-1] + lg[1:])


def score_histograms(y_true: npt.ArrayLike, y_prob: npt.ArrayLike,
                     edges: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    """Exact (negatives, positives) counts per bin, as float64.

    Bin k holds risks in [edges[k], edges[k+1]); the last bin is closed. ``edges`` must
    increase strictly from 0.0 to 1.0.
    """
    y, p = validate_binary_inputs(y_true, y_prob)
    e = _check_edges(edges)
    n_bins = e.size - 1
    idx = np.minimum(np.searchsorted(e, p, side="right") - 1, n_bins - 1)
    is_pos = y == 1.0
    neg = np.bincount(idx[~is_pos], minlength=n_bins).astype(np.float64)
    pos = np.bincount(idx[is_pos], minlength=n_bins).astype(np.float64)
    return neg, pos


def as_probabilities(scores: npt.ArrayLike) -> FloatArray:
    """Scores as a private release takes them: clipped into [0, 1], a NaN counted as 0.5,
    so that each record's part of the release is bounded whatever model scored it."""
    return np.nan_to_num(np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0), nan=0.5)


def release_score_histograms(y_true: npt.ArrayLike, y_prob: npt.ArrayLike,
                             edges: npt.ArrayLike, *, noise_std: float,
                             rng: np.random.Generator) -> tuple[FloatArray, FloatArray]:
    """The Gaussian-mechanism release: exact histograms plus N(0, noise_std^2) per bin.

    ``noise_std`` (counts) is the noise multiplier, the L2 sensitivity being 1; 0 releases
    the exact counts. ``rng`` must be a secret generator for a real release.
    """
    sigma = _check_noise_std(noise_std)
    gen = _check_rng(rng)
    neg, pos = score_histograms(y_true, y_prob, edges)
    if sigma > 0.0:
        noise = gen.normal(0.0, sigma, size=(2, neg.size))
        neg = neg + noise[0]
        pos = pos + noise[1]
    return neg, pos


def _metrics(neg_raw: FloatArray, pos_raw: FloatArray, lp_rep: FloatArray,
             k_threshold: int) -> dict[str, float]:
    """Metrics from released histograms; no validation. Calibration-in-the-large uses
    the counts as they are (:func:`_citls`); everything else clips them at 0 first."""
    nan = math.nan
    neg, pos = np.clip(neg_raw, 0.0, None), np.clip(pos_raw, 0.0, None)
    n_neg = float(neg.sum())
    n_pos = float(pos.sum())
    n = n_neg + n_pos
    if n <= 0.0:
        return {"n": 0.0, "prevalence": nan, "mean_predicted": nan, "auc": nan,
                "accuracy": nan, "brier": nan, "calibration_slope": nan,
                "calibration_intercept": nan, "ece": nan, "sensitivity": nan,
                "specificity": nan}
    tp = float(pos[k_threshold:].sum())
    tn = float(neg[:k_threshold].sum())
    shared = dict(zip(_CI_KEYS, (float(v) for v in _replicate_metrics(
        neg_raw[None], pos_raw[None], lp_rep)[:, 0]), strict=True))
    return {
        "n": n,
        "mean_predicted": float(np.sum((neg + pos) * _expit(lp_rep)) / n),
        "accuracy": (tp + tn) / n,
        "sensitivity": tp / n_pos if n_pos > 0.0 else nan,
        "specificity": tn / n_neg if n_neg > 0.0 else nan,
        **shared,  # auc, the calibration fits, ece, brier, prevalence: as the bootstrap's
    }


def metrics_from_histograms(neg: npt.ArrayLike, pos: npt.ArrayLike, edges: npt.ArrayLike,
                            *, threshold: float = 0.5) -> dict[str, float]:
    """Metrics of :func:`~cardiofed.evaluation.metrics.binary_metrics` from (noisy) counts.

    Negative counts are clipped to 0 first, except for calibration-in-the-large, fitted
    to the counts as released (:func:`_citls`). Each bin stands for the expit of the midpoint
    in logit of its edges; ties within a bin count 1/2 in the AUC, and the ECE uses one bin
    per histogram bin. ``threshold`` must be one of ``edges[:-1]``, so that accuracy,
    sensitivity and specificity are exact. Values that are not estimable are nan; ``n``
    is the clipped total count.
    """
    e = _check_edges(edges)
    n_bins = e.size - 1
    neg_c = _check_counts("neg", neg, n_bins)
    pos_c = _check_counts("pos", pos, n_bins)
    k = _threshold_index(threshold, e)
    return _metrics(neg_c, pos_c, _representative_logits(e), k)


def metrics_with_uncertainty(neg: npt.ArrayLike, pos: npt.ArrayLike, edges: npt.ArrayLike,
                             *, noise_std: float, rng: np.random.Generator,
                             n_boot: int = 200, level: float = 0.95,
                             threshold: float = 0.5) -> dict[str, float]:
    """Point metrics plus basic-bootstrap intervals ``<key>_ci_low``/``<key>_ci_high``
    for auc, calibration_slope, calibration_intercept, ece, brier and prevalence (the
    intervals of the proportions among them clipped to [0, 1]).

    Each of ``n_boot`` replicates redraws every clipped released count as Poisson(count)
    (sampling variation) and adds fresh N(0, noise_std^2) noise (the mechanism's
    variation), then recomputes the metrics. ``noise_std`` is the mechanism's, in counts;
    ``level`` in (0, 1). Non-estimable replicates are ignored; an interval is nan when
    none is estimable. Post-processing only: costs no privacy.

    Clipping gives truly empty bins positive mass (about 0.4 noise_std each), which pulls
    auc towards 0.5, the slope towards 0 and ece up. Replicates are clipped again, so
    their spread sits on the far side of the estimate from the truth: the *basic*
    interval (2 x estimate - quantiles) reflects it back, which covers the noise-free auc,
    brier and ece far better than percentiles do (measured in tests/test_private_metrics.py).
    Calibration-in-the-large uses the unclipped counts: unbiased, so its interval is the
    replicates' percentiles, as wide as the noise makes it. The slope has no such
    estimator (its fit to unclipped counts mostly fails to converge), and the clipped one
    is biased towards 0 by the spurious mass: about 0.4 noise_std in each of the 2 x bins
    cells. Where that mass exceeds
    :data:`MAX_SPURIOUS_SHARE` of the released count, the slope and its interval are
    nan, not estimable from this release, rather than a figure that reads as
    miscalibration (a calibrated model at a site of a few hundred test patients under the
    default evaluation noise came out with slopes of 0.1 to 0.5).
    """
    sigma = _check_noise_std(noise_std)
    gen = _check_rng(rng)
    if isinstance(n_boot, bool) or not isinstance(n_boot, int | np.integer) or n_boot < 1:
        raise ConfigurationError(f"n_boot must be a positive integer; got {n_boot!r}")
    if not (_is_real(level) and 0.0 < float(level) < 1.0):
        raise ConfigurationError(f"level must be in (0, 1); got {level!r}")
    e = _check_edges(edges)
    n_bins = e.size - 1
    neg_c = _check_counts("neg", neg, n_bins)
    pos_c = _check_counts("pos", pos, n_bins)
    k = _threshold_index(threshold, e)
    lp_rep = _representative_logits(e)

    result = _metrics(neg_c, pos_c, lp_rep, k)
    counts = np.clip(np.stack([neg_c, pos_c]), 0.0, None)
    replicates = np.empty((int(n_boot), *counts.shape))
    for b in range(int(n_boot)):
        replicates[b] = gen.poisson(counts)
        if sigma > 0.0:
            replicates[b] += gen.normal(0.0, sigma, size=counts.shape)
    draws = _replicate_metrics(replicates[:, 0], replicates[:, 1], lp_rep)
    tail = 100.0 * (1.0 - float(level)) / 2.0
    for key, values in zip(_CI_KEYS, draws, strict=True):
        if np.all(np.isnan(values)):
            low = high = math.nan
        else:
            q_low, q_high = (float(v) for v in np.nanpercentile(values, [tail, 100.0 - tail]))
            low, high = ((q_low, q_high) if key == "calibration_intercept"  # unbiased
                         else (2 * result[key] - q_high, 2 * result[key] - q_low))
            if key in _PROPORTIONS:  # a basic interval can reach past [0, 1]
                low, high = min(max(low, 0.0), 1.0), min(max(high, 0.0), 1.0)
        result[f"{key}_ci_low"] = low
        result[f"{key}_ci_high"] = high
    if _SPURIOUS_PER_CELL * sigma * counts.size > MAX_SPURIOUS_SHARE * result["n"]:
        for key in ("calibration_slope", "calibration_slope_ci_low",
                    "calibration_slope_ci_high"):
            result[key] = math.nan
    return result


def _replicate_metrics(neg_raw: FloatArray, pos_raw: FloatArray,
                       lp_rep: FloatArray) -> FloatArray:
    """The metrics of :data:`_CI_KEYS` for many releases at once (a bootstrap's
    replicates; :func:`_metrics` calls it with one row): one release's counts per row of
    `neg_raw` and `pos_raw`, one column per release returned (a bootstrap of 200
    replicates took 0.2 s one replicate at a time, at every site's evaluation upload)."""
    nan = math.nan
    neg, pos = np.clip(neg_raw, 0.0, None), np.clip(pos_raw, 0.0, None)
    n_neg, n_pos = neg.sum(axis=1), pos.sum(axis=1)
    n = n_neg + n_pos
    rep = _expit(lp_rep)
    total = neg + pos
    some = n > 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        neg_below = np.cumsum(neg, axis=1) - neg
        auc = np.where(some & (n_pos > 0.0) & (n_neg > 0.0),
                       np.sum(pos * (neg_below + 0.5 * neg), axis=1) / (n_pos * n_neg), nan)
        ece = np.where(some, np.sum(np.abs(total * rep - pos), axis=1) / n, nan)
        brier = np.where(some, np.sum(neg * rep**2 + pos * (1.0 - rep) ** 2, axis=1) / n, nan)
        prevalence = np.where(some, n_pos / n, nan)
    slope = np.where(some, _slopes(neg, pos, lp_rep), nan)
    citl = np.where(some, _citls(neg_raw, pos_raw, lp_rep), nan)
    by_key = {"auc": auc, "calibration_slope": slope, "calibration_intercept": citl,
              "ece": ece, "brier": brier, "prevalence": prevalence}
    return np.stack([by_key[key] for key in _CI_KEYS])


def _citls(neg: FloatArray, pos: FloatArray, lp_rep: FloatArray) -> FloatArray:
    """Calibration-in-the-large of each row's counts as released, negative ones
    included: its score equation is linear in the counts, so the mechanism's zero-mean
    noise leaves it unbiased, where clipping at 0 gives empty bins positive mass of both
    labels. Fisher scoring from 0 with the clipped counts' information (always
    positive); nan where it does not converge."""
    total = neg + pos
    weight = np.clip(neg, 0.0, None) + np.clip(pos, 0.0, None)
    a = np.zeros(neg.shape[0])
    out = np.full(neg.shape[0], math.nan)
    active = np.arange(neg.shape[0])
    for _ in range(100):
        if active.size == 0:
            break
        rep = _expit(lp_rep + a[active, None])
        info = np.sum(weight[active] * rep * (1.0 - rep), axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            step = np.clip(np.sum(pos[active] - total[active] * rep, axis=1) / info, -5.0, 5.0)
        bad = ~(info > 0)
        a[active] += np.where(bad, 0.0, step)
        done = ~bad & (np.abs(step) < 1e-10)
        out[active[done]] = a[active[done]]
        active = active[~(bad | done)]
    return out


def _slopes(neg: FloatArray, pos: FloatArray, lp_rep: FloatArray) -> FloatArray:
    """The calibration slope of each row's clipped counts: the weighted logistic fit of
    :func:`~cardiofed.evaluation.metrics.fit_logistic` (damped Newton from (0, 1), at
    most 50 steps of at most 30 halvings each), run on every row at once; nan where that
    fit gives none (one class, a singular or non-finite step, no convergence). Where the
    counts are tiny and the classes (nearly) separated, such a fit is decided by
    rounding, and this one and ``fit_logistic`` can disagree; elsewhere they agree to
    1e-8 (tested)."""
    b = neg.shape[0]
    y = np.concatenate([np.zeros_like(lp_rep), np.ones_like(lp_rep)])
    lp = np.concatenate([lp_rep, lp_rep])
    w = np.concatenate([neg, pos], axis=1)
    out = np.full(b, math.nan)
    # One class (or none) among a row's counts: no fit.
    active = np.flatnonzero((w[:, y == 0.0] > 0).any(axis=1) & (w[:, y == 1.0] > 0).any(axis=1))
    beta = np.tile([0.0, 1.0], (b, 1))

    def loglik(rows: np.ndarray, coef: FloatArray) -> FloatArray:
        eta = coef[:, :1] + coef[:, 1:] * lp
        return np.sum(w[rows] * (y * eta - np.logaddexp(0.0, eta)), axis=1)

    ll_of = np.full(b, math.nan)
    ll_of[active] = loglik(active, beta[active])
    for _ in range(_SLOPE_MAX_ITER):
        if active.size == 0:
            break
        coef = beta[active]
        eta = coef[:, :1] + coef[:, 1:] * lp
        mu = np.exp(-np.logaddexp(0.0, -eta))
        resid, curv = w[active] * (y - mu), w[active] * mu * (1.0 - mu)
        grad = np.stack([resid.sum(axis=1), (resid * lp).sum(axis=1)], axis=1)
        h01 = (curv * lp).sum(axis=1)
        hess = np.stack([np.stack([curv.sum(axis=1), h01], axis=1),
                         np.stack([h01, (curv * lp * lp).sum(axis=1)], axis=1)], axis=1)
        det = hess[:, 0, 0] * hess[:, 1, 1] - hess[:, 0, 1] ** 2
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            delta = np.stack([hess[:, 1, 1] * grad[:, 0] - hess[:, 0, 1] * grad[:, 1],
                              hess[:, 0, 0] * grad[:, 1] - hess[:, 0, 1] * grad[:, 0]],
                             axis=1) / det[:, None]
        failed = (det == 0.0) | ~np.isfinite(delta).all(axis=1)
        largest = np.abs(delta).max(axis=1)
        converged = ~failed & (largest <= _SLOPE_TOL * (1.0 + np.abs(coef).max(axis=1)))
        out[active[converged]] = coef[converged, 1] + delta[converged, 1]
        going = ~(failed | converged)
        rows, coef, delta, largest = active[going], coef[going], delta[going], largest[going]
        accepted = np.zeros(rows.size, dtype=bool)
        new_coef, new_ll = coef.copy(), ll_of[rows].copy()
        step = 1.0
        for _ in range(_SLOPE_MAX_HALVINGS):
            trying = np.flatnonzero(~accepted)
            if trying.size == 0:
                break
            candidate = coef[trying] + step * delta[trying]
            cand_ll = loglik(rows[trying], candidate)
            old = ll_of[rows[trying]]
            ok = cand_ll >= old - 1e-12 * (1.0 + np.abs(old))
            new_coef[trying[ok]], new_ll[trying[ok]] = candidate[ok], cand_ll[ok]
            accepted[trying[ok]] = True
            step /= 2.0
        # No ascent left: at the optimum up to rounding, or stuck.
        stuck = ~accepted
        at_optimum = stuck & (largest < 1e-6)
        out[rows[at_optimum]] = coef[at_optimum, 1]
        beta[rows[accepted]], ll_of[rows[accepted]] = new_coef[accepted], new_ll[accepted]
        active = rows[accepted]
    return out
