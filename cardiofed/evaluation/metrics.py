"""Discrimination and calibration metrics for binary risk predictions.

All probabilities are risks on the [0, 1] scale; labels are 0/1. Calibration slope and
intercept come from small Newton-Raphson logistic fits in numpy (no penalty).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from cardiofed.exceptions import ConfigurationError, DataValidationError

__all__ = [
    "EPS",
    "auc_score",
    "binary_metrics",
    "calibration_points",
    "roc_points",
    "validate_binary_inputs",
]

EPS: float = 1e-7
"""Probabilities are clipped to [EPS, 1 - EPS] before taking the logit."""

_MAX_ITER = 50
_TOL = 1e-10
_MAX_HALVINGS = 30

FloatArray = npt.NDArray[np.float64]


def validate_binary_inputs(
    y_true: npt.ArrayLike, y_prob: npt.ArrayLike
) -> tuple[FloatArray, FloatArray]:
    """Check labels and probabilities; return both as 1-D float64 arrays.

    Raises DataValidationError (a ValueError) naming the offending parameter and value.
    """
    y = np.asarray(y_true)
    p = np.asarray(y_prob)
    for name, arr in (("y_true", y), ("y_prob", p)):
        if arr.ndim != 1:
            raise DataValidationError(f"{name} must be 1-D; got shape {arr.shape}")
        if arr.size == 0:
            raise DataValidationError(f"{name} must be non-empty; got 0 samples")
        if arr.dtype.kind not in "biuf":
            raise DataValidationError(f"{name} must be numeric; got dtype {arr.dtype}")
    if y.shape != p.shape:
        raise DataValidationError(
            f"y_true and y_prob must have the same length; got {y.size} and {p.size}"
        )
    y = y.astype(np.float64)
    p = p.astype(np.float64)
    bad_labels = ~np.isin(y, (0.0, 1.0))
    if bad_labels.any():
        raise DataValidationError(
            f"y_true must contain only 0 and 1; got {y[bad_labels][0]:g} "
            f"({int(bad_labels.sum())} invalid values)"
        )
    n_bad = int((~np.isfinite(p)).sum())
    if n_bad:
        raise DataValidationError(f"y_prob must be finite; got {n_bad} non-finite values")
    if p.min() < 0.0:
        raise DataValidationError(f"y_prob must be in [0, 1]; got min {p.min():g}")
    if p.max() > 1.0:
        raise DataValidationError(f"y_prob must be in [0, 1]; got max {p.max():g}")
    return y, p


def _check_n_bins(n_bins: int) -> None:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int | np.integer) or n_bins < 1:
        raise ConfigurationError(f"n_bins must be a positive integer; got {n_bins!r}")


def logit(p: FloatArray) -> FloatArray:
    q = np.clip(p, EPS, 1.0 - EPS)
    return np.log(q) - np.log1p(-q)


def _loglik(y: FloatArray, eta: FloatArray, weights: FloatArray | None = None) -> float:
    # sum(w * (y*eta - log(1 + exp(eta)))), computed stably.
    terms = y * eta - np.logaddexp(0.0, eta)
    if weights is not None:
        terms = weights * terms
    return float(np.sum(terms))


def fit_logistic(x: FloatArray, y: FloatArray, offset: FloatArray,
                  beta0: FloatArray, weights: FloatArray | None = None) -> FloatArray | None:
    """Maximum-likelihood logistic fit of y ~ x @ beta + offset by damped Newton-Raphson.

    ``weights`` (shape like y, finite, >= 0) are frequency weights on the rows; None means
    all ones. Returns None when the rows of positive weight hold one class (or none), the
    Hessian is singular, or the fit does not converge within 50 iterations (e.g. under
    (quasi-)complete separation).
    """
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != y.shape:
            raise DataValidationError(
                f"weights must have the shape of y {y.shape}; got {weights.shape}")
        bad = ~np.isfinite(weights) | (weights < 0.0)
        if bad.any():
            raise DataValidationError(f"weights must be finite and >= 0; got "
                                      f"{weights[bad][0]:g} ({int(bad.sum())} invalid values)")
        y_used = y[weights > 0.0]
        if y_used.size == 0 or y_used.min() == y_used.max():
            return None
    elif y.min() == y.max():
        return None
    beta = beta0.astype(np.float64).copy()
    ll = _loglik(y, x @ beta + offset, weights)
    for _ in range(_MAX_ITER):
        eta = x @ beta + offset
        mu = np.exp(-np.logaddexp(0.0, -eta))  # expit(eta) without overflow
        resid = y - mu
        curv = mu * (1.0 - mu)
        if weights is not None:
            resid = weights * resid
            curv = weights * curv
        grad = x.T @ resid
        hess = (x * curv[:, None]).T @ x
        try:
            delta = np.linalg.solve(hess, grad)
        except np.linalg.LinAlgError:
            return None
        if not np.all(np.isfinite(delta)):
            return None
        if np.max(np.abs(delta)) <= _TOL * (1.0 + np.max(np.abs(beta))):
            return beta + delta
        step = 1.0
        for _ in range(_MAX_HALVINGS):
            new_beta = beta + step * delta
            new_ll = _loglik(y, x @ new_beta + offset, weights)
            # Accept any step that does not lower the log-likelihood beyond rounding error.
            if new_ll >= ll - 1e-12 * (1.0 + abs(ll)):
                break
            step /= 2.0
        else:
            # No ascent left: we are at the optimum up to rounding, or the fit is stuck.
            return beta if np.max(np.abs(delta)) < 1e-6 else None
        beta, ll = new_beta, new_ll
    return None


def _calibration_fits(y: FloatArray, p: FloatArray) -> tuple[float, float]:
    """Return (calibration slope, calibration-in-the-large intercept); nan when not estimable."""
    lp = logit(p)
    ones = np.ones((y.size, 1))
    slope_fit = fit_logistic(np.column_stack([ones, lp]), y, np.zeros_like(y),
                              np.array([0.0, 1.0]))
    citl_fit = fit_logistic(ones, y, lp, np.array([0.0]))
    slope = float(slope_fit[1]) if slope_fit is not None else math.nan
    intercept = float(citl_fit[0]) if citl_fit is not None else math.nan
    return slope, intercept


def _bin_index(p: FloatArray, n_bins: int) -> npt.NDArray[np.intp]:
    """Equal-width bins on [0, 1]: bin k holds [k/n_bins, (k+1)/n_bins); the last one is closed."""
    return np.minimum(np.floor(p * n_bins).astype(np.intp), n_bins - 1)


def _binned(
    y: FloatArray, p: FloatArray, n_bins: int
) -> tuple[FloatArray, FloatArray, FloatArray]:
    idx = _bin_index(p, n_bins)
    counts = np.bincount(idx, minlength=n_bins).astype(np.float64)
    sum_p = np.bincount(idx, weights=p, minlength=n_bins)
    sum_y = np.bincount(idx, weights=y, minlength=n_bins)
    keep = counts > 0
    return sum_p[keep] / counts[keep], sum_y[keep] / counts[keep], counts[keep]


def binary_metrics(y_true: npt.ArrayLike, y_prob: npt.ArrayLike, *, threshold: float = 0.5,
                   n_bins: int = 10) -> dict[str, float]:
    """Discrimination, accuracy and calibration of predicted risks.

    Args:
        y_true: labels in {0, 1}, shape (n,).
        y_prob: predicted risks in [0, 1], shape (n,).
        threshold: risk at or above which a case is predicted positive, in [0, 1].
        n_bins: number of equal-width bins on [0, 1] for the ECE.

    Returns:
        dict with keys n, prevalence, mean_predicted, auc, accuracy, brier,
        calibration_slope, calibration_intercept, ece, sensitivity, specificity.
        All values are floats (proportions, not percent); auc, sensitivity, specificity
        and the calibration fits are nan when not estimable (one class, separation).
    """
    if not (isinstance(threshold, int | float) and 0.0 <= threshold <= 1.0):
        raise ConfigurationError(f"threshold must be in [0, 1]; got {threshold!r}")
    _check_n_bins(n_bins)
    y, p = validate_binary_inputs(y_true, y_prob)

    n = y.size
    n_pos = float(y.sum())
    n_neg = n - n_pos
    pred = p >= threshold
    pos = y == 1.0
    tp = float(np.sum(pred & pos))
    tn = float(np.sum(~pred & ~pos))

    auc = auc_score(y, p)
    mean_p, frac_pos, counts = _binned(y, p, n_bins)
    slope, intercept = _calibration_fits(y, p)
    return {
        "n": float(n),
        "prevalence": n_pos / n,
        "mean_predicted": float(p.mean()),
        "auc": auc,
        "accuracy": (tp + tn) / n,
        "brier": float(np.mean((p - y) ** 2)),
        "calibration_slope": slope,
        "calibration_intercept": intercept,
        "ece": float(np.sum(counts * np.abs(mean_p - frac_pos)) / n),
        "sensitivity": tp / n_pos if n_pos > 0 else math.nan,
        "specificity": tn / n_neg if n_neg > 0 else math.nan,
    }


def auc_score(y: npt.ArrayLike, p: npt.ArrayLike) -> float:
    """The AUC of risks `p` for 0/1 labels `y` (Mann-Whitney with midranks, equal to
    sklearn's ``roc_auc_score``); nan with one class. For hot loops: no validation."""
    yy, pp = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    n_pos = float(yy.sum())
    n_neg = yy.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(pp)
    ps = pp[order]
    new_block = np.r_[True, ps[1:] != ps[:-1]]
    starts = np.flatnonzero(new_block)
    midranks = (starts + np.r_[starts[1:], ps.size] + 1) / 2.0  # 1-based, per tie block
    positives = np.bincount(np.cumsum(new_block) - 1, weights=yy[order])
    return float((positives @ midranks - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def grouped_auc(y: npt.ArrayLike, p: npt.ArrayLike, groups: npt.ArrayLike,
                n_groups: int) -> FloatArray:
    """The AUC within each group (0..n_groups-1) of rows, in one sort: Mann-Whitney with
    midranks for ties, nan for a group lacking a class. Equal to sklearn's per group."""
    yy, pp = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    g = np.asarray(groups, dtype=np.int64)
    order = np.lexsort((pp, g))
    gs, ps, ys = g[order], pp[order], yy[order]
    # Midranks within each group: tie blocks share the mean of their positions.
    new_block = np.r_[True, (gs[1:] != gs[:-1]) | (ps[1:] != ps[:-1])]
    block = np.cumsum(new_block) - 1
    first_of_group = np.r_[True, gs[1:] != gs[:-1]]
    group_start = np.maximum.accumulate(np.where(first_of_group, np.arange(len(gs)), 0))
    position = np.arange(len(gs)) - group_start + 1.0
    block_sum = np.bincount(block, weights=position)
    block_size = np.bincount(block)
    ranks = (block_sum / block_size)[block]
    n_pos = np.bincount(gs, weights=ys, minlength=n_groups)
    n_all = np.bincount(gs, minlength=n_groups).astype(np.float64)
    n_neg = n_all - n_pos
    rank_sum = np.bincount(gs, weights=ranks * ys, minlength=n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    out: FloatArray = auc
    return out


def roc_points(y_true: npt.ArrayLike, y_prob: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    """Return (false positive rate, true positive rate) of the ROC curve, each in [0, 1].

    Raises DataValidationError when y_true holds a single class (the curve is undefined).
    """
    y, p = validate_binary_inputs(y_true, y_prob)
    if y.min() == y.max():
        raise DataValidationError(
            f"y_true must contain both classes for a ROC curve; got only {int(y[0])}"
        )
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(y, p)
    return np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)


def calibration_points(y_true: npt.ArrayLike, y_prob: npt.ArrayLike,
                       n_bins: int = 10) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Reliability-diagram points over equal-width bins on [0, 1].

    Returns (mean predicted risk, observed event fraction, count) for each non-empty bin,
    in increasing bin order.
    """
    _check_n_bins(n_bins)
    y, p = validate_binary_inputs(y_true, y_prob)
    return _binned(y, p, n_bins)
