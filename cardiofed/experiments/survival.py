"""A survival model judged at each site at a horizon, with the binary models' verdicts:
Uno's C (its 95% interval from a bootstrap of the site's rows, seeded: an evaluation,
not a private release), observed (Kaplan-Meier) against predicted risk, and the
calibration slope and calibration-in-the-large with their 95% intervals
(:mod:`cardiofed.survival.metrics`), judged as the binary models' AUC, slope and
calibration-in-the-large are (:mod:`cardiofed.experiments.acceptability`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from cardiofed.experiments.acceptability import (
    calibration_checks,
    combined,
    discrimination_check,
)
from cardiofed.survival.metrics import horizon_figures

__all__ = ["assess_at", "judged"]


def judged(figures: dict[str, float]) -> dict[str, Any]:
    """`figures` (:func:`~cardiofed.survival.metrics.horizon_figures`, computed here or
    reported by a site) with their intervals, judged: Uno's C, slope and
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
