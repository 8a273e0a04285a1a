"""Deterministic synthetic multi-hospital cohort: the built-in data of ``cardiofed demo``.

Each site draws risk factors from its type's distribution (large tier-3 hospitals see
older, sicker patients than community clinics), draws a 10-year CVD outcome from the
published Framingham general CVD risk equation (:func:`dagostino_cvd_risk`), and writes
the result as a hospital would export it: its own column names, units, codes and
missing-value tokens, all text, with a matching :class:`SiteMapping`. The federation is
then built through the same path as real exports (:func:`site_from_export`), so the demo
exercises mapping, validation, unit conversion and encoding.

Everything is seeded: one :class:`numpy.random.SeedSequence` per call, spawned into one
child per site; the global NumPy random state is never used.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from cardiofed.data.dataset import FederatedDataset, SiteData, SiteTypes, feature_ranges_for
from cardiofed.data.mapping import LoadReport, SiteMapping, encode, harmonise
from cardiofed.data.sites import site_from_export, split_indices
from cardiofed.exceptions import ConfigurationError
from cardiofed.schema import encoded_feature_names, get_feature

SYNTHETIC_FEATURES: list[str] = [
    "age", "sex", "total_cholesterol", "hdl_cholesterol", "systolic_bp", "bp_treated",
    "current_smoker", "diabetes",
]
OUTCOME = "cvd_10y"
MG_DL_PER_MMOL_L = get_feature("total_cholesterol").unit_factors["mmol/L"]  # 38.67

# D'Agostino 2008, Table 2: (ln age, ln TC, ln HDL, ln SBP untreated, ln SBP treated,
# smoker, diabetes, 10-year baseline survival S0, mean of the linear predictor).
_WOMEN = (2.32888, 1.20904, -0.70833, 2.76157, 2.82263, 0.52873, 0.69154, 0.95012, 26.1931)
_MEN = (3.06117, 1.12370, -0.93263, 1.93303, 1.99881, 0.65451, 0.57367, 0.88936, 23.9802)


def dagostino_cvd_risk(*, male: np.ndarray, age: np.ndarray, total_chol: np.ndarray,
                       hdl: np.ndarray, sbp: np.ndarray, bp_treated: np.ndarray,
                       smoker: np.ndarray, diabetes: np.ndarray) -> np.ndarray:
    """10-year general CVD risk from the sex-specific Framingham Cox model.

    D'Agostino RB Sr, Vasan RS, Pencina MJ, Wolf PA, Cobain M, Massaro JM, Kannel WB.
    "General cardiovascular risk profile for use in primary care: the Framingham Heart
    Study." Circulation 2008;117:743-753, Table 2:
    ``risk = 1 - S0 ** exp(sum(beta * x) - mean)`` with x = ln age, ln total cholesterol
    (mg/dL), ln HDL (mg/dL), ln SBP (mmHg; coefficient depends on treatment), smoker,
    diabetes. Inputs are arrays (booleans or 0/1 for the binary ones).
    """
    arrays = [np.asarray(a, dtype=float) for a in
              (male, age, total_chol, hdl, sbp, bp_treated, smoker, diabetes)]
    m, a, tc, h, s, tr, sm, dm = np.broadcast_arrays(*arrays)
    c = np.where(m[..., None] > 0.5, np.array(_MEN), np.array(_WOMEN))
    lp = (c[..., 0] * np.log(a) + c[..., 1] * np.log(tc) + c[..., 2] * np.log(h)
          + np.where(tr > 0.5, c[..., 4], c[..., 3]) * np.log(s)
          + c[..., 5] * sm + c[..., 6] * dm)
    risk: np.ndarray = 1.0 - c[..., 7] ** np.exp(lp - c[..., 8])
    return risk


@dataclass(frozen=True)
class SiteProfile:
    """One synthetic site: its size, risk-factor distribution and export quirks."""

    name: str
    site_type: str  # "tier3" | "tier2" | "community"
    n_patients: int
    age_mean: float
    age_sd: float
    male_fraction: float
    tc_mean: float  # mg/dL
    tc_sd: float
    hdl_mean: float  # mg/dL, before a -5 (men) / +5 (women) offset
    hdl_sd: float
    sbp_mean: float  # mmHg at the site's mean age; +0.5 mmHg per year of age
    sbp_sd: float
    treated_rate: float
    smoker_rate: float
    diabetes_rate: float
    # Export quirks.
    column_style: int = 0  # index into _COLUMN_STYLES
    chol_unit: str = "mg/dL"  # "mg/dL" | "mmol/L" (total and HDL cholesterol)
    sex_coding: str = "MF"  # "MF" | "10" (1 = male) | "word"
    binary_coding: str = "10"  # "10" | "YN"
    label_coding: str = "10"  # "10" | "yesno"
    missing_token: str = ""
    missing_rate: float = 0.0  # in total/HDL cholesterol and SBP
    label_noise: float = 0.0  # fraction of labels flipped at random
    # A survival export: follow-up times (with loss to follow-up by site type) and the
    # event at their end, instead of a 10-year outcome.
    follow_up: bool = False

    def __post_init__(self) -> None:
        checks = {
            "site_type": self.site_type in TYPE_PARAMS,
            "n_patients": self.n_patients >= 2,
            "column_style": 0 <= self.column_style < len(_COLUMN_STYLES),
            "chol_unit": self.chol_unit in ("mg/dL", "mmol/L"),
            "sex_coding": self.sex_coding in _SEX_CODES,
            "binary_coding": self.binary_coding in _BINARY_CODES,
            "label_coding": self.label_coding in _LABEL_CODES,
            "missing_rate": 0.0 <= self.missing_rate < 1.0,
            "label_noise": 0.0 <= self.label_noise <= 0.5,
        }
        for field_name, ok in checks.items():
            if not ok:
                raise ConfigurationError(f"SiteProfile {self.name!r}: invalid {field_name} "
                                         f"{getattr(self, field_name)!r}.")


@dataclass(frozen=True, eq=False)
class SiteExport:
    """A site's raw export (all text), its mapping, and the truth behind it (tests only)."""

    raw: pd.DataFrame
    mapping: SiteMapping
    true_risk: np.ndarray  # 10-year risk each label was drawn from
    labels: np.ndarray  # the exported outcomes (after any label noise)
    follow_up: np.ndarray | None  # exported follow-up in years (survival exports)
    noisy_labels: bool
    truth: pd.DataFrame  # canonical values in canonical units before export quirks


