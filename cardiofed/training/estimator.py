"""The risk model as a scikit-learn style estimator.

``RiskEstimator`` takes encoded feature rows (as produced by the site mapping, ``NaN``
for missing), fills and standardises them with its preprocessor, and returns event
probabilities. It is either fitted locally (``fit``) or built from a federated run's
global weights (``from_weights``), so a hospital can score its own patients without
the coordinator.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from cardiofed.data.preprocessing import Preprocessor, local_preprocessor
from cardiofed.models.networks import (
    Weights,
    get_weights,
    make_model,
    predict_logits,
    set_weights,
)
from cardiofed.training.local import LocalOptimizer, LocalTrainingConfig, train_local


class RiskEstimator(ClassifierMixin, BaseEstimator):
    """Binary event-risk classifier with ``fit``, ``predict_proba`` and ``predict``.

    Parameters are those of local training; learned attributes end in ``_``:
    ``weights_``, ``preprocessor_``, ``n_features_in_``, ``classes_``.
    """

    def __init__(self, model: str = "logistic", *, epochs: int = 20, batch_size: int = 32,
                 lr: float = 0.05, optimizer: str = "sgd", weight_decay: float = 0.0,
                 random_state: int = 0, feature_names: list[str] | None = None) -> None:
        self.model = model
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.optimizer = optimizer
        self.weight_decay = weight_decay
        self.random_state = random_state
        self.feature_names = feature_names

    def fit(self, X: Any, y: Any) -> RiskEstimator:
        """Train on encoded rows `X` (NaN = missing) and 0/1 labels `y`."""
        x = np.asarray(X, dtype=np.float64)
        labels = np.asarray(y)
        if x.ndim != 2 or len(x) != len(labels):
            raise ValueError(f"X must be 2-D with one row per label; got X {x.shape}, "
                             f"y {labels.shape}.")
        if not np.isin(labels, (0, 1)).all():
            raise ValueError("y must contain only 0 and 1.")
        observed = ~np.isnan(x)
        fill = np.array([np.median(x[observed[:, j], j]) if observed[:, j].any() else 0.0
                         for j in range(x.shape[1])])
        pre = local_preprocessor(x, fill)
        config = LocalTrainingConfig(lr=self.lr, batch_size=self.batch_size,
                                     local_epochs=self.epochs,
                                     optimizer=cast(LocalOptimizer, self.optimizer),
                                     weight_decay=self.weight_decay)
        net = make_model(self.model, x.shape[1], seed=self.random_state)
        train_local(net, pre.transform(x), labels.astype(np.float32), config,
                    seed=self.random_state)
        return self._set_fitted(get_weights(net), pre, x.shape[1])

    @classmethod
    def from_weights(cls, weights: Weights, preprocessor: Preprocessor, *, model: str = "logistic",
                     feature_names: list[str] | None = None) -> RiskEstimator:
        """Wrap a trained (e.g. federated) model and the preprocessor its sites used."""
        net = make_model(model, preprocessor.n_columns, seed=0)
        set_weights(net, weights)  # validates names and shapes
        return cls(model=model, feature_names=feature_names)._set_fitted(
            weights, preprocessor, len(preprocessor.fill))

    def _set_fitted(self, weights: Weights, pre: Preprocessor, n_features: int) -> RiskEstimator:
        self.weights_ = weights
        self.preprocessor_ = pre
        self.n_features_in_ = n_features  # encoded columns; the network takes pre's terms
        self.classes_ = np.array([0, 1])
        self._net = make_model(self.model, pre.n_columns, seed=0)
        set_weights(self._net, weights)
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        """Log-odds of the event for encoded rows `X`."""
        check_is_fitted(self, "weights_")
        x = np.asarray(X, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_features_in_:
            raise ValueError(f"X must have shape (n, {self.n_features_in_}); got {x.shape}.")
        return predict_logits(self._net, self.preprocessor_.transform(x))

    def predict_proba(self, X: Any) -> np.ndarray:
        """Columns: P(no event), P(event)."""
        p = 1.0 / (1.0 + np.exp(-self.decision_function(X)))
        return np.column_stack([1.0 - p, p])

    def predict(self, X: Any) -> np.ndarray:
        return (self.decision_function(X) >= 0).astype(np.int64)
