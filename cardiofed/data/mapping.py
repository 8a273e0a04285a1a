"""Site mapping files: how one hospital's export maps onto the canonical schema.

A mapping file (TOML) names, for each canonical feature, the local column, its unit,
its codes and its missing-value tokens. Loading validates every row: a value that is
unparseable or outside the plausible range raises :class:`DataValidationError` naming
the file, column, row and value, or, where the mapping says ``on_invalid = "missing"``,
is set missing and counted in the :class:`LoadReport`. No row is dropped silently.

Example::

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

For a causal attribution of a measured outcome, ``kind = "continuous"`` in ``[label]``
reads a number per row instead of codes (a risk model refuses such a mapping).

A survival export adds where each patient's follow-up is; the label then says whether
follow-up ended in the event (positive) or was censored (negative)::

    [follow_up]
    column = "FU_DAYS"
    unit = "days"          # days, weeks, months or years
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from cardiofed._pydantic import read_toml, validation_problems
from cardiofed.data.csv_lines import read_csv_export
from cardiofed.exceptions import DataValidationError
from cardiofed.schema import CATALOGUE, Catalogue, FeatureKind

OnInvalid = Literal["error", "missing"]

# Codes every binary column accepts without a mapping (compared case-insensitively).
_BINARY_DEFAULT_CODES = {
    "0": "0", "1": "1", "0.0": "0", "1.0": "1", "no": "0", "yes": "1",
    "n": "0", "y": "1", "false": "0", "true": "1",
}


class ColumnMapping(BaseModel):
    """How one canonical feature is found in the site's export."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(min_length=1)
    unit: str | None = None
    # Local value -> canonical code (binary, categorical, ordinal) or number (continuous:
    # e.g. an age band "70-74" = 72).
    codes: dict[str, str | int | float] = Field(default_factory=dict)
    missing_values: list[str] = Field(default_factory=list)
    on_invalid: OnInvalid | None = None


class LabelMapping(BaseModel):
    """The outcome column: a binary outcome (its positive and negative codes), or, for a
    causal attribution only, a continuous one (a number per row)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    column: str = Field(min_length=1)
    kind: Literal["binary", "continuous"] = "binary"
    positive: list[str] = Field(default_factory=lambda: ["1"], min_length=1)
    negative: list[str] = Field(default_factory=lambda: ["0"], min_length=1)


# Years per unit of a follow-up time (a year of 365.25 days, a month a twelfth of it).
FOLLOW_UP_UNITS: dict[str, float] = {"days": 1 / 365.25, "weeks": 7 / 365.25,
                                     "months": 1 / 12, "years": 1.0}
MAX_FOLLOW_UP_YEARS = 120.0


class FollowUpMapping(BaseModel):
    """Where a survival export holds each patient's follow-up time (from baseline to the
    event or to the end of follow-up) and its unit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    column: str = Field(min_length=1)
    unit: Literal["days", "weeks", "months", "years"]