# Per-type distributions and size ranges (largest, smallest) at size_scale = 1.
TYPE_PARAMS: dict[str, dict[str, float]] = {
    SiteTypes.TIER3: dict(age_mean=62, age_sd=9, male_fraction=0.55, tc_mean=205, tc_sd=40,
                          hdl_mean=47, hdl_sd=12, sbp_mean=140, sbp_sd=19, treated_rate=0.45,
                          smoker_rate=0.20, diabetes_rate=0.22),
    SiteTypes.TIER2: dict(age_mean=55, age_sd=10, male_fraction=0.50, tc_mean=200, tc_sd=38,
                          hdl_mean=50, hdl_sd=13, sbp_mean=132, sbp_sd=17, treated_rate=0.28,
                          smoker_rate=0.20, diabetes_rate=0.13),
    SiteTypes.COMMUNITY: dict(age_mean=48, age_sd=10, male_fraction=0.47, tc_mean=195,
                              tc_sd=36, hdl_mean=54, hdl_sd=14, sbp_mean=124, sbp_sd=15,
                              treated_rate=0.14, smoker_rate=0.18, diabetes_rate=0.07),
}
# Survival exports: administrative follow-up (uniform, years) and loss to follow-up (per
# year) by site type: community clinics lose their patients soonest.
FOLLOW_UP_YEARS = {SiteTypes.TIER3: (8.0, 15.0), SiteTypes.TIER2: (6.0, 14.0),
                   SiteTypes.COMMUNITY: (4.0, 12.0)}
