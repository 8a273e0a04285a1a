"""The reference data sets: UCI Heart Disease (FLamby split) and partitioned Framingham.

Skipped, with the reason, when the data are not at ``cardiofed.data.paths.data_dir()``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cardiofed.data.dataset import FederatedDataset
from cardiofed.data.framingham import load_framingham
from cardiofed.data.uci_heart import load_uci_heart

# --- UCI Heart Disease, FLamby Fed-Heart-Disease ---------------------------------------

# FLamby (Ogier du Terrail et al., NeurIPS 2022), Fed-Heart-Disease; also SOURCES.md.
FLAMBY_SPLITS = {"cleveland": (199, 104), "hungarian": (172, 89), "switzerland": (30, 16),
                 "va": (85, 45)}
FLAMBY_FEATURES = [
    "age", "sex=male", "systolic_bp", "total_cholesterol", "fasting_glucose_high",
    "max_heart_rate", "exercise_angina", "st_depression",
    "chest_pain_type=2", "chest_pain_type=3", "chest_pain_type=4", "rest_ecg=1", "rest_ecg=2",
]


@pytest.fixture(scope="module")
def uci(uci_dir: Path) -> FederatedDataset:
    return load_uci_heart(uci_dir.parent)


def test_uci_flamby_split_sizes(uci: FederatedDataset) -> None:
    sizes = {s.name: (s.n_train, s.n_test) for s in uci.sites}

    assert sizes == FLAMBY_SPLITS
    assert sum(a + b for a, b in sizes.values()) == 740


def test_uci_has_flamby_features_in_order(uci: FederatedDataset) -> None:
    assert uci.n_features == 13
    assert uci.feature_names == FLAMBY_FEATURES
    assert uci.outcome == "heart_disease"
    for s in uci.sites:
        assert not np.isnan(s.x_train).any() and not np.isnan(s.x_test).any()
        # One-hot columns hold 0/1 only.
        dummies = np.concatenate([s.x_train, s.x_test])[:, 8:]
        assert set(np.unique(dummies)) <= {0.0, 1.0}


def test_uci_load_is_deterministic(uci: FederatedDataset, uci_dir: Path) -> None:
    again = load_uci_heart(uci_dir.parent)

    for a, b in zip(uci.sites, again.sites, strict=True):
        np.testing.assert_array_equal(a.x_train, b.x_train)
        np.testing.assert_array_equal(a.y_train, b.y_train)
        np.testing.assert_array_equal(a.x_test, b.x_test)
        np.testing.assert_array_equal(a.y_test, b.y_test)


# --- Framingham, eight hospitals ---------------------------------------------------------

@pytest.fixture(scope="module")
def framingham(framingham_csv: Path) -> FederatedDataset:
    return load_framingham(framingham_csv.parent.parent, seed=0)


def site_rows(ds: FederatedDataset) -> dict[str, int]:
    return {s.name: s.n_train + s.n_test for s in ds.sites}


def test_framingham_has_eight_sites_of_three_types(framingham: FederatedDataset) -> None:
    types = Counter(s.site_type for s in framingham.sites)

    assert len(framingham.sites) == 8
    assert types == {"tier3": 2, "tier2": 3, "community": 3}
    assert sum(site_rows(framingham).values()) == 4240
    assert framingham.outcome == "chd_10y"


def test_framingham_sites_are_heterogeneous_in_size(framingham: FederatedDataset) -> None:
    sizes = list(site_rows(framingham).values())

    assert max(sizes) / min(sizes) > 10


def test_framingham_tier3_patients_are_older_than_community(
        framingham: FederatedDataset) -> None:
    age = framingham.feature_names.index("age")

    def mean_age(site_type: str) -> float:
        return float(np.mean(np.concatenate(
            [np.concatenate([s.x_train[:, age], s.x_test[:, age]])
             for s in framingham.sites if s.site_type == site_type])))

    assert mean_age("tier3") > mean_age("community")


def test_framingham_missing_counts_match_sources(framingham: FederatedDataset) -> None:
    report = framingham.load_reports["framingham"]

    # SOURCES.md: glucose 388, education 105, BPMeds 53, totChol 50, cigsPerDay 29,
    # BMI 19, heartRate 1; every other column is complete.
    missing = {k: v for k, v in report.missing.items() if v}
    assert missing == {"glucose": 388, "education": 105, "bp_treated": 53,
                       "total_cholesterol": 50, "cigs_per_day": 29, "bmi": 19,
                       "heart_rate": 1}
    assert report.rows == 4240
    assert not any(report.invalid_set_missing.values())


def test_framingham_label_prevalence(framingham: FederatedDataset) -> None:
    labels = np.concatenate([np.concatenate([s.y_train, s.y_test]) for s in framingham.sites])

    assert int(labels.sum()) == 644  # SOURCES.md: 644 positive (15.2%)


def test_framingham_same_seed_same_partition(framingham: FederatedDataset,
                                             framingham_csv: Path) -> None:
    again = load_framingham(framingham_csv.parent.parent, seed=0)

    for a, b in zip(framingham.sites, again.sites, strict=True):
        np.testing.assert_array_equal(a.x_train, b.x_train)
        np.testing.assert_array_equal(a.y_test, b.y_test)


def test_framingham_other_seed_other_partition(framingham: FederatedDataset,
                                               framingham_csv: Path) -> None:
    other = load_framingham(framingham_csv.parent.parent, seed=1)

    assert sum(site_rows(other).values()) == 4240
    assert site_rows(other) != site_rows(framingham)


def test_the_uci_files_ship_with_the_package_byte_for_byte(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh install has no data folder: --dataset uci-heart reads the packaged copy
    (CC BY 4.0, with its licence and citation beside it)."""
    import hashlib

    from cardiofed.data.paths import PACKAGED
    from cardiofed.data.uci_heart import load_uci_heart

    md5 = {"processed.cleveland.data": "2d91a8ff69cfd9616aa47b59d6f843db",
           "processed.hungarian.data": "22e96bee155b5973568101c93b3705f6",
           "processed.switzerland.data": "9a87f7577310b3917730d06ba9349e20",
           "processed.va.data": "4249d03ca7711e84f4444768c9426170"}
    for name, digest in md5.items():
        assert hashlib.md5((PACKAGED / "uci_heart" / name).read_bytes()).hexdigest() == digest
    readme = (PACKAGED / "uci_heart" / "README.md").read_text()
    assert "CC BY 4.0" in readme and "doi:10.24432/C52P4X" in readme
    monkeypatch.setenv("CARDIOFED_DATA_DIR", str(tmp_path))  # an empty data folder
    data = load_uci_heart()
    assert [s.n_train for s in data.sites] == [199, 172, 30, 85]
    with pytest.raises(FileNotFoundError, match="framingham"):
        from cardiofed.data.framingham import load_framingham

        load_framingham()
