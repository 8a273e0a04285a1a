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
from cardiofed.survival.metrics import brier_at, calibration_at, harrell_c, horizon_auc, uno_c

__all__ = ["FIGURES", "assess_at", "horizon_figures", "judged"]

# One site's figures at a horizon, in the order a networked evaluation sends them.
FIGURES = ("n", "events", "uno_c", "uno_c_low", "uno_c_high", "observed", "observed_low",
           "observed_high", "predicted", "slope", "slope_low", "slope_high", "citl",
           "citl_low", "citl_high", "harrell_c", "horizon_auc", "brier")


def horizon_figures(time: np.ndarray, event: np.ndarray, risk: np.ndarray, horizon: float,
                    *, resamples: int = 200, seed: int = 0) -> dict[str, float]:
    """One site's :data:`FIGURES` at `horizon` (NaN where one is undefined); `resamples`
    of the bootstrap of Uno's C."""
    cal = calibration_at(time, event, risk, horizon)
    c = uno_c(time, event, risk, horizon)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        rows = rng.integers(0, len(time), len(time))
        draws.append(uno_c(time[rows], event[rows], risk[rows], horizon))
    finite = np.asarray(draws)[np.isfinite(draws)]
    c_ci = ((float(np.percentile(finite, 2.5)), float(np.percentile(finite, 97.5)))
            if finite.size else (math.nan, math.nan))
    return {"n": float(len(time)), "events": float(np.sum(event)), "uno_c": c,
            "uno_c_low": c_ci[0], "uno_c_high": c_ci[1], "observed": cal.observed,
            "observed_low": cal.observed_interval[0], "observed_high": cal.observed_interval[1],
            "predicted": cal.expected, "slope": cal.slope, "slope_low": cal.slope_interval[0],
            "slope_high": cal.slope_interval[1], "citl": cal.citl,
            "citl_low": cal.citl_interval[0], "citl_high": cal.citl_interval[1],
            "harrell_c": harrell_c(time, event, risk),
            "horizon_auc": horizon_auc(time, event, risk, horizon),
            "brier": brier_at(time, event, risk, horizon)}


def judged(figures: dict[str, float]) -> dict[str, Any]:
    """`figures` (:func:`horizon_figures`, computed here or reported by a site) as JSON-ready
    values (None where undefined) with intervals, judged: Uno's C, slope and
    calibration-in-the-large on their intervals, as the binary models' are."""
    f = {k: float(v) for k, v in figures.items()}
    slope, citl = calibration_checks(f["slope"], (f["slope_low"], f["slope_high"]), f["citl"],
                                     (f["citl_low"], f["citl_high"]))
    discrimination = discrimination_check(f["uno_c"], (f["uno_c_low"], f["uno_c_high"]),
                                          name="Uno's C")
    checks = (discrimination, slope, citl)
    out: dict[str, Any] = {"n": int(f["n"]), "events": int(f["events"])}
    for name in ("uno_c", "observed", "slope", "citl"):
        out[name] = f[name]
        out[f"{name}_ci"] = [f[f"{name}_low"], f[f"{name}_high"]]
    out |= {"predicted": f["predicted"], "harrell_c": f["harrell_c"],
            "horizon_auc": f["horizon_auc"], "brier": f["brier"],
            "verdict": str(combined(checks)),
            "calibration_verdict": str(combined((slope, citl))),
            "reasons": [check.reason for check in checks if check.reason]}
    return out


def assess_at(time: np.ndarray, event: np.ndarray, risk: np.ndarray, horizon: float,
              true_risk: np.ndarray | None = None, *, resamples: int = 200,
              seed: int = 0) -> dict[str, Any]:
    """One site's figures at `horizon`, judged (JSON-ready), `true_risk` where it is known;
    `resamples` of the bootstrap of Uno's C."""
    out = judged(horizon_figures(time, event, risk, horizon, resamples=resamples, seed=seed))
    if true_risk is not None:
        out["true_risk"] = float(np.mean(true_risk))
    return out
