"""Federated Cox proportional hazards, fitted exactly by Newton steps from per-site sums.

At each Newton step the coordinator sends the coefficients ``beta``; each site returns
:class:`CoxSums`: at every point ``g_k`` of a public time grid (times carried up to the
next point and censorings down, as in :mod:`cardiofed.survival.kaplan_meier`), the sums
over its risk set at ``g_k`` and over its events at ``g_k`` of ``exp(x beta)``, ``x exp(x beta)``
and ``x x' exp(x beta)``, with the event count and the events' ``x``. No row leaves the
site. From these the partial likelihood, its gradient and its Hessian follow exactly
(:func:`partial_likelihood`, Efron's or Breslow's handling of tied times):

* **unstratified** (one baseline hazard, the pooled model): the sites' sums are added
  first, so the fit equals the pooled Cox model of the (grid-coarsened) times;
* **stratified by site** (each site its own baseline hazard, which recalibrates the shared
  coefficients to every hospital's incidence): each site's own derivatives are added.

Which grid: the pooled fit is exact *per distinct event time* when the grid holds every
event time of every site (:func:`event_time_grid`); that tells the coordinator those times
(not who had them), so a site that may not reveal them uses a coarser public grid (e.g.
months), and the fit is then the exact pooled fit of the times carried up to that grid.
Covariates are centred at a public ``center`` before exponentiating: the partial
likelihood does not change, and ``exp`` stays in range. The Breslow baseline hazard and
absolute risk at a horizon come from the same sums (:func:`breslow_baseline`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from cardiofed.exceptions import ConfigurationError, DataValidationError
from cardiofed.survival._checks import (
    check_covariates,
    check_grid,
    check_outcome,
    check_weights,
)
from cardiofed.survival.kaplan_meier import grid_positions

__all__ = ["CoxFit", "CoxSums", "Newton", "absolute_risk", "baseline_at", "breslow_baseline",
           "derivatives", "event_time_grid", "fit_cox", "partial_likelihood", "pooled_sums",
           "site_cox_sums"]

TIES = ("efron", "breslow")


@dataclass(frozen=True)
class CoxSums:
    """One site's sums at one ``beta`` (K grid points, d covariates)."""

    events: np.ndarray      # (K,) events at g_k
    event_x: np.ndarray     # (K, d) sum of x over those events
    event_eta: np.ndarray   # (K,) sum of x beta over those events
    risk0: np.ndarray       # (K,) sum of exp(x beta) over the risk set
    risk1: np.ndarray       # (K, d)
    risk2: np.ndarray       # (K, d, d)
    tied0: np.ndarray       # (K,) the same three sums over the events at g_k (Efron)
    tied1: np.ndarray       # (K, d)
    tied2: np.ndarray       # (K, d, d)


def event_time_grid(*times_with_events: tuple[object, object]) -> np.ndarray:
    """Every distinct event time of the given (time, event) pairs: the grid on which the
    pooled fit is exact per event time."""
    found = [t[e] for t, e in (check_outcome(t, e) for t, e in times_with_events)]
    grid = np.unique(np.concatenate(found)) if found else np.empty(0)
    if grid.size == 0:
        raise DataValidationError("No site has an event: a Cox model cannot be fitted.")
    return grid


