"""A national federation: tens of thousands of institutions, generated in bulk.

The mix of site types follows China's hospitals as the National Health Commission's
statistical bulletin for 2021 counts them (36,570 hospitals: 3,275 tier-3, 10,848
tier-2, 12,649 tier-1, the rest unrated; quoted from the bulletin, not re-checked on
this offline machine): tier-3 9%, tier-2 30%, and tier-1 and unrated as community
clinics, 61%. Each institution's number of patients with the study's records is
log-normal around a median by type (tier-3 1,500, tier-2 400, community 100; sigma 0.6,
clipped to [20, 20,000]): an assumption, stated as one, giving a few thousand large
hospitals and tens of thousands of small clinics. Risk factors per type and outcomes come
from the same distributions and equation as the demo's sites
(:mod:`cardiofed.data.synthetic`), drawn for all patients of a type at once and encoded
directly (no text export, no per-site mapping: at this scale the exports' quirks would
only cost memory). Test rows are 20% of each site's patients.
"""

from __future__ import annotations

import numpy as np

from cardiofed.data.dataset import FederatedDataset, SiteData, SiteTypes, feature_ranges_for
from cardiofed.data.synthetic import (
    CLIP,
    OUTCOME,
    SYNTHETIC_FEATURES,
    TYPE_PARAMS,
    dagostino_cvd_risk,
)
from cardiofed.exceptions import ConfigurationError
from cardiofed.schema import encoded_feature_names

__all__ = ["NATIONAL_SHARE", "national_federation"]

NATIONAL_SHARE = {SiteTypes.TIER3: 0.09, SiteTypes.TIER2: 0.30, SiteTypes.COMMUNITY: 0.61}
MEDIAN_SIZE = {SiteTypes.TIER3: 1500, SiteTypes.TIER2: 400, SiteTypes.COMMUNITY: 100}
SIGMA = 0.6
SIZE_RANGE = (20, 20_000)
TEST_FRACTION = 0.2


def site_sizes(n_sites: int, rng: np.random.Generator) -> list[tuple[str, int]]:
    """(type, patients) per institution, tier-3 first."""
    counts = {t: round(n_sites * share) for t, share in NATIONAL_SHARE.items()}
    counts[SiteTypes.COMMUNITY] = n_sites - counts[SiteTypes.TIER3] - counts[SiteTypes.TIER2]
    out: list[tuple[str, int]] = []
    for site_type, k in counts.items():
        sizes = np.exp(rng.normal(np.log(MEDIAN_SIZE[site_type]), SIGMA, k))
        out += [(site_type, int(v)) for v in np.clip(np.round(sizes), *SIZE_RANGE)]
    return out


def _patients(site_type: str, n: int, rng: np.random.Generator
              ) -> tuple[np.ndarray, np.ndarray]:
    """Encoded rows (the synthetic features) and outcomes of `n` patients of a type."""
    p = TYPE_PARAMS[site_type]

    def clipped(name: str, values: np.ndarray) -> np.ndarray:
        return np.round(np.clip(values, *CLIP[name]))

    male = rng.random(n) < p["male_fraction"]
    age = clipped("age", rng.normal(p["age_mean"], p["age_sd"], n))
    tc = clipped("total_cholesterol", rng.normal(p["tc_mean"], p["tc_sd"], n))
    hdl = clipped("hdl_cholesterol",
                  rng.normal(p["hdl_mean"] + np.where(male, -5.0, 5.0), p["hdl_sd"], n))
    sbp = clipped("systolic_bp", rng.normal(p["sbp_mean"] + 0.5 * (age - p["age_mean"]),
                                             p["sbp_sd"], n))
    treated = rng.random(n) < np.clip(p["treated_rate"] + 0.01 * (sbp - p["sbp_mean"]), 0, 0.95)
    smoker = rng.random(n) < p["smoker_rate"]
    diabetes = rng.random(n) < p["diabetes_rate"]
    risk = dagostino_cvd_risk(male=male, age=age, total_chol=tc, hdl=hdl, sbp=sbp,
                              bp_treated=treated, smoker=smoker, diabetes=diabetes)
    y = (rng.random(n) < risk).astype(np.int64)
    x = np.column_stack([age, male, tc, hdl, sbp, treated, smoker, diabetes]).astype(np.float64)
    return x, y


def national_federation(n_sites: int = 36_000, *, seed: int = 0) -> FederatedDataset:
    """`n_sites` institutions with the national size mix (see the module docstring)."""
    if isinstance(n_sites, bool) or not isinstance(n_sites, int) or n_sites < 3:
        raise ConfigurationError(f"n_sites must be an integer >= 3; got n_sites={n_sites!r}.")
    rng = np.random.default_rng([seed, 0x6E6174])  # "nat"
    plan = site_sizes(n_sites, rng)
    sites: list[SiteData] = []
    for site_type in NATIONAL_SHARE:
        members = [(i, n) for i, (t, n) in enumerate(plan) if t == site_type]
        x, y = _patients(site_type, sum(n for _, n in members), rng)
        start = 0
        for number, (_, n) in enumerate(members, start=1):
            rows = slice(start, start + n)
            start += n
            n_test = max(1, round(TEST_FRACTION * n))
            sites.append(SiteData(name=f"{site_type}_{number:05d}", site_type=site_type,
                                  x_train=x[rows][n_test:], y_train=y[rows][n_test:],
                                  x_test=x[rows][:n_test], y_test=y[rows][:n_test]))
    names = encoded_feature_names(SYNTHETIC_FEATURES)
    total = sum(n for _, n in plan)
    return FederatedDataset(
        name="synthetic", feature_names=names, feature_ranges=feature_ranges_for(names),
        sites=sites, outcome=OUTCOME,
        description=f"National synthetic federation: {len(sites):,} institutions "
                    f"({', '.join(f'{share:.0%} {t}' for t, share in NATIONAL_SHARE.items())}), "
                    f"{total:,} patients, seed {seed}; outcomes from the D'Agostino 2008 "
                    f"general CVD risk equation.")
