"""A patient's features as a model's input row: whatever a body holds, a row or every
problem named, never another exception."""

from __future__ import annotations

import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from cardiofed.schema import CATALOGUE, FeatureKind
from cardiofed.serving.patient_input import PatientErrors, patient_row


def _all_features() -> tuple[dict[str, Any], int]:
    """Every catalogue feature as a model input, columns in order."""
    encoders, col = {}, 0
    for name, feature in CATALOGUE.features.items():
        width = len(feature.encoded_names())
        encoders[name] = (feature, list(range(col, col + width)))
        col += width
    return encoders, col


ENCODERS, N_INPUTS = _all_features()
NAMES = list(ENCODERS)


def _value(name: str) -> st.SearchStrategy[Any]:
    """Values of every kind, plainly valid or not, for feature `name`."""
    feature = CATALOGUE.feature(name)
    anything = st.one_of(st.none(), st.booleans(), st.integers(-10**400, 10**400),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5))
    if feature.kind is FeatureKind.CONTINUOUS:
        low, high = float(feature.low), float(feature.high)  # type: ignore[arg-type]
        return st.one_of(st.floats(low, high), st.integers(math.ceil(low), math.floor(high)),
                         anything)
    if feature.kind is FeatureKind.BINARY:
        return st.one_of(st.booleans(), st.sampled_from([0, 1, 0.0, "yes", " No", "2"]),
                         anything)
    codes = list(feature.codes)
    return st.one_of(st.sampled_from(codes), st.sampled_from(codes).map(str.upper),
                     st.sampled_from(codes).map(lambda c: f" {c} "),
                     st.integers(0, len(codes)), anything)


@st.composite
def patients(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, str]]:
    present = draw(st.lists(st.sampled_from(NAMES), unique=True, min_size=len(NAMES) - 2,
                            max_size=len(NAMES)))
    features = {name: draw(_value(name)) for name in present}
    if draw(st.booleans()):
        features[draw(st.text(min_size=1, max_size=4))] = 1.0
    units = {}
    for name in draw(st.lists(st.sampled_from(NAMES + ["nonsense"]), unique=True,
                              max_size=3)):
        feature = CATALOGUE.features.get(name)
        known = [feature.unit, *feature.unit_factors] if feature and feature.unit else []
        units[name] = draw(st.sampled_from(known + ["furlongs"]))
    return features, units


@settings(max_examples=400, deadline=None)
@given(patient=patients(), impute=st.booleans())
def test_any_body_gives_a_row_or_names_every_problem(
        patient: tuple[dict[str, Any], dict[str, str]], impute: bool) -> None:
    """(It found a whole number past 1e308 for a coded feature raising OverflowError.)"""
    features, units = patient
    try:
        row, imputed = patient_row(ENCODERS, N_INPUTS, features, units,
                                   impute_missing=impute, where="patients[0]")
    except PatientErrors as exc:
        assert exc.problems and all(field.startswith("patients[0].") and message
                                    for field, message in exc.problems)
        return
    assert len(row) == N_INPUTS  # NaN exactly in the imputed features' columns
    assert {c for c, v in enumerate(row) if math.isnan(v)} == {
        c for name in imputed for c in ENCODERS[name][1]}