def site_cox_sums(time: object, event: object, x: object, beta: object, grid: object,
                  center: object | None = None, weights: object | None = None) -> CoxSums:
    """A site's :class:`CoxSums` at `beta` on the public `grid`; with case `weights` every
    sum (event counts included) is weighted (fit those with Breslow's ties)."""
    g = check_grid(grid)
    t, e = check_outcome(time, event)
    m = check_covariates(x, t.size)
    case = check_weights(weights, t.size)
    d = m.shape[1]
    b = _check_vector(beta, d, "beta")
    c = np.zeros(d) if center is None else _check_vector(center, d, "center")
    xc = m - c
    with np.errstate(over="ignore", invalid="ignore"):
        eta = xc @ b
    if not np.isfinite(eta).all() or np.abs(eta).max(initial=0.0) > 700:
        raise DataValidationError("exp(x beta) overflows at these coefficients: centre the "
                                  "covariates (the 'center' parameter) or scale them.")
    w = np.exp(eta) * case
    last, ev = grid_positions(t, e, g)
    K = g.size
    # Sums over {i: last_i == j}, then reverse cumulative sums: the risk sets {last_i >= j}.
    seen = last >= 0
    at = np.zeros((K, 1 + d + d * d))
    with np.errstate(over="ignore", invalid="ignore"):
        np.add.at(at, last[seen], _at_rows(xc[seen], w[seen]))
        risk = np.cumsum(at[::-1], axis=0)[::-1]
        tied = np.zeros((K, 1 + d + d * d))
        np.add.at(tied, last[ev], _at_rows(xc[ev], w[ev]))
    if not (np.isfinite(risk).all() and np.isfinite(tied).all()):
        raise DataValidationError("The sums of exp(x beta) x x' overflow at these "
                                  "coefficients and covariates: centre or scale them.")
    events = np.bincount(last[ev], weights=case[ev], minlength=K)
    event_x = np.zeros((K, d))
    np.add.at(event_x, last[ev], xc[ev] * case[ev, None])
    event_eta = np.bincount(last[ev], weights=(eta * case)[ev], minlength=K)
    return CoxSums(events=events, event_x=event_x, event_eta=event_eta,
                   risk0=risk[:, 0], risk1=risk[:, 1:1 + d],
                   risk2=risk[:, 1 + d:].reshape(K, d, d),
                   tied0=tied[:, 0], tied1=tied[:, 1:1 + d],
                   tied2=tied[:, 1 + d:].reshape(K, d, d))


