"""Tests of the synthetic multi-hospital cohort generator."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from cardiofed.data.mapping import harmonise
from cardiofed.data.synthetic import (
    SYNTHETIC_FEATURES,
    SiteExport,
    SiteProfile,
    dagostino_cvd_risk,
    default_profiles,
    generate_exports,
    synthetic_federation,
)
from cardiofed.schema import encoded_feature_names


@pytest.fixture(scope="module")
def profiles() -> list[SiteProfile]:
    return default_profiles()


@pytest.fixture(scope="module")
def exports(profiles: list[SiteProfile]) -> list[SiteExport]:
    return generate_exports(profiles, seed=0)


def test_same_seed_same_frames_and_different_seed_differs(
        profiles: list[SiteProfile], exports: list[SiteExport]) -> None:
    again = generate_exports(profiles, seed=0)
    for a, b in zip(exports, again, strict=True):
        pd.testing.assert_frame_equal(a.raw, b.raw)
        np.testing.assert_array_equal(a.true_risk, b.true_risk)
    other = generate_exports(profiles, seed=1)
    assert not all(a.raw.equals(b.raw) for a, b in zip(exports, other, strict=True))


def test_raw_exports_are_text_with_local_quirks(exports: list[SiteExport]) -> None:
    for e in exports:
        assert all(e.raw[c].map(type).eq(str).all() for c in e.raw.columns)
        assert e.mapping.outcome == "cvd_10y"
        assert set(e.mapping.columns) == set(SYNTHETIC_FEATURES)
    assert len({e.mapping.columns["age"].source for e in exports}) >= 3
    assert {e.mapping.columns["total_cholesterol"].unit for e in exports} == {"mg/dL", "mmol/L"}
    assert len({tuple(sorted(e.mapping.columns["sex"].codes)) for e in exports}) == 3
    assert len({tuple(e.mapping.missing_values) for e in exports}) == 3


def test_sizes_by_type(profiles: list[SiteProfile]) -> None:
    by_type: dict[str, list[int]] = {}
    for p in profiles:
        by_type.setdefault(p.site_type, []).append(p.n_patients)
    assert {t: len(v) for t, v in by_type.items()} == {"tier3": 2, "tier2": 4, "community": 6}
    assert all(2500 <= n <= 3000 for n in by_type["tier3"])
    assert all(600 <= n <= 900 for n in by_type["tier2"])
    assert all(250 <= n <= 400 for n in by_type["community"])
    sizes = [p.n_patients for p in profiles]
    assert max(sizes) >= 10 * min(sizes)
    assert 10000 <= sum(sizes) <= 11000
    assert len({p.name for p in profiles}) == len(profiles)


@pytest.mark.parametrize("n_sites", [3, 4, 5, 7, 20])
def test_other_site_counts_keep_every_type(n_sites: int) -> None:
    ps = default_profiles(n_sites)
    assert len(ps) == n_sites
    assert {p.site_type for p in ps} == {"tier3", "tier2", "community"}
    assert sum(p.label_noise > 0 for p in ps) == 1


def test_size_scale_scales_sizes() -> None:
    small = default_profiles(size_scale=0.5)
    assert sum(p.n_patients for p in small) == pytest.approx(10450 / 2, rel=0.02)


@pytest.mark.parametrize("bad", [0, -3])
def test_invalid_n_sites_raises(bad: int) -> None:
    with pytest.raises(ValueError, match="n_sites"):
        default_profiles(bad)
    with pytest.raises(ValueError, match="n_sites"):
        synthetic_federation(bad)


def test_tier3_older_than_community(exports: list[SiteExport]) -> None:
    def mean_age(site_type: str) -> float:
        ages = [harmonise(e.raw, e.mapping).frame["age"] for e in exports
                if e.mapping.site_type == site_type]
        return float(pd.concat(ages).mean())

    assert mean_age("tier3") == pytest.approx(62, abs=2)
    assert mean_age("community") == pytest.approx(48, abs=2)
    assert mean_age("tier3") > mean_age("community") + 8


def test_mmol_site_round_trips_to_mg_dl_truth(exports: list[SiteExport]) -> None:
    mmol = [e for e in exports if e.mapping.columns["total_cholesterol"].unit == "mmol/L"]
    assert mmol
    for e in mmol:
        frame = harmonise(e.raw, e.mapping).frame
        for name in ("total_cholesterol", "hdl_cholesterol"):
            present = frame[name].notna().to_numpy()
            assert 0.9 < present.mean() <= 1.0
            got = frame[name].to_numpy()[present]
            truth = e.truth[name].to_numpy()[present]
            np.testing.assert_allclose(got, truth, atol=0.5)


def test_risk_equation_golden_value() -> None:
    # D'Agostino RB Sr et al., Circulation 2008;117:743-753, Table 2 (men):
    # risk = 1 - S0 ** exp(sum(beta * x) - mean), S0 = 0.88936, mean = 23.9802.
    # Man aged 61, TC 180 mg/dL, HDL 47 mg/dL, SBP 124 mmHg untreated, smoker, no diabetes.
    lp = (3.06117 * math.log(61) + 1.12370 * math.log(180) - 0.93263 * math.log(47)
          + 1.93303 * math.log(124) + 0.65451)
    by_hand = 1 - 0.88936 ** math.exp(lp - 23.9802)
    risk = dagostino_cvd_risk(male=np.array([True]), age=np.array([61.0]),
                              total_chol=np.array([180.0]), hdl=np.array([47.0]),
                              sbp=np.array([124.0]), bp_treated=np.array([0]),
                              smoker=np.array([1]), diabetes=np.array([0]))
    assert risk[0] == pytest.approx(by_hand, abs=1e-9)
    assert 0.05 < risk[0] < 0.30
    # The same profile for a woman (Table 2, women: S0 = 0.95012, mean = 26.1931).
    lp_w = (2.32888 * math.log(61) + 1.20904 * math.log(180) - 0.70833 * math.log(47)
            + 2.76157 * math.log(124) + 0.52873)
    woman = dagostino_cvd_risk(male=np.array([False]), age=np.array([61.0]),
                               total_chol=np.array([180.0]), hdl=np.array([47.0]),
                               sbp=np.array([124.0]), bp_treated=np.array([0]),
                               smoker=np.array([1]), diabetes=np.array([0]))
    assert woman[0] == pytest.approx(1 - 0.95012 ** math.exp(lp_w - 26.1931), abs=1e-9)
    # Treated SBP uses its own, larger coefficient.
    treated = dagostino_cvd_risk(male=np.array([True]), age=np.array([61.0]),
                                 total_chol=np.array([180.0]), hdl=np.array([47.0]),
                                 sbp=np.array([124.0]), bp_treated=np.array([1]),
                                 smoker=np.array([1]), diabetes=np.array([0]))
    assert treated[0] > risk[0]


def test_prevalence_per_site(exports: list[SiteExport]) -> None:
    for e in exports:
        labels = harmonise(e.raw, e.mapping).labels
        assert 0.02 <= labels.mean() <= 0.40, e.mapping.site
    tier3 = [e.true_risk.mean() for e in exports if e.mapping.site_type == "tier3"]
    community = [e.true_risk.mean() for e in exports if e.mapping.site_type == "community"]
    assert min(tier3) > max(community)


def test_exactly_one_noisy_tier2_site(profiles: list[SiteProfile],
                                      exports: list[SiteExport]) -> None:
    noisy = [e for e in exports if e.noisy_labels]
    assert len(noisy) == 1
    assert noisy[0].mapping.site_type == "tier2"
    noisy_profiles = [p for p in profiles if p.label_noise > 0]
    assert [p.name for p in noisy_profiles] == [noisy[0].mapping.site]
    assert noisy_profiles[0].label_noise == pytest.approx(0.3)
    # Flipping 30% pushes prevalence towards 0.3 whatever the true risk.
    labels = harmonise(noisy[0].raw, noisy[0].mapping).labels
    assert labels.mean() > noisy[0].true_risk.mean() + 0.1


def test_synthetic_federation() -> None:
    fed = synthetic_federation(seed=0)
    assert fed.name == "synthetic"
    assert fed.outcome == "cvd_10y"
    assert len(fed.sites) == 12
    assert fed.feature_names == encoded_feature_names(SYNTHETIC_FEATURES)
    assert fed.n_features == len(encoded_feature_names(SYNTHETIC_FEATURES))
    assert set(fed.load_reports) == {s.name for s in fed.sites}
    assert 10000 <= sum(s.n_train + s.n_test for s in fed.sites) <= 11000
    for s in fed.sites:
        assert s.n_test == pytest.approx(0.3 * (s.n_train + s.n_test), abs=1)
        assert not np.isnan(s.x_train[:, 0]).any()  # age is never missing
    converted = [r for r in fed.load_reports.values() if r.converted_units]
    assert converted


def test_test_rows_carry_the_true_risk_their_labels_were_drawn_from(
        exports: list[SiteExport]) -> None:
    data = synthetic_federation(seed=0)
    from cardiofed.data.sites import split_indices

    for k, (site, export) in enumerate(zip(data.sites, exports, strict=True)):
        _, test = split_indices(export.labels, 0.3, k)
        np.testing.assert_array_equal(site.y_test, export.labels[test])
        assert site.true_risk_test is not None
        np.testing.assert_array_equal(site.true_risk_test, export.true_risk[test])


def test_evaluation_cohorts_are_large_new_patients_of_each_site_s_profile(
        profiles: list[SiteProfile]) -> None:
    data = synthetic_federation(n_sites=4, seed=3, eval_size=6000)
    small = default_profiles(4)
    for site, p in zip(data.sites, small, strict=True):
        assert site.n_train == p.n_patients  # every record trains; evaluation is apart
        assert site.n_test == 6000
        assert site.true_risk_test is not None and site.true_risk_test.shape == (6000,)
        age = site.x_test[:, 0]
        assert np.nanmean(age) == pytest.approx(p.age_mean, abs=1.0)
        # Labels were drawn from these risks (no label noise at these four sites but one).
        if p.label_noise == 0:
            assert site.y_test.mean() == pytest.approx(site.true_risk_test.mean(), abs=0.02)
    again = synthetic_federation(n_sites=4, seed=3, eval_size=6000)
    np.testing.assert_array_equal(again.sites[0].x_test, data.sites[0].x_test)
    with pytest.raises(ValueError, match="eval_size must be an integer >= 2"):
        synthetic_federation(n_sites=4, eval_size=1)


def test_the_sampler_draws_fresh_patients_of_one_site() -> None:
    data = synthetic_federation(n_sites=4, seed=0)
    assert data.sampler is not None
    x, y = data.sampler.draw("community_01", 500, seed=1)
    assert x.shape == (500, len(data.feature_names)) and y.shape == (500,)
    again, _ = data.sampler.draw("community_01", 500, seed=1)
    other, _ = data.sampler.draw("community_01", 500, seed=2)
    np.testing.assert_array_equal(x, again)
    assert not np.array_equal(np.nan_to_num(x), np.nan_to_num(other))
    tier3, _ = data.sampler.draw("tier3_01", 2000, seed=1)
    assert np.nanmean(tier3[:, 0]) > np.nanmean(x[:, 0]) + 8  # older at tier-3 hospitals
    with pytest.raises(ValueError, match="No synthetic site 'nowhere'"):
        data.sampler.draw("nowhere", 10, seed=0)
