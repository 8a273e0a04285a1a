"""Sums of per-record gradients, each clipped: what a site contributes to DP-FedSGD.

A record's gradient of the log-loss of a logistic regression at the global weights is
``(p - y) * x`` for the weights and ``p - y`` for the intercept. The weights' part is
scaled down to L2 norm at most `clip`; the intercept's part is left alone, as it is in
[-1, 1] already (clipping it with the rest would shrink the gradients of the rarer
class most and bias the intercept: a model that under-predicts). The site sums them:
adding or removing one record moves the sum by at most ``sqrt(clip^2 + 1)``
(:data:`sensitivity`, what the noise of a secure sum is calibrated to). Flattened in the
weights' order (``linear.weight`` then ``linear.bias``), so :func:`unflatten` reads it
back.

A record may also be a patient's block of person-period rows (``x`` of shape ``(n, J,
d)``, labels ``(n, J)`` with -1 where the patient was not at risk:
:mod:`cardiofed.survival.discrete`): its gradient is the sum over its rows, the weights'
part clipped as above and the intercept's part (a sum of ``p - y`` over the intervals
at risk, which small hazards keep within [-1, 1] in practice) clipped to [-1, 1], so the
sensitivity is the same.
"""

from __future__ import annotations

import numpy as np

from cardiofed.exceptions import ConfigurationError
from cardiofed.models.kinds import Weights


def clipped_gradient_sum(weights: Weights, x: np.ndarray, y: np.ndarray,
                         clip: float) -> np.ndarray:
    """The sum of each record's log-loss gradient of a logistic model, its weights' part
    clipped to L2 norm `clip` (flattened; see the module docstring): a record is a row,
    or a patient's block of person-period rows."""
    if set(weights) != {"linear.weight", "linear.bias"}:
        raise ConfigurationError("Clipped gradient sums are built for logistic regression "
                                 f"(weights linear.weight, linear.bias); got {sorted(weights)}.")
    if not clip > 0:
        raise ConfigurationError(f"The 'clip' parameter must be > 0; got {clip!r}.")
    w = weights["linear.weight"].astype(np.float64).ravel()
    b = float(weights["linear.bias"].ravel()[0])
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    z = x @ w + b
    residual = np.exp(-np.logaddexp(0.0, -z)) - y  # p - y
    if x.ndim == 2:
        norms = np.abs(residual) * np.sqrt((x * x).sum(axis=1))
        factor = residual * np.minimum(1.0, clip / np.maximum(norms, 1e-300))
        return np.concatenate([factor @ x, [residual.sum()]])
    residual = np.where(y < 0, 0.0, residual)  # intervals the patient was not at risk in
    grads = np.einsum("nj,njd->nd", residual, x)
    norms = np.sqrt((grads * grads).sum(axis=1))
    scale = np.minimum(1.0, clip / np.maximum(norms, 1e-300))
    return np.concatenate([scale @ grads, [np.clip(residual.sum(axis=1), -1.0, 1.0).sum()]])


def sensitivity(clip: float) -> float:
    """How far one record moves :func:`clipped_gradient_sum` (L2)."""
    return float(np.hypot(clip, 1.0))


FLAT_ORDER = ("linear.weight", "linear.bias")  # how clipped_gradient_sum lays them out


def unflatten(flat: np.ndarray, like: Weights) -> Weights:
    """A flat vector, laid out as :func:`clipped_gradient_sum` lays it out, back into
    arrays shaped as `like` (whatever the order of `like`'s names: weights decoded from
    the wire come in the file's order)."""
    out, start = {}, 0
    for name in sorted(like, key=lambda n: FLAT_ORDER.index(n) if n in FLAT_ORDER else 2):
        array = like[name]
        out[name] = flat[start:start + array.size].reshape(array.shape).astype(array.dtype)
        start += array.size
    out = {name: out[name] for name in like}
    if start != flat.size:
        raise ValueError(f"A flat vector of {flat.size} values does not fill weights of "
                         f"{start}.")
    return out
