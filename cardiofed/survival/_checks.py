"""Validation shared by the survival modules: errors name the argument and the value."""

from __future__ import annotations

import numpy as np

from cardiofed.exceptions import ConfigurationError, DataValidationError


def check_grid(grid: object) -> np.ndarray:
    """A public time grid: 1-D, finite, > 0 and strictly increasing."""
    g = np.asarray(grid, dtype=np.float64)
    if g.ndim != 1 or g.size == 0:
        raise ConfigurationError(f"The 'grid' parameter must be a non-empty 1-D list of "
                                 f"times; got shape {g.shape}.")
    if not np.isfinite(g).all() or (g <= 0).any() or (np.diff(g) <= 0).any():
        raise ConfigurationError(f"The 'grid' parameter must hold finite times > 0 in "
                                 f"strictly increasing order; got {g[:5].tolist()}"
                                 f"{' ...' if g.size > 5 else ''}.")
    return g


def check_outcome(time: object, event: object) -> tuple[np.ndarray, np.ndarray]:
    """Follow-up times (finite, > 0) and event indicators (0 or 1) of equal length."""
    t = np.asarray(time, dtype=np.float64)
    e = np.asarray(event, dtype=np.float64)
    if t.ndim != 1 or e.shape != t.shape:
        raise DataValidationError(f"time and event must be 1-D of equal length; got shapes "
                                  f"{t.shape} and {e.shape}.")
    bad = ~np.isfinite(t) | (t <= 0)
    if bad.any():
        raise DataValidationError(f"Follow-up times must be finite and > 0; {int(bad.sum())} "
                                  f"are not (the first at row {int(np.argmax(bad))}).")
    bad = ~np.isin(e, (0.0, 1.0))
    if bad.any():
        raise DataValidationError(f"Event indicators must be 0 (censored) or 1 (event); "
                                  f"{int(bad.sum())} are not (the first at row "
                                  f"{int(np.argmax(bad))}).")
    return t, e.astype(bool)


def check_covariates(x: object, n: int) -> np.ndarray:
    """An (n, d) matrix of finite covariates (imputed before it reaches a model)."""
    m = np.asarray(x, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != n:
        raise DataValidationError(f"x must be a 2-D matrix with one row per patient ({n}); "
                                  f"got shape {m.shape}.")
    if not np.isfinite(m).all():
        raise DataValidationError("x holds missing or non-finite values: impute them first "
                                  "(the federation's preprocessor fills them).")
    return m


def check_weights(weights: object | None, n: int) -> np.ndarray:
    """Case weights: finite, >= 0, one per patient (all ones when None)."""
    if weights is None:
        return np.ones(n)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or not np.isfinite(w).all() or (w < 0).any():
        raise DataValidationError(f"weights must be {n} finite numbers >= 0; got shape "
                                  f"{w.shape}.")
    return w
