"""The canonical clinical schema every site's export is harmonised to.

Each :class:`Feature` has a canonical unit, a plausible range, a kind (continuous,
binary, categorical with its code list, or ordinal with its ordered levels) and the
other units a site may export it in, with the factor that converts them. The label is
an event within a horizon (:class:`Outcome`). Sites map their own column names, units
and codes onto these features with a mapping file (:mod:`cardiofed.data.mapping`).

The built-in :data:`CATALOGUE` is every study's default; a study may declare features
and an outcome of its own (:mod:`cardiofed.data.study_features`), which extend it into
the study's :class:`Catalogue`. A built-in name never changes meaning within a study.

The schema is versioned: a saved model records :data:`SCHEMA_VERSION`, and the
meaning of a feature never changes without a new version.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

SCHEMA_VERSION = "1.0"


class FeatureKind(StrEnum):
    CONTINUOUS = "continuous"
    BINARY = "binary"
    CATEGORICAL = "categorical"
    ORDINAL = "ordinal"  # ordered levels, encoded as one column: the level's position


@dataclass(frozen=True, kw_only=True)
class Feature:
    """One canonical clinical variable."""

    name: str
    kind: FeatureKind
    description: str
    unit: str = ""
    low: float | None = None
    high: float | None = None
    codes: tuple[str, ...] = ()
    # Other units a site may export, with the factor that converts them to `unit`.
    unit_factors: dict[str, float] = field(default_factory=dict)
    # The published CVD equations (D'Agostino 2008, the Pooled Cohort Equations, China-PAR)
    # model this risk factor on the log scale; the "log" and "clinical" model forms do too.
    log_scale: bool = False

    def __post_init__(self) -> None:
        if self.kind is FeatureKind.CONTINUOUS and (self.low is None or self.high is None):
            raise ValueError(f"Continuous feature {self.name!r} needs a plausible range.")
        if self.kind in (FeatureKind.CATEGORICAL, FeatureKind.ORDINAL) and len(self.codes) < 2:
            raise ValueError(f"{self.kind.title()} feature {self.name!r} needs at least two "
                             f"codes.")
        if self.log_scale and not (self.kind is FeatureKind.CONTINUOUS and self.low
                                   and self.low > 0):
            raise ValueError(f"Feature {self.name!r} is marked log_scale; it needs a "
                             f"continuous range with a positive lower end.")

    def encoded_names(self) -> list[str]:
        """Model input columns: one per continuous or binary feature, one-hot
        (first code dropped as reference) for a categorical one."""
        if self.kind is FeatureKind.CATEGORICAL:
            return [f"{self.name}={code}" for code in self.codes[1:]]
        return [self.name]

    def encoded_range(self) -> tuple[float, float]:
        """Plausible range of each encoded column, used for histogram bin edges."""
        if self.kind is FeatureKind.ORDINAL:
            return (0.0, float(len(self.codes) - 1))
        if self.low is not None and self.high is not None:
            return (self.low, self.high)
        return (0.0, 1.0)

    def conversion_factor(self, unit: str) -> float:
        """Factor that converts a value in `unit` to this feature's canonical unit."""
        if unit == self.unit:
            return 1.0
        if unit in self.unit_factors:
            return self.unit_factors[unit]
        known = ", ".join(repr(u) for u in [self.unit, *self.unit_factors])
        raise ValueError(
            f"Unknown unit {unit!r} for feature {self.name!r}; expected one of {known}."
        )


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """The label: an event within a time horizon."""

    name: str
    description: str
    horizon_years: float | None


# Conversion factors: cholesterol 1 mmol/L = 38.67 mg/dL; glucose 1 mmol/L = 18.016 mg/dL;
# blood pressure 1 kPa = 7.50062 mmHg.
_CHOLESTEROL_UNITS = {"mmol/L": 38.67}
_GLUCOSE_UNITS = {"mmol/L": 18.016}
_PRESSURE_UNITS = {"kPa": 7.50062}

