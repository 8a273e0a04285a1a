"""A federated Cox model as a networked study: rounds that only exchange sums.

A first round (``km``, unless the plan says ``kaplan_meier = false``) gathers each site's
event and censoring counts on the grid: the pooled Kaplan-Meier curve, with Greenwood
standard errors, and the Nelson-Aalen cumulative hazard
(:mod:`cardiofed.survival.kaplan_meier`). Then every round the coordinator sends the
coefficients ``beta`` it wants the federation's derivatives at (and a public centre);
each site returns, from its own rows:

* the pooled model (one baseline hazard): its :class:`~cardiofed.survival.cox.CoxSums` on
  the plan's public time grid, which the coordinator adds;
* stratified by site (each site its own baseline): its own log partial likelihood,
  gradient and Hessian, which add across sites.

A stratified fit ends with one more round (``baseline``) at the fitted coefficients: each
site's event counts and risk-set sums of ``exp(x beta)`` on the grid, kept per site (not
added), give each site its own Breslow baseline, so that each hospital is served the
shared coefficients on its own incidence. With ``evaluate`` the sites fit on their
training rows, and a last round (``assess``, kept per site too) has each site judge the
model it is served on its held-out rows.

The coordinator then takes one move of :class:`~cardiofed.survival.cox.Newton` (a Newton
step, or a halving of it when the likelihood fell), exactly as
:func:`~cardiofed.survival.cox.fit_cox` does in process, so the networked fit equals the
simulator's. Once converged, the result holds the coefficients, their covariance and,
for the pooled model, Breslow's baseline hazard on the grid. The state between rounds
is JSON.

The grid is public and declared in the plan (``grid_step_years`` up to ``max_years``):
event times are carried up to it, censorings down (what the sums reveal is counts per
grid interval, never a patient's time). The sums are exact: a site takes part only if
it is non-private and opted in (``opt_in = ["exact_survival"]``); there is no private
release of Cox sums yet.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import fields
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cardiofed.exceptions import ConfigurationError, DataValidationError
from cardiofed.survival.cox import (
    CoxSums,
    Newton,
    baseline_at,
    breslow_baseline,
    breslow_cumulative,
    partial_likelihood,
    site_cox_sums,
)
from cardiofed.survival.kaplan_meier import GridCounts, kaplan_meier, site_counts

STEPS = ("km", "cox", "baseline", "assess", "done")
# Steps whose reports the coordinator keeps per site instead of adding them.
PER_SITE_STEPS = ("baseline", "assess")
# An evaluation's figures that may be negative, within +-MAX_CALIBRATION (what a site
# reports stays plausible); every other is a count (n, events) or lies in [0, 1].
_SIGNED = ("slope", "slope_low", "slope_high", "citl", "citl_low", "citl_high")
MAX_CALIBRATION = 1e6
# |x beta| over the site's ranges stays below this (exp stays far from overflow)
MAX_ETA = 500.0
MIN_EXP_ETA = math.exp(-MAX_ETA)  # the least exp(x beta) a site's row can have
Arrays = dict[str, np.ndarray]
_SUMS = tuple(f.name for f in fields(CoxSums))  # what a pooled round's site sends


class SurvivalPlan(BaseModel):
    """What a survival study fits: a Cox model of the covariates (features of the schema or
    of the study's own feature file), on a public time grid; the event is the mapping's
    outcome and the time its ``[follow_up]``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    covariates: list[str] = Field(min_length=1)
    grid_step_years: float = Field(1 / 12, gt=0, le=5, description=(
        "the public grid's spacing (default a month): times are carried to it"))
    max_years: float = Field(20.0, gt=0, le=120, description="the grid's last point")
    stratified: bool = Field(False, description="each site its own baseline hazard")
    ties: Literal["efron", "breslow"] = "efron"
    horizon_years: float = Field(10.0, gt=0, le=120, description=(
        "the horizon of the absolute risk the result reports"))
    max_newton: int = Field(30, ge=1, le=100, description="the most Newton steps")
    kaplan_meier: bool = Field(True, description=(
        "a first round of event and censoring counts on the grid: the pooled Kaplan-Meier "
        "curve"))
    evaluate: bool = Field(False, description=(
        "fit on each site's training rows, then judge the served model at the horizon on "
        "each site's held-out rows (its test split): Uno's and Harrell's C, the horizon "
        "AUC, calibration and the IPCW Brier score, with intervals and verdicts"))

    @model_validator(mode="after")
    def _consistent(self) -> SurvivalPlan:
        if len(set(self.covariates)) != len(self.covariates):
            raise ValueError(f"covariates: {self.covariates} names one twice")
        if self.grid_step_years > self.max_years:
            raise ValueError(f"grid_step_years {self.grid_step_years:g} is beyond max_years "
                             f"{self.max_years:g}")
        if self.grid.size > 2_000:
            raise ValueError(f"the grid has {self.grid.size} points (max_years / "
                             f"grid_step_years); at most 2000")
        return self

    @property
    def grid(self) -> np.ndarray:
        """The public time grid, in years."""
        k = math.floor(self.max_years / self.grid_step_years + 1e-9)
        return self.grid_step_years * np.arange(1, k + 1)


def start(plan: SurvivalPlan, columns: list[str],
          ranges: Sequence[Sequence[float]]) -> dict[str, Any]:
    """The state before the first round: ``beta`` 0, the covariates centred at the middle
    of their schema ranges (public)."""
    if len(ranges) != len(columns):
        raise ConfigurationError("A survival study needs the schema's range of every "
                                 "covariate column.")
    center = [(float(lo) + float(hi)) / 2 for lo, hi in ranges]
    newton = Newton.start(len(columns))
    return {"step": "km" if plan.kaplan_meier else "cox", "columns": columns,
            "iterations": 0,
            "inputs": {"beta": newton.request.tolist(), "center": center},
            "newton": newton.to_json()}


def expected_arrays(plan: SurvivalPlan, step: str, k: int) -> dict[str, tuple[int, ...]]:
    """The arrays a site sends for `step` (`k` covariate columns)."""
    if step == "km":
        return {"events": (plan.grid.size,), "censored": (plan.grid.size,)}
    if step == "baseline":
        return {"events": (plan.grid.size,), "risk0": (plan.grid.size,)}
    if step == "assess":
        from cardiofed.survival.metrics import FIGURES  # loads SciPy

        return {"values": (len(FIGURES),), "defined": (len(FIGURES),)}
    if step != "cox":
        raise ConfigurationError(f"A survival study has no step {step!r}.")
    if plan.stratified:
        return {"loglik": (1,), "gradient": (k,), "hessian": (k, k), "events": (1,)}
    g = plan.grid.size
    return {"events": (g,), "event_x": (g, k), "event_eta": (g,), "risk0": (g,),
            "risk1": (g, k), "risk2": (g, k, k), "tied0": (g,), "tied1": (g, k),
            "tied2": (g, k, k)}


def check_state(plan: SurvivalPlan, state: dict[str, Any],
                ranges: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    """The state's ``beta`` and centre, refused unless they fit the columns and keep
    ``|(x - centre) beta|`` below :data:`MAX_ETA` for every x within the site's `ranges`
    (a bound from the ranges, not from the rows)."""
    k = len(state["columns"])
    beta = np.asarray(state["inputs"]["beta"], dtype=np.float64)
    center = np.asarray(state["inputs"]["center"], dtype=np.float64)
    if beta.shape != (k,) or center.shape != (k,) or len(ranges) != k:
        raise ConfigurationError(f"beta and center must have one value per covariate column "
                                 f"({k}).")
    if not (np.isfinite(beta).all() and np.isfinite(center).all()):
        raise ConfigurationError("beta and center must be finite.")
    low, high = _bounds(ranges)
    if ((center < low) | (center > high)).any():
        raise ConfigurationError("The centre lies outside the covariates' ranges.")
    reach = np.maximum(high - center, center - low)
    with np.errstate(over="ignore"):  # an overflow to inf is refused just the same
        largest = float(np.abs(beta) @ reach)
    if largest > MAX_ETA:
        raise ConfigurationError(f"These coefficients give |x beta| above {MAX_ETA:g} within "
                                 f"the covariates' ranges.")
    return beta, center


def _bounds(ranges: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    """The covariates' lower and upper bounds, from the site's `ranges`."""
    return (np.array([r[0] for r in ranges], dtype=np.float64),
            np.array([r[1] for r in ranges], dtype=np.float64))


def _clipped(x: np.ndarray, ranges: Sequence[Sequence[float]]) -> np.ndarray:
    """The site's rows clipped to its `ranges`."""
    return np.clip(x, *_bounds(ranges))


def site_step(plan: SurvivalPlan, state: dict[str, Any], time: np.ndarray,
              event: np.ndarray, x: np.ndarray, ranges: Sequence[Sequence[float]],
              site: str | None = None) -> Arrays:
    """What `site` sends for the round in `state`: its counts on the grid (``km``), then
    its sums (pooled) or its own derivatives (stratified), then, stratified, what its own
    baseline needs (``baseline``), and with ``evaluate`` its figures of the served model
    (on its held-out rows), on its rows clipped to its `ranges`."""
    if state["step"] == "assess":
        return _evaluation(plan, state, time, event, x, ranges, site)
    if state["step"] == "km":
        counts = site_counts(time, event, plan.grid)
        return {"events": counts.events.astype(np.float64),
                "censored": counts.censored.astype(np.float64)}
    beta, center = check_state(plan, state, ranges)
    sums = site_cox_sums(time, event, _clipped(x, ranges), beta, plan.grid, center=center)
    if state["step"] == "baseline":
        return {"events": sums.events.astype(np.float64),
                "risk0": np.asarray(sums.risk0, dtype=np.float64)}
    if plan.stratified:
        ll, grad, hess = partial_likelihood(sums, plan.ties)
        return {"loglik": np.array([ll]), "gradient": grad, "hessian": hess,
                "events": np.array([float(sums.events.sum())])}
    return {name: np.asarray(getattr(sums, name), dtype=np.float64) for name in _SUMS}


def _evaluation(plan: SurvivalPlan, state: dict[str, Any], time: np.ndarray,
                event: np.ndarray, x: np.ndarray, ranges: Sequence[Sequence[float]],
                site: str | None) -> Arrays:
    """The site's figures of the model it is served (the fit and its own baseline, or the
    one baseline) on its rows: each value, and whether it is defined (0 where not; a
    calibration figure beyond +-MAX_CALIBRATION, from risks too alike to fit a slope to,
    is not)."""
    from cardiofed.survival.metrics import FIGURES, horizon_figures

    beta, center = check_state(plan, state, ranges)
    h0 = state["inputs"]["h0"]
    if isinstance(h0, dict):
        if site not in h0:
            raise ConfigurationError(f"The evaluation names no baseline for site {site!r}.")
        h0 = h0[site]  # None: no event by the horizon, no model served to this site
    if not (h0 is None or isinstance(h0, int | float) and math.isfinite(h0) and h0 > 0):
        raise ConfigurationError(f"A baseline hazard must be a finite number > 0; got {h0!r}.")
    if time.size == 0:
        raise ConfigurationError("This site has no held-out rows to judge the model on.")
    figures = {name: math.nan for name in FIGURES}
    figures |= {"n": float(time.size), "events": float(np.sum(event))}
    if h0 is not None:
        with np.errstate(over="ignore"):  # a risk of 1 where h0 exp(x beta) overflows
            risk = -np.expm1(-float(h0) * np.exp((_clipped(x, ranges) - center) @ beta))
        with np.errstate(all="ignore"):
            figures = horizon_figures(time, event, risk, plan.horizon_years)
    values = np.array([figures[name] for name in FIGURES], dtype=np.float64)
    signed = np.array([name in _SIGNED for name in FIGURES])
    with np.errstate(invalid="ignore"):
        defined = np.isfinite(values) & ~(signed & (np.abs(values) > MAX_CALIBRATION))
    return {"values": np.where(defined, values, 0.0), "defined": defined.astype(np.float64)}


def check_sums(plan: SurvivalPlan, step: str, arrays: Arrays) -> None:
    """What one site's sums for `step` must satisfy beyond their names, shapes and
    finiteness (which the coordinator checks for every analysis): sums of ``exp(x beta)``
    are >= 0, a risk set holds its tied events and is not empty where events are; a log
    partial likelihood is <= 0 and its Hessian symmetric."""
    if step == "km":  # counts: whole and >= 0, as the payload checks hold them
        return
    if step == "assess":
        _check_figures(arrays)
        return
    if step == "baseline":
        r0, d = arrays["risk0"], arrays["events"]
        if (r0 < 0).any() or (d < 0).any() or (r0 < d * MIN_EXP_ETA).any():
            raise DataValidationError(f"A site's baseline sums must be >= 0, with a risk set "
                                      f"of at least {MIN_EXP_ETA:.3g} per event (exp(x beta) "
                                      f"within the covariates' ranges).")
        return
    if plan.stratified:
        hess = arrays["hessian"]
        if arrays["loglik"][0] > 0 or not np.allclose(hess, hess.T, rtol=1e-9, atol=1e-9):
            raise DataValidationError("A site's log partial likelihood must be <= 0 and its "
                                      "Hessian symmetric.")
        return
    r0, t0 = arrays["risk0"], arrays["tied0"]
    if (r0 < 0).any() or (t0 < 0).any() or (t0 > r0 * (1 + 1e-9)).any() \
            or (t0 < arrays["events"] * MIN_EXP_ETA).any() \
            or ((arrays["events"] == 0) & (t0 != 0)).any():
        raise DataValidationError(f"Cox sums of exp(x beta) must be >= 0, hold their tied "
                                  f"events, and be at least {MIN_EXP_ETA:.3g} per event where "
                                  f"a grid point has events (exp(x beta) within the "
                                  f"covariates' ranges).")


def next_state(plan: SurvivalPlan, state: dict[str, Any], totals: Arrays) -> dict[str, Any]:
    """The coordinator's move once every site's arrays of the round are summed; a fit that
    cannot go on raises a :class:`~cardiofed.exceptions.CardioFedError`."""
    if state["step"] == "km":
        curve = kaplan_meier(GridCounts(grid=plan.grid, events=totals["events"],
                                        censored=totals["censored"]))
        return {**state, "step": "cox", "kaplan_meier": {
            "survival": curve.survival.tolist(),
            "survival_se": [None if math.isnan(v) else v for v in curve.survival_se.tolist()],
            "cumulative_hazard": curve.cumulative_hazard.tolist()},
            "kaplan_meier_risk_at_horizon": 1.0 - curve.at(plan.horizon_years)}
    if state["step"] != "cox":
        raise ConfigurationError(f"The analysis is {state['step']!r}; nothing comes next.")
    if float(totals["events"].sum()) < 1:
        raise DataValidationError("No site has an event on the grid: a Cox model cannot be "
                                  "fitted.")
    check_sums(plan, "cox", totals)
    sums = None if plan.stratified else CoxSums(**{k: totals[k] for k in _SUMS})
    with np.errstate(all="ignore"):
        try:
            if sums is None:
                derivs = (float(totals["loglik"][0]), totals["gradient"], totals["hessian"])
            else:
                derivs = partial_likelihood(sums, plan.ties)
            newton = Newton.from_json(state["newton"]).next(derivs, max_iter=plan.max_newton,
                                                            tol=1e-10)
            if not (np.isfinite(newton.request).all() and math.isfinite(newton.loglik)):
                raise ValueError("non-finite coefficients")
        except (ValueError, ZeroDivisionError, OverflowError, np.linalg.LinAlgError) as exc:
            raise DataValidationError(f"The Cox fit cannot go on from these sums: "
                                      f"{exc}.") from None
    state = {**state, "newton": newton.to_json(), "iterations": newton.iterations,
             "inputs": {**state["inputs"], "beta": newton.request.tolist()}}
    if newton.converged:
        with np.errstate(all="ignore"):
            try:
                fit = newton.fit(plan.stratified, plan.ties)
            except np.linalg.LinAlgError:
                fit = None
        if fit is None or not (np.isfinite(fit.se).all() and np.isfinite(fit.covariance).all()):
            raise DataValidationError("The Cox fit converged to a point whose information "
                                      "matrix is not positive definite.")
        result: dict[str, Any] = {
            "beta": fit.beta.tolist(), "se": fit.se.tolist(),
            "covariance": fit.covariance.tolist(), "loglik": fit.loglik,
            "iterations": fit.iterations, "events": float(totals["events"].sum()),
            "center": state["inputs"]["center"], "stratified": plan.stratified,
            "ties": plan.ties, "kaplan_meier": state.get("kaplan_meier"),
            "kaplan_meier_risk_at_horizon": state.get("kaplan_meier_risk_at_horizon")}
        result["horizon_years"] = plan.horizon_years
        if sums is None:  # each site's own baseline needs one more round, at the fit
            return {**state, "step": "baseline", "fit": result,
                    "inputs": {**state["inputs"], "beta": result["beta"]}}
        baseline = breslow_baseline(sums)  # the sums are at the fitted beta
        result["baseline"] = baseline.tolist()
        result["baseline_at_horizon"] = baseline_at(baseline, plan.grid, plan.horizon_years)
        return _fitted(plan, state, result)
    return state


def _fitted(plan: SurvivalPlan, state: dict[str, Any], result: dict[str, Any]
            ) -> dict[str, Any]:
    """The fit is complete: done, or with ``evaluate`` one round in which every site judges
    the model it is served (``assess``; ``h0``: the one baseline by the horizon, or each
    site's)."""
    rest = {k: v for k, v in state.items() if k != "fit"}
    by_site = result.get("baselines_at_horizon")
    h0: float | dict[str, float | None]
    if by_site is None:
        h0 = float(result["baseline_at_horizon"])
        served = h0 > 0
    else:  # a site without a baseline by the horizon (None) is served no model
        h0 = {site: by_site.get(site) for site in state["sites"]}
        served = bool(by_site)
    if not (plan.evaluate and served):  # no evaluation asked for, or no model to judge
        return {**rest, "step": "done", "result": result}
    return {**rest, "step": "assess", "fit": result,
            "inputs": {**state["inputs"], "beta": result["beta"], "h0": h0}}


def with_site_evaluations(plan: SurvivalPlan, state: dict[str, Any],
                          reports: dict[str, Arrays]) -> dict[str, Any]:
    """The study is done: each site's figures, checked, in the result's ``evaluation``
    (None where undefined), in the analysis's site order; the report judges them
    (:func:`cardiofed.experiments.survival.judged`)."""
    from cardiofed.survival.metrics import FIGURES

    if state["step"] != "assess":
        raise ConfigurationError(f"The analysis is {state['step']!r}, not at its assess "
                                 f"round.")
    evaluation = {}
    for site in state["sites"]:
        _check_figures(reports[site])
        defined = reports[site]["defined"] == 1
        evaluation[site] = {name: float(v) if ok else None for name, v, ok in zip(
            FIGURES, reports[site]["values"].tolist(), defined.tolist(), strict=True)}
    rest = {k: v for k, v in state.items() if k != "fit"}
    return {**rest, "step": "done", "result": {**state["fit"], "evaluation": evaluation}}


def _check_figures(arrays: Arrays) -> None:
    """What a site's figures must be: each defined or not (0 then); n a whole number >= 1,
    events a whole number up to n; C statistics, AUC, Brier score and risks in [0, 1];
    slope and calibration-in-the-large within +-MAX_CALIBRATION; each interval ordered."""
    from cardiofed.survival.metrics import FIGURES

    values, defined = arrays["values"], arrays["defined"]
    f = dict(zip(FIGURES, values.tolist(), strict=True))
    ok = dict(zip(FIGURES, (defined == 1).tolist(), strict=True))
    problems = []
    if not np.isin(defined, (0.0, 1.0)).all() or (values[defined == 0] != 0).any():
        problems.append("'defined' must be 0 or 1 for each figure, and an undefined one 0")
    if not (ok["n"] and ok["events"] and f["n"] >= 1 and f["n"] == round(f["n"])
            and 0 <= f["events"] <= f["n"] and f["events"] == round(f["events"])):
        problems.append("n must be a whole number >= 1 and events a whole number up to n")
    for name in FIGURES[2:]:
        low, high = (-MAX_CALIBRATION, MAX_CALIBRATION) if name in _SIGNED else (0.0, 1.0)
        if ok[name] and not low <= f[name] <= high:
            problems.append(f"{name} must lie in [{low:g}, {high:g}]")
    for name in ("uno_c", "observed", "slope", "citl"):
        lo, hi = f"{name}_low", f"{name}_high"
        if ok[lo] and ok[hi] and f[lo] > f[hi]:
            problems.append(f"{lo} must not exceed {hi}")
    if problems:
        raise DataValidationError(f"A site's evaluation is not one its rows can give: "
                                  f"{'; '.join(problems)}.")


def with_site_reports(plan: SurvivalPlan, state: dict[str, Any],
                      reports: dict[str, Arrays]) -> dict[str, Any]:
    """The coordinator's move after a round kept per site (:data:`PER_SITE_STEPS`):
    `reports` maps each site of the analysis to its arrays."""
    if state["step"] == "assess":
        return with_site_evaluations(plan, state, reports)
    return with_site_baselines(plan, state, reports)


def with_site_baselines(plan: SurvivalPlan, state: dict[str, Any],
                        reports: dict[str, Arrays]) -> dict[str, Any]:
    """A stratified fit finished: each site's Breslow baseline from its own ``baseline``
    report (its event counts and risk-set sums at the fitted coefficients), in the
    analysis's site order. A site without an event by the horizon has a baseline of 0
    there: it is named, and not served."""
    if state["step"] != "baseline":
        raise ConfigurationError(f"The analysis is {state['step']!r}, not at its baseline "
                                 f"round.")
    baselines, at_horizon, without = {}, {}, []
    for site in state["sites"]:
        arrays = reports[site]
        check_sums(plan, "baseline", arrays)
        with np.errstate(all="ignore"):
            baseline = breslow_cumulative(arrays["events"], arrays["risk0"])
        if not np.isfinite(baseline).all():
            raise DataValidationError(f"{site}'s baseline sums give a baseline hazard that "
                                      f"is not finite.")
        h0 = baseline_at(baseline, plan.grid, plan.horizon_years)
        baselines[site] = baseline.tolist()
        if h0 > 0:
            at_horizon[site] = h0
        else:
            without.append(site)
    return _fitted(plan, state, {**state["fit"], "baselines": baselines,
                                 "baselines_at_horizon": at_horizon,
                                 "without_baseline": without})
