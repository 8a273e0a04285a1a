"""A discrete-time survival model, trained by gradient like any other model.

Follow-up is cut at the points ``g_1 < ... < g_J`` of a public grid (e.g. every year to
the horizon). A patient is at risk in interval ``j`` (``(g_{j-1}, g_j]``) while followed
into it; the model gives the hazard there, ``h_j(x) = sigmoid(x beta + alpha_j)`` (the
logistic model of the patient's columns and an indicator per interval after the first),
and the risk by ``g_m`` is ``1 - prod_{j <= m} (1 - h_j(x))``. An event is carried up to
the end of its interval and a censoring down to the end of the previous one, as on the
Kaplan-Meier grid (:mod:`cardiofed.survival.kaplan_meier`).

Each patient is one record: a ``(J, d + J - 1)`` block of its columns beside the interval
indicators, and ``J`` labels (1 in the interval of its event, 0 in the others it was at
risk in, -1 where it was not at risk; :func:`~cardiofed.training.local.bce_loss`). So
FedAvg and the other algorithms train it unchanged, and DP-SGD clips each *patient's*
gradient (Opacus sums a linear layer's per-sample gradient over the intervals): the
ledger accounts for patients, not for rows of a person-period table.
"""

from __future__ import annotations

import numpy as np

from cardiofed.exceptions import ConfigurationError
from cardiofed.survival._checks import check_covariates, check_grid, check_outcome

__all__ = ["interval_grid", "person_periods", "risk_by"]


def interval_grid(horizon: float, step: float = 1.0) -> np.ndarray:
    """The ends of the intervals up to `horizon` (every `step` years)."""
    if not (np.isfinite(step) and step > 0 and np.isfinite(horizon) and horizon >= step):
        raise ConfigurationError(f"The 'horizon' ({horizon!r}) and 'step' ({step!r}) "
                                 f"parameters must be finite, with 0 < step <= horizon.")
    k = int(np.floor(horizon / step + 1e-9))
    return step * np.arange(1, k + 1)


def person_periods(time: object, event: object, x: object, grid: object
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Each patient's block of inputs, ``(n, J, d + J - 1)``, and labels, ``(n, J)``."""
    g = check_grid(grid)
    t, e = check_outcome(time, event)
    m = check_covariates(x, t.size)
    n, d, J = t.size, m.shape[1], g.size
    k = np.searchsorted(g, t, side="left")  # the interval each follow-up ends in (J: after)
    intervals = np.arange(J)
    events = e & (k < J)
    last = np.where(events, k, k - 1)  # the last interval at risk (censoring carried down)
    labels = np.where(intervals[None, :] <= last[:, None], 0.0, -1.0)
    labels[np.flatnonzero(events), k[events]] = 1.0
    inputs = np.zeros((n, J, d + J - 1), dtype=np.float32)
    inputs[:, :, :d] = m[:, None, :]
    inputs[:, intervals[1:], d + intervals[1:] - 1] = 1.0
    return inputs, labels.astype(np.float32)


def risk_by(logits: np.ndarray, grid: object, horizon: float) -> np.ndarray:
    """The risk of an event by `horizon` from each patient's interval logits ``(n, J)``."""
    g = check_grid(grid)
    m = int(np.searchsorted(g, horizon, side="right"))
    if m == 0:
        raise ConfigurationError(f"The horizon {horizon:g} lies before the grid's first "
                                 f"point {g[0]:g}.")
    log_survival = -np.logaddexp(0.0, np.asarray(logits, dtype=np.float64)[:, :m])
    return -np.expm1(log_survival.sum(axis=1))
