"""Federations an attribution analysis runs on: the synthetic intervention (a known
truth), Framingham (an illustration: blood-pressure medication and 10-year CHD) and NHEFS
(a published effect on a continuous outcome)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd

from cardiofed.causal.design import COVARIATES, synthetic_intervention
from cardiofed.causal.study import SiteArrays
from cardiofed.causal.survival import SurvivalSite
from cardiofed.data.mapping import SiteMapping, encode, harmonise
from cardiofed.exceptions import ConfigurationError, DataValidationError
from cardiofed.schema import Catalogue, FeatureKind, encoded_feature_names

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


# Hernan MA, Robins JM. Causal Inference: What If. Chapman & Hall/CRC, 2020, section 12.2:
# the IP-weighted average causal effect of quitting smoking (qsmk) on weight gain
# 1971-1982 (wt82_71, kg) in NHEFS, 3.4 kg (95% CI 2.4 to 4.5), propensity model below.
NHEFS_PUBLISHED = {"effect": 3.4, "low": 2.4, "high": 4.5}
NHEFS_COVARIATES = ["sex", "race", "age", "age^2", "education=2", "education=3",
                    "education=4", "education=5", "smokeintensity", "smokeintensity^2",
                    "smokeyrs", "smokeyrs^2", "exercise=1", "exercise=2", "active=1",
                    "active=2", "wt71", "wt71^2"]


def _nhefs(n_sites: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """NHEFS' columns (as numbers), the covariates' design and each row's site."""
    try:
        from causaldata import nhefs_complete
    except ImportError:  # a dev dependency: the benchmark's and the tests' data
        raise ConfigurationError("NHEFS comes from the causaldata package: pip install "
                                 "causaldata (or pip install -e \".[dev]\").") from None
    d = nhefs_complete.load_pandas().data
    # categorical columns hold their codes as text
    raw = {c: np.asarray(d[c].astype(str).astype(float)) for c in (
        "sex", "race", "age", "smokeintensity", "smokeyrs", "wt71", "education", "exercise",
        "active", "qsmk", "wt82_71", "death", "yrdth", "modth")}
    columns = {name: raw[name] for name in ("sex", "race", "age", "smokeintensity",
                                            "smokeyrs", "wt71")}
    for name in ("age", "smokeintensity", "smokeyrs", "wt71"):
        columns[f"{name}^2"] = columns[name] ** 2
    for name, levels in (("education", (2, 3, 4, 5)), ("exercise", (1, 2)),
                         ("active", (1, 2))):
        for level in levels:
            columns[f"{name}={level}"] = (raw[name] == level).astype(float)
    x = np.column_stack([columns[c] for c in NHEFS_COVARIATES])
    share = np.linspace(2.0, 1.0, n_sites)
    site = np.random.default_rng(seed).choice(n_sites, size=len(x), p=share / share.sum())
    return raw, x, site


def nhefs_sites(n_sites: int = 4, *, seed: int = 0) -> tuple[list[SiteArrays], list[str]]:
    """NHEFS (the 1,566 complete cases, from the ``causaldata`` package) split at random
    into `n_sites` sites of unequal size: treatment qsmk, continuous outcome wt82_71."""
    raw, x, site = _nhefs(n_sites, seed)
    t, y = raw["qsmk"].astype(int), raw["wt82_71"]
    return [SiteArrays(f"site_{k + 1}", x[site == k], t[site == k], y[site == k])
            for k in range(n_sites)], list(NHEFS_COVARIATES)


def nhefs_survival_sites(n_sites: int = 4, *, seed: int = 0) -> list[SurvivalSite]:
    """The same sites with a time-to-event outcome: death from January 1983 to December
    1992, in months (120 for those alive at the end, censored)."""
    raw, x, site = _nhefs(n_sites, seed)
    died = raw["death"] == 1
    months = np.where(died, (raw["yrdth"] - 83) * 12 + raw["modth"], 120.0)
    t = raw["qsmk"].astype(int)
    return [SurvivalSite(f"site_{k + 1}", x[site == k], t[site == k], months[site == k],
                         died[site == k].astype(int)) for k in range(n_sites)]


