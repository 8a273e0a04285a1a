"""Personalisation by local fine-tuning with a proximal term (Ditto's personal objective).

Li, Hu, Beirami and Smith, "Ditto: Fair and Robust Federated Learning Through
Personalization", ICML 2021: each site keeps a personal model ``v`` minimising its own
loss plus ``lam / 2 * ||v - w||^2``, with ``w`` the global model. Here a site solves
that once, from the final global model, on its training rows; ``lam`` is chosen on the
site's calibration split (mean log-loss) from a grid that includes not fine-tuning at
all, so the personal model is never worse than the global one on the rows it was chosen
on. The personal model never leaves the site.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from cardiofed.exceptions import ConfigurationError
from cardiofed.models.networks import Weights, get_weights, make_model, score, set_weights
from cardiofed.training.local import LocalTrainingConfig, train_local

__all__ = ["PROXIMAL_GRID", "Personalisation", "finetune"]

PROXIMAL_GRID = (0.01, 0.1, 1.0)


@dataclass(frozen=True)
class Personalisation:
    """A site's personal model and how it was chosen (``lam`` inf: the global model)."""

    weights: Weights
    lam: float
    calibration_loss: dict[float, float]  # lam -> mean log-loss on the calibration split


def _log_loss(y: np.ndarray, p: np.ndarray) -> float:
    q = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(q) + (1 - y) * np.log1p(-q)))


def finetune(model_kind: str, global_weights: Weights, x_fit: np.ndarray, y_fit: np.ndarray,
             x_cal: np.ndarray, y_cal: np.ndarray, *, config: LocalTrainingConfig,
             epochs: int, seed: int, grid: Sequence[float] = PROXIMAL_GRID) -> Personalisation:
    """Fine-tune the global model at one site and keep the best ``lam`` on its
    calibration split (preprocessed rows; labels 0/1)."""
    if not grid or any(not (math.isfinite(lam) and lam > 0) for lam in grid):
        raise ConfigurationError(f"The 'grid' parameter must hold finite values > 0; got "
                                 f"{list(grid)!r}.")
    if len(y_cal) == 0:
        return Personalisation(global_weights, math.inf, {})
    y_cal = np.asarray(y_cal, dtype=np.float64)
    losses = {math.inf: _log_loss(y_cal, score(model_kind, global_weights, x_cal))}
    candidates = {math.inf: global_weights}
    for lam in grid:
        model = make_model(model_kind, x_fit.shape[1], seed=0)
        set_weights(model, global_weights)
        local = replace(config, proximal_mu=float(lam), local_epochs=epochs, local_steps=None)
        train_local(model, x_fit, y_fit, local, seed=seed, anchor=global_weights)
        candidates[lam] = get_weights(model)
        losses[lam] = _log_loss(y_cal, score(model_kind, candidates[lam], x_cal))
    best = min(losses, key=lambda lam: (losses[lam], -lam))  # ties: the stronger anchor
    return Personalisation(candidates[best], best, losses)
