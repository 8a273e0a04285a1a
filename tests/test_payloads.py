"""The one validation layer for what a site sends: every abuse refused with its field."""

from __future__ import annotations

import json
import re
import struct

import numpy as np
import pytest

from cardiofed.coordinator.payloads import (
    MAX_RECORDS,
    check_statistics,
    check_update,
    evaluation_metrics,
)
from cardiofed.data.preprocessing import PRIVATE_BINS, bin_edges, site_statistics
from cardiofed.exceptions import DataValidationError, InvalidUpdate
from cardiofed.wire import decode_arrays, encode_arrays

RANGES = [(18.0, 110.0), (0.0, 1.0)]


def exact() -> dict[str, np.ndarray]:
    x = np.array([[40.0, 1.0], [60.0, 0.0], [np.nan, 1.0]])
    return site_statistics(x, bin_edges(RANGES)).to_arrays()


def test_an_exact_release_is_accepted_with_its_record_count() -> None:
    assert check_statistics(exact(), RANGES) == 3


def test_a_private_release_is_accepted_though_noisy() -> None:
    arrays = exact()
    arrays["histogram"] = np.random.default_rng(0).normal(0, 5, (2, PRIVATE_BINS))
    arrays["count"] = arrays["histogram"].sum(axis=1)

    check_statistics(arrays, RANGES)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("count", np.array([-2.0, 3.0]), "must be non-negative integers"),
    ("n_missing", np.array([0.5, 0.0]), "must be non-negative integers"),
    ("count", np.array([2.0**62, 3.0]), "Statistics field 'count' holds values beyond"),
    ("total_sq", np.array([1.7e308, 1.0]), "Statistics field 'total_sq' holds values beyond"),
    ("total", np.array([639.0 * 2, 1.0]), "Statistics field 'total' must lie within count x"),
    ("histogram", np.ones((2, 7)), "histogram of shape (2, 256) (exact) or (2, 16)"),
    ("histogram", np.zeros((2, 256)), "Statistics field 'histogram' must sum to 'count'"),
])
def test_implausible_statistics_are_refused(field: str, value: np.ndarray,
                                            message: str) -> None:
    arrays = {**exact(), field: value}

    with pytest.raises(InvalidUpdate, match=re.escape(message)):
        check_statistics(arrays, RANGES)


def test_records_must_agree_across_columns() -> None:
    arrays = {**exact(), "n_missing": np.array([5.0, 0.0])}

    with pytest.raises(InvalidUpdate, match="the same number of records in every column"):
        check_statistics(arrays, RANGES)


MODEL = {"linear.weight": ((1, 2), np.dtype("float32")), "linear.bias": ((1,), np.dtype("float32"))}


