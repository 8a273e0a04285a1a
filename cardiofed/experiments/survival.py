"""A survival model judged at each site at a horizon, with the binary models' verdicts:
Uno's C (its 95% interval from a bootstrap of the site's rows, seeded: an evaluation,
not a private release), observed (Kaplan-Meier) against predicted risk, and the
calibration slope and calibration-in-the-large with their 95% intervals
(:mod:`cardiofed.survival.metrics`), judged as the binary models' AUC, slope and
calibration-in-the-large are (:mod:`cardiofed.experiments.acceptability`)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from cardiofed.experiments.acceptability import (
    calibration_checks,
    combined,
    discrimination_check,
)
from cardiofed.survival.metrics import calibration_at, uno_c

__all__ = ["assess_at"]


def assess_at(time: np.ndarray, event: np.ndarray, risk: np.ndarray, horizon: float,
              true_risk: np.ndarray | None = None, *, resamples: int = 200,
              seed: int = 0) -> dict[str, Any]:
    """One site's figures at `horizon` (JSON-ready), `true_risk` where it is known;
    `resamples` of the bootstrap of Uno's C."""
    cal = calibration_at(time, event, risk, horizon)
    slope, citl = calibration_checks(cal.slope, cal.slope_interval, cal.citl,
                                     cal.citl_interval)
    c = uno_c(time, event, risk, horizon)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        rows = rng.integers(0, len(time), len(time))
        draws.append(uno_c(time[rows], event[rows], risk[rows], horizon))
    finite = np.asarray(draws)[np.isfinite(draws)]
    c_ci = ((float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5)))
            if finite.size else (math.nan, math.nan))
    discrimination = discrimination_check(c, c_ci, name="Uno's C")
    checks = (discrimination, slope, citl)
    out = {"n": int(len(time)), "events": int(np.sum(event)), "uno_c": c,
           "uno_c_ci": list(c_ci), "observed": cal.observed,
           "observed_ci": list(cal.observed_interval), "predicted": cal.expected,
           "slope": cal.slope, "slope_ci": list(cal.slope_interval), "citl": cal.citl,
           "citl_ci": list(cal.citl_interval), "verdict": str(combined(checks)),
           "calibration_verdict": str(combined((slope, citl))),
           "reasons": [check.reason for check in checks if check.reason]}
    if true_risk is not None:
        out["true_risk"] = float(np.mean(true_risk))
    return out
