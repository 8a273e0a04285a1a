"""A survival model judged at each site at a horizon, with the binary models' verdicts:
Uno's C, observed (Kaplan-Meier) against predicted risk, and the calibration slope and
calibration-in-the-large with their 95% intervals (:mod:`cardiofed.survival.metrics`),
judged by :func:`~cardiofed.experiments.acceptability.calibration_checks`."""

from __future__ import annotations

from typing import Any

import numpy as np

from cardiofed.experiments.acceptability import calibration_checks, combined
from cardiofed.survival.metrics import calibration_at, uno_c

__all__ = ["assess_at"]


def assess_at(time: np.ndarray, event: np.ndarray, risk: np.ndarray, horizon: float,
              true_risk: np.ndarray | None = None) -> dict[str, Any]:
    """One site's figures at `horizon` (JSON-ready), `true_risk` where it is known."""
    cal = calibration_at(time, event, risk, horizon)
    slope, citl = calibration_checks(cal.slope, cal.slope_interval, cal.citl,
                                     cal.citl_interval)
    out = {"n": int(len(time)), "events": int(np.sum(event)),
           "uno_c": uno_c(time, event, risk, horizon), "observed": cal.observed,
           "observed_ci": list(cal.observed_interval), "predicted": cal.expected,
           "slope": cal.slope, "slope_ci": list(cal.slope_interval), "citl": cal.citl,
           "citl_ci": list(cal.citl_interval), "verdict": str(combined((slope, citl))),
           "reasons": [c.reason for c in (slope, citl) if c.reason]}
    if true_risk is not None:
        out["true_risk"] = float(np.mean(true_risk))
    return out