_CATALOGUE: tuple[Feature, ...] = (
    Feature(name="age", kind=FeatureKind.CONTINUOUS, unit="years", low=18, high=110,
            description="Age at baseline", unit_factors={"months": 1 / 12}, log_scale=True),
    Feature(name="sex", kind=FeatureKind.CATEGORICAL, codes=("female", "male"),
            description="Sex recorded at baseline"),
    Feature(name="total_cholesterol", kind=FeatureKind.CONTINUOUS, unit="mg/dL", low=70,
            high=700, description="Serum total cholesterol", unit_factors=_CHOLESTEROL_UNITS,
            log_scale=True),
    Feature(name="hdl_cholesterol", kind=FeatureKind.CONTINUOUS, unit="mg/dL", low=10,
            high=150, description="HDL cholesterol", unit_factors=_CHOLESTEROL_UNITS,
            log_scale=True),
    Feature(name="systolic_bp", kind=FeatureKind.CONTINUOUS, unit="mmHg", low=60, high=300,
            description="Systolic blood pressure", unit_factors=_PRESSURE_UNITS,
            log_scale=True),
    Feature(name="diastolic_bp", kind=FeatureKind.CONTINUOUS, unit="mmHg", low=30, high=180,
            description="Diastolic blood pressure", unit_factors=_PRESSURE_UNITS,
            log_scale=True),
    Feature(name="bp_treated", kind=FeatureKind.BINARY,
            description="On antihypertensive medication"),
    Feature(name="lipid_lowering", kind=FeatureKind.BINARY,
            description="On lipid-lowering medication (a statin)"),
    Feature(name="current_smoker", kind=FeatureKind.BINARY, description="Current smoker"),
    Feature(name="cigs_per_day", kind=FeatureKind.CONTINUOUS, unit="cigarettes/day", low=0,
            high=100, description="Cigarettes smoked per day"),
    Feature(name="diabetes", kind=FeatureKind.BINARY, description="Diabetes mellitus"),
    Feature(name="prevalent_stroke", kind=FeatureKind.BINARY, description="Prior stroke"),
    Feature(name="prevalent_hypertension", kind=FeatureKind.BINARY,
            description="Diagnosed hypertension"),
    Feature(name="bmi", kind=FeatureKind.CONTINUOUS, unit="kg/m2", low=10, high=80,
            description="Body-mass index", log_scale=True),
    Feature(name="heart_rate", kind=FeatureKind.CONTINUOUS, unit="beats/min", low=30,
            high=220, description="Resting heart rate"),
    Feature(name="glucose", kind=FeatureKind.CONTINUOUS, unit="mg/dL", low=30, high=600,
            description="Fasting plasma glucose", unit_factors=_GLUCOSE_UNITS,
            log_scale=True),
    Feature(name="education", kind=FeatureKind.CATEGORICAL, codes=("1", "2", "3", "4"),
            description="Education level (1 = some high school ... 4 = college)"),
    # Exercise-test variables of the UCI Heart Disease data.
    Feature(name="chest_pain_type", kind=FeatureKind.CATEGORICAL, codes=("1", "2", "3", "4"),
            description="1 typical angina, 2 atypical angina, 3 non-anginal pain, "
                        "4 asymptomatic"),
    Feature(name="fasting_glucose_high", kind=FeatureKind.BINARY,
            description="Fasting blood sugar > 120 mg/dL"),
    Feature(name="rest_ecg", kind=FeatureKind.CATEGORICAL, codes=("0", "1", "2"),
            description="Resting ECG: 0 normal, 1 ST-T abnormality, 2 LV hypertrophy"),
    Feature(name="max_heart_rate", kind=FeatureKind.CONTINUOUS, unit="beats/min", low=50,
            high=230, description="Maximum heart rate achieved in exercise test"),
    Feature(name="exercise_angina", kind=FeatureKind.BINARY,
            description="Exercise-induced angina"),
    Feature(name="st_depression", kind=FeatureKind.CONTINUOUS, unit="mm", low=-5, high=10,
            description="ST depression induced by exercise relative to rest"),
)

FEATURES: dict[str, Feature] = {f.name: f for f in _CATALOGUE}

OUTCOMES: dict[str, Outcome] = {
    o.name: o
    for o in (
        Outcome(name="cvd_10y", horizon_years=10,
                description="First cardiovascular event (D'Agostino 2008 definition) "
                            "within 10 years"),
        Outcome(name="chd_10y", horizon_years=10,
                description="Coronary heart disease within 10 years (Framingham)"),
        Outcome(name="heart_disease", horizon_years=None,
                description="Angiographic disease: > 50% diameter narrowing (UCI num > 0)"),
    )
}


@dataclass(frozen=True)
class Catalogue:
    """The features and outcomes a study may use: the built-in ones and its own."""

    features: dict[str, Feature]
    outcomes: dict[str, Outcome]

    def feature(self, name: str) -> Feature:
        """The entry for `name`, with an error that lists the known names."""
        try:
            return self.features[name]
        except KeyError:
            raise ValueError(f"Unknown canonical feature {name!r}; known features: "
                             f"{', '.join(self.features)}.") from None

    def encoded_names(self, features: Sequence[str]) -> list[str]:
        """Model input column names for a list of canonical features, in order."""
        return [col for name in features for col in self.feature(name).encoded_names()]

    def ranges(self, encoded_names: Sequence[str]) -> list[tuple[float, float]]:
        """Plausible range of each encoded column."""
        return [self.feature(name.split("=", 1)[0]).encoded_range() for name in encoded_names]


CATALOGUE = Catalogue(features=FEATURES, outcomes=OUTCOMES)


def get_feature(name: str, catalogue: Catalogue | None = None) -> Feature:
    """The entry for `name` in `catalogue` (default: the built-in one)."""
    return (catalogue or CATALOGUE).feature(name)


def encoded_feature_names(features: Sequence[str],
                          catalogue: Catalogue | None = None) -> list[str]:
    """Model input column names for a list of canonical features, in order."""
    return (catalogue or CATALOGUE).encoded_names(features)


def canonical_features(encoded_names: Sequence[str]) -> list[str]:
    """Canonical feature names, in order, from model column names (``sex=male`` -> ``sex``)."""
    return list(dict.fromkeys(name.split("=", 1)[0] for name in encoded_names))