class SiteMapping(BaseModel):
    """A validated site mapping (see the module docstring for the file format)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    site: str = Field(min_length=1)
    site_type: str = "hospital"
    outcome: str
    missing_values: list[str] = Field(default_factory=lambda: ["", "NA", "NaN", "?"])
    on_invalid: OnInvalid = "error"
    label: LabelMapping
    follow_up: FollowUpMapping | None = None
    columns: dict[str, ColumnMapping] = Field(min_length=1)
    _catalogue: Catalogue = PrivateAttr(default=CATALOGUE)

    @model_validator(mode="after")
    def _check_against_schema(self, info: ValidationInfo) -> SiteMapping:
        catalogue: Catalogue = (info.context or {}).get("catalogue", CATALOGUE)
        self._catalogue = catalogue
        if self.outcome not in catalogue.outcomes:
            raise ValueError(
                f"outcome {self.outcome!r} is not a known outcome; expected one of "
                f"{', '.join(catalogue.outcomes)} (a study declares its own in its feature "
                f"file)"
            )
        for name, col in self.columns.items():
            feature = catalogue.feature(name)
            if col.unit is not None:
                if feature.kind is not FeatureKind.CONTINUOUS:
                    raise ValueError(f"columns.{name}: a {feature.kind} feature has no unit")
                feature.conversion_factor(col.unit)  # raises on an unknown unit
            if feature.kind is FeatureKind.CONTINUOUS:
                for local, number in col.codes.items():
                    if _number(number) is None:
                        raise ValueError(
                            f"columns.{name}.codes: {local!r} maps to {number!r}; codes of a "
                            f"numeric feature map local values to numbers in the column's "
                            f"unit, e.g. {{ \"70-74\" = 72 }}")
                continue
            allowed = {"0", "1"} if feature.kind is FeatureKind.BINARY else set(feature.codes)
            for local, canonical in col.codes.items():
                if _code(canonical) not in allowed:
                    raise ValueError(
                        f"columns.{name}.codes: {local!r} maps to {canonical!r}, which is "
                        f"not a code of {name!r} (expected one of {sorted(allowed)})"
                    )
        for name, col in self.columns.items():
            _unique_ignoring_case(f"columns.{name}.codes", list(col.codes))
        overlap = ({c.lower() for c in self.label.positive}
                   & {c.lower() for c in self.label.negative})
        if overlap:
            raise ValueError(f"label codes {sorted(overlap)} are both positive and negative "
                             f"(codes are compared ignoring case)")
        return self

    @classmethod
    def from_toml(cls, path: str | Path, catalogue: Catalogue | None = None) -> SiteMapping:
        """Read and validate a mapping file against `catalogue` (default: built-in)."""
        path = Path(path)
        raw = read_toml(path, "Mapping file", DataValidationError)
        return cls.from_dict(raw, source=str(path), catalogue=catalogue)

    @classmethod
    def from_dict(cls, raw: dict[str, object], source: str = "<mapping>",
                  catalogue: Catalogue | None = None) -> SiteMapping:
        try:
            return cls.model_validate(raw, context={"catalogue": catalogue or CATALOGUE})
        except ValidationError as exc:
            raise DataValidationError(f"Mapping {source} is invalid: "
                                      f"{validation_problems(exc, 'mapping')}") from None

    @property
    def features(self) -> list[str]:
        return list(self.columns)

    @property
    def catalogue(self) -> Catalogue:
        """The catalogue the mapping was validated against."""
        return self._catalogue


def _number(value: object) -> float | None:
    """`value` as a finite number, or None."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _code(value: object) -> str:
    """A typed value as text, as an export writes it: 1 for 1.0 or true (a TOML code, a
    Parquet cell)."""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _unique_ignoring_case(where: str, codes: list[str]) -> None:
    seen: dict[str, str] = {}
    for code in codes:
        if code.lower() in seen:
            raise ValueError(f"{where}: {seen[code.lower()]!r} and {code!r} differ only in case; "
                             f"codes are compared ignoring case")
        seen[code.lower()] = code


@dataclass
class LoadReport:
    """What loading one export did, value by value; nothing else is dropped."""

    source: str
    rows: int = 0
    missing: dict[str, int] = field(default_factory=dict)  # a missing-value token
    invalid_set_missing: dict[str, int] = field(default_factory=dict)  # the three below
    not_a_number: dict[str, int] = field(default_factory=dict)
    out_of_range: dict[str, int] = field(default_factory=dict)
    unknown_code: dict[str, int] = field(default_factory=dict)
    converted_units: dict[str, str] = field(default_factory=dict)
    # people left out before loading, by reason (an OMOP site: not at risk, lost)
    excluded: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {
            "source": self.source, "rows": self.rows, "excluded": dict(self.excluded),
            "missing": dict(self.missing),
            "invalid_set_missing": dict(self.invalid_set_missing),
            "not_a_number": dict(self.not_a_number), "out_of_range": dict(self.out_of_range),
            "unknown_code": dict(self.unknown_code),
            "converted_units": dict(self.converted_units),
        }

    def columns(self) -> list[dict[str, object]]:
        """One row per feature: values parsed, missing, and set missing by reason."""
        return [{"feature": name, "parsed": self.rows - missing
                 - self.invalid_set_missing.get(name, 0), "missing": missing,
                 "not a number": self.not_a_number.get(name, 0),
                 "out of range": self.out_of_range.get(name, 0),
                 "unknown code": self.unknown_code.get(name, 0),
                 "unit": self.converted_units.get(name, "")}
                for name, missing in self.missing.items()]