def _at_rows(xc: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Per row: ``[w, w x, w x x']`` flattened."""
    d = xc.shape[1]
    return np.hstack([w[:, None], xc * w[:, None],
                      (xc[:, :, None] * xc[:, None, :]).reshape(-1, d * d) * w[:, None]])


def pooled_sums(parts: Sequence[CoxSums]) -> CoxSums:
    """Sites' sums added (same grid, beta and centre): the pooled rows' sums."""
    if not parts:
        raise DataValidationError("Pooling Cox sums needs at least one site's.")
    return CoxSums(**{k: np.sum([getattr(p, k) for p in parts], axis=0)
                      for k in parts[0].__dict__})


def partial_likelihood(sums: CoxSums, ties: str = "efron"
                       ) -> tuple[float, np.ndarray, np.ndarray]:
    """Log partial likelihood, gradient and Hessian at the sums' ``beta``."""
    if ties not in TIES:
        raise ConfigurationError(f"The 'ties' parameter must be one of {TIES}; got {ties!r}.")
    if ties == "efron" and not np.allclose(sums.events, np.round(sums.events)):
        raise ConfigurationError("Weighted event counts need ties='breslow' (Efron's "
                                 "correction counts tied events one by one).")
    d = sums.event_x.shape[1]
    ll, grad, hess = 0.0, np.zeros(d), np.zeros((d, d))
    for k in np.flatnonzero(sums.events > 0):
        ll += sums.event_eta[k]
        grad += sums.event_x[k]
        if ties == "efron":  # the l-th of n_k tied events sees the risk set less l/n_k
            n_k = int(round(sums.events[k]))
            fractions, weight = np.arange(n_k) / n_k, 1.0
        else:  # Breslow: every event (or its weight) sees the whole risk set
            fractions, weight = np.zeros(1), float(sums.events[k])
        for f in fractions:
            s0 = sums.risk0[k] - f * sums.tied0[k]
            s1 = sums.risk1[k] - f * sums.tied1[k]
            s2 = sums.risk2[k] - f * sums.tied2[k]
            mean = s1 / s0
            ll -= weight * math.log(s0)
            grad -= weight * mean
            hess -= weight * (s2 / s0 - np.outer(mean, mean))
    return ll, grad, hess


@dataclass(frozen=True)
class CoxFit:
    """A fitted Cox model: coefficients (per covariate, on the uncentred scale), their
    standard errors from the observed information, the log partial likelihood."""

    beta: np.ndarray
    se: np.ndarray
    loglik: float
    iterations: int
    stratified: bool
    ties: str
    covariance: np.ndarray = field(repr=False)


SumsAt = Callable[[np.ndarray], Sequence[CoxSums]]


def fit_cox(sums_at: SumsAt, n_covariates: int, *, stratified: bool = False,
            ties: str = "efron", max_iter: int = 50, tol: float = 1e-10) -> CoxFit:
    """Newton-Raphson on the federated partial likelihood (step halving when it falls).

    `sums_at(beta)` gathers every site's :class:`CoxSums` at ``beta`` (in process or over a
    network: the fit does not care). ``stratified`` adds the sites' own derivatives (each
    site its own baseline hazard); otherwise their sums are added first (the pooled model).
    Converged when the largest Newton step is below `tol`. The steps are those of
    :class:`Newton`, which a networked study takes one round at a time."""
    check_newton_settings(ties, max_iter)
    state = Newton.start(n_covariates)
    while not state.converged:
        sites = list(sums_at(state.request))
        if not sites:
            raise DataValidationError("fit_cox needs at least one site's sums.")
        state = state.next(derivatives(sites, stratified, ties), max_iter=max_iter, tol=tol)
    return state.fit(stratified, ties)


def check_newton_settings(ties: str, max_iter: object) -> None:
    if ties not in TIES:
        raise ConfigurationError(f"The 'ties' parameter must be one of {TIES}; got {ties!r}.")
    if not (isinstance(max_iter, int) and max_iter >= 1):
        raise ConfigurationError(f"The 'max_iter' parameter must be an integer >= 1; "
                                 f"got {max_iter!r}.")


Derivatives = tuple[float, np.ndarray, np.ndarray]


def derivatives(sites: Sequence[CoxSums], stratified: bool, ties: str) -> Derivatives:
    """The federation's log partial likelihood, gradient and Hessian from the sites' sums
    at one ``beta``: the pooled sums' (one baseline), or the sum of each site's own
    (stratified by site)."""
    if stratified:
        parts = [partial_likelihood(s, ties) for s in sites]
        return (sum(p[0] for p in parts), np.sum([p[1] for p in parts], axis=0),
                np.sum([p[2] for p in parts], axis=0))
    return partial_likelihood(pooled_sums(sites), ties)


MAX_HALVINGS = 30


@dataclass(frozen=True)
class Newton:
    """A Newton-Raphson fit between two evaluations of the derivatives: `request` is the
    ``beta`` they are wanted at next; the accepted point so far, its derivatives and the
    step being tried (halved while the likelihood falls). JSON round-trips exactly."""

    request: np.ndarray
    beta: np.ndarray | None = None
    loglik: float = 0.0
    gradient: np.ndarray | None = None
    hessian: np.ndarray | None = None
    step: np.ndarray | None = None
    halvings: int = 0
    iterations: int = 0
    converged: bool = False

    @classmethod
    def start(cls, n_covariates: int) -> Newton:
        return cls(request=np.zeros(n_covariates))

    def next(self, at_request: Derivatives, *, max_iter: int, tol: float) -> Newton:
        """The state once the derivatives at `request` are known."""
        ll, grad, hess = at_request
        if self.beta is None:  # the starting point
            return _newton_step(self.request, ll, grad, hess, 0)
        assert self.step is not None
        if not (math.isfinite(ll) and ll >= self.loglik - 1e-12 * abs(self.loglik)) \
                and self.halvings < MAX_HALVINGS:
            step = self.step / 2
            return replace(self, request=self.beta + step, step=step,
                           halvings=self.halvings + 1)
        accepted = replace(self, beta=self.request, loglik=ll, gradient=grad, hessian=hess)
        if np.abs(self.step).max() < tol:
            return replace(accepted, converged=True)
        if self.iterations >= max_iter:
            raise DataValidationError(f"The Cox fit did not converge in {max_iter} Newton "
                                      f"steps (monotone likelihood: a covariate separates "
                                      f"events from survivors?).")
        return _newton_step(self.request, ll, grad, hess, self.iterations)

    def fit(self, stratified: bool, ties: str) -> CoxFit:
        """The converged fit (standard errors from the observed information)."""
        if not self.converged or self.beta is None or self.hessian is None:
            raise DataValidationError("The Cox fit has not converged yet.")
        covariance = np.linalg.inv(-self.hessian)
        return CoxFit(beta=self.beta, se=np.sqrt(np.diag(covariance)), loglik=self.loglik,
                      iterations=self.iterations, stratified=stratified, ties=ties,
                      covariance=covariance)

    def to_json(self) -> dict[str, Any]:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v)
                for k, v in self.__dict__.items()}

    @classmethod
    def from_json(cls, state: dict[str, Any]) -> Newton:
        def array(key: str) -> np.ndarray | None:
            return None if state[key] is None else np.asarray(state[key], dtype=np.float64)

        request = array("request")
        assert request is not None
        return cls(request=request, beta=array("beta"), gradient=array("gradient"),
                   hessian=array("hessian"), step=array("step"),
                   loglik=float(state["loglik"]), halvings=int(state["halvings"]),
                   iterations=int(state["iterations"]), converged=bool(state["converged"]))