LOSS_PER_YEAR = {SiteTypes.TIER3: 0.02, SiteTypes.TIER2: 0.04, SiteTypes.COMMUNITY: 0.08}
_FOLLOW_UP_COLUMNS = (("FU_DAYS", "days"), ("followup_months", "months"),
                      ("Follow-up (years)", "years"))
_SIZES = {SiteTypes.TIER3: (3000, 2500), SiteTypes.TIER2: (900, 600),
          SiteTypes.COMMUNITY: (400, 250)}
_SHARE = {SiteTypes.TIER3: 2 / 12, SiteTypes.TIER2: 4 / 12}  # community takes the rest

# Local column names; "label" is the outcome column.
_COLUMN_STYLES: list[dict[str, str]] = [
    dict(age="AGE", sex="SEX", total_cholesterol="CHOL", hdl_cholesterol="HDL",
         systolic_bp="SBP", bp_treated="BPMEDS", current_smoker="SMOKER", diabetes="DM",
         label="CVD10"),
    dict(age="age_years", sex="sex", total_cholesterol="total_chol", hdl_cholesterol="hdl_chol",
         systolic_bp="sys_bp", bp_treated="on_bp_meds", current_smoker="smoker",
         diabetes="diabetic", label="cvd_event_10y"),
    dict(age="Patient Age", sex="Gender", total_cholesterol="Total Cholesterol",
         hdl_cholesterol="HDL-C", systolic_bp="Systolic BP", bp_treated="On BP Medication",
         current_smoker="Current Smoker", diabetes="Diabetes", label="CVD within 10y"),
]
_SEX_CODES = {"MF": {"M": "male", "F": "female"}, "10": {"1": "male", "0": "female"},
              "word": {"male": "male", "female": "female"}}
_BINARY_CODES = {"10": ("1", "0"), "YN": ("Y", "N")}  # (true, false)
_LABEL_CODES = {"10": ("1", "0"), "yesno": ("yes", "no")}  # (positive, negative)
_MISSING_TOKENS = ("", "NA", "-999")
_EVALUATION_STREAM = 0x6576616C  # evaluation cohorts draw from their own seed stream
_MISSING_RATES = (0.0, 0.03, 0.05, 0.02)
# Clip ranges, well inside the schema's plausible ranges so that rounding and mmol/L
# round trips stay valid.
CLIP = {"age": (30, 79), "total_cholesterol": (100, 400), "hdl_cholesterol": (20, 100),
         "systolic_bp": (90, 220)}


def _type_counts(n_sites: int) -> dict[str, int]:
    if n_sites == 1:
        return {SiteTypes.TIER3: 0, SiteTypes.TIER2: 1, SiteTypes.COMMUNITY: 0}
    if n_sites == 2:
        return {SiteTypes.TIER3: 1, SiteTypes.TIER2: 0, SiteTypes.COMMUNITY: 1}
    t3 = max(1, round(n_sites * _SHARE[SiteTypes.TIER3]))
    t2 = max(1, round(n_sites * _SHARE[SiteTypes.TIER2]))
    return {SiteTypes.TIER3: t3, SiteTypes.TIER2: t2, SiteTypes.COMMUNITY: n_sites - t3 - t2}


