"""Site mappings onto the canonical schema: validation, exact error messages, unit
conversion, codes, missing values and the CSV-to-federation path."""

from __future__ import annotations

import re
import textwrap
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cardiofed.data.mapping import SiteMapping, encode, harmonise, read_export
from cardiofed.data.sites import federation_from_csv
from cardiofed.exceptions import DataValidationError
from cardiofed.schema import FEATURES, encoded_feature_names

Columns = dict[str, dict[str, object]]


def mapping_dict(columns: Columns, **top: object) -> dict[str, object]:
    """A minimal valid mapping: site 'a', outcome cvd_10y, label column 'y' coded 1/0."""
    return {"site": "a", "outcome": "cvd_10y", "label": {"column": "y"}, "columns": columns,
            **top}


def make_mapping(columns: Columns, **top: object) -> SiteMapping:
    return SiteMapping.from_dict(mapping_dict(columns, **top), source="a.toml")


def export(**columns: list[str]) -> pd.DataFrame:
    """A raw export as the loader sees it: every column text; label 'y' all 0 if absent."""
    n = len(next(iter(columns.values())))
    columns.setdefault("y", ["0"] * n)
    return pd.DataFrame(columns, dtype=str)


CHOL_MG: Columns = {"total_cholesterol": {"source": "CHOL"}}
CHOL_MMOL: Columns = {"total_cholesterol": {"source": "CHOL", "unit": "mmol/L"}}
SEX_MF: Columns = {"sex": {"source": "GENDER", "codes": {"M": "male", "F": "female"}}}


# --- Row-level validation: every message names file, column, feature, row and value ---

def test_unparseable_number_names_file_column_feature_row_and_value() -> None:
    raw = export(CHOL=["200", "abc", "210"])

    with pytest.raises(DataValidationError, match=re.escape(
            "a.csv: column 'CHOL' (total_cholesterol), row 2: value 'abc' is not a number.")):
        harmonise(raw, make_mapping(CHOL_MG), source="a.csv")


def test_out_of_range_value_in_canonical_unit() -> None:
    raw = export(CHOL=["200", "180", "9"])

    with pytest.raises(DataValidationError, match=re.escape(
            "a.csv: column 'CHOL' (total_cholesterol), row 3: value 9 mg/dL is outside the "
            "plausible range [70, 700] mg/dL.")):
        harmonise(raw, make_mapping(CHOL_MG), source="a.csv")


def test_out_of_range_value_is_reported_in_both_units_after_conversion() -> None:
    # 99 mmol/L x 38.67 = 3828.33 mg/dL, far above the schema's 700 mg/dL.
    raw = export(CHOL=["5.0", "99"])

    with pytest.raises(DataValidationError, match=re.escape(
            "a.csv: column 'CHOL' (total_cholesterol), row 2: value 99 mmol/L = 3828.33 mg/dL "
            "is outside the plausible range [70, 700] mg/dL.")):
        harmonise(raw, make_mapping(CHOL_MMOL), source="a.csv")


def test_unknown_categorical_code() -> None:
    raw = export(GENDER=["M", "F", "X"])

    with pytest.raises(DataValidationError, match=re.escape(
            "a.csv: column 'GENDER' (sex), row 3: value 'X' is not a known code; expected one "
            "of ['F', 'M', 'female', 'male'] or a missing-value token.")):
        harmonise(raw, make_mapping(SEX_MF), source="a.csv")


def test_mapped_column_missing_from_file() -> None:
    raw = pd.DataFrame({"AGE": ["50"], "y": ["0"]}, dtype=str)

    with pytest.raises(DataValidationError, match=re.escape(
            "a.csv: columns ['CHOL'] named in the mapping for site 'a' are not in the file "
            "(it has ['AGE', 'y'])."
    )):
        harmonise(raw, make_mapping(CHOL_MG), source="a.csv")


def test_label_value_neither_positive_nor_negative() -> None:
    raw = export(CHOL=["200", "210", "220"], y=["0", "1", "2"])

    with pytest.raises(DataValidationError, match=re.escape(
            "a.csv: label column 'y', row 3: value '2' is neither positive ['1'] nor negative "
            "['0']. A row without an outcome cannot be used for training; remove it from the "
            "export or code it explicitly.")):
        harmonise(raw, make_mapping(CHOL_MG), source="a.csv")