def _newton_step(beta: np.ndarray, ll: float, grad: np.ndarray, hess: np.ndarray,
                 iterations: int) -> Newton:
    try:
        step = np.linalg.solve(-hess, grad)
    except np.linalg.LinAlgError:
        raise DataValidationError("The Cox model's information matrix is singular: a "
                                  "covariate is constant or collinear with others, "
                                  "or no event is left.") from None
    return Newton(request=beta + step, beta=beta, loglik=ll, gradient=grad, hessian=hess,
                  step=step, iterations=iterations + 1)


def breslow_baseline(sums: CoxSums) -> np.ndarray:
    """Breslow's baseline cumulative hazard at the grid points, from (summed) sums at the
    fitted ``beta``: ``H0(g_k) = sum_{j <= k} d_j / risk0_j``, for covariates at the
    sums' centre."""
    return breslow_cumulative(sums.events, sums.risk0)


def breslow_cumulative(events: np.ndarray, risk0: np.ndarray) -> np.ndarray:
    """``cumsum(d_k / risk0_k)``, 0 where a risk set is empty: Breslow's baseline from the
    two sums it needs (:func:`breslow_baseline`)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        steps = np.where(risk0 > 0, events / risk0, 0.0)
    return np.cumsum(steps)


def baseline_at(baseline: np.ndarray, grid: object, horizon: float) -> float:
    """The baseline cumulative hazard by `horizon`: its value at the last grid point <=
    horizon (0 before the first)."""
    g = check_grid(grid)
    if not (math.isfinite(horizon) and horizon > 0):
        raise ConfigurationError(f"The 'horizon' parameter must be a finite time > 0; "
                                 f"got {horizon!r}.")
    k = int(np.searchsorted(g, horizon, side="right"))
    return 0.0 if k == 0 else float(baseline[k - 1])


def absolute_risk(x: object, fit: CoxFit, baseline: np.ndarray, grid: object,
                  horizon: float, center: object | None = None) -> np.ndarray:
    """Each row's risk of an event by `horizon`: ``1 - exp(-H0(horizon) exp((x - c) beta))``
    with ``H0`` from :func:`baseline_at` (the sums' centre `c`)."""
    h0 = baseline_at(baseline, grid, horizon)
    m = np.asarray(x, dtype=np.float64)
    c = np.zeros(m.shape[1]) if center is None else _check_vector(center, m.shape[1], "center")
    return -np.expm1(-h0 * np.exp((m - c) @ fit.beta))


def _check_vector(value: object, d: int, name: str) -> np.ndarray:
    v = np.asarray(value, dtype=np.float64)
    if v.shape != (d,) or not np.isfinite(v).all():
        raise ConfigurationError(f"The '{name}' parameter must be {d} finite numbers; got "
                                 f"shape {v.shape}.")
    return v
