"""The model a site would build alone: the strongest honest local-only baseline.

A hospital's data team would not stop a logistic regression after a fixed number of SGD
epochs: it fits it to convergence, with an L2 penalty chosen by stratified 5-fold
cross-validation on its own rows (log-loss), as scikit-learn's tools make routine; the
fits take Newton steps (``newton-cholesky``: a few exact steps for a handful of columns,
converged more tightly and two to three times faster than L-BFGS at its default
tolerance).
:func:`train_alone` does exactly that for logistic regression; the MLP has no such
closed recipe and trains with the federation's own local recipe
(:func:`cardiofed.simulation.runner.train_centralised`). Local-only baselines and the
effective-data learning curves both use it, so a federation is never compared with a
weakened local model.
"""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold

from cardiofed.models.networks import Weights
from cardiofed.simulation.config import SimulationConfig

__all__ = ["PENALTY_GRID", "train_alone"]

PENALTY_GRID = tuple(float(c) for c in np.logspace(-3, 3, 7))  # sklearn's C = 1 / lambda
FOLDS = 5


def _neg_log_loss(model: LogisticRegression, x: np.ndarray, y: np.ndarray) -> float:
    """scikit-learn's ``neg_log_loss`` on a fold's fit, from its log-odds: the same
    choice of penalty without the per-call validation that took half the curve's time."""
    z = x @ np.ravel(model.coef_) + np.ravel(model.intercept_)[0]
    positive = (np.asarray(y) == model.classes_[1]).astype(float)
    return -float(np.mean(np.logaddexp(0.0, z) - positive * z))


def train_alone(x: np.ndarray, y: np.ndarray, config: SimulationConfig, *,
                seed: int) -> Weights:
    """One site's own model on its preprocessed rows `x` and 0/1 labels `y`."""
    if config.model != "logistic":
        from cardiofed.simulation.runner import train_centralised

        return train_centralised(x, y, config, seed=seed)
    labels = np.asarray(y).astype(int)
    rarer = int(min(labels.sum(), labels.size - labels.sum()))
    model: LogisticRegression | LogisticRegressionCV
    if rarer >= 2:
        folds = StratifiedKFold(n_splits=min(FOLDS, rarer), shuffle=True, random_state=seed)
        model = LogisticRegressionCV(Cs=list(PENALTY_GRID), cv=folds, scoring=_neg_log_loss,
                                     max_iter=5000, solver="newton-cholesky")
        with warnings.catch_warnings():  # scikit-learn 1.8 announces attribute changes
            warnings.simplefilter("ignore", FutureWarning)
            model.fit(x, labels)
    elif rarer == 1:
        # One event: nothing to tune on; scikit-learn's default penalty.
        model = LogisticRegression(max_iter=5000).fit(x, labels)
    else:  # one class: the intercept says everything there is to say
        rate = float(np.clip(labels.mean(), 1e-6, 1 - 1e-6))
        return {"linear.weight": np.zeros((1, x.shape[1]), np.float32),
                "linear.bias": np.array([np.log(rate / (1 - rate))], np.float32)}
    return {"linear.weight": model.coef_.astype(np.float32).reshape(1, -1),
            "linear.bias": model.intercept_.astype(np.float32).reshape(1)}
