"""Per-site logistic recalibration of a trained global model.

The federated model is one model for every hospital, but a community clinic's event
rate and case mix differ from a tier-3 hospital's, so its risks can be systematically
too high or too spread out there. Logistic recalibration (Cox, "Two further
applications of a model for binary regression", Biometrika 1958; Steyerberg, "Clinical
Prediction Models", 2nd ed. 2019, ch. 20) fits, at each site, on the site's own data,

    logit P(y = 1) = a + b * logit(p)

and reports ``sigmoid(a + b * logit(p))`` as the site's calibrated risk. The global model
is unchanged and ranking (AUC) is preserved when ``b > 0``. ``a = 0, b = 1`` is the
identity; the fitted ``a`` and ``b`` are the calibration intercept and slope that
:func:`cardiofed.evaluation.metrics.binary_metrics` reports as ``calibration_slope``.

The fit is unpenalised maximum likelihood by damped Newton-Raphson. A slope estimated
from a small site is mostly noise (its standard error is about ``1/sqrt(events)``), and
applying a noisy slope makes calibration worse on new patients, so when the slope's
standard error exceeds ``max_slope_se`` only the intercept is updated ("recalibration in
the large", the first step of Steyerberg's updating hierarchy, ch. 20.3), with the slope
kept at 1. With too few events (or a single class, or separation) no reliable fit
exists, and :func:`fit_recalibration` returns the identity with ``fitted=False`` and the
reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cardiofed.evaluation.metrics import fit_logistic, logit, validate_binary_inputs
from cardiofed.exceptions import ConfigurationError

__all__ = ["Recalibration", "fit_recalibration"]

def _sigmoid(z: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.exp(-np.logaddexp(0.0, -z))
    return out


@dataclass(frozen=True)
class Recalibration:
    """``p -> sigmoid(intercept + slope * logit(p))``; the identity when not ``fitted``."""

    intercept: float = 0.0
    slope: float = 1.0
    fitted: bool = True
    reason: str = ""  # why the identity or an intercept-only update was used

    @classmethod
    def identity(cls, reason: str) -> Recalibration:
        return cls(0.0, 1.0, fitted=False, reason=reason)

    def apply(self, p: npt.ArrayLike) -> np.ndarray:
        """Recalibrated risks (float64, same shape as ``p``); ``p`` itself when not fitted."""
        arr = np.asarray(p, dtype=np.float64)
        if arr.size and (not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 1):
            raise ValueError("p must hold finite risks in [0, 1].")
        if not self.fitted:
            return arr.copy()
        return _sigmoid(self.intercept + self.slope * logit(arr))


def fit_recalibration(y: npt.ArrayLike, p: npt.ArrayLike, *, min_events: int = 10,
                      max_slope_se: float = 0.1) -> Recalibration:
    """Fit ``logit P(y = 1) = a + b * logit(p)`` on one site's labels and predicted risks.

    Args:
        y: 0/1 outcomes at the site.
        p: the global model's risks for the same patients.
        min_events: the smaller of the two class counts must be at least this (>= 1);
            otherwise the intercept and slope are too uncertain to apply and the
            identity is returned, with ``fitted=False`` and the reason.
        max_slope_se: largest standard error of the fitted slope (> 0) at which the slope
            is applied; above it only the intercept is updated (slope 1), and ``reason``
            says so. ``math.inf`` always applies the fitted slope.
    """
    if isinstance(min_events, bool) or not isinstance(min_events, int) or min_events < 1:
        raise ConfigurationError(f"The 'min_events' parameter must be an integer >= 1; "
                                 f"got {min_events!r}.")
    if isinstance(max_slope_se, bool) or not isinstance(max_slope_se, (int, float)) \
            or not max_slope_se > 0:
        raise ConfigurationError(f"The 'max_slope_se' parameter must be a number > 0; "
                                 f"got {max_slope_se!r}.")
    yy, pp = validate_binary_inputs(y, p)
    n_pos = int(yy.sum())
    n_neg = yy.size - n_pos
    if n_pos == 0 or n_neg == 0:
        only = "1" if n_pos else "0"
        return Recalibration.identity(
            f"y holds a single class (all {yy.size} labels are {only}); recalibration "
            f"needs both outcomes, so the identity is used.")
    if min(n_pos, n_neg) < min_events:
        return Recalibration.identity(
            f"only {min(n_pos, n_neg)} {'events' if n_pos <= n_neg else 'non-events'} "
            f"({n_pos} positive, {n_neg} negative) < min_events={min_events}; "
            f"the identity is used.")
    design = np.column_stack([np.ones_like(pp), logit(pp)])
    if np.ptp(design[:, 1]) == 0:
        return Recalibration.identity("all predicted risks are equal, so no slope can be "
                                      "fitted; the identity is used.")
    beta = fit_logistic(design, yy, np.zeros_like(yy), np.array([0.0, 1.0]))
    if beta is None or not np.all(np.abs(beta) < 1e6):
        return Recalibration.identity("the logistic fit did not converge (the outcomes are "
                                      "separated by the predicted risk); the identity is used.")
    slope_se = _slope_standard_error(design, beta)
    if slope_se <= max_slope_se:
        return Recalibration(intercept=float(beta[0]), slope=float(beta[1]))
    alpha = fit_logistic(design[:, :1], yy, design[:, 1], np.zeros(1))
    if alpha is None:
        return Recalibration.identity("the intercept-only fit did not converge; the "
                                      "identity is used.")
    return Recalibration(intercept=float(alpha[0]), slope=1.0, reason=(
        f"the fitted slope {beta[1]:.3f} has standard error {slope_se:.3f} > "
        f"max_slope_se={max_slope_se:g} ({n_pos} events), so only the intercept is "
        f"updated."))


def _slope_standard_error(design: np.ndarray, beta: np.ndarray) -> float:
    """Standard error of the slope from the inverse Fisher information at the MLE."""
    mu = _sigmoid(design @ beta)
    info = (design * (mu * (1.0 - mu))[:, None]).T @ design
    try:
        return float(np.sqrt(np.linalg.inv(info)[1, 1]))
    except np.linalg.LinAlgError:
        return float("inf")
