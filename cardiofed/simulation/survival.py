"""Federated Cox models of a survival federation, in one process.

The same steps a networked study takes, with every site's rows in this process: the
sites' preprocessing statistics are merged (exactly) into one preprocessor, which fills
missing values and builds the model form's terms; each site's Cox sums at the
coordinator's coefficients are gathered at every Newton step
(:func:`~cardiofed.survival.cox.fit_cox`); the Breslow baseline comes from the same sums
at the fitted coefficients, pooled or one per site (stratified).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cardiofed.data.dataset import FederatedDataset, SiteData
from cardiofed.data.model_form import model_form
from cardiofed.data.preprocessing import (
    Preprocessor,
    bin_edges,
    merge_statistics,
    site_statistics,
)
from cardiofed.exceptions import ConfigurationError, DataValidationError
from cardiofed.survival.cox import (
    CoxFit,
    absolute_risk,
    add_cox_sums,
    breslow_baseline,
    event_time_grid,
    fit_cox,
    site_cox_sums,
)

__all__ = ["FederatedCox", "fit_federated_cox", "inverse_variance_meta"]

POOLED = "*"  # the key of a pooled (unstratified) baseline


@dataclass(frozen=True)
class FederatedCox:
    """A fitted federated Cox model and what scoring a patient needs."""

    fit: CoxFit
    preprocessor: Preprocessor
    grid: np.ndarray
    baselines: dict[str, np.ndarray]  # site -> Breslow H0, or POOLED -> one for all
    term_names: list[str]

    def risk(self, x: np.ndarray, horizon: float, site: str | None = None) -> np.ndarray:
        """Risk of an event by `horizon` (years) of encoded rows `x`: with a stratified
        model, on `site`'s own baseline hazard."""
        key = POOLED if POOLED in self.baselines else site
        if key not in self.baselines:
            raise ConfigurationError(f"A stratified model scores with a site's own baseline: "
                                     f"name one of {sorted(self.baselines)}; got {site!r}.")
        return absolute_risk(self.preprocessor.transform(x), self.fit, self.baselines[key],
                             self.grid, horizon)


def _survival_sites(dataset: FederatedDataset) -> list[SiteData]:
    lacking = [s.name for s in dataset.sites if not s.survival]
    if lacking:
        raise DataValidationError(f"Sites {lacking} have no follow-up times: a Cox model "
                                  f"needs a survival export (a mapping's [follow_up]).")
    return dataset.sites


Rows = list[tuple[np.ndarray, np.ndarray, np.ndarray]]


def _training_rows(sites: list[SiteData], pre: Preprocessor) -> Rows:
    """Each site's follow-up, events and model terms (on the site, in a real study)."""
    return [(s.time_train, s.y_train, pre.transform(s.x_train)) for s in sites
            if s.time_train is not None]


def fit_federated_cox(dataset: FederatedDataset, *, form: str = "clinical",
                      stratified: bool = False, grid: np.ndarray | None = None,
                      ties: str = "efron") -> FederatedCox:
    """Fit a Cox model on every site's training rows (see the module docstring).

    `grid` None: every distinct event time (the pooled fit, exactly); else a public grid
    (the exact fit of the times carried to it, :mod:`cardiofed.survival.cox`)."""
    sites = _survival_sites(dataset)
    model = model_form(form, dataset.feature_names)
    edges = bin_edges(dataset.feature_ranges)
    pre = merge_statistics([site_statistics(s.x_train, edges) for s in sites], edges,
                           dataset.feature_names, form=model)
    rows = _training_rows(sites, pre)
    if grid is None:
        grid = event_time_grid(*[(t, e) for t, e, _ in rows])
    d = rows[0][2].shape[1]
    fit = fit_cox(lambda b: [site_cox_sums(t, e, x, b, grid) for t, e, x in rows], d,
                  stratified=stratified, ties=ties)
    sums = [site_cox_sums(t, e, x, fit.beta, grid) for t, e, x in rows]
    if stratified:
        baselines = {s.name: breslow_baseline(part) for s, part in zip(sites, sums,
                                                                        strict=True)}
    else:
        total = sums[0]
        for part in sums[1:]:
            total = add_cox_sums(total, part)
        baselines = {POOLED: breslow_baseline(total)}
    return FederatedCox(fit=fit, preprocessor=pre, grid=np.asarray(grid, dtype=float),
                        baselines=baselines,
                        term_names=list(dataset.feature_names) if model is None
                        else model.names)


def inverse_variance_meta(model: FederatedCox, dataset: FederatedDataset
                          ) -> tuple[FederatedCox, list[str]]:
    """DataSHIELD's approach, for comparison: a Cox model fitted at each site alone,
    combined by (multivariate, fixed-effect) inverse-variance weighting, with the pooled
    Breslow baseline at the combined coefficients. Sites whose own fit fails (too few
    events for the covariates) drop out; their names are returned."""
    sites = _survival_sites(dataset)
    pre = model.preprocessor
    rows = _training_rows(sites, pre)
    d = rows[0][2].shape[1]
    information, weighted, dropped = np.zeros((d, d)), np.zeros(d), []
    for s, (t, e, x) in zip(sites, rows, strict=True):
        try:
            own = _own_fit(t, e, x, model.grid)
            precision = np.linalg.inv(own.covariance)
        except (DataValidationError, np.linalg.LinAlgError):
            dropped.append(s.name)
            continue
        if not (np.isfinite(own.beta).all() and np.isfinite(precision).all()):
            dropped.append(s.name)
            continue
        information += precision
        weighted += precision @ own.beta
    if len(dropped) == len(sites):
        raise DataValidationError("No site could fit a Cox model on its own rows.")
    covariance = np.linalg.inv(information)
    beta = covariance @ weighted
    fit = CoxFit(beta=beta, se=np.sqrt(np.diag(covariance)), loglik=math.nan, iterations=0,
                 stratified=False, ties=model.fit.ties, covariance=covariance)
    sums = [site_cox_sums(t, e, x, beta, model.grid) for t, e, x in rows]
    total = sums[0]
    for part in sums[1:]:
        total = add_cox_sums(total, part)
    return (FederatedCox(fit=fit, preprocessor=pre, grid=model.grid,
                         baselines={POOLED: breslow_baseline(total)},
                         term_names=model.term_names), dropped)


def _own_fit(t: np.ndarray, e: np.ndarray, x: np.ndarray, grid: np.ndarray) -> CoxFit:
    """A Cox model of one site's rows alone."""
    return fit_cox(lambda b: [site_cox_sums(t, e, x, b, grid)], x.shape[1])
