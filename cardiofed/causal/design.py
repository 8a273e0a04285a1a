"""A synthetic intervention with a known effect on the synthetic cohort.

Each site's patients are drawn as the demo's (:mod:`cardiofed.data.synthetic`: older,
sicker patients at tier-3 hospitals). Treatment (think of a statin) follows a confounded
propensity model: older patients, men, diabetics and those with high cholesterol or
blood pressure are treated more often. The untreated 10-year risk is the D'Agostino 2008
equation's; treatment multiplies the hazard by `hazard_ratio`, so a patient's treated
risk is ``1 - (1 - r0) ** hazard_ratio``. The outcome is drawn from the risk of the arm
the patient is in. The truth (ATE and ATT in risk difference and risk ratio) is the
design's population value, computed from the true risks of a large draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from cardiofed.data.synthetic import _draw_truth, dagostino_cvd_risk, default_profiles
from cardiofed.exceptions import ConfigurationError

# The covariates' model columns (the schema's encoding) and the treatment (the schema's).
COVARIATES = ["age", "sex=male", "total_cholesterol", "hdl_cholesterol", "systolic_bp",
              "bp_treated", "current_smoker", "diabetes"]
TREATMENT = "lipid_lowering"
# logit P(treated) = INTERCEPT + sum(coef * (x - centre))
PROPENSITY = {"age": (0.06, 55.0), "sex=male": (0.4, 0.0), "total_cholesterol": (0.012, 200.0),
              "systolic_bp": (0.015, 130.0), "diabetes": (0.8, 0.0)}
INTERCEPT = -1.2


@dataclass(frozen=True)
class InterventionSite:
    name: str
    site_type: str
    x: np.ndarray  # covariates in COVARIATES order
    treated: np.ndarray  # 0/1
    outcome: np.ndarray  # 0/1
    risk_untreated: np.ndarray
    risk_treated: np.ndarray
    propensity: np.ndarray  # the true one


def _site(profile_name: str, site_type: str, x: np.ndarray, rng: np.random.Generator,
          hazard_ratio: float) -> InterventionSite:
    logit = INTERCEPT + sum(c * (x[:, COVARIATES.index(k)] - centre)
                            for k, (c, centre) in PROPENSITY.items())
    e = 1 / (1 + np.exp(-logit))
    treated = (rng.random(len(x)) < e).astype(int)
    col = {k: x[:, i] for i, k in enumerate(COVARIATES)}
    r0 = dagostino_cvd_risk(male=col["sex=male"], age=col["age"],
                            total_chol=col["total_cholesterol"], hdl=col["hdl_cholesterol"],
                            sbp=col["systolic_bp"],
                            bp_treated=col["bp_treated"], smoker=col["current_smoker"],
                            diabetes=col["diabetes"])
    r1 = 1 - (1 - r0) ** hazard_ratio
    outcome = (rng.random(len(x)) < np.where(treated == 1, r1, r0)).astype(int)
    return InterventionSite(profile_name, site_type, x, treated, outcome, r0, r1, e)


def _covariates(frame: pd.DataFrame) -> np.ndarray:
    frame = frame.assign(**{"sex=male": (frame["sex"] == "male").astype(int)})
    return frame[COVARIATES].to_numpy(dtype=float)


def synthetic_intervention(n_sites: int = 12, *, seed: int = 0, hazard_ratio: float = 0.75,
                           size_scale: float = 1.0) -> list[InterventionSite]:
    """The design's sites (the demo's profiles), every draw from `seed`."""
    if not hazard_ratio > 0:
        raise ConfigurationError(f"hazard_ratio must be > 0; got {hazard_ratio!r}.")
    rng = np.random.default_rng([seed, 0xCA05A1])
    sites = []
    for p in default_profiles(n_sites, size_scale=size_scale):
        sites.append(_site(p.name, p.site_type, _covariates(_draw_truth(p, rng)), rng,
                           hazard_ratio))
    return sites


@dataclass(frozen=True)
class Truth:
    ate_rd: float
    ate_rr: float
    att_rd: float
    att_rr: float
    ato_rd: float  # the overlap population's (weights e(1 - e))


def design_truth(n_sites: int = 12, *, hazard_ratio: float = 0.75, draws: int = 40,
                 seed: int = 10_000) -> Truth:
    """The population effects, from the true risks of `draws` federations."""
    r0, r1, t, e = [], [], [], []
    for k in range(draws):
        for s in synthetic_intervention(n_sites, seed=seed + k, hazard_ratio=hazard_ratio):
            r0.append(s.risk_untreated)
            r1.append(s.risk_treated)
            t.append(s.treated)
            e.append(s.propensity)
    a0, a1, at = np.concatenate(r0), np.concatenate(r1), np.concatenate(t) == 1
    overlap = np.concatenate(e) * (1 - np.concatenate(e))
    return Truth(float(np.mean(a1 - a0)), float(np.mean(a1) / np.mean(a0)),
                 float(np.mean(a1[at] - a0[at])), float(np.mean(a1[at]) / np.mean(a0[at])),
                 float(np.sum(overlap * (a1 - a0)) / np.sum(overlap)))
