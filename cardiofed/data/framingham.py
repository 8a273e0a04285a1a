"""The Framingham teaching data set, partitioned into eight hospitals.

The 4,240 participants are loaded through the bundled mapping file
(``mappings/framingham.toml``) and validated like any site export. They are then
split into hospitals by a seeded rule that imitates how patients reach care:

1. A severity score per patient: ``z(age) + 0.8 prevalent_hypertension + 0.8 diabetes
   + 0.5 bp_treated + 0.3 z(systolic_bp)`` (z = standardised over the cohort; missing
   counts as 0).
2. The probability of attending a site type is ``softmax(a_t + b_t * score)`` with
   ``b = +0.9`` for tier-3 hospitals, ``0`` for tier-2 and ``-0.9`` for community
   clinics; the intercepts ``a_t`` are solved so that the expected share of each type is
   60% tier-3, 27% tier-2 and 13% community. Each patient's type is drawn from it.
3. Within a type, the patient goes to one of its sites with probability proportional to
   the site's share (tier-3 55/45, tier-2 40/33/27, community 50/30/20).

The result: two large tier-3 hospitals skewed older, hypertensive and diabetic, three
tier-2 hospitals, and three small, younger, healthier clinics; the largest site is
more than ten times the smallest. Each site is split 70/30 into train and test,
stratified on the label, seeded.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path

import numpy as np

from cardiofed.data.dataset import FederatedDataset, SiteData, SiteTypes, feature_ranges_for
from cardiofed.data.mapping import SiteMapping, encode, harmonise, read_export
from cardiofed.data.paths import require
from cardiofed.data.sites import split_indices
from cardiofed.schema import encoded_feature_names

FEATURES = [
    "sex", "age", "education", "current_smoker", "cigs_per_day", "bp_treated",
    "prevalent_stroke", "prevalent_hypertension", "diabetes", "total_cholesterol",
    "systolic_bp", "diastolic_bp", "bmi", "heart_rate", "glucose",
]
# (site name, site type, share of its type)
SITES: tuple[tuple[str, str, float], ...] = (
    ("tier3_a", SiteTypes.TIER3, 0.55), ("tier3_b", SiteTypes.TIER3, 0.45),
    ("tier2_a", SiteTypes.TIER2, 0.40), ("tier2_b", SiteTypes.TIER2, 0.33),
    ("tier2_c", SiteTypes.TIER2, 0.27),
    ("clinic_a", SiteTypes.COMMUNITY, 0.50), ("clinic_b", SiteTypes.COMMUNITY, 0.30),
    ("clinic_c", SiteTypes.COMMUNITY, 0.20),
)
_TYPES = (SiteTypes.TIER3, SiteTypes.TIER2, SiteTypes.COMMUNITY)
_TYPE_SHARE = np.array([0.60, 0.27, 0.13])
_TYPE_SLOPE = np.array([0.9, 0.0, -0.9])


def framingham_mapping() -> SiteMapping:
    """The bundled mapping of ``framingham.csv``."""
    text = resources.files("cardiofed.data").joinpath("mappings/framingham.toml").read_text()
    return SiteMapping.from_dict(tomllib.loads(text), source="mappings/framingham.toml")


def _type_probabilities(score: np.ndarray) -> np.ndarray:
    """softmax(a_t + b_t * score) with intercepts solved to match the target type shares."""
    a = np.log(_TYPE_SHARE)
    for _ in range(500):
        logits = a + np.outer(score, _TYPE_SLOPE)
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        a += np.log(_TYPE_SHARE / p.mean(axis=0))
    return p


def _zscore(v: np.ndarray) -> np.ndarray:
    z = (v - np.nanmean(v)) / np.nanstd(v)
    return np.nan_to_num(z)


def partition(frame_values: dict[str, np.ndarray], seed: int) -> np.ndarray:
    """Site index (into :data:`SITES`) for each patient, by the rule in the module docstring."""
    score = (_zscore(frame_values["age"]) + 0.3 * _zscore(frame_values["systolic_bp"])
             + sum(w * np.nan_to_num(frame_values[c]) for c, w in
                   (("prevalent_hypertension", 0.8), ("diabetes", 0.8), ("bp_treated", 0.5))))
    rng = np.random.default_rng(seed)
    p = _type_probabilities(np.asarray(score, dtype=float))
    u = rng.random(len(p))[:, None]
    site_type = (u > np.cumsum(p, axis=1)).sum(axis=1)
    site = np.empty(len(p), dtype=np.int64)
    for t, type_name in enumerate(_TYPES):
        members = np.flatnonzero(site_type == t)
        indices = [i for i, (_, typ, _) in enumerate(SITES) if typ == type_name]
        shares = np.array([SITES[i][2] for i in indices])
        site[members] = rng.choice(indices, size=len(members), p=shares / shares.sum())
    return site


def load_framingham(data_dir: str | Path | None = None, *, seed: int = 0,
                    test_fraction: float = 0.3) -> FederatedDataset:
    """Framingham as eight hospitals (see the module docstring for the rule)."""
    path = require("framingham/framingham.csv", data_dir)
    mapping = framingham_mapping()
    site = harmonise(read_export(path)[0], mapping, source=str(path))
    frame = site.frame
    assignment = partition({c: frame[c].to_numpy(dtype=float) for c in
                            ("age", "systolic_bp", "prevalent_hypertension", "diabetes",
                             "bp_treated")}, seed)
    x_all = encode(frame, FEATURES)
    sites = []
    for k, (name, site_type, _) in enumerate(SITES):
        rows = np.flatnonzero(assignment == k)
        x, y = x_all[rows], site.labels[rows]
        train, test = split_indices(y, test_fraction, seed + k)
        sites.append(SiteData(name=name, site_type=site_type, x_train=x[train],
                              y_train=y[train], x_test=x[test], y_test=y[test]))
    names = encoded_feature_names(FEATURES)
    return FederatedDataset(
        name="framingham", feature_names=names, feature_ranges=feature_ranges_for(names),
        sites=sites, outcome="chd_10y", load_reports={"framingham": site.report},
        description="Framingham teaching data set, 8 hospitals by a seeded severity rule",
    )
