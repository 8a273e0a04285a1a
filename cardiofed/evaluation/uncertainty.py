"""Confidence intervals and paired tests for per-site figures.

AUC: DeLong's variance (DeLong, DeLong and Clarke-Pearson, Biometrics 1988;44:837-845),
computed with the midrank algorithm of Sun and Xu (IEEE Signal Processing Letters
2014;21:1389-1393); the interval is built on the logit scale so that it stays inside
(0, 1) at small sites with high AUCs. Two models scored on the same patients are compared
with DeLong's paired test. Calibration slope and calibration-in-the-large: Wald intervals
from the Fisher information of their logistic fits (Steyerberg, Clinical Prediction
Models, 2nd ed., 2019, ch. 15). Everything here is deterministic: no resampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cardiofed.evaluation.metrics import fit_logistic, logit, validate_binary_inputs
from cardiofed.exceptions import ConfigurationError

__all__ = ["PairedComparison", "auc_interval", "calibration_intervals", "delong",
           "paired_auc_test"]

FloatArray = npt.NDArray[np.float64]
NAN_PAIR = (math.nan, math.nan)


def _z(level: float) -> float:
    if not (isinstance(level, float | int) and 0.0 < level < 1.0):
        raise ConfigurationError(f"The 'level' parameter must be in (0, 1); got {level!r}.")
    from scipy.stats import norm  # SciPy's stats take a second to import: only when used

    return float(norm.ppf(0.5 + level / 2.0))


def delong(y: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    """AUCs of each row of `scores` (k, n) against labels `y` (n,), and their DeLong
    covariance matrix (k, k). Raises when `y` holds one class."""
    yy = np.asarray(y, dtype=np.float64)
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    pos, neg = yy == 1.0, yy == 0.0
    m, n = int(pos.sum()), int(neg.sum())
    if m == 0 or n == 0:
        raise ValueError("DeLong's variance needs both outcome classes.")
    from scipy.stats import rankdata

    x, z = s[:, pos], s[:, neg]
    tx, tz = rankdata(x, axis=1), rankdata(z, axis=1)
    t = rankdata(np.concatenate([x, z], axis=1), axis=1)
    auc = (t[:, :m].sum(axis=1) - m * (m + 1) / 2.0) / (m * n)
    v10 = (t[:, :m] - tx) / n  # each positive's share of negatives ranked below it
    v01 = 1.0 - (t[:, m:] - tz) / m  # each negative's share of positives above it
    sx = np.atleast_2d(np.cov(v10)) if m > 1 else np.zeros((len(s), len(s)))
    sz = np.atleast_2d(np.cov(v01)) if n > 1 else np.zeros((len(s), len(s)))
    return auc, sx / m + sz / n


def auc_interval(y: npt.ArrayLike, p: npt.ArrayLike, *, level: float = 0.95
                 ) -> tuple[float, float]:
    """DeLong interval for the AUC, on the logit scale; (nan, nan) with one class."""
    z = _z(level)
    yy, pp = validate_binary_inputs(y, p)
    if yy.min() == yy.max():
        return NAN_PAIR
    auc_arr, cov = delong(yy, pp)
    auc, se = float(auc_arr[0]), math.sqrt(max(float(cov[0, 0]), 0.0))
    if auc <= 0.0 or auc >= 1.0 or se == 0.0:
        return auc, auc
    centre = math.log(auc / (1.0 - auc))
    half = z * se / (auc * (1.0 - auc))
    return 1.0 / (1.0 + math.exp(-(centre - half))), 1.0 / (1.0 + math.exp(-(centre + half)))


@dataclass(frozen=True)
class PairedComparison:
    """AUC of model A minus model B on the same patients: DeLong's paired test."""

    auc_a: float
    auc_b: float
    difference: float
    interval: tuple[float, float]
    p_value: float
    alpha: float

    @property
    def significant(self) -> bool:
        return math.isfinite(self.p_value) and self.p_value < self.alpha

    @property
    def status(self) -> str:
        """"better" or "worse" (A vs B) only when significant, else "no significant
        difference"; "not estimable" with one outcome class."""
        if not math.isfinite(self.difference):
            return "not estimable"
        if not self.significant:
            return "no significant difference"
        return "better" if self.difference > 0 else "worse"

    def to_dict(self) -> dict[str, object]:
        return {"auc_a": _finite(self.auc_a), "auc_b": _finite(self.auc_b),
                "difference": _finite(self.difference),
                "interval": [_finite(v) for v in self.interval],
                "p_value": _finite(self.p_value), "status": self.status}


def paired_auc_test(y: npt.ArrayLike, p_a: npt.ArrayLike, p_b: npt.ArrayLike, *,
                    level: float = 0.95) -> PairedComparison:
    """Compare two models' AUCs on the same labels `y` (two-sided, alpha = 1 - level)."""
    z = _z(level)
    yy, pa = validate_binary_inputs(y, p_a)
    _, pb = validate_binary_inputs(y, p_b)
    if yy.min() == yy.max():
        return PairedComparison(math.nan, math.nan, math.nan, NAN_PAIR, math.nan, 1 - level)
    auc, cov = delong(yy, np.vstack([pa, pb]))
    diff = float(auc[0] - auc[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    se = math.sqrt(max(var, 0.0))
    # A difference with no variance (identical scores) is no evidence of one.
    from scipy.stats import norm

    p_value = float(2.0 * norm.sf(abs(diff) / se)) if se > 0.0 else float(diff == 0.0)
    return PairedComparison(float(auc[0]), float(auc[1]), diff, (diff - z * se, diff + z * se),
                            p_value, 1.0 - level)


def calibration_intervals(y: npt.ArrayLike, p: npt.ArrayLike, *, level: float = 0.95
                          ) -> dict[str, tuple[float, float]]:
    """Wald intervals for the calibration slope (``y ~ a + b logit(p)``) and
    calibration-in-the-large (``y ~ a + offset(logit(p))``); (nan, nan) where a fit is
    not estimable (one class, separation)."""
    z = _z(level)
    yy, pp = validate_binary_inputs(y, p)
    lp = logit(pp)
    ones = np.ones_like(yy)
    out = {"calibration_slope": NAN_PAIR, "calibration_intercept": NAN_PAIR}
    design = np.column_stack([ones, lp])
    beta = fit_logistic(design, yy, np.zeros_like(yy), np.array([0.0, 1.0]))
    if beta is not None:
        se = _standard_errors(design, design @ beta)
        out["calibration_slope"] = (beta[1] - z * se[1], beta[1] + z * se[1])
    alpha = fit_logistic(ones[:, None], yy, lp, np.zeros(1))
    if alpha is not None:
        se = _standard_errors(ones[:, None], alpha[0] + lp)
        out["calibration_intercept"] = (alpha[0] - z * se[0], alpha[0] + z * se[0])
    return {k: (float(lo), float(hi)) for k, (lo, hi) in out.items()}


def _standard_errors(design: FloatArray, eta: FloatArray) -> FloatArray:
    """Square roots of the inverse Fisher information's diagonal at linear predictor `eta`."""
    mu = np.exp(-np.logaddexp(0.0, -eta))
    info = (design * (mu * (1.0 - mu))[:, None]).T @ design
    try:
        out: FloatArray = np.sqrt(np.maximum(np.diag(np.linalg.inv(info)), 0.0))
    except np.linalg.LinAlgError:
        out = np.full(design.shape[1], math.inf)
    return out


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None
