"""Model forms: the columns a risk model sees, built from a study's encoded features.

Every published cardiovascular risk equation models the continuous risk factors on the
log scale, blood pressure separately for treated and untreated patients, and men and
women with their own coefficients (D'Agostino et al., Circulation 2008;117:743-753;
the Pooled Cohort Equations, Goff et al., Circulation 2014;129:S49-S73; China-PAR,
Yang et al., Circulation 2016;134:1430-1440). A study chooses one of three forms:

``raw``
    the encoded columns themselves (one per continuous or binary feature, one-hot for a
    categorical one).
``log``
    each feature the schema marks ``log_scale`` enters as ``log(value)``, the value first
    clipped into the feature's plausible range; when the study also has ``bp_treated``,
    systolic blood pressure enters as two terms, ``log(systolic_bp)*bp_treated`` and
    ``log(systolic_bp)*(1-bp_treated)``.
``clinical``
    the ``log`` terms, and when the study has ``sex``, each of them again multiplied by
    ``sex=male``: a sex-specific equation in one model.

A product is centred first, ``(log(age) - c) * sex=male`` with ``c`` the log of the
geometric midpoint of age's plausible range (the midpoint for a value not logged, 0.5
for a 0/1 one): the same model, but without it ``log(age) * sex=male`` is almost
``4 * sex=male`` and the nearly collinear pair slows gradient descent to a crawl.

A form is a deterministic function of a patient's own (already imputed) values, so it
costs no privacy and needs no statistics of its own: the preprocessor fills missing
encoded values first, then builds the terms, then standardises them
(:class:`cardiofed.data.preprocessing.Preprocessor`). Each term belongs to one canonical
feature for explanations: the interaction ``log(age)*sex=male`` is part of age's
contribution (its sex-specific slope), ``log(systolic_bp)*bp_treated`` part of systolic
blood pressure's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from cardiofed.exceptions import ConfigurationError
from cardiofed.schema import Catalogue, get_feature

FeatureTransform = Literal["raw", "log", "clinical"]
FEATURE_TRANSFORMS: tuple[str, ...] = ("raw", "log", "clinical")
MALE = "sex=male"
TREATED = "bp_treated"


@dataclass(frozen=True)
class Term:
    """One model column: a base value (optionally logged) times 0/1 indicators."""

    name: str
    column: int  # encoded column of the base value
    log: bool
    low: float  # clip range before the log (the feature's plausible range)
    high: float
    centre: float  # subtracted from the base value of a product before the factors apply
    # (encoded column of a 0/1 indicator, True: times the indicator, False: times 1 - it)
    factors: tuple[tuple[int, bool], ...]
    feature: str  # the canonical feature whose contribution this term is part of


@dataclass(frozen=True)
class ModelForm:
    """The terms of one form over a study's encoded columns."""

    kind: str
    encoded_names: tuple[str, ...]
    terms: tuple[Term, ...]

    @property
    def n_inputs(self) -> int:
        return len(self.encoded_names)

    @property
    def n_columns(self) -> int:
        return len(self.terms)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.terms]

    def apply(self, x: np.ndarray) -> np.ndarray:
        """The terms of encoded rows `x` (n, n_inputs), float64; NaN stays NaN."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_inputs:
            raise ValueError(f"x must have shape (n, {self.n_inputs}); got {x.shape}.")
        out = np.empty((len(x), self.n_columns))
        for k, t in enumerate(self.terms):
            value = x[:, t.column]
            if t.log:
                value = np.log(np.clip(value, t.low, t.high))
            if t.factors:
                value = value - t.centre
            for column, positive in t.factors:
                value = value * (x[:, column] if positive else 1.0 - x[:, column])
            out[:, k] = value
        return out

    def moments(self, hist: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and SD of every term from per-column histograms of the encoded values.

        For standardisation only (any fixed centring and scaling shared by all sites
        trains the same model): each base value is read off its histogram at the bin
        midpoints (0 and 1 for a 0/1 column), and its indicators are taken as independent
        of it. Post-processing of released statistics: no privacy cost.
        """
        mids = (edges[:, :-1] + edges[:, 1:]) / 2
        binary = (edges[:, 0] == 0.0) & (edges[:, -1] == 1.0)
        mids[binary, 0], mids[binary, -1] = 0.0, 1.0
        mass = np.maximum(hist, 0.0)
        total = mass.sum(axis=1)
        weights = mass / np.where(total > 0, total, 1.0)[:, None]
        share_one = weights[:, -1]  # share of 1s in a 0/1 column
        mean = np.empty(self.n_columns)
        second = np.empty(self.n_columns)
        for k, t in enumerate(self.terms):
            value = mids[t.column]
            if t.log:
                value = np.log(np.clip(value, t.low, t.high))
            if t.factors:
                value = value - t.centre
            scale = 1.0
            for column, positive in t.factors:
                scale *= share_one[column] if positive else 1.0 - share_one[column]
            mean[k] = scale * float(weights[t.column] @ value)
            second[k] = scale * float(weights[t.column] @ value**2)
        return mean, np.sqrt(np.maximum(second - mean**2, 0.0))

    def feature_groups(self, features: Sequence[str]) -> list[list[int]]:
        """For each canonical feature in `features`, the indices of its terms."""
        index = {name: i for i, name in enumerate(features)}
        groups: list[list[int]] = [[] for _ in features]
        for k, t in enumerate(self.terms):
            if t.feature not in index:
                raise ConfigurationError(f"Term {t.name!r} belongs to feature {t.feature!r}, "
                                         f"which is not among {list(features)}.")
            groups[index[t.feature]].append(k)
        return groups


def model_form(kind: str, encoded_names: Sequence[str],
               catalogue: Catalogue | None = None) -> ModelForm | None:
    """The terms of form `kind` (see the module docstring) over `encoded_names`; None for
    ``raw``, whose columns are the encoded ones."""
    if kind not in FEATURE_TRANSFORMS:
        raise ConfigurationError(f"The 'feature_transform' parameter must be one of "
                                 f"{list(FEATURE_TRANSFORMS)}; got {kind!r}.")
    if kind == "raw":
        return None
    names = list(encoded_names)
    position = {name: j for j, name in enumerate(names)}
    treated = position.get(TREATED)
    base: list[Term] = []
    for j, name in enumerate(names):
        feature = get_feature(name.split("=", 1)[0], catalogue)
        logged = feature.log_scale
        low, high = feature.encoded_range()
        centre = (math.log(math.sqrt(low * high)) if logged else (low + high) / 2)
        label = f"log({name})" if logged else name
        if logged and feature.name == "systolic_bp" and treated is not None:
            base += [Term(f"{label}*{TREATED}", j, True, low, high, centre,
                          ((treated, True),), feature.name),
                     Term(f"{label}*(1-{TREATED})", j, True, low, high, centre,
                          ((treated, False),), feature.name)]
        else:
            base.append(Term(label, j, logged, low, high, centre, (), feature.name))
    terms = list(base)
    male = position.get(MALE)
    if kind == "clinical" and male is not None:
        terms += [Term(f"{t.name}*{MALE}", t.column, t.log, t.low, t.high, t.centre,
                       (*t.factors, (male, True)), t.feature)
                  for t in base if t.column != male]
    return ModelForm(kind=kind, encoded_names=tuple(names), terms=tuple(terms))