@dataclass(frozen=True)
class HarmonisedSite:
    """A site's export in canonical form: one column per feature, NaN where missing."""

    frame: pd.DataFrame
    labels: np.ndarray
    report: LoadReport
    follow_up: np.ndarray | None = None  # years, where the mapping names a follow-up
    # feature -> {row position in `frame`: why its value was invalid and set missing};
    # the reasons never quote the value
    problems: dict[str, dict[int, str]] = field(default_factory=dict)


# LoadReport.excluded's key for CSV lines that are no record (cardiofed.data.csv_lines)
MALFORMED = "malformed lines (not UTF-8, an unbalanced quote, or the wrong number of fields)"


def read_export(path: str | Path) -> tuple[pd.DataFrame, dict[int, str]]:
    """Read a CSV or Parquet export as text, so that the mapping decides what is missing
    (a Parquet null is the empty string, a missing-value token by default), and the CSV
    lines that are no record (:mod:`cardiofed.data.csv_lines`), left out: row number ->
    reason."""
    path = Path(path)
    if not path.exists():
        raise DataValidationError(f"Data file {path} does not exist.")
    if path.suffix.lower() == ".parquet":
        frame = pd.read_parquet(path)
        return pd.DataFrame({c: ["" if v is None or (isinstance(v, float) and np.isnan(v))
                                 else _code(v) for v in frame[c].tolist()]
                             for c in frame.columns}, dtype=str), {}
    export = read_csv_export(path)
    return export.frame, export.malformed


def harmonise(raw: pd.DataFrame, mapping: SiteMapping, source: str = "<data>", *,
              labels: bool = True) -> HarmonisedSite:
    """Map a raw export (all columns as text) onto the canonical schema.

    Messages number a row by its index plus 1: from 1, the first data row after the
    header, for a frame with the default index; its number in its file for a CSV read
    by :mod:`cardiofed.data.csv_lines`, which skips blank and malformed lines. Without
    `labels` (scoring new patients) the label column is not needed and ``labels`` is
    empty; with them, a mapping's ``[follow_up]`` column gives ``follow_up`` in years.
    """
    survival = labels and mapping.follow_up is not None
    needed = [c.source for c in mapping.columns.values()] + (
        [mapping.label.column] if labels else []) + (
        [mapping.follow_up.column] if survival and mapping.follow_up else [])
    absent = [c for c in needed if c not in raw.columns]
    if absent:
        raise DataValidationError(
            f"{source}: columns {absent} named in the mapping for site {mapping.site!r} are not "
            f"in the file (it has {list(raw.columns)})."
        )
    report = LoadReport(source=source, rows=len(raw))
    row_numbers = raw.index.to_numpy() + 1
    out: dict[str, pd.Series] = {}
    problems: dict[str, dict[int, str]] = {}
    for name, col in mapping.columns.items():
        out[name] = _harmonise_column(raw[col.source], name, col, mapping, source, report,
                                      row_numbers, problems.setdefault(name, {}))
    y = (_harmonise_label(raw[mapping.label.column], mapping, source, row_numbers) if labels
         else np.empty(0, dtype=np.int64))
    follow_up = (_harmonise_follow_up(raw[mapping.follow_up.column], mapping.follow_up,
                                      mapping, source, row_numbers)
                 if survival and mapping.follow_up else None)
    return HarmonisedSite(frame=pd.DataFrame(out), labels=y, report=report,
                          problems={k: v for k, v in problems.items() if v},
                          follow_up=follow_up)


def _clean(text: pd.Series) -> pd.Series:
    return text.astype(str).str.strip()


