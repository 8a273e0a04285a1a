"""How well predicted risks fit censored outcomes: discrimination and calibration at a
horizon, computed at one site on its own rows (only the figures leave it).

* :func:`harrell_c`: the share of comparable pairs (the earlier time an event) that the
  risks order correctly, ties in risk counting half;
* :func:`uno_c`: the same restricted to events before the horizon and weighted by the
  inverse squared probability of staying uncensored (Uno et al., Stat Med 2011), which
  removes Harrell's dependence on the censoring;
* :func:`horizon_auc`: cumulative/dynamic AUC at the horizon, inverse-probability-of-
  censoring weighted (Uno et al., JASA 2007);
* :func:`brier_at`: IPCW Brier score at the horizon (Graf et al., Stat Med 1999);
* :func:`calibration_at`: observed (Kaplan-Meier) against mean predicted risk at the
  horizon, overall and by risk group, with Greenwood intervals, and the calibration
  slope (a Cox model of the outcome on ``log(-log(1 - risk))``, 1 when calibrated).

The censoring distribution ``G`` is the Kaplan-Meier estimate with the roles of events
and censorings swapped; at a tie an event comes before a censoring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm

from cardiofed.exceptions import ConfigurationError, DataValidationError
from cardiofed.survival._checks import check_outcome
from cardiofed.survival.cox import fit_cox, site_cox_sums
from cardiofed.survival.kaplan_meier import kaplan_meier, site_counts

__all__ = ["FIGURES", "HorizonCalibration", "brier_at", "calibration_at", "censoring_survival",
           "harrell_c", "horizon_auc", "uno_c"]


def _inputs(time: object, event: object, risk: object, *, probability: bool = False
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checked outcomes and risks: finite scores (a ranking needs no more), or with
    `probability` risks in [0, 1] (the Brier score and calibration)."""
    t, e = check_outcome(time, event)
    r = np.asarray(risk, dtype=np.float64)
    bad = ~np.isfinite(r) | ((r < 0) | (r > 1) if probability else False)
    if r.shape != t.shape or bad.any():
        what = "probability in [0, 1]" if probability else "finite score"
        raise DataValidationError(f"risk must hold one {what} per patient ({t.size}); got "
                                  f"shape {r.shape}" + (f" with {int(bad.sum())} values "
                                  f"that are not" if r.shape == t.shape else "") + ".")
    return t, e, r


def _check_horizon(horizon: float) -> float:
    if not (isinstance(horizon, int | float) and math.isfinite(horizon) and horizon > 0):
        raise ConfigurationError(f"The 'horizon' parameter must be a finite time > 0; "
                                 f"got {horizon!r}.")
    return float(horizon)


def censoring_survival(time: np.ndarray, event: np.ndarray, at: np.ndarray,
                       *, before: bool) -> np.ndarray:
    """G(at) (or G(at-) with ``before``): the probability of staying uncensored."""
    times = np.unique(time)
    at_risk = len(time) - np.searchsorted(np.sort(time), times, side="left")
    censored = np.bincount(np.searchsorted(times, time[~event]), minlength=times.size)
    g = np.cumprod(1.0 - censored / at_risk)
    k = np.searchsorted(times, at, side="left" if before else "right")
    return np.where(k > 0, g[np.maximum(k - 1, 0)], 1.0)


