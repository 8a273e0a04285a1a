"""A federated Cox model as a served risk model: its risk by a horizon.

At a fixed horizon ``h`` a Cox model's risk is ``1 - exp(-H0(h) exp(x beta))``, a linear
model with the complementary log-log link and intercept ``log H0(h)``: the risk API, the
calculator and ``cardiofed predict`` score it as they score a logistic regression
(:class:`~cardiofed.serving.model.RiskModel`, ``model = "cox"``), with the horizon on the
card.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from cardiofed.data.dataset import FederatedDataset
from cardiofed.data.preprocessing import Preprocessor
from cardiofed.exceptions import ConfigurationError
from cardiofed.protocol.schemas import SurvivalResponse
from cardiofed.serving.attribution import finished_analysis
from cardiofed.serving.model import RiskModel, build_model
from cardiofed.simulation.config import SimulationConfig
from cardiofed.store import Study
from cardiofed.survival.cox import baseline_at

if TYPE_CHECKING:  # the simulator's fit (PyTorch, scikit-learn): not the coordinator's import
    from cardiofed.simulation.survival import FederatedCox

__all__ = ["cox_risk_model", "study_model", "study_report"]

RELEASES = ("Each site released exact counts and sums over its rows on the public grid "
            "(events and censorings per grid interval, risk-set sums of exp(x beta)), or, "
            "stratified, its own log partial likelihood and derivatives, and at the fit its "
            "own events and risk-set sums per grid point (its baseline); no row, no time and "
            "no differential privacy.")


def cox_risk_model(model: FederatedCox, dataset: FederatedDataset, *, study: str,
                   horizon: float = 10.0, site: str | None = None) -> RiskModel:
    """The risk model of `model` by `horizon` years: one baseline hazard, or, for a model
    stratified by site, `site`'s own (the shared coefficients on that hospital's
    incidence, served to that hospital)."""
    from cardiofed.simulation.survival import POOLED

    stratified = POOLED not in model.baselines
    at_horizon = {key: baseline_at(h, model.grid, horizon) for key, h in model.baselines.items()}
    weights, baseline = _served(model.fit.beta, None if stratified else at_horizon[POOLED],
                                at_horizon if stratified else None, site, horizon)
    sites = [s.name for s in dataset.sites if s.name not in model.excluded]
    notes = [f"Cox proportional hazards ({model.fit.ties} ties), {baseline}; risk by "
             f"{horizon:g} years = 1 - exp(-exp(logit))."]
    notes += [f"{name} took no part: {why}" for name, why in model.excluded.items()]
    return build_model(study=study if site is None else f"{study}-{site}", source="simulation",
                       model="cox", algorithm="newton",
                       settings={"ties": model.fit.ties, "grid_points": len(model.grid),
                                 "stratified": stratified},
                       rounds=model.fit.iterations, sites=sites,
                       encoded_names=dataset.feature_names, outcome=dataset.outcome,
                       weights=weights, preprocessor=model.preprocessor, notes=notes,
                       site_types={s.name: s.site_type for s in dataset.sites},
                       horizon_years=horizon)


def study_model(study: Study, site: str | None = None) -> RiskModel:
    """A finished survival study's Cox model as a served risk model by the plan's horizon:
    one baseline hazard, or, stratified by site, `site`'s own (the shared coefficients on
    that hospital's incidence). Columns are centred at the study's public centre, which
    also fills a missing value (the fit used complete cases)."""
    plan = SimulationConfig.model_validate(study.plan).survival
    analysis = study.analysis or {}
    result = analysis.get("result")
    if plan is None or result is None:
        raise ConfigurationError(f"Study {study.id!r} is not a finished survival study.")
    weights, baseline = _served(np.asarray(result["beta"], dtype=np.float64),
                                None if plan.stratified else result["baseline_at_horizon"],
                                (result.get("baselines_at_horizon") or {}) if plan.stratified
                                else None, site, plan.horizon_years)
    center = np.asarray(result["center"], dtype=np.float64)
    pre = Preprocessor(fill=center, mean=center, std=np.ones_like(center))
    notes = [f"Cox proportional hazards ({plan.ties} ties), {baseline}, fitted over the "
             f"network on each site's complete cases (times carried to a grid of "
             f"{plan.grid_step_years:g} years); risk by {plan.horizon_years:g} years = "
             f"1 - exp(-exp(logit)). A missing value is filled with the middle of its range.",
             RELEASES]
    settings: dict[str, object] = {"ties": plan.ties, "grid_points": int(plan.grid.size),
                                   "stratified": plan.stratified}
    if site is not None:
        settings["site"] = site
    # With evaluate: each site's figures on its held-out rows, of this model (stratified:
    # only its own site judged this baseline).
    evaluation = result.get("evaluation") or {}
    metrics = {name: figures for name, figures in evaluation.items()
               if site is None or name == site}
    if metrics:
        notes.append(f"metrics: each site's figures on its held-out rows by "
                     f"{plan.horizon_years:g} years (Uno's C, Harrell's C, the horizon AUC, "
                     f"observed against predicted risk, slope, calibration-in-the-large, "
                     f"IPCW Brier), None where undefined.")
    return build_model(study=study.id, source="network", model="cox", algorithm="newton",
                       settings=settings, rounds=int(result["iterations"]),
                       sites=list(analysis["sites"]), encoded_names=study.feature_names,
                       outcome=study.outcome, weights=weights, preprocessor=pre, notes=notes,
                       metrics=metrics,
                       study_features=SimulationConfig.model_validate(study.plan).study_features,
                       horizon_years=plan.horizon_years)


def _served(beta: np.ndarray, pooled: float | None, by_site: Mapping[str, float] | None,
            site: str | None, horizon: float) -> tuple[dict[str, np.ndarray], str]:
    """The served linear model's weights (the coefficients, and the log of the baseline
    cumulative hazard by `horizon`: the `pooled` one, or, stratified, `site`'s own of
    `by_site`) and how a card names that baseline; a site to serve named wrongly, or a
    baseline of 0, refused by name."""
    if by_site is not None and site not in by_site:
        raise ConfigurationError(f"A stratified Cox model has a baseline hazard per site: "
                                 f"name the site to serve, one of {sorted(by_site)}; got "
                                 f"{site!r}.")
    if by_site is None and site is not None:
        raise ConfigurationError("This Cox model has one baseline hazard for every site: "
                                 "leave 'site' out.")
    h0 = float(by_site[site] if by_site is not None and site is not None else pooled or 0.0)
    if not h0 > 0:
        raise ConfigurationError(f"No event before {horizon:g} years: the baseline hazard by "
                                 f"then is 0, and every risk would be 0.")
    weights = {"linear.weight": np.asarray(beta, dtype=np.float64)[None, :],
               "linear.bias": np.array([math.log(h0)])}
    return weights, (f"stratified by site, served with {site}'s own baseline hazard"
                     if by_site is not None else "one baseline hazard")


def study_report(study: Study) -> SurvivalResponse:
    """A finished survival study's model (409 until it is finished)."""
    plan = SimulationConfig.model_validate(study.plan).survival
    a = finished_analysis(study, plan, "a survival")
    assert plan is not None
    r = a["result"]
    coefficients = {}
    for name, b, se in zip(a["columns"], r["beta"], r["se"], strict=True):
        coefficients[name] = {"coefficient": b, "se": se, "hazard_ratio": math.exp(b),
                              "hr_low": math.exp(b - 1.959964 * se),
                              "hr_high": math.exp(b + 1.959964 * se)}
    return SurvivalResponse.model_validate({
        "study": study.id, "outcome": study.outcome, "columns": a["columns"],
        "coefficients": coefficients, "covariance": r["covariance"], "center": r["center"],
        "loglik": r["loglik"], "newton_steps": r["iterations"], "events": r["events"],
        "sites": a["sites"], "restarts": a.get("restarts", 0), "stratified": plan.stratified,
        "ties": plan.ties, "grid_step_years": plan.grid_step_years,
        "max_years": plan.max_years, "horizon_years": plan.horizon_years,
        "baseline": r.get("baseline"), "baseline_at_horizon": r.get("baseline_at_horizon"),
        "baselines": r.get("baselines"), "baselines_at_horizon": r.get("baselines_at_horizon"),
        "without_baseline": r.get("without_baseline"),
        "evaluation": None if r.get("evaluation") is None else {
            site: _judged(figures) for site, figures in r["evaluation"].items()},
        "kaplan_meier": r.get("kaplan_meier"),
        "kaplan_meier_risk_at_horizon": r.get("kaplan_meier_risk_at_horizon"),
        "releases": RELEASES})


def _judged(figures: dict[str, float | None]) -> dict[str, Any]:
    """A site's reported figures judged as the simulator judges its own, None where a
    figure is undefined."""
    from cardiofed.experiments.survival import judged

    out = judged({k: math.nan if v is None else v for k, v in figures.items()})
    return {k: _none_for_nan(v) for k, v in out.items()}


def _none_for_nan(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, list):
        return [_none_for_nan(v) for v in value]
    return value