def default_profiles(n_sites: int = 12, *, size_scale: float = 1.0) -> list[SiteProfile]:
    """The demo federation: 1/6 tier-3 hospitals, 1/3 tier-2 hospitals, the rest community
    clinics (2, 4 and 6 of 12), with varied export quirks and one noisy-label tier-2 site
    (the last one, when ``n_sites >= 3``)."""
    if isinstance(n_sites, bool) or not isinstance(n_sites, int) or n_sites < 1:
        raise ConfigurationError(f"n_sites must be an integer >= 1; got n_sites={n_sites!r}.")
    if not size_scale > 0:
        raise ConfigurationError(f"size_scale must be > 0; got size_scale={size_scale!r}.")
    counts = _type_counts(n_sites)
    profiles: list[SiteProfile] = []
    for site_type, k in counts.items():
        if k == 0:
            continue
        hi, lo = _SIZES[site_type]
        sizes = np.linspace(hi, lo, k) if k > 1 else np.array([(hi + lo) / 2])
        for j, size in enumerate(sizes):
            i = len(profiles)
            noisy = site_type == SiteTypes.TIER2 and j == k - 1 and n_sites >= 3
            profiles.append(SiteProfile(
                name=f"{site_type}_{j + 1:02d}", site_type=site_type,
                n_patients=max(20, round(float(size) * size_scale)),
                **TYPE_PARAMS[site_type],
                column_style=i % 3,
                chol_unit="mmol/L" if i % 4 == 1 else "mg/dL",
                sex_coding=("MF", "10", "word")[(i + 1) % 3],
                binary_coding=("10", "YN")[i % 2],
                label_coding=("10", "yesno")[(i // 2) % 2],
                missing_token=_MISSING_TOKENS[(i + 2) % 3],
                missing_rate=_MISSING_RATES[i % 4],
                label_noise=0.3 if noisy else 0.0,
                follow_up=False,
            ))
    return profiles


def _draw_truth(p: SiteProfile, rng: np.random.Generator) -> pd.DataFrame:
    n = p.n_patients

    def clipped(name: str, values: np.ndarray) -> np.ndarray:
        return np.round(np.clip(values, *CLIP[name]))

    male = rng.random(n) < p.male_fraction
    age = clipped("age", rng.normal(p.age_mean, p.age_sd, n))
    tc = clipped("total_cholesterol", rng.normal(p.tc_mean, p.tc_sd, n))
    hdl = clipped("hdl_cholesterol",
                  rng.normal(p.hdl_mean + np.where(male, -5.0, 5.0), p.hdl_sd, n))
    sbp = clipped("systolic_bp",
                  rng.normal(p.sbp_mean + 0.5 * (age - p.age_mean), p.sbp_sd, n))
    p_treated = np.clip(p.treated_rate + 0.01 * (sbp - p.sbp_mean), 0.0, 0.95)
    treated = rng.random(n) < p_treated
    smoker = rng.random(n) < p.smoker_rate
    diabetes = rng.random(n) < p.diabetes_rate
    return pd.DataFrame({
        "age": age, "sex": np.where(male, "male", "female"), "total_cholesterol": tc,
        "hdl_cholesterol": hdl, "systolic_bp": sbp, "bp_treated": treated.astype(int),
        "current_smoker": smoker.astype(int), "diabetes": diabetes.astype(int),
    })


def _mapping(p: SiteProfile) -> SiteMapping:
    names = _COLUMN_STYLES[p.column_style]
    yes, no = _BINARY_CODES[p.binary_coding]
    positive, negative = _LABEL_CODES[p.label_coding]
    columns: dict[str, dict[str, object]] = {
        "age": {"source": names["age"], "unit": "years"},
        "sex": {"source": names["sex"], "codes": _SEX_CODES[p.sex_coding]},
        "total_cholesterol": {"source": names["total_cholesterol"], "unit": p.chol_unit},
        "hdl_cholesterol": {"source": names["hdl_cholesterol"], "unit": p.chol_unit},
        "systolic_bp": {"source": names["systolic_bp"], "unit": "mmHg"},
    }
    for name in ("bp_treated", "current_smoker", "diabetes"):
        columns[name] = {"source": names[name], "codes": {yes: "1", no: "0"}}
    raw: dict[str, object] = {
        "site": p.name, "site_type": p.site_type, "outcome": OUTCOME,
        "missing_values": [p.missing_token],
        "label": {"column": names["label"], "positive": [positive], "negative": [negative]},
        "columns": columns,
    }
    if p.follow_up:
        column, unit = _FOLLOW_UP_COLUMNS[p.column_style]
        raw["follow_up"] = {"column": column, "unit": unit}
    return SiteMapping.from_dict(raw, source=f"<synthetic mapping {p.name}>")


def _export(p: SiteProfile, truth: pd.DataFrame, labels: np.ndarray,
            rng: np.random.Generator, follow_up: np.ndarray | None = None) -> pd.DataFrame:
    names = _COLUMN_STYLES[p.column_style]
    sex_out = {canonical: local for local, canonical in _SEX_CODES[p.sex_coding].items()}
    yes, no = _BINARY_CODES[p.binary_coding]
    positive, negative = _LABEL_CODES[p.label_coding]
    out: dict[str, list[str]] = {}
    for name in SYNTHETIC_FEATURES:
        values = truth[name].to_numpy()
        if name == "sex":
            text = [sex_out[v] for v in values]
        elif name in ("bp_treated", "current_smoker", "diabetes"):
            text = [yes if v else no for v in values]
        elif name in ("total_cholesterol", "hdl_cholesterol") and p.chol_unit == "mmol/L":
            text = [f"{v / MG_DL_PER_MMOL_L:.2f}" for v in values]
        else:
            text = [str(int(v)) for v in values]
        if name in ("total_cholesterol", "hdl_cholesterol", "systolic_bp"):
            for i in np.flatnonzero(rng.random(len(text)) < p.missing_rate):
                text[i] = p.missing_token
        out[names[name]] = text
    out[names["label"]] = [positive if y else negative for y in labels]
    if follow_up is not None:
        column, unit = _FOLLOW_UP_COLUMNS[p.column_style]
        out[column] = _follow_up_text(follow_up, unit)
    return pd.DataFrame(out, dtype=str)


def _follow_up_text(years: np.ndarray, unit: str) -> list[str]:
    """Follow-up as a site writes it: whole days, months to 0.1, years to 0.01."""
    if unit == "days":
        return [str(int(v)) for v in np.maximum(1, np.ceil(years * 365.25))]
    if unit == "months":
        return [f"{v:.1f}" for v in np.maximum(0.1, np.round(years * 12, 1))]
    return [f"{v:.2f}" for v in np.maximum(0.01, np.round(years, 2))]


def _survival_outcomes(p: SiteProfile, risk: np.ndarray, rng: np.random.Generator
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Follow-up (years) and events: event times from a constant hazard that gives each
    patient its 10-year risk, ended by administrative follow-up or loss to follow-up."""
    hazard = -np.log1p(-np.clip(risk, 1e-12, 1 - 1e-12)) / 10.0
    event_time = rng.exponential(1.0 / hazard)
    low, high = FOLLOW_UP_YEARS[p.site_type]
    end = np.minimum(rng.uniform(low, high, risk.size),
                     rng.exponential(1.0 / LOSS_PER_YEAR[p.site_type], risk.size))
    return np.minimum(event_time, end), (event_time <= end).astype(np.int64)


def _export_of(p: SiteProfile, rng: np.random.Generator) -> SiteExport:
    truth = _draw_truth(p, rng)
    risk = dagostino_cvd_risk(
        male=(truth["sex"] == "male").to_numpy(), age=truth["age"].to_numpy(),
        total_chol=truth["total_cholesterol"].to_numpy(),
        hdl=truth["hdl_cholesterol"].to_numpy(), sbp=truth["systolic_bp"].to_numpy(),
        bp_treated=truth["bp_treated"].to_numpy(),
        smoker=truth["current_smoker"].to_numpy(), diabetes=truth["diabetes"].to_numpy())
    follow_up = None
    if p.follow_up:
        follow_up, labels = _survival_outcomes(p, risk, rng)
    else:
        labels = (rng.random(len(risk)) < risk).astype(np.int64)
    n_flip = round(p.label_noise * len(labels))
    if n_flip:
        flip = rng.choice(len(labels), size=n_flip, replace=False)
        labels[flip] = 1 - labels[flip]
    return SiteExport(raw=_export(p, truth, labels, rng, follow_up), mapping=_mapping(p),
                      true_risk=risk, labels=labels, follow_up=follow_up,
                      noisy_labels=p.label_noise > 0, truth=truth)


def generate_exports(profiles: list[SiteProfile], *,
                     seed: int | Sequence[int]) -> list[SiteExport]:
    """One raw export and mapping per profile; site k uses child k of ``SeedSequence(seed)``."""
    children = np.random.SeedSequence(seed).spawn(len(profiles))
    return [_export_of(p, np.random.default_rng(child))
            for p, child in zip(profiles, children, strict=True)]


def _rows(export: SiteExport) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Encoded rows, labels and follow-up (years, survival exports) as a site loads them."""
    site = harmonise(export.raw, export.mapping, source=f"synthetic:{export.mapping.site}")
    return encode(site.frame, SYNTHETIC_FEATURES), site.labels, site.follow_up


@dataclass(frozen=True)
class SyntheticSampler:
    """Fresh patients from a synthetic site's own profile (:class:`SiteSampler`)."""

    profiles: tuple[SiteProfile, ...]

    def draw(self, site: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        profile = next((p for p in self.profiles if p.name == site), None)
        if profile is None:
            raise ConfigurationError(f"No synthetic site {site!r}; sites are "
                                     f"{[p.name for p in self.profiles]}.")
        export = _export_of(replace(profile, n_patients=n),
                            np.random.default_rng([seed, zlib.crc32(site.encode())]))
        x, y, _ = _rows(export)
        return x, y


def synthetic_federation(n_sites: int = 12, *, seed: int = 0, test_fraction: float = 0.3,
                         size_scale: float = 1.0, eval_size: int | None = None,
                         survival: bool = False) -> FederatedDataset:
    """The demo federation, built from synthetic exports exactly as from real ones.

    Each site's records are split into train and test (`test_fraction`). With
    `eval_size`, every record of a site is training data and its test split is instead a
    separate cohort of `eval_size` new patients drawn from the same profile (with the
    same label noise): large enough to judge the site, while training stays at the
    site's realistic size. Test rows carry the true risk their labels were drawn from.
    With `survival`, sites export follow-up times ended by the event, administrative
    follow-up or loss to follow-up (:data:`FOLLOW_UP_YEARS`, :data:`LOSS_PER_YEAR`), in
    days, months or years, and the labels are the events at their end.
    """
    if eval_size is not None and (isinstance(eval_size, bool) or not isinstance(eval_size, int)
                                  or eval_size < 2):
        raise ConfigurationError(f"eval_size must be an integer >= 2 or None; got "
                                 f"eval_size={eval_size!r}.")
    profiles = [replace(p, follow_up=survival)
                for p in default_profiles(n_sites, size_scale=size_scale)]
    cohorts = (generate_exports([replace(p, n_patients=eval_size) for p in profiles],
                                seed=[seed, _EVALUATION_STREAM]) if eval_size else None)
    sites: list[SiteData] = []
    reports: dict[str, LoadReport] = {}
    for k, export in enumerate(generate_exports(profiles, seed=seed)):
        source = f"synthetic:{export.mapping.site}"
        if cohorts is None:
            _, test = split_indices(export.labels, test_fraction, seed + k)
            site, report = site_from_export(export.raw, export.mapping, SYNTHETIC_FEATURES,
                                            test_fraction=test_fraction, seed=seed + k,
                                            source=source)
            site = replace(site, true_risk_test=export.true_risk[test])
        else:
            site, report = site_from_export(export.raw, export.mapping, SYNTHETIC_FEATURES,
                                            test_fraction=None, seed=seed + k, source=source)
            x_eval, y_eval, t_eval = _rows(cohorts[k])
            site = replace(site, x_test=x_eval, y_test=y_eval, time_test=t_eval,
                           true_risk_test=cohorts[k].true_risk)
        sites.append(site)
        reports[site.name] = report
    names = encoded_feature_names(SYNTHETIC_FEATURES)
    evaluation = (f"; each site evaluated on {eval_size:,} new patients of its own profile"
                  if eval_size else "")
    if survival:
        evaluation += ", follow-up censored by loss to follow-up and its end"
    return FederatedDataset(
        name="synthetic", feature_names=names, feature_ranges=feature_ranges_for(names),
        sites=sites, outcome=OUTCOME, load_reports=reports,
        sampler=SyntheticSampler(tuple(profiles)), evaluation_cohorts=cohorts is not None,
        description=f"Synthetic cohort: {len(sites)} sites, seed {seed}, outcomes drawn from "
                    f"the D'Agostino 2008 general CVD risk equation{evaluation}.")