def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _harmonise_column(values: pd.Series, name: str, col: ColumnMapping, mapping: SiteMapping,
                      source: str, report: LoadReport, row_numbers: np.ndarray,
                      problems: dict[int, str] | None = None) -> pd.Series:
    feature = mapping.catalogue.feature(name)
    text = _clean(values)
    missing = text.isin([*mapping.missing_values, *col.missing_values]).to_numpy()
    report.missing[name] = int(missing.sum())
    on_invalid = col.on_invalid or mapping.on_invalid
    where = f"{source}: column {col.source!r} ({name})"

    if feature.kind is FeatureKind.CONTINUOUS:
        if col.codes:  # bands coded as numbers, e.g. "70-74" -> 72
            coded = {k.lower(): str(v) for k, v in col.codes.items()}
            lowered = text.str.lower()
            text = lowered.map(coded).where(lowered.isin(list(coded)), text)
        numbers = _parse_numbers(text, missing)
        unparseable = ~missing & np.isnan(numbers)
        factor = feature.conversion_factor(col.unit or feature.unit)
        if col.unit and col.unit != feature.unit:
            report.converted_units[name] = f"{col.unit} -> {feature.unit} (x{factor:g})"
        converted = numbers * factor
        with np.errstate(invalid="ignore"):
            out_of_range = ~missing & ~unparseable & (
                (converted < float(feature.low)) | (converted > float(feature.high))  # type: ignore[arg-type]
            )
        if on_invalid == "error":
            if unparseable.any():
                i = _first_bad(unparseable)
                raise DataValidationError(
                    f"{where}, row {row_numbers[i]}: value {text.iloc[i]!r} is not a number."
                )
            if out_of_range.any():
                i = _first_bad(out_of_range)
                shown = f"{numbers[i]:g} {col.unit or feature.unit}"
                if col.unit and col.unit != feature.unit:
                    shown += f" = {converted[i]:g} {feature.unit}"
                raise DataValidationError(
                    f"{where}, row {row_numbers[i]}: value {shown} is outside the plausible "
                    f"range "
                    f"[{feature.low:g}, {feature.high:g}] {feature.unit}."
                )
        bad = unparseable | out_of_range
        if problems is not None:  # reasons name no value: they may be written beside output
            problems.update(dict.fromkeys(np.flatnonzero(unparseable).tolist(),
                                          "not a number"))
            problems.update(dict.fromkeys(np.flatnonzero(out_of_range).tolist(),
                                          f"outside the plausible range [{feature.low:g}, "
                                          f"{feature.high:g}] {feature.unit}"))
        report.invalid_set_missing[name] = int(bad.sum())
        report.not_a_number[name] = int(unparseable.sum())
        report.out_of_range[name] = int(out_of_range.sum())
        converted[bad | missing] = np.nan
        return pd.Series(converted, index=values.index, name=name)

    # Binary, categorical and ordinal: map local codes to canonical codes.
    local = {k.lower(): _code(v) for k, v in col.codes.items()}
    if feature.kind is FeatureKind.BINARY:
        table = {**_BINARY_DEFAULT_CODES, **local}
    else:
        table = {c.lower(): c for c in feature.codes}
        table.update({f"{c}.0": c for c in feature.codes if c.isdigit()})
        table.update(local)
    mapped = text.str.lower().map(table)
    unknown = (~missing & mapped.isna()).to_numpy()
    if unknown.any() and on_invalid == "error":
        i = _first_bad(unknown)
        expected = (sorted({"0", "1", *col.codes}) if feature.kind is FeatureKind.BINARY
                    else sorted({*feature.codes, *col.codes}))
        raise DataValidationError(
            f"{where}, row {row_numbers[i]}: value {text.iloc[i]!r} is not a known code; "
            f"expected one of {expected} or a missing-value token."
        )
    report.invalid_set_missing[name] = int(unknown.sum())
    report.unknown_code[name] = int(unknown.sum())
    if problems is not None:
        problems.update(dict.fromkeys(np.flatnonzero(unknown).tolist(), "not a known code"))
    mapped = mapped.where(~(missing | unknown))
    if feature.kind is FeatureKind.BINARY:
        return mapped.astype("float64").rename(name)  # canonical "0" / "1" / missing
    if feature.kind is FeatureKind.ORDINAL:  # the level's position, 0 for the first
        position = {code: float(i) for i, code in enumerate(feature.codes)}
        return mapped.map(position).astype("float64").rename(name)
    return mapped.astype(object).rename(name)


