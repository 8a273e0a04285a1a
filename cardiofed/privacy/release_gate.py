"""The release gate: what a site computes from a coordinator's numbers is bounded first.

The coordinator is not trusted. Every number it sends a site (the preprocessor, the
model's weights) is checked against bounds that come from the schema and the site's own
declared ranges, and refused, naming the value, when it is outside them: a refusal that
depends only on what was sent, never on a record. What passes is applied so that no
patient's row can overflow anything downstream:

* each encoded value is clipped into the site's declared range (missing values stay
  missing and take the preprocessor's fill, itself inside the range);
* each standardised column's scale is floored at :data:`SCALE_FLOOR` of the column's
  span over the declared ranges, and each standardised value clipped to
  ``[-Z_MAX, Z_MAX]`` (NaN, which cannot arise, would count as 0);
* weights are at most :data:`WEIGHT_MAX` in absolute value.

With those bounds a logistic or MLP model's logits, losses and per-record gradients are
finite in float32 for every patient, so per-record clipping bounds what each patient adds
to a release (DP-SGD), and a score is a probability. Checks after the computation
(:mod:`cardiofed.privacy.site_privacy`) make any release that is still not finite a
data-independent one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from cardiofed.data.preprocessing import Preprocessor
from cardiofed.exceptions import TaskRefused
from cardiofed.models.kinds import Weights

log = logging.getLogger("cardiofed.privacy")

Z_MAX = 1e3
WEIGHT_MAX = 1e3
SCALE_FLOOR = 1e-3


def column_bounds(pre: Preprocessor, ranges: Sequence[Sequence[float]]
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The lowest and highest value each model column can take over the declared ranges
    (a term's base value, logged and centred as the form says, times 0/1 indicators)."""
    low, high = np.array(ranges, dtype=np.float64).T
    if pre.form is None:
        return low, high
    lowest, highest = np.empty(pre.form.n_columns), np.empty(pre.form.n_columns)
    for k, t in enumerate(pre.form.terms):
        a, b = low[t.column], high[t.column]
        if t.log:
            a, b = (float(np.log(np.clip(v, t.low, t.high))) for v in (a, b))
        if t.factors:  # centred, then times indicators that may be 0
            a, b = min(a - t.centre, 0.0), max(b - t.centre, 0.0)
        lowest[k], highest[k] = a, b
    return lowest, highest


def check_preprocessor(pre: Preprocessor, ranges: Sequence[Sequence[float]]) -> Preprocessor:
    """The coordinator's preprocessor, refused unless every fill value lies in the site's
    declared range of its column and every mean and scale is finite (scales >= 0) with
    the mean within one span of the column's values; returned with its scales floored
    (:func:`floored_scales`)."""
    fill, mean, std = (np.asarray(a, dtype=np.float64) for a in (pre.fill, pre.mean, pre.std))
    low, high = np.array(ranges, dtype=np.float64).T
    if fill.shape != low.shape:
        raise TaskRefused(f"The preprocessor has {fill.size} fill values; this site's data "
                          f"has {low.size} columns.")
    bad = np.flatnonzero(~np.isfinite(fill) | (fill < low) | (fill > high))
    if bad.size:
        j = int(bad[0])
        raise TaskRefused(f"The preprocessor's fill value of column {j} ({float(fill[j])!r}) "
                          f"is not within the site's range [{low[j]:g}, {high[j]:g}].")
    if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std >= 0).all()):
        raise TaskRefused("The preprocessor's means and scales must be finite, scales >= 0.")
    lowest, highest = column_bounds(pre, ranges)
    span = highest - lowest
    far = np.flatnonzero((mean < lowest - span) | (mean > highest + span))
    if far.size:
        k = int(far[0])
        raise TaskRefused(f"The preprocessor's mean of model column {k} ({float(mean[k])!r}) is "
                          f"more than a span away from the values the site's ranges allow.")
    return _floored(pre, span)


def floored_scales(pre: Preprocessor, ranges: Sequence[Sequence[float]]) -> Preprocessor:
    """`pre` with every positive scale at least :data:`SCALE_FLOOR` of its column's span
    over the declared ranges (a zero scale, a constant column, stays zero: only centred)."""
    lowest, highest = column_bounds(pre, ranges)
    return _floored(pre, highest - lowest)


def _floored(pre: Preprocessor, span: np.ndarray) -> Preprocessor:
    std = np.asarray(pre.std, dtype=np.float64)
    return Preprocessor(fill=pre.fill, mean=pre.mean,
                        std=np.where(std > 0, np.maximum(std, SCALE_FLOOR * span), 0.0),
                        form=pre.form)


def bounded_rows(pre: Preprocessor, x: np.ndarray,
                 ranges: Sequence[Sequence[float]]) -> np.ndarray:
    """The site's encoded rows as model columns, every value bounded (float32): clipped
    into the declared ranges, filled, standardised, clipped to ``[-Z_MAX, Z_MAX]``."""
    low, high = np.array(ranges, dtype=np.float64).T
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(all="ignore"):
        z = pre.standardise(np.clip(x, low, high))  # a missing value stays NaN: filled
    return np.clip(np.nan_to_num(z, nan=0.0, posinf=Z_MAX, neginf=-Z_MAX),
                   -Z_MAX, Z_MAX).astype(np.float32)


def check_weights(weights: Weights, expected: Weights) -> Weights:
    """The coordinator's model weights, refused unless they have the model's names and
    shapes, are finite and at most :data:`WEIGHT_MAX` in absolute value."""
    if set(weights) != set(expected):
        raise TaskRefused(f"The model's weights are named {sorted(weights)}; the study's "
                          f"model has {sorted(expected)}.")
    out: Weights = {}
    for name, value in weights.items():
        array = np.asarray(value, dtype=np.float32)
        if array.shape != np.shape(expected[name]):
            raise TaskRefused(f"Weight {name!r} has shape {array.shape}; the study's model "
                              f"expects {np.shape(expected[name])}.")
        if not np.isfinite(array).all() or np.abs(array).max(initial=0.0) > WEIGHT_MAX:
            raise TaskRefused(f"Weight {name!r} must be finite and at most {WEIGHT_MAX:g} in "
                              f"absolute value.")
        out[name] = array
    return out


def finite_or_zeros(compute: Callable[[], Mapping[str, np.ndarray]],
                    shapes: Mapping[str, tuple[int, ...]], what: str
                    ) -> dict[str, np.ndarray]:
    """`compute()`'s arrays if each of `shapes` is there, of its shape and finite; else
    zeros of those shapes. A release whose computation fails on the site's rows then
    carries the same noise around values that do not depend on them, instead of an
    exception or a refusal that would tell the coordinator so. `what` names the release
    in the log (never a value)."""
    try:
        arrays = dict(compute())
        if set(arrays) != set(shapes) or not all(
                np.shape(arrays[k]) == shapes[k] and np.isfinite(arrays[k]).all()
                for k in shapes):
            raise ArithmeticError("a value is missing, misshapen or not finite")
        return {k: np.asarray(arrays[k], dtype=np.float64) for k in shapes}
    except Exception as exc:  # noqa: BLE001 - any failure gets the same release
        log.warning("%s failed (%s); releasing noise alone", what, type(exc).__name__)
        return {k: np.zeros(shape) for k, shape in shapes.items()}