def _export_rows(raw: pd.DataFrame, mapping: SiteMapping, treatment: str,
                 covariates: list[str], source: str
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Covariates, treatment, outcome and follow-up (None without a ``[follow_up]``) of the
    rows that have every covariate and the treatment."""
    missing = [f for f in [*covariates, treatment] if f not in mapping.columns]
    if missing:
        raise DataValidationError(f"{source}: the mapping of site {mapping.site!r} does not "
                                  f"map {missing}, which the analysis uses.")
    if mapping.catalogue.feature(treatment).kind is not FeatureKind.BINARY:
        raise DataValidationError(f"The treatment {treatment!r} must be a 0/1 feature; it is "
                                  f"{mapping.catalogue.feature(treatment).kind}.")
    site = harmonise(raw, mapping, source=source)
    x = encode(site.frame, covariates, mapping.catalogue)
    t = encode(site.frame, [treatment], mapping.catalogue)[:, 0]
    keep = np.isfinite(x).all(axis=1) & np.isfinite(t)
    follow_up = None if site.follow_up is None else site.follow_up[keep]
    outcome = site.labels[keep]  # floats for a continuous outcome
    return (x[keep], t[keep].astype(int),
            outcome if mapping.label.kind == "continuous" else outcome.astype(int), follow_up)


def export_site(raw: pd.DataFrame, mapping: SiteMapping, treatment: str,
                covariates: list[str], source: str) -> SiteArrays:
    """A site's rows for an analysis, from its export and mapping: the covariates (the
    schema's encoding), the treatment (a 0/1 feature) and the mapping's outcome, every row
    that has all of them. A mapping that does not map what the analysis uses, or a
    treatment that is not a 0/1 feature, is refused by name."""
    x, t, y, _ = _export_rows(raw, mapping, treatment, covariates, source)
    return SiteArrays(mapping.site, x, t, y)


def export_survival_site(raw: pd.DataFrame, mapping: SiteMapping, treatment: str,
                         covariates: list[str], source: str) -> SurvivalSite:
    """The same rows with their follow-up (years): the mapping must have a ``[follow_up]``."""
    if mapping.label.kind == "continuous":
        raise DataValidationError(f"{source}: the mapping of site {mapping.site!r} labels a "
                                  f"continuous outcome; a time-to-event analysis needs the "
                                  f"event (a binary [label]).")
    x, t, y, follow_up = _export_rows(raw, mapping, treatment, covariates, source)
    if follow_up is None:
        raise DataValidationError(f"{source}: the mapping of site {mapping.site!r} has no "
                                  f"[follow_up]: a time-to-event analysis needs follow-up "
                                  f"times.")
    return SurvivalSite(mapping.site, x, t, follow_up, y)


Site = TypeVar("Site", SiteArrays, SurvivalSite)


def export_sites(csvs: Sequence[Path], mappings: Sequence[Path], *, treatment: str,
                 covariates: list[str], build: Callable[..., Site],
                 catalogue: Catalogue | None = None) -> tuple[list[Site], list[str]]:
    """A federation of a researcher's own exports (CSV, Parquet or OMOP, one mapping each),
    as its nodes would load them (`build`: :func:`export_site`, or
    :func:`export_survival_site` for a time-to-event outcome); the covariates' encoded
    column names."""
    from cardiofed.data.sites import load_site_rows

    if not csvs or len(csvs) != len(mappings):
        raise ConfigurationError(f"Give one mapping per export: {len(csvs)} exports and "
                                 f"{len(mappings)} mappings.")
    sites, outcomes = [], set()
    for csv, mapping_path in zip(csvs, mappings, strict=True):
        raw, mapping, _ = load_site_rows(Path(csv), Path(mapping_path), catalogue)
        outcomes.add(f"{mapping.outcome} ({mapping.label.kind})")
        sites.append(build(raw, mapping, treatment, covariates, str(csv)))
    if len(outcomes) > 1:
        raise DataValidationError(f"The sites' mappings label different outcomes "
                                  f"{sorted(outcomes)}; an analysis needs one.")
    return sites, encoded_feature_names(covariates, catalogue)
