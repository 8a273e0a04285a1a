"""A site's research database in the OMOP Common Data Model, read into canonical rows.

Many hospital research databases follow OMOP CDM v5.4: ``person``,
``measurement``, ``observation``, ``condition_occurrence``, ``drug_exposure`` and
``observation_period`` tables. An OMOP mapping file says how each canonical feature and
the outcome derive from concept ids at an index date; the reader turns the tables (a
folder of CSV or Parquet files, or any SQLAlchemy URL) into one text row per person with
a column per feature, and the rows then go through the same validation as any export::

    site = "omop_site"
    site_type = "tier2"
    outcome = "chd_10y"
    index_date = "2015-01-01"        # features as of this date, the outcome after it
    lookback_days = 1095              # how far back a measurement or a drug counts
    # source = "postgresql+psycopg://reader@db/omop"   (else the path given beside it)

    [features.age]
    table = "person"                  # from year_of_birth (month and day when present)
    [features.sex]
    table = "person"                  # gender_concept_id 8507 male, 8532 female
    [features.systolic_bp]
    table = "measurement"             # the latest value_as_number before the index date
    concept_ids = [3004249]
    units = { 8876 = "mmHg" }         # unit_concept_id -> a unit the feature accepts
    [features.diabetes]
    table = "condition_occurrence"    # 1 when any record before the index date, else 0
    concept_ids = [201826]
    [features.bp_treated]
    table = "drug_exposure"           # 1 when an exposure started within the lookback
    concept_ids = [1308216, 974166]

    [outcome_rule]
    table = "condition_occurrence"    # the first record after the index date
    concept_ids = [4329847, 312327]
    horizon_years = 10

A person with the outcome on or before the index date is left out (not at risk), and so
is one whose ``observation_period`` ends before the horizon without the outcome (lost to
follow-up), or starts after the index date; each is counted in :attr:`OmopRows.excluded`.

With ``follow_up = true`` in ``[outcome_rule]`` the site exports survival data instead:
each person is followed from the index date to the first outcome record, the end of
their observation period (censored: they are kept, not left out) or the horizon,
whichever comes first, in days; the label says whether follow-up ended in the outcome.
Without an ``observation_period`` table everyone is followed to the horizon.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cardiofed._pydantic import read_toml, validation_problems
from cardiofed.data.mapping import SiteMapping
from cardiofed.exceptions import DataValidationError
from cardiofed.schema import CATALOGUE, Catalogue, FeatureKind

__all__ = ["OmopMapping", "OmopRows", "is_omop_mapping", "read_omop"]

MALE, FEMALE = 8507, 8532  # OMOP gender concepts
LABEL = "outcome"
FOLLOW_UP = "follow_up_days"
Table = Literal["person", "measurement", "observation", "condition_occurrence",
                "drug_exposure"]
_DATE = {"measurement": "measurement_date", "observation": "observation_date",
         "condition_occurrence": "condition_start_date",
         "drug_exposure": "drug_exposure_start_date"}
_CONCEPT = {"measurement": "measurement_concept_id", "observation": "observation_concept_id",
            "condition_occurrence": "condition_concept_id",
            "drug_exposure": "drug_concept_id"}


class FeatureRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    table: Table
    concept_ids: list[int] = Field(default_factory=list)
    units: dict[int, str] = Field(default_factory=dict)  # unit_concept_id -> unit
    value: Literal["number", "presence"] | None = None  # observation: which one


class OutcomeRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    table: Literal["condition_occurrence", "observation"] = "condition_occurrence"
    concept_ids: list[int] = Field(min_length=1)
    horizon_years: float = Field(gt=0, le=100)
    follow_up: bool = False  # survival data: censored at the observation period's end


class OmopMapping(BaseModel):
    """A validated OMOP mapping (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    site: str = Field(min_length=1)
    site_type: str = "hospital"
    outcome: str
    index_date: date
    lookback_days: int = Field(1095, ge=1, le=36_500)
    source: str | None = None
    features: dict[str, FeatureRule] = Field(min_length=1)
    outcome_rule: OutcomeRule

    @classmethod
    def from_toml(cls, path: str | Path, catalogue: Catalogue | None = None) -> OmopMapping:
        path = Path(path)
        raw = read_toml(path, "OMOP mapping file", DataValidationError)
        try:
            mapping = cls.model_validate(raw)
        except ValidationError as exc:
            raise DataValidationError(f"OMOP mapping {path} is invalid: "
                                      f"{validation_problems(exc, 'mapping')}") from None
        mapping.check(catalogue or CATALOGUE, str(path))
        return mapping

    def check(self, catalogue: Catalogue, source: str) -> None:
        """Every rule fits its feature: kinds, concept ids, units the feature accepts."""
        problems = []
        if self.outcome not in catalogue.outcomes:
            problems.append(f"outcome {self.outcome!r} is not a known outcome")
        for name, rule in self.features.items():
            try:
                feature = catalogue.feature(name)
            except ValueError as exc:
                problems.append(str(exc))
                continue
            if rule.table == "person" and name not in ("age", "sex"):
                problems.append(f"features.{name}: the person table gives age and sex only")
            if rule.table != "person" and not rule.concept_ids:
                problems.append(f"features.{name}: {rule.table} needs concept_ids")
            numeric = rule.table == "measurement" or rule.value == "number"
            if numeric != (feature.kind is FeatureKind.CONTINUOUS) and name != "age":
                problems.append(f"features.{name}: a {feature.kind} feature cannot come from "
                                f"{'values' if numeric else 'the presence of records'}")
            for concept, unit in rule.units.items():
                try:
                    feature.conversion_factor(unit)
                except ValueError as exc:
                    problems.append(f"features.{name}.units.{concept}: {exc}")
        if problems:
            raise DataValidationError(f"OMOP mapping {source} is invalid: "
                                      + "; ".join(problems))

    def site_mapping(self, catalogue: Catalogue | None = None) -> SiteMapping:
        """The mapping of the rows :func:`read_omop` writes: canonical names and units."""
        columns: dict[str, Any] = {name: {"source": name} for name in self.features}
        raw: dict[str, Any] = {
            "site": self.site, "site_type": self.site_type, "outcome": self.outcome,
            "missing_values": [""], "columns": columns,
            "label": {"column": LABEL, "positive": ["1"], "negative": ["0"]}}
        if self.outcome_rule.follow_up:
            raw["follow_up"] = {"column": FOLLOW_UP, "unit": "days"}
        return SiteMapping.from_dict(raw, source=f"<OMOP mapping of {self.site}>",
                                     catalogue=catalogue)


@dataclass(frozen=True)
class OmopRows:
    """One text row per person at risk (with its ``person_id``), and how many were left
    out, by reason."""

    frame: pd.DataFrame
    excluded: dict[str, int] = field(default_factory=dict)


def is_omop_mapping(path: str | Path) -> bool:
    """A mapping file with an ``index_date`` is an OMOP mapping."""
    return "index_date" in read_toml(Path(path), "Mapping file", DataValidationError)


class _Tables:
    """Reads only the rows a rule needs, from a folder of files or a database."""

    def __init__(self, source: str | Path) -> None:
        self.source = source
        text = str(source)
        self.url = text if "://" in text else (f"sqlite:///{text}" if text.endswith(".db")
                                               else None)
        if self.url is None and not Path(text).is_dir():
            raise DataValidationError(f"OMOP source {text} is neither a folder of tables, a "
                                      f"SQLite .db file nor a database URL.")

    def read(self, table: str, concept_ids: list[int] | None = None) -> pd.DataFrame:
        """The table's rows (of `concept_ids` only, when given); an error if absent."""
        frame = self.read_optional(table, concept_ids)
        if frame is None:
            raise DataValidationError(f"OMOP source {self.source} has no {table} table.")
        return frame

    def read_optional(self, table: str, concept_ids: list[int] | None = None
                      ) -> pd.DataFrame | None:
        if self.url is not None:
            from sqlalchemy import bindparam, create_engine, inspect, text

            engine = create_engine(self.url)
            try:
                if table not in inspect(engine).get_table_names():
                    frame = None
                elif concept_ids is None:
                    frame = pd.read_sql_query(text(f"SELECT * FROM {table}"), engine)
                else:
                    query = text(f"SELECT * FROM {table} WHERE {_CONCEPT[table]} IN :ids"
                                 ).bindparams(bindparam("ids", expanding=True))
                    frame = pd.read_sql_query(query, engine, params={"ids": concept_ids})
            finally:
                engine.dispose()
        else:
            folder = Path(self.source)
            found = [p for p in (folder / f"{table}.parquet", folder / f"{table}.csv")
                     if p.exists()]
            frame = None
            if found:
                frame = (pd.read_parquet(found[0]) if found[0].suffix == ".parquet"
                         else pd.read_csv(found[0]))
                if concept_ids is not None:
                    frame = frame[frame[_CONCEPT[table]].isin(concept_ids)]
        return frame


def _dates(values: pd.Series) -> pd.Series:
    return pd.to_datetime(values, errors="coerce").dt.date


def read_omop(source: str | Path, mapping: OmopMapping,
              catalogue: Catalogue | None = None) -> OmopRows:
    """Canonical text rows of the people at risk at the index date (module docstring)."""
    catalogue = catalogue or CATALOGUE
    tables = _Tables(mapping.source or source)
    person = tables.read("person")
    ids = person["person_id"].to_numpy()
    out = pd.DataFrame({"person_id": ids})
    excluded: dict[str, int] = {}
    for name, rule in mapping.features.items():
        out[name] = _feature(name, rule, person, tables, mapping, catalogue)
    label, keep, days = _outcome(mapping, tables, ids, excluded)
    out[LABEL] = label
    if mapping.outcome_rule.follow_up:
        out[FOLLOW_UP] = [str(int(d)) for d in days]
    out["person_id"] = out["person_id"].astype(str)  # text, like every export column
    return OmopRows(frame=out[keep].reset_index(drop=True), excluded=excluded)


def _feature(name: str, rule: FeatureRule, person: pd.DataFrame, tables: _Tables,
             mapping: OmopMapping, catalogue: Catalogue) -> pd.Series:
    index = mapping.index_date
    if rule.table == "person":
        if name == "sex":
            codes = {MALE: "male", FEMALE: "female"}
            return person["gender_concept_id"].map(codes).fillna("").astype(str)
        # Without a month and day of birth, mid-year: off by at most half a year.
        month = person.get("month_of_birth", pd.Series(7, index=person.index)).fillna(7)
        day = person.get("day_of_birth", pd.Series(1, index=person.index)).fillna(1)
        before_birthday = [(index.month, index.day) < (int(m), int(d))
                           for m, d in zip(month, day, strict=True)]
        age = index.year - person["year_of_birth"] - np.asarray(before_birthday, dtype=int)
        return age.astype(str)
    records = tables.read(rule.table, rule.concept_ids)
    when = _dates(records[_DATE[rule.table]])
    window = when <= index
    if rule.table in ("measurement", "drug_exposure") or rule.value == "number":
        # A value or a treatment is current only within the lookback; a diagnosis is
        # history, whenever it was recorded.
        window &= when > index - pd.Timedelta(days=mapping.lookback_days)
    records = records[window.to_numpy()].assign(_when=when[window.to_numpy()])
    numeric = rule.table == "measurement" or rule.value == "number"
    if not numeric:
        present = set(records["person_id"])
        return person["person_id"].map(lambda p: "1" if p in present else "0")
    feature = catalogue.feature(name)
    latest = records.dropna(subset=["value_as_number"]).sort_values("_when") \
        .groupby("person_id").tail(1).set_index("person_id")
    values = latest["value_as_number"].map(_text)
    if rule.units:
        factor = latest["unit_concept_id"].map(
            {c: feature.conversion_factor(u) for c, u in rule.units.items()})
        # A unit the mapping does not name is never guessed: the value is not a number
        # for the load, so it is counted as invalid.
        values = (latest["value_as_number"] * factor).map(_text).where(factor.notna(),
                                                                          "unknown unit")
    return person["person_id"].map(values).fillna("").astype(str)


def _text(value: object) -> str:
    if isinstance(value, float | np.floating):
        return "" if math.isnan(value) else repr(float(value))
    return str(value)


def _outcome(mapping: OmopMapping, tables: _Tables, ids: np.ndarray,
             excluded: dict[str, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each person's label, whether they are kept, and (survival) their follow-up days."""
    rule, index = mapping.outcome_rule, mapping.index_date
    events = tables.read(rule.table, rule.concept_ids)
    when = _dates(events[_DATE[rule.table]])
    first = pd.Series(when.to_numpy(), index=events["person_id"].to_numpy()).groupby(
        level=0).min()
    first_event = pd.Series(ids).map(first)
    end = index.replace(year=index.year + int(rule.horizon_years))
    if rule.horizon_years % 1:
        end = (pd.Timestamp(index) + pd.Timedelta(days=365.25 * rule.horizon_years)).date()
    prior = first_event.notna() & (first_event <= index)
    keep = ~prior.to_numpy()
    excluded["outcome on or before the index date"] = int(prior.sum())
    periods = tables.read_optional("observation_period")
    stop = pd.Series([end] * len(ids))
    if periods is not None:
        start = pd.Series(ids).map(periods.groupby("person_id")[
            "observation_period_start_date"].min().pipe(_dates))
        observed = pd.Series(ids).map(periods.groupby("person_id")[
            "observation_period_end_date"].max().pipe(_dates))
        late = (start.notna() & (start > index)).to_numpy() & keep
        excluded["observed only after the index date"] = int(late.sum())
        keep &= ~late
        stop = observed.where(observed.notna() & (observed < end), end)
    if mapping.outcome_rule.follow_up:  # censored at the end of observation, kept
        label = (first_event.notna() & ~prior & (first_event <= stop)).to_numpy()
        finish = first_event.where(label, stop)
        days = np.array([(f - index).days for f in finish], dtype=float)
        none = (days <= 0) & keep
        excluded["no follow-up after the index date"] = int(none.sum())
        return np.where(label, "1", "0"), keep & ~none, days
    label = (first_event.notna() & ~prior & (first_event <= end)).to_numpy()
    if periods is not None:
        lost = (stop < end).to_numpy() & ~label & keep
        excluded["lost to follow-up before the horizon"] = int(lost.sum())
        keep &= ~lost
    return np.where(label, "1", "0"), keep, np.full(len(ids), np.nan)


def omop_site_rows(source: str | Path, mapping_path: str | Path,
                   catalogue: Catalogue | None = None
                   ) -> tuple[pd.DataFrame, SiteMapping, Mapping[str, int]]:
    """An OMOP site as an export: its rows, their canonical mapping, who was left out."""
    mapping = OmopMapping.from_toml(mapping_path, catalogue)
    rows = read_omop(source, mapping, catalogue)
    return rows.frame, mapping.site_mapping(catalogue), rows.excluded
