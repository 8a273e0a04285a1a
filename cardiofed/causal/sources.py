"""Federations an attribution analysis runs on: the synthetic intervention (a known
truth) and Framingham (an illustration: blood-pressure medication and 10-year CHD)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cardiofed.causal.design import COVARIATES, synthetic_intervention
from cardiofed.causal.study import SiteArrays

FRAMINGHAM_COVARIATES = ["age", "sex=male", "systolic_bp", "diastolic_bp", "total_cholesterol",
                         "bmi", "current_smoker", "diabetes"]
# What an analysis of Framingham cannot claim; shown with its results.
FRAMINGHAM_CAVEATS = (
    "Illustrative only: patients with prevalent hypertension (every treated one is), "
    "BPMEDS as recorded at the baseline visit, not a treatment decision with a start "
    "date; blood pressure is measured on treatment, and confounding by indication "
    "(severity, duration of hypertension) remains beyond the covariates; 10-year CHD as "
    "the teaching set records it; the 8 hospitals are the simulator's seeded partition.")


def synthetic_sites(n_sites: int = 12, *, seed: int = 0, hazard_ratio: float = 0.75
                    ) -> tuple[list[SiteArrays], list[str]]:
    sites = synthetic_intervention(n_sites, seed=seed, hazard_ratio=hazard_ratio)
    return [SiteArrays(s.name, s.x, s.treated, s.outcome) for s in sites], list(COVARIATES)


def framingham_sites(data_dir: str | Path | None = None, *, seed: int = 0
                     ) -> tuple[list[SiteArrays], list[str]]:
    """Framingham's eight hospitals (the simulator's partition), patients with prevalent
    hypertension: treatment BPMEDS, outcome TenYearCHD; patients missing a covariate or
    the treatment are left out."""
    from cardiofed.data.framingham import SITES, framingham_mapping, partition
    from cardiofed.data.mapping import harmonise, read_export
    from cardiofed.data.paths import require

    path = require("framingham/framingham.csv", data_dir)
    site = harmonise(read_export(path)[0], framingham_mapping(), source=str(path))
    frame = site.frame.assign(**{"sex=male": (site.frame["sex"] == "male").astype(float)})
    values = {c: frame[c].to_numpy(dtype=float) for c in
              ("age", "systolic_bp", "prevalent_hypertension", "diabetes", "bp_treated")}
    assignment = partition(values, seed)
    x = frame[FRAMINGHAM_COVARIATES].to_numpy(dtype=float)
    t = values["bp_treated"]
    y = np.asarray(site.labels, dtype=float)
    complete = (np.isfinite(x).all(axis=1) & np.isfinite(t) & np.isfinite(y)
                & (values["prevalent_hypertension"] == 1))
    out = []
    for k, (name, _, _) in enumerate(SITES):
        rows = np.flatnonzero((assignment == k) & complete)
        out.append(SiteArrays(name, x[rows], t[rows].astype(int), y[rows].astype(int)))
    return out, list(FRAMINGHAM_COVARIATES)
