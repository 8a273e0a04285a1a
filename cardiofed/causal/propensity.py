"""The federated propensity model: logistic regression of treatment on covariates, fitted
by Newton-Raphson from each site's gradient and Hessian (sums over its rows, never the
rows), which reaches the pooled maximum-likelihood fit exactly.

Covariates are standardised with federated means and SDs first (sums of x and x^2 per
site), so the Newton steps are well conditioned; the intercept is the first column.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cardiofed.exceptions import DataValidationError

MAX_NEWTON = 50


@dataclass(frozen=True)
class Standardiser:
    """Covariate centring and scaling from the federation's sums."""

    mean: np.ndarray
    sd: np.ndarray

    @classmethod
    def from_sites(cls, xs: Sequence[np.ndarray]) -> Standardiser:
        return cls.from_sums(sum(len(x) for x in xs), sum(x.sum(axis=0) for x in xs),
                             sum((x ** 2).sum(axis=0) for x in xs))

    @classmethod
    def from_sums(cls, n: float, s1: np.ndarray, s2: np.ndarray) -> Standardiser:
        """From the federation's row count, sums of x and sums of x^2."""
        mean = s1 / n
        sd = np.sqrt(np.maximum(s2 / n - mean ** 2, 0.0))
        if np.any(sd == 0):
            raise DataValidationError("A covariate is constant across every site; drop it "
                                      "from the propensity model.")
        return cls(mean, sd)

    def design(self, x: np.ndarray) -> np.ndarray:
        """The model's columns: an intercept and the standardised covariates."""
        return np.column_stack([np.ones(len(x)), (x - self.mean) / self.sd])


def sigmoid(z: np.ndarray) -> np.ndarray:
    out: np.ndarray = 0.5 * (1.0 + np.tanh(0.5 * z))
    return out


def newton_terms(z: np.ndarray, t: np.ndarray, beta: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, float]:
    """What a site sends for one Newton step: the log-likelihood's gradient and
    (negative) Hessian at `beta`, and its log-likelihood."""
    e = sigmoid(z @ beta)
    grad = z.T @ (t - e)
    info = (z * (e * (1 - e))[:, None]).T @ z
    loglik = float(np.sum(t * np.log(np.clip(e, 1e-300, None))
                          + (1 - t) * np.log(np.clip(1 - e, 1e-300, None))))
    return grad, info, loglik


@dataclass(frozen=True)
class PropensityModel:
    standardiser: Standardiser
    beta: np.ndarray
    iterations: int

    def logit(self, x: np.ndarray) -> np.ndarray:
        out: np.ndarray = self.standardiser.design(x) @ self.beta
        return out

    def score(self, x: np.ndarray) -> np.ndarray:
        return sigmoid(self.logit(x))


def fit_propensity(xs: Sequence[np.ndarray], ts: Sequence[np.ndarray], *,
                   tol: float = 1e-10) -> PropensityModel:
    """Newton-Raphson on the summed site terms until the step is below `tol`."""
    standardiser = Standardiser.from_sites(xs)
    zs = [standardiser.design(x) for x in xs]
    beta = np.zeros(zs[0].shape[1])
    for iteration in range(1, MAX_NEWTON + 1):
        terms = [newton_terms(z, t, beta) for z, t in zip(zs, ts, strict=True)]
        grad = np.sum([g for g, _, _ in terms], axis=0)
        info = np.sum([h for _, h, _ in terms], axis=0)
        beta, converged = newton_step(beta, grad, info, iteration, tol)
        if converged:
            return PropensityModel(standardiser, beta, iteration)
    raise AssertionError("newton_step raises past MAX_NEWTON")


def newton_step(beta: np.ndarray, grad: np.ndarray, info: np.ndarray, iteration: int,
                tol: float = 1e-10) -> tuple[np.ndarray, bool]:
    """One Newton-Raphson step from the summed site terms: the new coefficients, and
    whether the step was below `tol` (converged). Raises when the fit cannot go on."""
    try:
        step = np.linalg.solve(info, grad)
    except np.linalg.LinAlgError:
        raise DataValidationError("The propensity model cannot be fitted: its "
                                  "information matrix is singular (a covariate is a "
                                  "combination of others, or treatment is perfectly "
                                  "predicted by the covariates: no overlap).") from None
    converged = bool(np.max(np.abs(step)) < tol)
    if not converged and iteration >= MAX_NEWTON:
        raise DataValidationError(f"The propensity model did not converge in {MAX_NEWTON} "
                                  f"Newton steps: treatment may be perfectly predicted by "
                                  f"the covariates (no overlap).")
    return beta + step, converged