# --- Mapping-level validation --------------------------------------------------------

def test_unknown_unit_in_mapping() -> None:
    raw = mapping_dict({"total_cholesterol": {"source": "CHOL", "unit": "mmol"}})

    with pytest.raises(DataValidationError, match=re.escape(
            "Mapping a.toml is invalid: mapping: Unknown unit 'mmol' for feature "
            "'total_cholesterol'; expected one of 'mg/dL', 'mmol/L'.")):
        SiteMapping.from_dict(raw, source="a.toml")


def test_code_mapping_to_an_invalid_canonical_code() -> None:
    raw = mapping_dict({"sex": {"source": "GENDER", "codes": {"M": "man"}}})

    with pytest.raises(DataValidationError, match=re.escape(
            "Mapping a.toml is invalid: mapping: columns.sex.codes: 'M' maps to "
            "'man', which is not a code of 'sex' (expected one of ['female', 'male'])")):
        SiteMapping.from_dict(raw, source="a.toml")


def test_unknown_canonical_feature() -> None:
    raw = mapping_dict({"cholesterol": {"source": "CHOL"}})

    # The message lists every catalogue name, in catalogue order.
    with pytest.raises(DataValidationError, match=re.escape(
            "Mapping a.toml is invalid: mapping: Unknown canonical feature "
            f"'cholesterol'; known features: {', '.join(FEATURES)}.")):
        SiteMapping.from_dict(raw, source="a.toml")


@pytest.mark.parametrize(("raw", "location"), [
    ({**mapping_dict(CHOL_MG), "colour": "blue"}, "colour"),
    (mapping_dict({"total_cholesterol": {"source": "CHOL", "colour": "blue"}}),
     "columns.total_cholesterol.colour"),
])
def test_extra_unknown_key_in_mapping(raw: dict[str, object], location: str) -> None:
    with pytest.raises(DataValidationError, match=re.escape(
            f"Mapping a.toml is invalid: {location}: Extra inputs are not permitted")):
        SiteMapping.from_dict(raw, source="a.toml")


def test_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    text = "site = \nfoo"
    path.write_text(text)
    # The parser's own description (it varies across Python versions) follows the colon.
    with pytest.raises(tomllib.TOMLDecodeError) as parse_error:
        tomllib.loads(text)

    with pytest.raises(DataValidationError, match=re.escape(
            f"Mapping file {path} is not valid TOML: {parse_error.value}")):
        SiteMapping.from_toml(path)


