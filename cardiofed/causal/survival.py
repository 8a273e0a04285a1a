"""Causal effects on a time-to-event outcome, from per-site sums.

With the federation's propensity model (:func:`~cardiofed.causal.propensity.fit_propensity`,
the pooled fit) and its weights (IPTW or overlap weights, as for a binary outcome), each
site sends, for each arm, weighted Kaplan-Meier counts on the public grid of event times,
and weighted Cox sums with the treatment as the only covariate. Summed, they give

* the adjusted risk by the horizon in each arm (1 - the weighted Kaplan-Meier estimate)
  and their difference (the adjusted cumulative incidence difference);
* the marginal hazard ratio (a weighted Cox model, Breslow's ties);

both equal to the same computation on the pooled rows. Intervals: a bootstrap in which
each site resamples its own rows (with its own seeded generator) and the whole analysis,
propensity model included, is repeated; percentile intervals. In simulation only: no
networked rounds, no private releases yet.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cardiofed.causal.estimators import Estimand, Weighting, weights
from cardiofed.causal.propensity import fit_propensity, sigmoid
from cardiofed.exceptions import ConfigurationError, DataValidationError
from cardiofed.survival.cox import event_time_grid, fit_cox, site_cox_sums
from cardiofed.survival.kaplan_meier import kaplan_meier, pooled_counts, site_counts

__all__ = ["SurvivalEffect", "SurvivalSite", "survival_effect"]


@dataclass(frozen=True)
class SurvivalSite:
    """One site's rows: covariates, treatment (0/1), follow-up time and event (0/1)."""

    name: str
    x: np.ndarray
    treated: np.ndarray
    time: np.ndarray
    event: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.treated)
        if self.x.ndim != 2 or len(self.x) != n or len(self.time) != n or len(self.event) != n:
            raise DataValidationError(f"site {self.name!r}: covariates, treatment, time and "
                                      f"event need one row per patient")
        if not np.isin(self.treated, (0, 1)).all():
            raise DataValidationError(f"site {self.name!r}: treatment must be 0/1")

    def resampled(self, rng: np.random.Generator) -> SurvivalSite:
        rows = rng.integers(0, len(self.treated), len(self.treated))
        return SurvivalSite(self.name, self.x[rows], self.treated[rows], self.time[rows],
                            self.event[rows])


@dataclass(frozen=True)
class SurvivalEffect:
    """Adjusted risks by the horizon, their difference and the marginal hazard ratio,
    with bootstrap 95% intervals (NaN with no resamples)."""

    horizon: float
    estimand: str
    method: str
    risk_treated: float
    risk_control: float
    difference: float
    difference_interval: tuple[float, float]
    hazard_ratio: float
    hazard_ratio_interval: tuple[float, float]
    resamples: int


def _point(sites: Sequence[SurvivalSite], horizon: float, estimand: Estimand,
           method: Weighting, grid: np.ndarray) -> tuple[float, float, float]:
    """(risk treated, risk control, hazard ratio) from the sites' sums."""
    model = fit_propensity([s.x for s in sites], [s.treated for s in sites])
    counts: dict[int, list] = {0: [], 1: []}
    cox = []
    for s in sites:
        w, _ = weights(sigmoid(model.logit(s.x)), s.treated, method, estimand)
        for arm in (0, 1):
            mine = s.treated == arm
            counts[arm].append(site_counts(s.time[mine], s.event[mine], grid, w[mine]))
        cox.append((s.time, s.event, s.treated[:, None].astype(float), w))
    risks = [1.0 - kaplan_meier(pooled_counts(counts[arm])).at(horizon) for arm in (1, 0)]
    fit = fit_cox(lambda b: [site_cox_sums(t, e, x, b, grid, weights=w)
                             for t, e, x, w in cox], 1, ties="breslow")
    return risks[0], risks[1], math.exp(float(fit.beta[0]))


def survival_effect(sites: Sequence[SurvivalSite], *, horizon: float,
                    estimand: Estimand = "ATE", method: Weighting = "iptw",
                    resamples: int = 200, seed: int = 0) -> SurvivalEffect:
    """The effect of treatment on the risk of an event by `horizon` (see the module
    docstring); `resamples` bootstrap replicates (0: point estimates only)."""
    if not (math.isfinite(horizon) and horizon > 0):
        raise ConfigurationError(f"The 'horizon' parameter must be a finite time > 0; "
                                 f"got {horizon!r}.")
    if not (isinstance(resamples, int) and resamples >= 0):
        raise ConfigurationError(f"The 'resamples' parameter must be an integer >= 0; got "
                                 f"{resamples!r}.")
    if estimand not in ("ATE", "ATT") or method not in ("iptw", "overlap"):
        raise ConfigurationError(f"estimand must be ATE or ATT and method iptw or overlap; "
                                 f"got {estimand!r} and {method!r}.")
    if not sites:
        raise DataValidationError("An analysis needs at least one site.")
    grid = event_time_grid(*[(s.time, s.event) for s in sites])
    r1, r0, hr = _point(sites, horizon, estimand, method, grid)
    draws = []
    generators = [np.random.default_rng([seed, k]) for k in range(len(sites))]
    for _ in range(resamples):
        try:
            b1, b0, bhr = _point([s.resampled(g) for s, g in zip(sites, generators,
                                                                  strict=True)],
                                 horizon, estimand, method, grid)
        except DataValidationError:
            continue  # a degenerate resample (e.g. one arm without events) is skipped
        draws.append((b1 - b0, math.log(bhr)))
    if draws:
        low, high = np.percentile(np.array(draws), [2.5, 97.5], axis=0)
        diff_ci = (float(low[0]), float(high[0]))
        hr_ci = (math.exp(low[1]), math.exp(high[1]))
    else:
        diff_ci = hr_ci = (math.nan, math.nan)
    return SurvivalEffect(horizon=float(horizon), estimand=estimand, method=method,
                          risk_treated=r1, risk_control=r0, difference=r1 - r0,
                          difference_interval=diff_ci, hazard_ratio=hr,
                          hazard_ratio_interval=hr_ci, resamples=len(draws))
