"""A study's own features and outcome, declared in a TOML file.

The built-in catalogue (``cardiofed features`` lists it) is every study's default. A
study whose sites record more declares the rest, and any binary outcome::

    [outcome]
    name = "heart_disease_ever"
    description = "Ever told they had coronary heart disease or a myocardial infarction"
    # horizon_years = 10          (omit for a prevalent condition)

    [features.general_health]
    kind = "ordinal"              # ordered levels, one model column: the level's position
    levels = ["excellent", "very good", "good", "fair", "poor"]
    description = "Self-rated general health"

    [features.sleep_hours]
    kind = "continuous"
    unit = "hours"
    low = 1                       # the plausible range: values outside it are invalid
    high = 24
    log_scale = false             # true: log terms in the "log" and "clinical" forms

    [features.race]
    kind = "categorical"          # one-hot, the first level the reference
    levels = ["white", "black", "asian", "hispanic", "other"]

    [features.kidney_disease]
    kind = "binary"

The declaration travels with the study plan (``study_features``) and the model card,
so every node, the coordinator and the risk API read the same definitions. Built-in
names cannot be redeclared: they never change meaning.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cardiofed._pydantic import read_toml, validation_problems
from cardiofed.exceptions import ConfigurationError
from cardiofed.schema import CATALOGUE, Catalogue, Feature, FeatureKind, Outcome

__all__ = ["FeatureDeclaration", "OutcomeDeclaration", "StudyFeatures"]

NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


class FeatureDeclaration(BaseModel):
    """One study-defined feature."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["continuous", "binary", "categorical", "ordinal"]
    description: str = Field("", max_length=500)
    unit: str = Field("", max_length=40)
    low: float | None = None
    high: float | None = None
    levels: list[str] = Field(default_factory=list, max_length=100)
    log_scale: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> FeatureDeclaration:
        if self.kind == "continuous":
            if self.low is None or self.high is None or not (
                    math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
                raise ValueError("a continuous feature needs a finite plausible range, "
                                 "low < high")
            if self.levels:
                raise ValueError("a continuous feature has no levels (a site maps its bands "
                                 "to numbers with `codes` in its mapping file)")
            if self.log_scale and self.low <= 0:
                raise ValueError("log_scale needs a range with a positive lower end")
        else:
            if self.unit or self.low is not None or self.high is not None or self.log_scale:
                raise ValueError(f"a {self.kind} feature takes no unit, range or log_scale")
        if self.kind in ("categorical", "ordinal"):
            lowered = [level.strip().lower() for level in self.levels]
            if len(set(lowered)) < 2 or len(set(lowered)) != len(lowered):
                raise ValueError(f"a {self.kind} feature needs at least two distinct levels "
                                 f"(compared ignoring case); got {self.levels}")
            if any(not level.strip() or "=" in level for level in self.levels):
                raise ValueError("levels must be non-empty and may not contain '='")
        elif self.levels:
            raise ValueError("a binary feature has no levels (its values are 0 and 1)")
        return self

    def feature(self, name: str) -> Feature:
        return Feature(name=name, kind=FeatureKind(self.kind),
                       description=self.description or f"{name} (study-defined)",
                       unit=self.unit, low=self.low, high=self.high,
                       codes=tuple(level.strip() for level in self.levels),
                       log_scale=self.log_scale)


class OutcomeDeclaration(BaseModel):
    """The study's binary outcome."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME.pattern)
    description: str = Field(min_length=1, max_length=500)
    horizon_years: float | None = Field(None, gt=0, le=100)


class StudyFeatures(BaseModel):
    """A study's declared features and outcome (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    features: dict[str, FeatureDeclaration] = Field(default_factory=dict, max_length=500)
    outcome: OutcomeDeclaration | None = None

    @model_validator(mode="after")
    def _names(self) -> StudyFeatures:
        for name in self.features:
            if not NAME.match(name):
                raise ValueError(f"feature name {name!r} must be lower-case letters, digits "
                                 f"and '_', starting with a letter")
            if name in CATALOGUE.features:
                raise ValueError(f"feature {name!r} is built in; use it as it is (its unit, "
                                 f"range and codes) or give yours another name")
        if self.outcome is not None and self.outcome.name in CATALOGUE.outcomes:
            raise ValueError(f"outcome {self.outcome.name!r} is built in; give yours another "
                             f"name")
        return self

    def catalogue(self) -> Catalogue:
        """The built-in catalogue extended by this declaration."""
        outcomes = dict(CATALOGUE.outcomes)
        if self.outcome is not None:
            o = self.outcome
            outcomes[o.name] = Outcome(name=o.name, description=o.description,
                                       horizon_years=o.horizon_years)
        return Catalogue(features={**CATALOGUE.features,
                                   **{n: d.feature(n) for n, d in self.features.items()}},
                         outcomes=outcomes)

    @classmethod
    def from_toml(cls, path: str | Path) -> StudyFeatures:
        path = Path(path)
        raw = read_toml(path, "Feature file", ConfigurationError)
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise ConfigurationError(f"Feature file {path} is invalid: "
                                     f"{validation_problems(exc, 'features')}") from None


def catalogue_of(declared: StudyFeatures | None) -> Catalogue:
    """A study's catalogue: the built-in one, extended by its declaration if any."""
    return CATALOGUE if declared is None else declared.catalogue()


def catalogue_from_file(path: str | Path | None) -> Catalogue:
    """The built-in catalogue, extended by a study's feature file when one is given."""
    return catalogue_of(StudyFeatures.from_toml(path) if path else None)
