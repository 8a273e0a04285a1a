"""A patient's canonical features as a model's input row: each value checked against its
feature (kind, unit, plausible range, codes), every problem collected with the field it
concerns (:class:`PatientErrors`), whatever the body holds (tested)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from cardiofed.exceptions import DataValidationError
from cardiofed.schema import Feature, FeatureKind

REQUIRED = "is required (or set impute_missing to fill it with the federation's median)"
_BINARY_VALUES = {"0": 0.0, "1": 1.0, "false": 0.0, "true": 1.0, "no": 0.0, "yes": 1.0}


class PatientErrors(DataValidationError):
    """One or more invalid fields; ``problems`` holds ``(field, message)`` pairs."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{f}: {m}" for f, m in problems))


def patient_row(encoders: dict[str, tuple[Feature, list[int]]], n_inputs: int,
                features: Mapping[str, Any], units: Mapping[str, str], *,
                impute_missing: bool, where: str) -> tuple[list[float], list[str]]:
    """The input row (NaN where imputed) of a model whose inputs are `encoders` (each
    feature, in the card's order, with its encoded columns) in `n_inputs` columns, and the
    features imputed; :class:`PatientErrors` naming every problem (`where` prefixes the
    fields, e.g. ``patients[3]``)."""
    prefix = f"{where}." if where else ""  # e.g. "patients[3]." in a batch
    problems: list[tuple[str, str]] = []
    if not encoders.keys() >= features.keys():
        expected = ", ".join(encoders)
        problems += [(f"{prefix}features.{name}",
                      f"is not an input of this model; expected {expected}")
                     for name in features if name not in encoders]
    problems += [(f"{prefix}units.{name}", "names no input of this model")
                 for name in units if name not in encoders]
    row = [math.nan] * n_inputs
    imputed = []
    for name, (feature, cols) in encoders.items():
        value = features.get(name)
        if value is None:
            if impute_missing:
                imputed.append(name)
            else:
                problems.append((f"{prefix}features.{name}", REQUIRED))
            continue
        message = _encode_value(feature, value, units.get(name), row, cols)
        if message:
            problems.append((f"{prefix}features.{name}", message))
    if problems:
        raise PatientErrors(problems)
    return row, imputed


def _shown(value: Any, *, quote: bool = True) -> str:
    """`value` as an error message names it: cut past 40 characters, so that a refusal
    says what was sent without echoing a huge input back."""
    text = repr(value) if quote else str(value)
    return text if len(text) <= 40 else f"{text[:24]}... ({len(text):,} characters)"


def _encode_value(feature: Feature, value: Any, unit: str | None, row: list[float],
                  cols: list[int]) -> str:
    """Write `value` into `row[cols]`; return a problem message, or '' when valid."""
    if feature.kind is FeatureKind.CONTINUOUS:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"must be a number in {feature.unit}; got {_shown(value)}"
        if unit is not None and unit != feature.unit and unit not in feature.unit_factors:
            known = ", ".join([feature.unit, *feature.unit_factors])
            return f"unit {_shown(unit)} is not known for this feature; use one of {known}"
        factor = feature.conversion_factor(unit or feature.unit)
        try:
            converted = float(value) * factor
        except OverflowError:
            converted = math.inf  # reported as out of range below
        low, high = float(feature.low), float(feature.high)  # type: ignore[arg-type]
        if not math.isfinite(converted):
            return (f"{_shown(value, quote=False)} is not a finite number; the plausible "
                    f"range is [{low:g}, {high:g}] {feature.unit}")
        if not low <= converted <= high:
            if factor != 1.0:
                lo_u, hi_u = low / factor, high / factor
                return (f"{value:g} {unit} is outside the plausible range [{lo_u:.4g}, "
                        f"{hi_u:.4g}] {unit} ([{low:g}, {high:g}] {feature.unit})")
            return (f"{value:g} {feature.unit} is outside the plausible range [{low:g}, "
                    f"{high:g}] {feature.unit}")
        row[cols[0]] = converted
        return ""
    if unit is not None:
        return f"a {feature.kind} feature takes no unit; got {_shown(unit)}"
    if feature.kind is FeatureKind.BINARY:
        key = str(value).strip().lower() if not isinstance(value, bool) else str(int(value))
        if isinstance(value, float) and value in (0.0, 1.0):
            key = str(int(value))
        if key not in _BINARY_VALUES:
            return f"must be 0 or 1 (or true/false, yes/no); got {_shown(value)}"
        row[cols[0]] = _BINARY_VALUES[key]
        return ""
    # A whole number names a code by its text (an int as it is: one past 1e308 has no float)
    code = str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
    canonical = {c.lower(): c for c in feature.codes}.get(code.strip().lower())
    if canonical is None:
        return f"must be one of {', '.join(feature.codes)}; got {_shown(value)}"
    if feature.kind is FeatureKind.ORDINAL:  # the level's position, as in training
        row[cols[0]] = float(feature.codes.index(canonical))
        return ""
    for col, level in zip(cols, feature.codes[1:], strict=True):
        row[col] = 1.0 if canonical == level else 0.0
    return ""
