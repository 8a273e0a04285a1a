"""Weighted averaging of model updates, whole or one update at a time.

Pure functions on named arrays (:data:`~cardiofed.models.networks.Weights`). Folding
one update at a time (:func:`accumulate`) gives exactly the batch result of
:func:`weighted_mean` and is what asynchronous aggregation needs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from cardiofed.models.kinds import Weights


@dataclass(frozen=True)
class Accumulator:
    """A running weighted sum of updates and the total weight folded so far."""

    weighted_sum: Weights
    total_weight: float
    count: int


def accumulate(acc: Accumulator | None, update: Weights, weight: float) -> Accumulator:
    """Fold one update with a non-negative weight into the running sum."""
    if not np.isfinite(weight) or weight < 0:
        raise ValueError(f"Aggregation weight must be finite and >= 0; got {weight!r}.")
    if acc is None:
        return Accumulator({k: np.asarray(v, dtype=np.float64) * weight for k, v in update.items()},
                           float(weight), 1)
    if set(update) != set(acc.weighted_sum):
        raise ValueError(f"Update names {sorted(update)} differ from {sorted(acc.weighted_sum)}.")
    for k, v in update.items():
        if np.shape(v) != acc.weighted_sum[k].shape:
            raise ValueError(f"Update {k!r} has shape {np.shape(v)}; "
                             f"earlier updates have {acc.weighted_sum[k].shape}.")
    return Accumulator({k: acc.weighted_sum[k] + weight * np.asarray(v, dtype=np.float64)
                        for k, v in update.items()},
                       acc.total_weight + float(weight), acc.count + 1)


def finalize(acc: Accumulator) -> Weights:
    """The weighted mean of everything accumulated (float32)."""
    if acc.total_weight <= 0:
        raise ValueError("Cannot average updates whose weights sum to 0.")
    return {k: (v / acc.total_weight).astype(np.float32) for k, v in acc.weighted_sum.items()}


def weighted_mean(updates: Sequence[Weights], weights: Sequence[float]) -> Weights:
    """sum_i w_i u_i / sum_i w_i over named arrays."""
    if len(updates) != len(weights):
        raise ValueError(f"Got {len(updates)} updates but {len(weights)} weights.")
    if not updates:
        raise ValueError("weighted_mean needs at least one update.")
    acc: Accumulator | None = None
    for update, weight in zip(updates, weights, strict=True):
        acc = accumulate(acc, update, weight)
    assert acc is not None
    return finalize(acc)


def tail_average(models: Sequence[Weights]) -> Weights:
    """The plain mean of the last rounds' global models (tail averaging: post-processing
    of models the server holds anyway), or the model itself when there is one."""
    if len(models) == 1:
        return models[0]
    return weighted_mean(models, [1.0] * len(models))


def shares(counts: Mapping[str, float]) -> dict[str, float]:
    """Counts as fractions of their total (all 0 when nothing was counted)."""
    total = sum(counts.values())
    return {name: c / total if total else 0.0 for name, c in counts.items()}


def sample_size_weights(num_samples: Sequence[int]) -> list[float]:
    """FedAvg's weights: each site in proportion to its training rows."""
    if any(n < 0 for n in num_samples):
        raise ValueError(f"Sample counts must be >= 0; got {list(num_samples)}.")
    return [float(n) for n in num_samples]
