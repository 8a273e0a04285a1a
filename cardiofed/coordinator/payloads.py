"""One validation layer for everything a site sends: statistics, updates, evaluations.

Each check is a pure function of the payload and what the study expects (no database,
no HTTP): types, shapes against the plan, finite values and plausible ranges. A payload
that fails is refused at upload with :class:`~cardiofed.exceptions.InvalidUpdate`
naming the field; the coordinator runs the same checks again before it folds a round,
so a round's close never fails on one site's payload.

Counts are bounded by :data:`MAX_RECORDS` per site. An exact statistics release
(:data:`~cardiofed.data.preprocessing.DEFAULT_BINS` bins) holds non-negative integer
counts that agree with each other and sums inside the feature's range; a private
release (:data:`~cardiofed.data.preprocessing.PRIVATE_BINS` bins) carries noise, so it
is only bounded.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from cardiofed.data.preprocessing import DEFAULT_BINS, PRIVATE_BINS
from cardiofed.evaluation.private_metrics import metrics_with_uncertainty, score_bin_edges
from cardiofed.exceptions import ConfigurationError, DataValidationError, InvalidUpdate
from cardiofed.wire import decode_arrays

MAX_RECORDS = 10_000_000
MAX_METRICS_BYTES = 64 * 1024
MAX_METRICS = 64
# Metrics that are proportions or probabilities, and their intervals.
_UNIT_INTERVAL = ("auc", "accuracy", "brier", "ece", "prevalence", "mean_predicted",
                  "sensitivity", "specificity")
# Calibration on the logit scale: far beyond any model's, never a page's coordinates.
_CALIBRATION = ("calibration_slope", "calibration_intercept")
CALIBRATION_LIMIT = 100.0
# What a site may report (cardiofed.evaluation: binary_metrics, metrics_with_uncertainty):
# each metric, its 95% interval, the record count and the epsilon its ledger spent.
KNOWN_METRICS = frozenset({
    *_UNIT_INTERVAL, *_CALIBRATION, "n", "epsilon_spent", "epsilon_delta",
    "sites",  # a region's summary: how many of its sites published
    *(f"{base}_ci_{end}" for base in (*_UNIT_INTERVAL, *_CALIBRATION)
      for end in ("low", "high"))})


def check_manifest(manifest: dict[str, str], expected: dict[str, str]) -> None:
    for key, wanted in expected.items():
        if manifest.get(key) != wanted:
            raise InvalidUpdate(f"Manifest field {key!r} is {manifest.get(key)!r}; expected "
                                f"{wanted!r}.")


def _bounded_int(manifest: dict[str, str], key: str, low: int, high: int) -> int:
    raw = manifest.get(key)
    # ASCII digits only: "²".isdigit() is true, and int("²") raises.
    if raw is None or not (raw.isascii() and raw.isdigit()) or len(raw) > 12 \
            or not low <= int(raw) <= high:
        raise InvalidUpdate(f"Manifest field {key!r} must be an integer in [{low}, {high}]; "
                            f"got {raw!r}.")
    return int(raw)


# Arrays of an attribution step that count patients (cardiofed.causal.study).
_ATTRIBUTION_COUNTS = ("n", "kept", "rows", "overlap.treated", "overlap.control",
                       "events", "censored")  # the last two: a survival study's


def check_attribution(arrays: dict[str, np.ndarray],
                      expected: dict[str, tuple[int, ...]]) -> int:
    """An attribution step's sums against the arrays the step sends (names and shapes),
    finite float64; counts non-negative integers in an exact release (a private one,
    with a noise variance > 0, only bounded); returns the rows declared (moments)."""
    shapes = {k: tuple(v.shape) for k, v in arrays.items()}
    if shapes != expected:
        raise InvalidUpdate(f"Attribution payload must hold exactly {expected}; got {shapes}.")
    noise = [v for k, v in arrays.items() if k.startswith("noise_var.")]
    if any(v.dtype == np.float64 and (v < 0).any() for v in noise):
        raise InvalidUpdate("Attribution fields 'noise_var.*' are variances: >= 0.")
    noisy = any((v > 0).any() for v in noise)
    for key, value in arrays.items():
        if value.dtype != np.float64 or not np.isfinite(value).all():
            raise InvalidUpdate(f"Attribution field {key!r} must hold finite float64 values.")
        if key in _ATTRIBUTION_COUNTS and ((np.abs(value) > MAX_RECORDS).any() or not noisy
                                           and ((value < 0).any()
                                                or (value != np.round(value)).any())):
            raise InvalidUpdate(f"Attribution field {key!r} counts patients: non-negative "
                                f"integers up to {MAX_RECORDS}.")
    if "n" in arrays and not noisy and arrays["n"][0] < 1:
        raise InvalidUpdate("Attribution field 'n' must be at least 1.")
    return max(0, round(float(arrays["n"][0]))) if "n" in arrays else 0


def check_statistics(arrays: dict[str, np.ndarray],
                     feature_ranges: list[tuple[float, float]]) -> int:
    """A statistics release against the study's columns; returns the declared records."""
    d = len(feature_ranges)
    shapes = {k: v.shape for k, v in arrays.items()}
    vectors = {"count": (d,), "total": (d,), "total_sq": (d,), "n_missing": (d,)}
    hist = arrays.get("histogram")
    if {k: s for k, s in shapes.items() if k != "histogram"} != vectors or hist is None \
            or hist.shape not in ((d, DEFAULT_BINS), (d, PRIVATE_BINS)):
        raise InvalidUpdate(f"Statistics payload must hold count, total, total_sq, n_missing of "
                            f"shape ({d},) and histogram of shape ({d}, {DEFAULT_BINS}) "
                            f"(exact) or ({d}, {PRIVATE_BINS}) (private); got {shapes}.")
    low = np.array([lo for lo, _ in feature_ranges], dtype=np.float64)
    high = np.array([hi for _, hi in feature_ranges], dtype=np.float64)
    extent = np.maximum(np.abs(low), np.abs(high))
    count, n_missing = arrays["count"], arrays["n_missing"]
    bounds = {"count": MAX_RECORDS, "n_missing": MAX_RECORDS, "histogram": MAX_RECORDS,
              "total": MAX_RECORDS * extent, "total_sq": MAX_RECORDS * extent**2}
    for key, bound in bounds.items():
        magnitude = np.abs(arrays[key]) if key != "histogram" else np.abs(hist).max(axis=1)
        if (magnitude > bound).any():
            raise InvalidUpdate(f"Statistics field {key!r} holds values beyond what "
                                f"{MAX_RECORDS} records allow.")
    if hist.shape[1] == PRIVATE_BINS:  # noisy: bounded only
        return int(max(0.0, float(np.max(count + n_missing))))
    if any((a < 0).any() or (a != np.round(a)).any() for a in (count, n_missing, hist)):
        raise InvalidUpdate("Statistics fields 'count', 'n_missing' and 'histogram' of an exact "
                            "release must be non-negative integers.")
    if not np.array_equal(hist.sum(axis=1), count):
        raise InvalidUpdate("Statistics field 'histogram' must sum to 'count' in every column.")
    rows = count + n_missing
    if not (rows == rows[0]).all():
        raise InvalidUpdate("Statistics fields 'count' + 'n_missing' must be the same number "
                            "of records in every column.")
    slack = 1e-6 * (1 + np.abs(arrays["total"]))
    if ((arrays["total"] < count * low - slack) | (arrays["total"] > count * high + slack)).any() \
            or (arrays["total_sq"] < -slack).any():
        raise InvalidUpdate("Statistics field 'total' must lie within count x the feature's "
                            "range, and 'total_sq' must be >= 0.")
    return int(rows[0])