def update(**manifest: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    return ({"linear.weight": np.zeros((1, 2), np.float32),
             "linear.bias": np.zeros(1, np.float32)}, {"num_samples": "10", **manifest})


@pytest.mark.parametrize(("manifest", "message"), [
    ({"train_loss": "abc"}, "Manifest field 'train_loss' must be a finite number >= 0 (a "
                            "log-loss); got 'abc'."),
    ({"train_loss": "nan"}, "Manifest field 'train_loss' must be a finite number"),
    ({"global_loss": "inf"}, "Manifest field 'global_loss' must be a finite number"),
    ({"global_loss": "-0.1"}, "Manifest field 'global_loss' must be a finite number >= 0"),
    ({"train_loss": "-1e-300"}, "Manifest field 'train_loss' must be a finite number >= 0"),
    ({"num_samples": str(10**30)}, "Manifest field 'num_samples' must be an integer in "
                                   f"[1, {MAX_RECORDS}]"),
    ({"num_samples": "9" * 400}, "Manifest field 'num_samples' must be an integer"),
    ({"num_samples": "-5"}, "Manifest field 'num_samples' must be an integer"),
    ({"num_samples": "\u00b2"}, "Manifest field 'num_samples' must be an integer"),  # was a 500
    ({"num_samples": "\u0661\u0662"}, "Manifest field 'num_samples' must be an integer"),
])
def test_bad_update_manifests_are_refused(manifest: dict[str, str], message: str) -> None:
    arrays, full = update(**manifest)

    with pytest.raises(InvalidUpdate, match=re.escape(message)):
        check_update(arrays, full, MODEL)


def test_a_good_update_declares_its_samples() -> None:
    assert check_update(*update(train_loss="0.5", global_loss="0"), MODEL) == 10


@pytest.mark.parametrize(("payload", "message"), [
    (b'{"auc": 99}', "auc = 99.0 is outside [0, 1]"),
    (b'{"epsilon_spent": -3}', "epsilon_spent = -3.0 is negative"),
    (b'{"epsilon_delta": 2}', "epsilon_delta = 2.0 is outside (0, 1)"),
    (b'{"a": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", "must be a JSON object of metrics"),
    (b"[" * 30_000 + b"]" * 30_000, "neither JSON metrics nor score histograms"),
    (json.dumps({f"m{i}": 1 for i in range(65)}).encode(), "at most 64 metric names"),
])
def test_implausible_evaluations_are_refused(payload: bytes, message: str) -> None:
    with pytest.raises(InvalidUpdate, match=re.escape(message)):
        evaluation_metrics(payload)


def test_a_null_manifest_decodes_as_empty_and_a_bad_one_is_refused() -> None:
    body = encode_arrays({"x": np.zeros(1, np.float32)})
    (n,) = struct.unpack("<Q", body[:8])
    header = json.loads(body[8:8 + n])

    def with_metadata(value: object) -> bytes:
        new = json.dumps({**header, "__metadata__": value}).encode()
        new += b" " * (n - len(new)) if len(new) <= n else b""
        return struct.pack("<Q", len(new)) + new + body[8 + n:]

    assert decode_arrays(with_metadata(None))[1] == {}
    with pytest.raises(DataValidationError, match="not valid safetensors|strings to strings"):
        decode_arrays(with_metadata({"num_samples": 5}))


# --- Metrics are reports, not facts (issue 29): names and ranges are checked ---------------

@pytest.mark.parametrize(("metrics", "message"), [
    ({"auc": 0.99, "auc_ci_low": -1e300, "auc_ci_high": 1e300},
     "auc_ci_low = -1e+300 is outside [0, 1]"),
    ({"auc": 0.7, "auc_ci_low": 0.8, "auc_ci_high": 0.6}, "auc_ci_low > auc_ci_high"),
    ({"calibration_slope": 1e6}, "calibration_slope = 1000000.0 is outside [-100, 100]"),
    ({"auc": 0.7, "my_favourite_metric": 1.0},
     "Unknown evaluation metrics ['my_favourite_metric']"),
])
def test_self_reported_metrics_outside_their_names_or_ranges_are_refused(
        metrics: dict[str, float], message: str) -> None:
    from cardiofed.coordinator.payloads import evaluation_metrics

    with pytest.raises(InvalidUpdate, match=re.escape(message)):
        evaluation_metrics(json.dumps(metrics).encode())


def test_any_accepted_report_holds_known_metrics_within_their_ranges() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from cardiofed.coordinator.payloads import KNOWN_METRICS, evaluation_metrics

    names = st.sampled_from(sorted(KNOWN_METRICS) + ["auc_low", "x", "n_sites"])
    values = st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False,
                                            min_value=-1e6, max_value=1e6))

    @settings(max_examples=300, deadline=None)
    @given(report=st.dictionaries(names, values, max_size=12))
    def check(report: dict[str, float | None]) -> None:
        try:
            accepted = evaluation_metrics(json.dumps(report).encode())
        except InvalidUpdate:
            return
        assert set(accepted) <= KNOWN_METRICS
        for key, value in accepted.items():
            if value is not None and key.startswith(("auc", "prevalence", "brier")):
                assert 0.0 <= value <= 1.0

    check()


def test_a_regions_summary_caps_each_sites_weight() -> None:
    from cardiofed.protocol.relay import SUMMARY_WEIGHT_CAP, metrics_result

    honest = {f"s{k}": {"auc": 0.70, "n": 500.0} for k in range(4)}
    inflated = {**honest, "liar": {"auc": 0.99, "n": 10_000_000.0}}

    summary = json.loads(metrics_result(inflated))

    capped = (4 * 500 * 0.70 + SUMMARY_WEIGHT_CAP * 500 * 0.99) / (4 * 500
                                                                     + SUMMARY_WEIGHT_CAP * 500)
    assert summary["auc"] == pytest.approx(capped)  # not 0.99: one site is not the region
    assert summary["n"] == 10_002_000.0 and summary["sites"] == 5.0