def test_mapping_file_not_found(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"

    with pytest.raises(DataValidationError,
                       match=re.escape(f"Mapping file {path} does not exist.")):
        SiteMapping.from_toml(path)


def test_data_file_not_found(tmp_path: Path) -> None:
    path = tmp_path / "absent.csv"

    with pytest.raises(DataValidationError, match=re.escape(f"Data file {path} does not exist.")):
        read_export(path)


def test_mapping_read_from_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "clinic_a.toml"
    path.write_text(textwrap.dedent("""\
        site = "clinic_a"
        site_type = "community"
        outcome = "cvd_10y"
        missing_values = ["", "NA", "-999"]

        [label]
        column = "event10"
        positive = ["1", "yes"]
        negative = ["0", "no"]

        [columns.total_cholesterol]
        source = "CHOL"
        unit = "mmol/L"

        [columns.sex]
        source = "GENDER"
        codes = { M = "male", F = "female" }
        """))

    mapping = SiteMapping.from_toml(path)

    assert mapping.site == "clinic_a"
    assert mapping.site_type == "community"
    assert mapping.features == ["total_cholesterol", "sex"]
    assert mapping.missing_values == ["", "NA", "-999"]
    assert mapping.label.positive == ["1", "yes"]
    assert mapping.columns["total_cholesterol"].unit == "mmol/L"
    assert mapping.columns["sex"].codes == {"M": "male", "F": "female"}
    assert mapping.on_invalid == "error"


# --- on_invalid = "missing" and missing-value tokens ---------------------------------

def test_on_invalid_missing_sets_values_missing_and_counts_them() -> None:
    mapping = make_mapping({**CHOL_MG, **SEX_MF}, on_invalid="missing")
    raw = export(CHOL=["200", "abc", "9", "NA"], GENDER=["M", "X", "F", "F"])

    site = harmonise(raw, mapping)

    np.testing.assert_array_equal(site.frame["total_cholesterol"].to_numpy(),
                                  [200.0, np.nan, np.nan, np.nan])
    assert site.frame["sex"].tolist()[0] == "male"
    assert pd.isna(site.frame["sex"].iloc[1])
    # 'abc' (unparseable) and 9 (out of range) were invalid; 'NA' is merely missing.
    assert site.report.invalid_set_missing == {"total_cholesterol": 2, "sex": 1}
    assert site.report.missing == {"total_cholesterol": 1, "sex": 0}
    assert site.report.rows == 4


def test_column_level_on_invalid_overrides_the_site_default() -> None:
    mapping = make_mapping({"total_cholesterol": {"source": "CHOL", "on_invalid": "missing"},
                            "age": {"source": "AGE"}})

    site = harmonise(export(CHOL=["abc", "200"], AGE=["50", "60"]), mapping)
    assert site.report.invalid_set_missing["total_cholesterol"] == 1

    with pytest.raises(DataValidationError, match="value 'old' is not a number"):
        harmonise(export(CHOL=["200", "200"], AGE=["50", "old"]), mapping)


def test_missing_value_tokens_are_counted_per_column() -> None:
    # Site-wide defaults are "", "NA", "NaN", "?"; the column adds its own "-999".
    mapping = make_mapping({"total_cholesterol": {"source": "CHOL", "missing_values": ["-999"]},
                            "age": {"source": "AGE"}})
    raw = export(CHOL=["200", "", "NA", " NaN ", "?", "-999"],
                 AGE=["50", "60", "-999", "70", "", "80"])

    with pytest.raises(DataValidationError, match=re.escape("value -999 years is outside")):
        harmonise(raw, mapping)  # -999 is a token of the cholesterol column only

    raw.loc[2, "AGE"] = "NA"
    site = harmonise(raw, mapping)
    assert site.report.missing == {"total_cholesterol": 5, "age": 2}
    assert site.report.invalid_set_missing == {"total_cholesterol": 0, "age": 0}
    assert site.frame["total_cholesterol"].isna().sum() == 5


# --- Units and codes ------------------------------------------------------------------

@pytest.mark.parametrize(("feature", "unit", "value", "expected"), [
    # 1 mmol/L cholesterol = 38.67 mg/dL: 5.0 x 38.67 = 193.35
    ("total_cholesterol", "mmol/L", "5.0", 193.35),
    # 1 mmol/L glucose = 18.016 mg/dL: 5.5 x 18.016 = 99.088
    ("glucose", "mmol/L", "5.5", 99.088),
    # 1 kPa = 7.50062 mmHg: 16 x 7.50062 = 120.00992 (~120.01)
    ("systolic_bp", "kPa", "16", 120.00992),
    # Canonical unit given explicitly: no conversion.
    ("total_cholesterol", "mg/dL", "193", 193.0),
])
def test_unit_conversion_golden_values(feature: str, unit: str, value: str,
                                       expected: float) -> None:
    mapping = make_mapping({feature: {"source": "V", "unit": unit}})

    site = harmonise(export(V=[value]), mapping)

    assert site.frame[feature].iloc[0] == pytest.approx(expected, rel=1e-12)
    converted = unit != FEATURES[feature].unit
    assert (feature in site.report.converted_units) is converted


def test_conversion_is_recorded_in_the_load_report() -> None:
    site = harmonise(export(CHOL=["5.0"]), make_mapping(CHOL_MMOL))

    assert site.report.converted_units == {"total_cholesterol": "mmol/L -> mg/dL (x38.67)"}


@pytest.mark.parametrize(("codes", "values"), [
    ({"M": "male", "F": "female"}, ["M", "F", "M"]),
    ({"1": "male", "0": "female"}, ["1", "0", "1"]),
    ({}, ["male", "female", "male"]),  # canonical codes need no mapping
])
def test_sex_codings_all_map_to_canonical_codes(codes: dict[str, str],
                                                values: list[str]) -> None:
    mapping = make_mapping({"sex": {"source": "GENDER", "codes": codes}})

    site = harmonise(export(GENDER=values), mapping)

    assert site.frame["sex"].tolist() == ["male", "female", "male"]
    np.testing.assert_array_equal(encode(site.frame, ["sex"]), [[1.0], [0.0], [1.0]])


def test_binary_default_codes_are_case_insensitive() -> None:
    mapping = make_mapping({"diabetes": {"source": "DM"}})

    site = harmonise(export(DM=["Yes", "no", "1", "0.0", "TRUE", "n", "NA"]), mapping)

    np.testing.assert_array_equal(site.frame["diabetes"].to_numpy(),
                                  [1, 0, 1, 0, 1, 0, np.nan])


def test_column_with_only_missing_values_loads_as_all_nan() -> None:
    mapping = make_mapping({**CHOL_MG, **SEX_MF, "diabetes": {"source": "DM"}})
    raw = export(CHOL=["NA", "", "?"], GENDER=["NA", "", "?"], DM=["NA", "", "?"])

    site = harmonise(raw, mapping)

    assert site.frame.isna().all().all()
    assert site.report.missing == {"total_cholesterol": 3, "sex": 3, "diabetes": 3}
    x = encode(site.frame, ["total_cholesterol", "sex", "diabetes"])
    assert x.shape == (3, 3)
    assert np.isnan(x).all()


def test_missing_categorical_value_is_nan_in_all_its_one_hot_columns() -> None:
    mapping = make_mapping({"education": {"source": "EDU"}, "age": {"source": "AGE"}})
    site = harmonise(export(EDU=["1", "3", "NA", "4.0"], AGE=["40", "50", "60", "70"]), mapping)

    x = encode(site.frame, ["education", "age"])

    # Columns: education=2, education=3, education=4 (code 1 is the reference), age.
    assert encoded_feature_names(["education", "age"]) == [
        "education=2", "education=3", "education=4", "age"]
    np.testing.assert_array_equal(x, [
        [0, 0, 0, 40],
        [0, 1, 0, 50],
        [np.nan, np.nan, np.nan, 60],
        [0, 0, 1, 70],
    ])


def test_encode_requires_every_feature() -> None:
    frame = pd.DataFrame({"age": [50.0]})

    with pytest.raises(DataValidationError, match=re.escape(
            "Canonical feature 'bmi' is missing from the data.")):
        encode(frame, ["age", "bmi"])


# --- Federation from the user's own CSV exports ----------------------------------------

SITE_A_TOML = """\
site = "hospital_a"
site_type = "tier3"
outcome = "cvd_10y"

[label]
column = "event"

[columns.age]
source = "AGE"

[columns.sex]
source = "SEX"
codes = { M = "male", F = "female" }

[columns.total_cholesterol]
source = "TC"

[columns.diabetes]
source = "DM"
"""

SITE_B_TOML = """\
site = "clinic_b"
site_type = "community"
outcome = "cvd_10y"
missing_values = ["-999"]

[label]
column = "cvd"
positive = ["yes"]
negative = ["no"]

[columns.total_cholesterol]
source = "chol_mmol"
unit = "mmol/L"

[columns.age]
source = "age_years"

[columns.sex]
source = "male"
codes = { "1" = "male", "0" = "female" }

[columns.bmi]
source = "bmi"
"""


def write_two_sites(tmp_path: Path) -> tuple[list[Path], list[Path]]:
    a = pd.DataFrame({
        "AGE": [str(40 + i) for i in range(10)],
        "SEX": list("MFMFMFMFMF"),
        "TC": [str(150 + 10 * i) for i in range(10)],
        "DM": ["0", "1"] * 5,
        "event": ["0", "0", "0", "1", "0", "1", "0", "0", "1", "1"],
    })
    b = pd.DataFrame({
        "chol_mmol": ["4.0", "5.0", "-999", "6.0", "4.5", "5.5", "3.5", "6.5"],
        "age_years": [str(30 + 5 * i) for i in range(8)],
        "male": ["1", "0", "0", "1", "1", "0", "1", "0"],
        "bmi": ["25"] * 8,
        "cvd": ["no", "yes", "no", "no", "yes", "no", "yes", "no"],
    })
    csvs = [tmp_path / "a.csv", tmp_path / "b.csv"]
    mappings = [tmp_path / "a.toml", tmp_path / "b.toml"]
    a.to_csv(csvs[0], index=False)
    b.to_csv(csvs[1], index=False)
    mappings[0].write_text(SITE_A_TOML)
    mappings[1].write_text(SITE_B_TOML)
    return csvs, mappings


def test_federation_from_two_csv_exports(tmp_path: Path) -> None:
    csvs, mappings = write_two_sites(tmp_path)

    fed = federation_from_csv(csvs, mappings, test_fraction=0.25, seed=3)

    # Features default to those both mappings map, in the first mapping's order.
    assert fed.feature_names == ["age", "sex=male", "total_cholesterol"]
    assert fed.outcome == "cvd_10y"
    assert [(s.name, s.site_type) for s in fed.sites] == [("hospital_a", "tier3"),
                                                          ("clinic_b", "community")]
    assert [s.n_train + s.n_test for s in fed.sites] == [10, 8]
    b = fed.site("clinic_b")
    chol = np.sort(np.concatenate([b.x_train[:, 2], b.x_test[:, 2]]))
    # mmol/L x 38.67 = mg/dL; the -999 token is missing.
    expected = np.array([3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 6.5]) * 38.67
    np.testing.assert_allclose(chol[:7], expected, rtol=1e-12)
    assert np.isnan(chol[7])
    assert int(np.concatenate([b.y_train, b.y_test]).sum()) == 3
    assert fed.load_reports["clinic_b"].missing == {
        "total_cholesterol": 1, "age": 0, "sex": 0, "bmi": 0}
    assert set(fed.load_reports) == {"hospital_a", "clinic_b"}


def test_federation_from_csv_is_deterministic_by_seed(tmp_path: Path) -> None:
    csvs, mappings = write_two_sites(tmp_path)

    first = federation_from_csv(csvs, mappings, seed=5)
    second = federation_from_csv(csvs, mappings, seed=5)

    for s, t in zip(first.sites, second.sites, strict=True):
        np.testing.assert_array_equal(s.x_train, t.x_train)
        np.testing.assert_array_equal(s.y_test, t.y_test)


def test_federation_from_csv_needs_one_mapping_per_csv(tmp_path: Path) -> None:
    csvs, mappings = write_two_sites(tmp_path)

    with pytest.raises(DataValidationError, match=re.escape(
            "Give one mapping file per CSV file; got 2 CSV and 1 mapping files.")):
        federation_from_csv(csvs, mappings[:1])


def test_federation_from_csv_rejects_a_feature_a_site_does_not_map(tmp_path: Path) -> None:
    csvs, mappings = write_two_sites(tmp_path)

    with pytest.raises(DataValidationError, match=re.escape(
            f"{csvs[1]}: the mapping for site 'clinic_b' does not map features ['diabetes'] "
            "that the study uses.")):
        federation_from_csv(csvs, mappings, features=["age", "diabetes"])


def test_label_and_category_codes_are_compared_ignoring_case() -> None:
    mapping = SiteMapping.from_dict({
        "site": "s", "outcome": "chd_10y",
        "label": {"column": "Y", "positive": ["Yes"], "negative": ["No"]},
        "columns": {"sex": {"source": "SEX", "codes": {"M": "male", "F": "female"}},
                    "education": {"source": "EDU"}}})
    raw = pd.DataFrame({"Y": ["yes", "NO", "Yes"], "SEX": ["m", "F", "M"],
                        "EDU": ["1", "4", "2"]}, dtype=str)
    site = harmonise(raw, mapping)
    assert site.labels.tolist() == [1, 0, 1]
    assert site.frame["sex"].tolist() == ["male", "female", "male"]
    with pytest.raises(DataValidationError, match="differ only in case"):
        SiteMapping.from_dict({"site": "s", "outcome": "chd_10y", "label": {"column": "Y"},
                               "columns": {"sex": {"source": "S",
                                                   "codes": {"M": "male", "m": "female"}}}})
    with pytest.raises(DataValidationError, match="both positive and negative"):
        SiteMapping.from_dict({"site": "s", "outcome": "chd_10y",
                               "label": {"column": "Y", "positive": ["Y"], "negative": ["y"]},
                               "columns": {"age": {"source": "A"}}})


def test_check_counts_every_problem_per_column_before_any_training(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cardiofed.cli import app

    csv = tmp_path / "a.csv"
    csv.write_text("AGE,GENDER,CHOL,Y\n54,M,210,1\nold,F,199,0\n61,X,5000,0\n47,F,,1\n")
    mapping = tmp_path / "a.toml"
    mapping.write_text('site = "a"\noutcome = "chd_10y"\n[label]\ncolumn = "Y"\n'
                       '[columns.age]\nsource = "AGE"\n[columns.sex]\nsource = "GENDER"\n'
                       'codes = { M = "male", F = "female" }\n'
                       '[columns.total_cholesterol]\nsource = "CHOL"\n')
    result = CliRunner().invoke(app, ["check", "--csv", str(csv), "--mapping", str(mapping)],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 2  # the mapping says on_invalid = "error"
    rows = {}  # feature -> its counts; the site is named on its first row only
    for line in result.output.splitlines():
        tokens = line.split()
        tokens = tokens[1:] if tokens[:1] == ["a"] else tokens
        if len(tokens) == 6 and all(t.isdigit() for t in tokens[1:]):
            rows[tokens[0]] = tokens[1:]
    # parsed, missing, not a number, out of range, unknown code
    assert rows["age"] == ["3", "0", "1", "0", "0"]
    assert rows["sex"] == ["3", "0", "0", "0", "1"]
    assert rows["total_cholesterol"] == ["2", "1", "0", "1", "0"]
    assert "4 rows, 2 with the outcome 'chd_10y'" in result.output
    assert "Loading with this mapping stops: " in result.output and "'old'" in result.output
    lenient = tmp_path / "b.toml"
    lenient.write_text('on_invalid = "missing"\n' + mapping.read_text())
    ok = CliRunner().invoke(app, ["check", "--csv", str(csv), "--mapping", str(lenient)])
    assert ok.exit_code == 0 and "3 invalid values are set missing" in ok.output


def test_a_parquet_export_loads_like_its_csv(tmp_path: Path) -> None:
    frame = pd.DataFrame({"AGE": [54, 61, None], "GENDER": ["M", "F", None],
                          "SMOKER": [True, False, True], "CHOL": [5.2, None, 6.0],
                          "Y": [1, 0, 0]})
    frame.to_parquet(tmp_path / "a.parquet")
    raw, malformed = read_export(tmp_path / "a.parquet")
    assert malformed == {}
    assert raw.to_dict("list") == {"AGE": ["54", "61", ""], "GENDER": ["M", "F", ""],
                                   "SMOKER": ["1", "0", "1"], "CHOL": ["5.2", "", "6"],
                                   "Y": ["1", "0", "0"]}


def _numbers_by_python(text: pd.Series, missing: np.ndarray) -> np.ndarray:
    """What numbers were read as before Arrow's cast: NumPy's cast, else element-wise."""
    try:
        return text.where(~missing, "nan").astype("float64").to_numpy()
    except (TypeError, ValueError):
        return pd.to_numeric(text.where(~missing), errors="coerce").to_numpy(dtype=float)


number_text = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-10**30, 10**30).map(str),
    st.sampled_from(["", " 5", "5 ", "1_000", "+5", ".5", "5.", "1e400", "-0", "0x10", "nan",
                     "NaN", "-inf", "Infinity", "\u0661\u0662", "1e", "e5", "--1", "1,5"]),
    st.text(alphabet="0123456789.eE+-_ na", max_size=8))


@settings(max_examples=300, deadline=None)
@given(values=st.lists(number_text, min_size=1, max_size=6), data=st.data())
def test_numbers_are_read_as_python_reads_them(values: list[str], data: st.DataObject
                                               ) -> None:
    """Arrow's fast cast reads every value as the NumPy / pandas parse it replaced."""
    from cardiofed.data.mapping import _parse_numbers

    text = pd.Series(values, dtype=data.draw(st.sampled_from(["str", object])))
    missing = np.array(data.draw(st.lists(st.booleans(), min_size=len(values),
                                          max_size=len(values))))
    np.testing.assert_array_equal(_parse_numbers(text, missing),
                                  _numbers_by_python(text, missing))