def check_update(arrays: dict[str, np.ndarray], manifest: dict[str, str],
                 expected: dict[str, tuple[tuple[int, ...], np.dtype[Any]]]) -> int:
    """A model update against the model's tensors; returns its declared sample size."""
    got = {k: (v.shape, v.dtype) for k, v in arrays.items()}
    if set(got) != set(expected):
        raise InvalidUpdate(f"Update tensors {sorted(got)} do not match the model's "
                            f"{sorted(expected)}.")
    for name, (shape, dtype) in expected.items():
        if got[name] != (shape, dtype):
            raise InvalidUpdate(f"Update tensor {name!r} has shape {got[name][0]} and dtype "
                                f"{got[name][1]}; expected {shape} and {dtype}.")
    for field in ("train_loss", "global_loss"):  # binary cross-entropies
        if field in manifest and not (_finite_text(manifest[field])
                                      and float(manifest[field]) >= 0):
            raise InvalidUpdate(f"Manifest field {field!r} must be a finite number >= 0 (a "
                                f"log-loss); got {manifest[field][:40]!r}.")
    return _bounded_int(manifest, "num_samples", 1, MAX_RECORDS)


def check_intercept(arrays: dict[str, np.ndarray], manifest: dict[str, str]) -> int:
    """A site's intercept sums (:mod:`cardiofed.aggregation.intercept_step`): ``sums``
    (D, I) and ``noise_std``, finite float64, within what the declared records allow
    (exactly, where the release has no noise); returns the declared records."""
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in arrays.items()}
    wanted = {"sums": ((2,), np.dtype(np.float64)), "noise_std": ((1,), np.dtype(np.float64))}
    if shapes != wanted or not all(np.isfinite(v).all() for v in arrays.values()):
        raise InvalidUpdate(f"Intercept payload must hold finite float64 'sums' of shape (2,) "
                            f"and 'noise_std' of shape (1,); got {shapes}.")
    n = _bounded_int(manifest, "num_samples", 1, MAX_RECORDS)
    (score, information), noise = arrays["sums"], float(arrays["noise_std"][0])
    if noise < 0 or noise > MAX_RECORDS:
        raise InvalidUpdate(f"Intercept field 'noise_std' must be in [0, {MAX_RECORDS}]; "
                            f"got {noise!r}.")
    slack = 10 * noise  # a release's noise, bounded
    if abs(score) > n + slack or not -slack <= information <= n / 4 + slack:
        raise InvalidUpdate(f"Intercept sums ({score:.6g}, {information:.6g}) are beyond what "
                            f"{n} records allow (|D| <= n, 0 <= I <= n / 4, give or take 10 "
                            f"noise SDs).")
    return n


