"""A site's update of the global model along the standard hierarchy, on held-out rows.

The federated model is one model for every hospital; a community clinic's event rate
and case mix may differ enough that its risks are systematically off there. The site
updates the model's log-odds ``lp`` on its own *calibration split*, rows the federated
model never trained on, along the updating hierarchy (Steyerberg, Clinical Prediction
Models, 2nd ed. 2019, ch. 20; Janssen et al., J Clin Epidemiol 2008;61:76-86; the
closed-testing idea of Vergouwe et al., Stat Med 2017;36:4529-4539):

1. recalibration in the large: ``lp + a``;
2. logistic recalibration: ``a + b lp``;
3. revision of a few terms: ``a + b lp + sum_j c_j z_j`` over standardised model
   columns ``z_j`` chosen one at a time.

Each step is taken only when the evidence is sufficient: a likelihood-ratio test on the
calibration split prefers it to the model so far (p < ``alpha``; for a term, ``alpha``
divided by the number of candidate terms, Bonferroni), and the site has at least
``min_events_per_parameter`` events of its rarer outcome per parameter the step
estimates (25 by default: with fewer, a test at 0.05 on a 50-row split moved one UCI
site's calibration-in-the-large from -0.12 to +0.83 on its test patients; Riley et al.,
BMJ 2021;373:n1264 ask for 100 events or more to estimate calibration at all). A slope
at or below 0 is never applied: it would reverse the model's ranking,
which says the site's labels disagree with the model, not that it is miscalibrated.
Otherwise the global model is kept as it is: a small site mostly keeps it, which is the
point (its slope estimate is mostly noise, and applying noise makes calibration worse
for new patients).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from cardiofed.evaluation.metrics import fit_logistic, logit, validate_binary_inputs
from cardiofed.exceptions import ConfigurationError

__all__ = ["Recalibration", "describe", "fit_update"]


def _sigmoid(z: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.exp(-np.logaddexp(0.0, -z))
    return out


@dataclass(frozen=True)
class Recalibration:
    """``logit p' = intercept + slope * logit(p) + sum_j coefficients[j] * z[:, j]``.

    ``coefficients`` maps a model column (index into the standardised model columns
    ``z``) to its correction; ``level`` is the highest step of the hierarchy taken
    ("none" is the identity, then "intercept", "slope", "terms") and ``tests`` the
    likelihood-ratio tests that decided it, as (step, statistic, p-value).
    """

    intercept: float = 0.0
    slope: float = 1.0
    coefficients: dict[int, float] = field(default_factory=dict)
    level: str = "none"
    reason: str = ""
    tests: tuple[tuple[str, float, float], ...] = ()

    @classmethod
    def identity(cls, reason: str) -> Recalibration:
        return cls(reason=reason)

    @property
    def fitted(self) -> bool:
        return self.level != "none"

    def apply(self, p: npt.ArrayLike, z: np.ndarray | None = None) -> np.ndarray:
        """Updated risks (float64, same shape as ``p``); ``z`` (rows x model columns) is
        needed when the update revises terms."""
        arr = np.asarray(p, dtype=np.float64)
        if arr.size and (not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 1):
            raise ValueError("p must hold finite risks in [0, 1].")
        if not self.fitted:
            return arr.copy()
        eta = self.intercept + self.slope * logit(arr)
        if self.coefficients:
            if z is None:
                raise ValueError("This update revises model terms; pass the standardised "
                                 "model columns z.")
            columns = list(self.coefficients)
            eta = eta + np.asarray(z, dtype=np.float64)[:, columns] @ np.array(
                [self.coefficients[j] for j in columns])
        return _sigmoid(eta)


def _loglik(y: np.ndarray, eta: np.ndarray) -> float:
    return float(np.sum(y * eta - np.logaddexp(0.0, eta)))


@dataclass
class _Step:
    beta: np.ndarray  # coefficients of [1, lp, z_terms...] (slope fixed at 1 when absent)
    loglik: float
    terms: list[int]
    with_slope: bool


def fit_update(y: npt.ArrayLike, p: npt.ArrayLike, z: np.ndarray | None = None, *,
               alpha: float = 0.05, min_events_per_parameter: int = 25,
               max_terms: int = 3, term_names: Sequence[str] | None = None) -> Recalibration:
    """Walk the updating hierarchy on one site's calibration split.

    Args:
        y: 0/1 outcomes of the calibration rows.
        p: the global model's risks for the same rows.
        z: their standardised model columns (candidates for a term revision); None
            stops at the slope.
        alpha: significance level of each likelihood-ratio test, in (0, 1).
        min_events_per_parameter: events of the rarer outcome needed per estimated
            parameter (>= 1).
        max_terms: most terms revised (>= 0).
        term_names: names of z's columns, for the reason text.
    """
    if not (isinstance(alpha, float | int) and 0.0 < alpha < 1.0):
        raise ConfigurationError(f"The 'alpha' parameter must be in (0, 1); got {alpha!r}.")
    for name, value, low in (("min_events_per_parameter", min_events_per_parameter, 1),
                             ("max_terms", max_terms, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigurationError(f"The {name!r} parameter must be an integer >= {low}; "
                                     f"got {value!r}.")
    yy, pp = validate_binary_inputs(y, p)
    if z is not None and (z.ndim != 2 or len(z) != len(yy)):
        raise ConfigurationError(f"z must have one row per outcome; got {z.shape} for "
                                 f"{len(yy)} outcomes.")
    n_pos = int(yy.sum())
    events = min(n_pos, yy.size - n_pos)
    if events == 0:
        return Recalibration.identity(f"the calibration split holds one outcome class "
                                      f"({yy.size} rows); the global model is kept.")
    lp = logit(pp)
    current = _Step(np.zeros(0), _loglik(yy, lp), [], with_slope=False)
    intercept_only = False
    tests: list[tuple[str, float, float]] = []
    notes: list[str] = []

    def enough(parameters: int, step: str) -> bool:
        if events >= min_events_per_parameter * parameters:
            return True
        notes.append(f"{step} needs {min_events_per_parameter * parameters} events, "
                     f"the split has {events}")
        return False

    def better(step: str, candidate: _Step | None, df: int, level: float) -> bool:
        """Does a likelihood-ratio test on the split prefer `candidate` to `current`?"""
        if candidate is None:
            notes.append(f"the {step} fit did not converge")
            return False
        if candidate.with_slope and candidate.beta[1] <= 0:
            # A slope <= 0 would reverse the model's ranking: the site's labels disagree
            # with the model (see the label-quality check), not a calibration to apply.
            notes.append(f"the {step} fit has slope {candidate.beta[1]:.2f} <= 0, which "
                         f"would reverse the model's ranking")
            return False
        stat = max(2.0 * (candidate.loglik - current.loglik), 0.0)
        from scipy.stats import chi2  # only when a recalibration is fitted

        p_value = float(chi2.sf(stat, df))
        tests.append((step, stat, p_value))
        return p_value < level

    if enough(1, "an intercept"):
        fit = _fit(yy, lp, z, [], with_slope=False)
        if better("intercept", fit, 1, alpha) and fit is not None:
            current, intercept_only = fit, True
    if enough(2, "a slope"):
        fit = _fit(yy, lp, z, [], with_slope=True)
        if better("slope", fit, 1 if intercept_only else 2, alpha) and fit is not None:
            current = fit
    if z is not None:
        candidates = list(range(z.shape[1]))
        while len(current.terms) < max_terms and enough(3 + len(current.terms), "a term"):
            best: _Step | None = None
            for j in candidates:
                fit = _fit(yy, lp, z, [*current.terms, j], with_slope=True)
                if fit is not None and (best is None or fit.loglik > best.loglik):
                    best = fit
            # A term comes with the intercept and slope: df counts what the step adds.
            df = 3 + len(current.terms) - _parameters(current)
            if best is None or not better(f"term {_name(best.terms[-1], term_names)}", best,
                                          df, alpha / len(candidates)):
                break
            candidates.remove(best.terms[-1])
            current = best
    level = ("terms" if current.terms else "slope" if current.with_slope
             else "intercept" if intercept_only else "none")
    decided = "; ".join(f"{step}: LR {stat:.2f}, p={pv:.3g}" for step, stat, pv in tests)
    reason = "; ".join(part for part in (decided, *notes) if part)
    if level == "none":
        return Recalibration(reason=f"kept the global model ({reason or 'no test run'})",
                             tests=tuple(tests))
    beta = current.beta
    return Recalibration(
        intercept=float(beta[0]), slope=float(beta[1]) if current.with_slope else 1.0,
        coefficients={j: float(c) for j, c in zip(current.terms, beta[2:], strict=True)},
        level=level, reason=reason, tests=tuple(tests))


def _parameters(step: _Step) -> int:
    return len(step.beta)


def _name(column: int, names: Sequence[str] | None) -> str:
    return names[column] if names is not None else f"z[{column}]"


def _fit(y: np.ndarray, lp: np.ndarray, z: np.ndarray | None, terms: list[int], *,
         with_slope: bool) -> _Step | None:
    """Maximum likelihood of one step; None when it does not converge (separation)."""
    ones = np.ones_like(y)
    if not with_slope:
        beta = fit_logistic(ones[:, None], y, lp, np.zeros(1))
        if beta is None:
            return None
        return _Step(beta, _loglik(y, beta[0] + lp), [], with_slope=False)
    columns = [ones, lp] + ([z[:, j] for j in terms] if z is not None else [])
    design = np.column_stack(columns)
    beta = fit_logistic(design, y, np.zeros_like(y),
                        np.r_[0.0, 1.0, np.zeros(len(terms))])
    if beta is None or not np.all(np.abs(beta) < 1e6):
        return None
    return _Step(beta, _loglik(y, design @ beta), list(terms), with_slope=True)


def describe(update: Recalibration, names: Sequence[str] | None = None) -> str:
    """One line: what the site's update changes."""
    if not update.fitted:
        return "global model kept"
    parts = [f"intercept {update.intercept:+.3f}"]
    if update.level in ("slope", "terms"):
        parts.append(f"slope {update.slope:.3f}")
    parts += [f"{_name(j, names)} {c:+.3f}" for j, c in update.coefficients.items()]
    return ", ".join(parts)