def _parse_numbers(text: pd.Series, missing: np.ndarray) -> np.ndarray:
    """Floats of `text` (NaN where missing or not a number): Arrow's cast first (20x
    NumPy's on text), Python's parse when Arrow refuses a value (it reads ``1_000``, a
    value with spaces, other digits), element-wise only when some value is no number."""
    filled = text.where(~missing, "nan")
    try:
        numbers: np.ndarray = filled.astype("float64[pyarrow]").to_numpy(dtype=float,
                                                                         na_value=np.nan)
        return numbers
    except (TypeError, ValueError, NotImplementedError, ImportError):  # Arrow's errors too
        pass
    try:
        numbers = filled.astype("float64").to_numpy()
    except (TypeError, ValueError):
        numbers = pd.to_numeric(text.where(~missing), errors="coerce").to_numpy(dtype=float)
    return numbers


def _harmonise_label(values: pd.Series, mapping: SiteMapping, source: str,
                     row_numbers: np.ndarray) -> np.ndarray:
    text = _clean(values)
    if mapping.label.kind == "continuous":  # a number per row; an error names the row only
        missing = text.str.lower().isin([m.lower() for m in mapping.missing_values]).to_numpy()
        numbers = _parse_numbers(text, missing)
        bad = ~np.isfinite(numbers)
        if bad.any():
            raise DataValidationError(
                f"{source}: label column {mapping.label.column!r}, row "
                f"{row_numbers[_first_bad(bad)]}: the continuous outcome is missing or not a "
                f"number. A row without an outcome cannot be analysed; remove it from the "
                f"export.")
        return numbers
    lowered = text.str.lower()  # codes are compared ignoring case, as features' codes are
    positive = lowered.isin([c.lower() for c in mapping.label.positive]).to_numpy()
    negative = lowered.isin([c.lower() for c in mapping.label.negative]).to_numpy()
    unknown = ~(positive | negative)
    if unknown.any():
        i = _first_bad(unknown)
        raise DataValidationError(
            f"{source}: label column {mapping.label.column!r}, row {row_numbers[i]}: value "
            f"{text.iloc[i]!r} is neither positive {mapping.label.positive} nor negative "
            f"{mapping.label.negative}. A row without an outcome cannot be used for training; "
            f"remove it from the export or code it explicitly."
        )
    return positive.astype(np.int64)


def _harmonise_follow_up(values: pd.Series, follow_up: FollowUpMapping, mapping: SiteMapping,
                         source: str, row_numbers: np.ndarray) -> np.ndarray:
    """Follow-up times in years; a missing, unparseable, non-positive or implausible time is
    an error naming the row (never the value): a row without follow-up has no outcome."""
    text = _clean(values)
    missing = text.str.lower().isin([m.lower() for m in mapping.missing_values]).to_numpy()
    years = _parse_numbers(text, missing) * FOLLOW_UP_UNITS[follow_up.unit]
    for bad, why in ((missing, "is missing"), (~missing & ~np.isfinite(years), "is not a number"),
                     (np.isfinite(years) & (years <= 0), "is not > 0"),
                     (np.isfinite(years) & (years > MAX_FOLLOW_UP_YEARS),
                      f"is over {MAX_FOLLOW_UP_YEARS:g} years")):
        if bad.any():
            raise DataValidationError(
                f"{source}: follow-up column {follow_up.column!r} ({follow_up.unit}), row "
                f"{row_numbers[_first_bad(bad)]}: the time {why} ({int(bad.sum())} rows). A "
                f"row without follow-up cannot be used; fix or remove it in the export.")
    return years


def encode(frame: pd.DataFrame, features: list[str],
           catalogue: Catalogue | None = None) -> np.ndarray:
    """Canonical frame -> model input matrix (float64), one-hot for categorical features.

    A missing categorical value gives NaN in all its one-hot columns.
    """
    blocks: list[np.ndarray] = []
    for name in features:
        feature = (catalogue or CATALOGUE).feature(name)
        if name not in frame.columns:
            raise DataValidationError(f"Canonical feature {name!r} is missing from the data.")
        col = frame[name]
        if feature.kind is FeatureKind.CATEGORICAL:
            isna = col.isna().to_numpy()
            for code in feature.codes[1:]:
                block = (col.to_numpy() == code).astype(float)
                block[isna] = np.nan
                blocks.append(block)
        else:
            blocks.append(col.to_numpy(dtype=float))
    return np.column_stack(blocks) if blocks else np.empty((len(frame), 0))