def _finite_text(text: str) -> bool:
    try:
        return len(text) <= 40 and math.isfinite(float(text))
    except ValueError:
        return False


def _metric_problem(key: str, value: float) -> str | None:
    base = key.removesuffix("_ci_low").removesuffix("_ci_high")
    if base in _UNIT_INTERVAL and not 0 <= value <= 1:
        return f"{key} = {value!r} is outside [0, 1]"
    if base in _CALIBRATION and not abs(value) <= CALIBRATION_LIMIT:
        return f"{key} = {value!r} is outside [-{CALIBRATION_LIMIT:g}, {CALIBRATION_LIMIT:g}]"
    if key in ("n", "epsilon_spent") and value < 0:
        return f"{key} = {value!r} is negative"
    if key == "n" and value > MAX_RECORDS:
        return f"n = {value!r} exceeds {MAX_RECORDS}"
    if key == "epsilon_delta" and not 0 < value < 1:
        return f"epsilon_delta = {value!r} is outside (0, 1)"
    return None


def evaluation_metrics(payload: bytes) -> dict[str, Any]:
    """A site's evaluation as metrics: JSON metrics as sent, or, from a private site, the
    metrics (with 95% intervals) computed from its noisy score histograms, plus the
    epsilon its manifest reports. Raises :class:`InvalidUpdate` naming what is wrong.
    (Its size, at most :data:`MAX_METRICS_BYTES`, is checked at upload with a 413.)"""
    if payload[:1] == b"{":
        try:
            metrics = json.loads(payload)
        except (ValueError, RecursionError):
            raise InvalidUpdate("Evaluation payload must be a JSON object of metrics.") from None
        if not isinstance(metrics, dict) or len(metrics) > MAX_METRICS or not all(
                isinstance(k, str) and len(k) <= 64 and (v is None or (
                    isinstance(v, int | float) and not isinstance(v, bool) and _finite(v)))
                for k, v in metrics.items()):
            raise InvalidUpdate(f"Evaluation payload must map at most {MAX_METRICS} metric "
                                f"names (<= 64 characters) to finite numbers or null.")
    else:
        metrics = _histogram_metrics(payload)
    unknown = sorted(k for k in metrics if k not in KNOWN_METRICS)
    if unknown:
        known = ", ".join(sorted(k for k in KNOWN_METRICS if "_ci_" not in k))
        raise InvalidUpdate(f"Unknown evaluation metrics {unknown[:5]}; a site reports only "
                            f"{known} and their intervals (<metric>_ci_low, <metric>_ci_high).")
    problems = [p for k, v in metrics.items() if v is not None
                and (p := _metric_problem(k, float(v))) is not None]
    problems += [f"{base}_ci_low > {base}_ci_high" for base in (*_UNIT_INTERVAL, *_CALIBRATION)
                 if isinstance(low := metrics.get(f"{base}_ci_low"), int | float)
                 and isinstance(high := metrics.get(f"{base}_ci_high"), int | float)
                 and low > high]
    if problems:
        raise InvalidUpdate(f"Evaluation metrics out of range: {'; '.join(problems[:5])}.")
    return metrics


