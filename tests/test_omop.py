"""OMOP CDM sites: features and the outcome derived from concept ids at an index date,
from a folder of tables or a database, then validated like any export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cardiofed.data.omop import OmopMapping, read_omop
from cardiofed.data.sites import federation_from_csv
from cardiofed.exceptions import DataValidationError

SBP, CHOL, DIABETES, STATIN, CHD = 3004249, 3027114, 201826, 1539403, 4329847
MAPPING = f"""
site = "{{site}}"
site_type = "tier2"
outcome = "chd_10y"
index_date = "2015-01-01"
lookback_days = 730

[features.age]
table = "person"
[features.sex]
table = "person"
[features.systolic_bp]
table = "measurement"
concept_ids = [{SBP}]
units = {{ 8876 = "mmHg" }}
[features.total_cholesterol]
table = "measurement"
concept_ids = [{CHOL}]
units = {{ 8840 = "mg/dL", 8753 = "mmol/L" }}
[features.diabetes]
table = "condition_occurrence"
concept_ids = [{DIABETES}]

[outcome_rule]
table = "condition_occurrence"
concept_ids = [{CHD}]
horizon_years = 10
"""


def omop_tables(n: int, seed: int) -> dict[str, pd.DataFrame]:
    """A small OMOP database: person 1 is the hand-checked one, the rest random."""
    rng = np.random.default_rng(seed)
    ids = np.arange(1, n + 1)
    person = pd.DataFrame({"person_id": ids, "gender_concept_id": rng.choice([8507, 8532], n),
                           "year_of_birth": rng.integers(1940, 1975, n),
                           "month_of_birth": rng.integers(1, 13, n),
                           "day_of_birth": rng.integers(1, 28, n)})
    person.loc[0, ["gender_concept_id", "year_of_birth", "month_of_birth",
                   "day_of_birth"]] = [8507, 1950, 6, 15]
    sbp = 110 + 40 * rng.random(n)
    measurement = pd.concat([
        pd.DataFrame({"person_id": ids, "measurement_concept_id": SBP,
                      "measurement_date": "2014-06-01", "value_as_number": sbp,
                      "unit_concept_id": 8876}),
        # person 1: an older reading outside the window, and a later one after the index
        pd.DataFrame({"person_id": [1, 1], "measurement_concept_id": SBP,
                      "measurement_date": ["2010-01-01", "2016-01-01"],
                      "value_as_number": [190.0, 200.0], "unit_concept_id": 8876}),
        pd.DataFrame({"person_id": ids, "measurement_concept_id": CHOL,
                      "measurement_date": "2014-09-01",
                      "value_as_number": np.where(ids % 2 == 0, 5.2, 201.0),
                      "unit_concept_id": np.where(ids % 2 == 0, 8753, 8840)}),
    ], ignore_index=True)
    measurement.loc[(measurement["person_id"] == 1) & (measurement["measurement_date"]
                                                       == "2014-06-01"), "value_as_number"] = 141
    risk = 1 / (1 + np.exp(-(-3 + 0.04 * (sbp - 130) + 0.8 * (ids % 3 == 0))))
    chd = rng.random(n) < risk
    chd[1:4] = False  # persons 2-4: the hand-checked cases below
    condition = pd.concat([
        pd.DataFrame({"person_id": ids[ids % 3 == 0], "condition_concept_id": DIABETES,
                      "condition_start_date": "2012-03-01"}),
        pd.DataFrame({"person_id": ids[chd], "condition_concept_id": CHD,
                      "condition_start_date": "2019-05-01"}),
        # person 2: CHD before the index date (not at risk); person 3: after the horizon
        pd.DataFrame({"person_id": [2, 3], "condition_concept_id": CHD,
                      "condition_start_date": ["2013-01-01", "2026-01-01"]}),
    ], ignore_index=True)
    period = pd.DataFrame({"person_id": ids, "observation_period_start_date": "2005-01-01",
                           "observation_period_end_date": "2030-12-31"})
    period.loc[3, "observation_period_end_date"] = "2018-01-01"  # person 4 lost early
    return {"person": person, "measurement": measurement, "condition_occurrence": condition,
            "observation_period": period}


def write_folder(folder: Path, tables: dict[str, pd.DataFrame]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, frame in tables.items():
        frame.to_csv(folder / f"{name}.csv", index=False)
    return folder


def write_mapping(path: Path, site: str) -> Path:
    path.write_text(MAPPING.replace("{site}", site))
    return path


def test_features_and_outcome_are_derived_at_the_index_date(tmp_path: Path) -> None:
    tables = omop_tables(200, seed=0)
    mapping = OmopMapping.from_toml(write_mapping(tmp_path / "m.toml", "a"))
    rows = read_omop(write_folder(tmp_path / "omop", tables), mapping)
    assert rows.excluded == {"outcome on or before the index date": 1,  # person 2
                             "observed only after the index date": 0,
                             "lost to follow-up before the horizon": 1}  # person 4
    people = rows.frame.set_index("person_id")
    assert "2" not in people.index and "4" not in people.index
    assert people.loc["3", "outcome"] == "0"  # CHD after the 10-year horizon
    first = people.loc["1"]
    assert first["age"] == "64"  # born 15 June 1950, index 1 January 2015
    assert first["sex"] == "male"
    assert float(first["systolic_bp"]) == 141.0  # the reading in the window, not 2010/2016
    assert float(people.loc["6"]["total_cholesterol"]) == pytest.approx(5.2 * 38.67)
    assert float(people.loc["5"]["total_cholesterol"]) == 201.0
    assert set(rows.frame["diabetes"]) == {"0", "1"}


def test_a_database_gives_the_same_rows_as_a_folder(tmp_path: Path) -> None:
    from sqlalchemy import create_engine

    tables = omop_tables(120, seed=1)
    db = tmp_path / "omop.db"
    engine = create_engine(f"sqlite:///{db}")
    for name, frame in tables.items():
        frame.to_sql(name, engine, index=False)
    engine.dispose()
    mapping = OmopMapping.from_toml(write_mapping(tmp_path / "m.toml", "a"))
    from_db = read_omop(db, mapping)
    from_folder = read_omop(write_folder(tmp_path / "omop", tables), mapping)
    pd.testing.assert_frame_equal(from_db.frame, from_folder.frame)


def test_omop_sites_train_beside_csv_sites_through_the_same_validation(tmp_path: Path) -> None:
    paths, mappings = [], []
    for k, site in enumerate(("omop_a", "omop_b")):
        paths.append(write_folder(tmp_path / site, omop_tables(300, seed=k)))
        mappings.append(write_mapping(tmp_path / f"{site}.toml", site))
    data = federation_from_csv(paths, mappings)
    assert [s.name for s in data.sites] == ["omop_a", "omop_b"]
    assert data.feature_names == ["age", "sex=male", "systolic_bp", "total_cholesterol",
                                  "diabetes"]
    assert data.load_reports["omop_a"].excluded["outcome on or before the index date"] == 1


def test_an_unknown_unit_is_counted_invalid_never_guessed(tmp_path: Path) -> None:
    tables = omop_tables(50, seed=2)
    tables["measurement"].loc[tables["measurement"]["measurement_concept_id"] == CHOL,
                              "unit_concept_id"] = 9999
    folder = write_folder(tmp_path / "omop", tables)
    mapping = write_mapping(tmp_path / "m.toml", "a")
    with pytest.raises(DataValidationError, match=r"column 'total_cholesterol'.*'unknown "
                                                  r"unit' is not a number"):
        federation_from_csv([folder], [mapping])


def test_an_omop_mapping_is_checked_against_the_catalogue(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(MAPPING.replace("{site}", "a").replace(
        'units = { 8876 = "mmHg" }', 'units = { 8876 = "furlongs" }').replace(
        "[features.diabetes]\ntable = \"condition_occurrence\"",
        "[features.diabetes]\ntable = \"measurement\""))
    with pytest.raises(DataValidationError) as err:
        OmopMapping.from_toml(bad)
    assert "features.systolic_bp.units.8876: Unknown unit 'furlongs'" in str(err.value)
    assert "features.diabetes: a binary feature cannot come from values" in str(err.value)
    with pytest.raises(DataValidationError, match="neither a folder of tables"):
        read_omop(tmp_path / "nowhere", OmopMapping.from_toml(write_mapping(
            tmp_path / "m.toml", "a")))


def test_a_survival_omop_site_is_censored_at_the_end_of_observation(tmp_path: Path) -> None:
    tables = omop_tables(200, seed=0)
    text = MAPPING.replace("{site}", "a").replace("horizon_years = 10",
                                                  "horizon_years = 10\nfollow_up = true")
    (tmp_path / "m.toml").write_text(text)
    rows = read_omop(write_folder(tmp_path / "omop", tables),
                     OmopMapping.from_toml(tmp_path / "m.toml"))
    assert rows.excluded["outcome on or before the index date"] == 1  # person 2
    assert "lost to follow-up before the horizon" not in rows.excluded
    people = rows.frame.set_index("person_id")
    lost = people.loc["4"]  # observation ends 2018-01-01: censored then, not left out
    assert (lost["outcome"], lost["follow_up_days"]) == ("0", "1096")
    late = people.loc["3"]  # CHD in 2026, after the 10-year horizon: censored at it
    assert (late["outcome"], late["follow_up_days"]) == ("0", "3653")
    events = people[people["outcome"] == "1"]
    assert len(events) and set(events["follow_up_days"]) == {"1581"}  # 2019-05-01
    data = federation_from_csv([tmp_path / "omop"], [tmp_path / "m.toml"], test_fraction=0.3)
    site = data.sites[0]
    assert site.survival
    years = np.concatenate([site.time_train, site.time_test])
    assert years.max() == pytest.approx(3653 / 365.25) and years.min() > 0
