"""A federated Cox model as a served risk model: its risk by a horizon.

At a fixed horizon ``h`` a Cox model's risk is ``1 - exp(-H0(h) exp(x beta))``, a linear
model with the complementary log-log link and intercept ``log H0(h)``: the risk API, the
calculator and ``cardiofed predict`` score it as they score a logistic regression
(:class:`~cardiofed.serving.model.RiskModel`, ``model = "cox"``), with the horizon on the
card.
"""

from __future__ import annotations

import math

import numpy as np

from cardiofed.data.dataset import FederatedDataset
from cardiofed.exceptions import ConfigurationError
from cardiofed.serving.model import RiskModel, build_model
from cardiofed.simulation.survival import POOLED, FederatedCox
from cardiofed.survival.cox import baseline_at

__all__ = ["cox_risk_model"]


def cox_risk_model(model: FederatedCox, dataset: FederatedDataset, *, study: str,
                   horizon: float = 10.0) -> RiskModel:
    """The risk model of `model` (one baseline hazard) by `horizon` years."""
    if POOLED not in model.baselines:
        raise ConfigurationError("A stratified Cox model has a baseline hazard per site; "
                                 "serve a model with one baseline (stratified=False).")
    h0 = baseline_at(model.baselines[POOLED], model.grid, horizon)
    if not h0 > 0:
        raise ConfigurationError(f"No event before {horizon:g} years: the baseline hazard "
                                 f"by then is 0, and every risk would be 0.")
    sites = [s.name for s in dataset.sites if s.name not in model.excluded]
    weights = {"linear.weight": model.fit.beta[None, :].astype(np.float64),
               "linear.bias": np.array([math.log(h0)])}
    notes = [f"Cox proportional hazards ({model.fit.ties} ties), one baseline hazard; "
             f"risk by {horizon:g} years = 1 - exp(-exp(logit))."]
    notes += [f"{site} took no part: {why}" for site, why in model.excluded.items()]
    return build_model(study=study, source="simulation", model="cox", algorithm="newton",
                       settings={"ties": model.fit.ties, "grid_points": len(model.grid)},
                       rounds=model.fit.iterations, sites=sites,
                       encoded_names=dataset.feature_names, outcome=dataset.outcome,
                       weights=weights, preprocessor=model.preprocessor, notes=notes,
                       site_types={s.name: s.site_type for s in dataset.sites},
                       horizon_years=horizon)
