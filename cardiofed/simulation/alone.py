"""The model a site would build alone: the strongest honest local-only baseline.

A hospital's data team would not stop a logistic regression after a fixed number of SGD
epochs: it fits it to convergence, with an L2 penalty chosen by stratified 5-fold
cross-validation on its own rows (log-loss), as scikit-learn's ``LogisticRegressionCV``
makes routine. :func:`train_alone` does that in NumPy (Newton steps to the optimum: the
same penalty and model as scikit-learn converged, tested, without its per-fit overhead).
The MLP has no such closed recipe and trains with the federation's own local recipe
(:func:`cardiofed.simulation.runner.train_centralised`). Local-only baselines and the
effective-data learning curves both use it, so a federation is never compared with a
weakened local model.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from cardiofed.models.networks import Weights
from cardiofed.simulation.config import SimulationConfig

__all__ = ["PENALTY_GRID", "train_alone"]

PENALTY_GRID = tuple(float(c) for c in np.logspace(-3, 3, 7))  # sklearn's C = 1 / lambda
FOLDS = 5
_MAX_NEWTON = 100
_NEWTON_TOL = 1e-8


def _fit(x1: np.ndarray, y: np.ndarray, rows: np.ndarray, inverse_c: float,
         beta: np.ndarray) -> np.ndarray:
    """For each problem f, the minimiser of ``sum over rows[f] of log-loss + |w|^2 / (2 C)``
    (the intercept, x1's last column, unpenalised: scikit-learn's objective), by damped
    Newton steps from ``beta[f]``; `rows` (problems x records) holds 0/1 row weights. All
    problems step at once: one NumPy call per step for every fold."""
    penalty = np.full(x1.shape[1], inverse_c)
    penalty[-1] = 0.0

    def objective(b: np.ndarray) -> np.ndarray:
        z = b @ x1.T
        return (np.sum(rows * (np.logaddexp(0.0, z) - y * z), axis=1)
                + 0.5 * np.sum(penalty * b * b, axis=1))

    current = objective(beta)
    for _ in range(_MAX_NEWTON):
        p = 0.5 * (1.0 + np.tanh(0.5 * (beta @ x1.T)))  # expit without overflow
        gradient = (rows * (p - y)) @ x1 + penalty * beta
        hessian = np.transpose(x1[None] * (rows * p * (1.0 - p))[..., None], (0, 2, 1)) @ x1
        hessian += np.diag(penalty)  # positive definite: penalty > 0
        step = np.linalg.solve(hessian, gradient[..., None])[..., 0]
        converged = (np.max(np.abs(step), axis=1)
                     <= _NEWTON_TOL * (1.0 + np.max(np.abs(beta), axis=1)))
        if converged.all():
            return beta - step  # a full step, below rounding in the objective
        size = np.ones(len(beta))
        while True:  # halve each problem's step until its objective does not rise
            candidate = beta - size[:, None] * step
            value = objective(candidate)
            rising = (value > current) & ~converged & (size >= 1e-8)
            if not rising.any():
                break
            size[rising] /= 2.0
        beta, current = candidate, value
    return beta


def _ridge_logistic_cv(x: np.ndarray, y: np.ndarray, folds: StratifiedKFold) -> np.ndarray:
    """scikit-learn's ``LogisticRegressionCV(Cs=PENALTY_GRID, scoring="neg_log_loss")``
    in NumPy: each fold's path over the grid (warm-started), the penalty with the least
    held-out log-loss summed over folds (the first on ties), refitted on every row. The
    objective is strictly convex, so the fits are scikit-learn's converged ones; without
    its per-fit validation and dispatch, many times faster on a site's few hundred rows
    (the effective-data curves fit over a hundred sites' worth)."""
    x1 = np.column_stack([x, np.ones(len(x))]).astype(np.float64)
    yy = y.astype(np.float64)
    train = np.zeros((folds.get_n_splits(), len(x1)))
    for f, (rows, _) in enumerate(folds.split(x1, y)):
        train[f, rows] = 1.0
    test = 1.0 - train
    losses = np.zeros(len(PENALTY_GRID))
    beta = np.zeros((len(train), x1.shape[1]))
    for k, c in enumerate(PENALTY_GRID):
        beta = _fit(x1, yy, train, 1.0 / c, beta)
        z = beta @ x1.T
        losses[k] = float(np.sum(np.sum(test * (np.logaddexp(0.0, z) - yy * z), axis=1)
                                 / test.sum(axis=1)))
    best = int(np.argmin(losses))
    return _fit(x1, yy, np.ones((1, len(x1))), 1.0 / PENALTY_GRID[best],
                np.zeros((1, x1.shape[1])))[0]


def train_alone(x: np.ndarray, y: np.ndarray, config: SimulationConfig, *,
                seed: int) -> Weights:
    """One site's own model on its preprocessed rows `x` and 0/1 labels `y`."""
    if config.model != "logistic":
        from cardiofed.simulation.runner import train_centralised

        return train_centralised(x, y, config, seed=seed)
    labels = np.asarray(y).astype(int)
    rarer = int(min(labels.sum(), labels.size - labels.sum()))
    if rarer >= 2:
        folds = StratifiedKFold(n_splits=min(FOLDS, rarer), shuffle=True, random_state=seed)
        beta = _ridge_logistic_cv(x, labels, folds)
        return {"linear.weight": beta[:-1].astype(np.float32).reshape(1, -1),
                "linear.bias": beta[-1:].astype(np.float32)}
    if rarer == 1:
        # One event: nothing to tune on; scikit-learn's default penalty.
        model = LogisticRegression(max_iter=5000).fit(x, labels)
    else:  # one class: the intercept says everything there is to say
        rate = float(np.clip(labels.mean(), 1e-6, 1 - 1e-6))
        return {"linear.weight": np.zeros((1, x.shape[1]), np.float32),
                "linear.bias": np.array([np.log(rate / (1 - rate))], np.float32)}
    return {"linear.weight": model.coef_.astype(np.float32).reshape(1, -1),
            "linear.bias": model.intercept_.astype(np.float32).reshape(1)}