def _finite(value: float) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _histogram_metrics(payload: bytes) -> dict[str, Any]:
    try:
        arrays, manifest = decode_arrays(payload)
    except DataValidationError as exc:
        raise InvalidUpdate(f"Evaluation payload is neither JSON metrics nor score "
                            f"histograms: {exc}") from None
    neg, pos = arrays.get("negatives"), arrays.get("positives")
    if set(arrays) != {"negatives", "positives"} or neg is None or pos is None \
            or neg.ndim != 1 or neg.shape != pos.shape or not 4 <= len(neg) <= 1000:
        raise InvalidUpdate("Evaluation histograms must be 'negatives' and 'positives', two "
                            f"1-D arrays of one length (4 to 1000 bins); got "
                            f"{ {k: v.shape for k, v in arrays.items()} }.")
    if (np.abs(neg) > MAX_RECORDS).any() or (np.abs(pos) > MAX_RECORDS).any():
        raise InvalidUpdate(f"Evaluation histograms hold counts beyond {MAX_RECORDS}.")
    try:
        noise_std = float(manifest.get("noise_std", "nan")[:40])
        if not 0 <= noise_std <= 1e6:
            raise ValueError(f"noise_std must be in [0, 1e6]; got {noise_std!r}")
        metrics = release_metrics(neg, pos, noise_std)
        for key in ("epsilon_spent", "epsilon_delta"):
            if key in manifest:
                value = float(manifest[key][:40])
                metrics[key] = value if math.isfinite(value) else None
    except (ValueError, ConfigurationError) as exc:
        raise InvalidUpdate(f"Evaluation histograms are not usable: {exc}") from None
    return metrics


def release_metrics(neg: np.ndarray, pos: np.ndarray, noise_std: float) -> dict[str, Any]:
    """The metrics, with intervals, of noisy score histograms (a site's release or a
    secure sum's) as the card holds them: those the simulator computes
    (:func:`~cardiofed.evaluation.private_metrics.metrics_with_uncertainty`), None where
    a metric is not finite."""
    metrics = metrics_with_uncertainty(neg, pos, score_bin_edges(int(neg.shape[0])),
                                       noise_std=noise_std, rng=np.random.default_rng(0))
    return {k: v if math.isfinite(v) else None for k, v in metrics.items()}