def _pairs(r_case: np.ndarray, w_case: np.ndarray, t_case: np.ndarray, t: np.ndarray,
           r: np.ndarray) -> tuple[float, float]:
    """Weighted concordant and comparable pair counts: each case i against every row j
    with ``t_j > t_i``, concordant when ``r_i > r_j`` (a tie in risk counts half).

    O(n log n) in blocks: rows sorted by time; a case's comparable rows are a suffix of
    them. The suffix beyond the case's block is counted by binary search in its sorted
    risks, the few rows inside the block directly."""
    order = np.argsort(t, kind="stable")
    t_sorted, r_sorted = t[order], r[order]
    n = t.size
    start = np.searchsorted(t_sorted, t_case, side="right")  # first comparable row
    concordant = comparable = 0.0
    block = max(64, int(math.sqrt(n)) * 4)
    suffix = np.empty(0)  # sorted risks of the rows beyond the current block
    for first in range(((n - 1) // block) * block, -1, -block):
        end = min(first + block, n)
        cases = np.flatnonzero((start >= first) & (start < end))
        if cases.size:
            rc, wc = r_case[cases], w_case[cases]
            below = np.searchsorted(suffix, rc, side="left")
            ties = np.searchsorted(suffix, rc, side="right") - below
            inside = np.arange(first, end)[None, :] >= start[cases][:, None]
            rows = r_sorted[first:end][None, :]
            below = below + (inside & (rows < rc[:, None])).sum(axis=1)
            ties = ties + (inside & (rows == rc[:, None])).sum(axis=1)
            concordant += float(wc @ (below + 0.5 * ties))
            comparable += float(wc @ (suffix.size + inside.sum(axis=1)))
        suffix = np.sort(np.concatenate([suffix, r_sorted[first:end]]))
    return concordant, comparable


def harrell_c(time: object, event: object, risk: object) -> float:
    """Harrell's concordance index of `risk` (higher risk, earlier event); NaN if no pair
    is comparable."""
    t, e, r = _inputs(time, event, risk)
    # A censoring at an event's time counts as later: nudge censored times up by one ulp.
    later = np.where(e, t, np.nextafter(t, np.inf))
    concordant, comparable = _pairs(r[e], np.ones(int(e.sum())), t[e], later, r)
    return concordant / comparable if comparable else math.nan


def uno_c(time: object, event: object, risk: object, horizon: float) -> float:
    """Uno's censoring-adjusted concordance of `risk` over events before `horizon`."""
    h = _check_horizon(horizon)
    t, e, r = _inputs(time, event, risk)
    case = e & (t < h)
    g = censoring_survival(t, e, t[case], before=True)
    w = np.where(g > 0, 1.0 / np.maximum(g, 1e-300) ** 2, 0.0)
    # Uno's pairs: t_i < t_j strictly, whatever j's status.
    concordant, comparable = _pairs(r[case], w, t[case], t, r)
    return concordant / comparable if comparable else math.nan


def horizon_auc(time: object, event: object, risk: object, horizon: float) -> float:
    """Cumulative/dynamic AUC at `horizon`: cases had the event by then (weighted by
    1 / G(t-)), controls were event-free after it."""
    h = _check_horizon(horizon)
    t, e, r = _inputs(time, event, risk)
    case = e & (t <= h)
    control = t > h
    if not case.any() or not control.any():
        return math.nan
    w = 1.0 / np.maximum(censoring_survival(t, e, t[case], before=True), 1e-300)
    rc = r[case][:, None]
    rn = r[control][None, :]
    score = (rc > rn).sum(axis=1) + 0.5 * (rc == rn).sum(axis=1)
    return float(w @ score / (w.sum() * control.sum()))


def brier_at(time: object, event: object, risk: object, horizon: float) -> float:
    """IPCW Brier score of the risk of an event by `horizon` (0 is perfect)."""
    h = _check_horizon(horizon)
    t, e, r = _inputs(time, event, risk, probability=True)
    case = e & (t <= h)
    alive = t > h
    g_case = censoring_survival(t, e, t, before=True)
    g_h = float(censoring_survival(t, e, np.array([h]), before=False)[0])
    if g_h <= 0:
        return math.nan
    terms = np.where(case, (1 - r) ** 2 / np.maximum(g_case, 1e-300), 0.0)
    terms += np.where(alive, r**2 / g_h, 0.0)
    return float(terms.mean())


@dataclass(frozen=True)
class HorizonCalibration:
    """Observed against predicted risk at a horizon."""

    horizon: float
    observed: float                    # 1 - Kaplan-Meier S(horizon)
    observed_interval: tuple[float, float]
    expected: float                    # mean predicted risk
    citl: float                        # logit(observed) - logit(expected)
    citl_interval: tuple[float, float]
    slope: float                       # Cox slope of log(-log(1 - risk))
    slope_interval: tuple[float, float]
    groups: list[dict[str, float]]     # per risk group: n, expected, observed, low, high


def _observed(t: np.ndarray, e: np.ndarray, h: float, z: float
              ) -> tuple[float, float, float, float]:
    """1 - KM(h), its Greenwood standard error and interval (on the risk scale)."""
    grid = np.unique(t[e & (t <= h)])
    if grid.size == 0:
        return 0.0, 0.0, 0.0, 0.0
    curve = kaplan_meier(site_counts(t, e, grid))
    s, se = curve.at(h), float(curve.survival_se[-1])
    se = se if math.isfinite(se) else 0.0
    return 1 - s, se, max(0.0, 1 - s - z * se), min(1.0, 1 - s + z * se)


def calibration_at(time: object, event: object, risk: object, horizon: float, *,
                   groups: int = 10, level: float = 0.95, slope: bool = True
                   ) -> HorizonCalibration:
    """Calibration of predicted risks by `horizon` (see the module docstring); without
    `slope` the calibration slope (a Cox fit) is left out (NaN)."""
    h = _check_horizon(horizon)
    t, e, r = _inputs(time, event, risk, probability=True)
    if not (isinstance(groups, int) and groups >= 1):
        raise ConfigurationError(f"The 'groups' parameter must be an integer >= 1; "
                                 f"got {groups!r}.")
    z = float(norm.ppf(0.5 + level / 2))
    observed, se, low, high = _observed(t, e, h, z)
    expected = float(r.mean())
    citl, citl_interval = math.nan, (math.nan, math.nan)
    if 0 < observed < 1 and 0 < expected < 1:
        citl = _logit(observed) - _logit(expected)
        half = z * se / (observed * (1 - observed))
        citl_interval = (citl - half, citl + half)
    fitted, slope_interval = math.nan, (math.nan, math.nan)
    clipped = np.clip(r, 1e-12, 1 - 1e-12)
    cloglog = np.log(-np.log1p(-clipped))[:, None]
    if slope and e.any() and np.ptp(cloglog) > 0:
        try:
            grid = np.unique(t[e])
            center = np.array([cloglog.mean()])
            fit = fit_cox(lambda b: [site_cox_sums(t, e, cloglog, b, grid, center)], 1)
            fitted = float(fit.beta[0])
            slope_interval = (fitted - z * float(fit.se[0]), fitted + z * float(fit.se[0]))
        except DataValidationError:
            pass  # not estimable (e.g. separation): the check says so
    order = np.argsort(r, kind="stable")
    rows = []
    for part in np.array_split(order, min(groups, max(1, t.size))):
        if part.size == 0:
            continue
        o, _, lo, hi = _observed(t[part], e[part], h, z)
        rows.append({"n": float(part.size), "expected": float(r[part].mean()),
                     "observed": o, "low": lo, "high": hi})
    return HorizonCalibration(horizon=h, observed=observed, observed_interval=(low, high),
                              expected=expected, citl=citl, citl_interval=citl_interval,
                              slope=fitted, slope_interval=slope_interval, groups=rows)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


# One site's figures at a horizon, in the order a networked evaluation sends them.
FIGURES = ("n", "events", "uno_c", "uno_c_low", "uno_c_high", "observed", "observed_low",
           "observed_high", "predicted", "slope", "slope_low", "slope_high", "citl",
           "citl_low", "citl_high", "harrell_c", "horizon_auc", "brier")


def horizon_figures(time: np.ndarray, event: np.ndarray, risk: np.ndarray, horizon: float,
                    *, resamples: int = 200, seed: int = 0) -> dict[str, float]:
    """One site's :data:`FIGURES` at `horizon` (NaN where one is undefined); `resamples`
    of the bootstrap of Uno's C (seeded: an evaluation, not a private release)."""
    cal = calibration_at(time, event, risk, horizon)
    c = uno_c(time, event, risk, horizon)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        rows = rng.integers(0, len(time), len(time))
        draws.append(uno_c(time[rows], event[rows], risk[rows], horizon))
    finite = np.asarray(draws)[np.isfinite(draws)]
    c_ci = ((float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5)))
            if finite.size else (math.nan, math.nan))
    return {"n": float(len(time)), "events": float(np.sum(event)), "uno_c": c,
            "uno_c_low": c_ci[0], "uno_c_high": c_ci[1], "observed": cal.observed,
            "observed_low": cal.observed_interval[0], "observed_high": cal.observed_interval[1],
            "predicted": cal.expected, "slope": cal.slope, "slope_low": cal.slope_interval[0],
            "slope_high": cal.slope_interval[1], "citl": cal.citl,
            "citl_low": cal.citl_interval[0], "citl_high": cal.citl_interval[1],
            "harrell_c": harrell_c(time, event, risk),
            "horizon_auc": horizon_auc(time, event, risk, horizon),
            "brier": brier_at(time, event, risk, horizon)}
