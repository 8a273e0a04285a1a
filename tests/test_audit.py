"""The privacy audit: canaries in payloads, membership inference, update inversion, CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

import cardiofed.experiments.privacy_audit as audit_module
from cardiofed.cli import app
from cardiofed.data.dataset import FederatedDataset
from cardiofed.data.synthetic import synthetic_federation
from cardiofed.exceptions import ConfigurationError
from cardiofed.experiments.privacy_audit import (
    CanaryReport,
    canary_audit,
    membership_inference,
    run_audit,
    scan_payloads,
    update_inversion,
    update_inversion_audit,
)
from cardiofed.simulation.config import SimulationConfig
from cardiofed.simulation.prepare import prepare_federation
from cardiofed.wire import encode_arrays, encode_metrics


@pytest.fixture(scope="module")
def federation() -> FederatedDataset:
    return synthetic_federation(n_sites=3, seed=1, size_scale=0.2)


@pytest.fixture(scope="module")
def clean_report(federation: FederatedDataset) -> CanaryReport:
    return canary_audit(federation, SimulationConfig.create(rounds=2), seed=0)


# A canary row of the synthetic layout: age, sex=male, TC, HDL, SBP, treated, smoker, DM.
_ROW = np.array([61.734829, 1.0, 203.118273, 44.771902, 133.902817, 0.0, 1.0, 0.0])
_SCAN = np.where([False, True, False, False, False, True, True, True], np.nan, _ROW)[None]


# --- Canaries -------------------------------------------------------------------------------

def test_real_payloads_contain_no_canary(clean_report: CanaryReport) -> None:
    assert clean_report.n_canaries == 9  # 3 per site
    assert clean_report.n_patterns > 100
    assert clean_report.matches == [] and clean_report.passed
    assert clean_report.payloads_by_kind == {"update": 6, "statistics": 3, "metrics": 3}
    assert clean_report.n_payloads == 12


def test_dp_payloads_contain_no_canary(federation: FederatedDataset) -> None:
    report = canary_audit(federation, SimulationConfig.create(rounds=1, dp_epsilon=1.0),
                          seed=1)

    assert report.passed and report.payloads_by_kind["update"] == 3


def test_bytes_sent_are_counted_by_kind_and_site(clean_report: CanaryReport) -> None:
    assert all(clean_report.bytes_by_kind[k] > 0 for k in ("update", "statistics", "metrics"))
    assert sum(clean_report.bytes_by_site.values()) == sum(clean_report.bytes_by_kind.values())
    assert set(clean_report.bytes_by_site) == {"tier3_01", "tier2_01", "community_01"}


@pytest.mark.parametrize(("payload", "encoding"), [
    (encode_arrays({"leak": _ROW.astype(np.float32)}), "float32 raw"),
    (encode_arrays({"leak": _ROW}), "float64 raw"),
    (json.dumps({"row": _ROW.tolist()}).encode(), "text raw"),
    (encode_metrics({"age": round(float(_ROW[0]), 4)}), "text raw"),
])
def test_a_leaky_payload_is_found(payload: bytes, encoding: str) -> None:
    matches = scan_payloads([("clinic_a", "update", b"\x00" * 64),
                             ("clinic_b", "metrics", payload)], _SCAN)

    assert matches, "the check must be able to fail"
    assert {(m.site, m.kind, m.encoding) for m in matches} == {("clinic_b", "metrics", encoding)}
    assert {m.canary for m in matches} == {0}
    assert {m.feature for m in matches} <= {0, 2, 3, 4}  # only the continuous columns


def test_standardised_values_are_searched_too() -> None:
    standardised = np.array([[0.318274, np.nan, -1.204417]])
    payload = encode_arrays({"x": standardised.astype(np.float32)})

    matches = scan_payloads([("s", "update", payload)], np.full((1, 3), np.nan), standardised)

    assert {m.encoding for m in matches} == {"float32 standardised"}
    assert {m.feature for m in matches} == {0, 2}


def test_scan_ignores_common_values_and_digits_inside_longer_numbers() -> None:
    rows = np.array([[0.0, 1.0, -1.0, 120.0, 61.734829]])
    payloads = [("s", "update", encode_arrays({"w": np.array([0.0, 1.0, -1.0, 120.0])})),
                ("s", "metrics", b'{"auc": 161.7348291, "n": 61.73482}')]

    assert scan_payloads(payloads, rows) == []


def test_canary_audit_fails_when_a_site_sends_its_rows(
        federation: FederatedDataset, monkeypatch: pytest.MonkeyPatch) -> None:
    real = audit_module.run_experiment

    def leaky(planted: FederatedDataset, config: SimulationConfig, **kwargs: Any) -> Any:
        result = real(planted, config, **kwargs)
        site = planted.sites[1]
        rows = result.preprocessors[site.name].transform(site.x_train)
        kwargs["outbox"](site.name, "update", encode_arrays({"x": rows}))
        return result

    monkeypatch.setattr(audit_module, "run_experiment", leaky)
    report = canary_audit(federation, SimulationConfig.create(rounds=1), seed=3)

    assert not report.passed
    assert {(m.site, m.kind) for m in report.matches} == {("tier2_01", "update")}
    assert {m.encoding for m in report.matches} == {"float32 standardised"}
    assert len({m.canary for m in report.matches}) == 3  # that site's three canaries


def test_canary_audit_rejects_no_canaries(federation: FederatedDataset) -> None:
    with pytest.raises(ConfigurationError, match="'per_site' parameter must be >= 1; got 0"):
        canary_audit(federation, SimulationConfig.create(rounds=1), seed=0, per_site=0)


# --- Update inversion -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def record(federation: FederatedDataset) -> tuple[np.ndarray, float]:
    site = prepare_federation(federation)[0]
    return site.x_train[7].astype(np.float64), float(site.y_train[7])


def test_one_record_update_reveals_the_record_without_dp(
        record: tuple[np.ndarray, float]) -> None:
    x, y = record
    out = update_inversion(x, y, epsilon=None, seed=0)

    np.testing.assert_allclose(out["x_hat"], x, rtol=1e-4, atol=1e-5)
    assert out["relative_error"] < 1e-4


def test_dp_update_does_not_reveal_the_record(record: tuple[np.ndarray, float]) -> None:
    # One DP-SGD step at epsilon 1 (q = 1) adds noise of std sigma * C ~ 3.7 to every
    # coordinate, while the clipped gradient has norm <= C = 1 over all 9 coordinates:
    # delta_w / delta_b is a ratio of noise, not the record.
    # The noise comes from the OS's secret source, so one draw's error is random: ad hoc,
    # 400 draws gave a median of 1.42 and a 1st percentile of 0.66, and CI once drew 0.35.
    # The median of 25 draws is what the audit summarises, and it does not come near 0.5.
    x, y = record
    outs = [update_inversion(x, y, epsilon=1.0, delta=1e-5, seed=0) for _ in range(25)]

    assert all(out["noise_multiplier"] > 3 for out in outs)
    assert np.median([out["relative_error"] for out in outs]) > 0.5


def test_inversion_audit_summarises_errors_only(federation: FederatedDataset) -> None:
    out = update_inversion_audit(federation, epsilon=1.0, seed=0, n_records=8)

    assert out["n_records"] == 8
    assert out["no_dp"]["median_relative_error"] < 1e-4  # type: ignore[index]
    assert out["dp"]["median_relative_error"] > 0.5  # type: ignore[index]
    assert "x_hat" not in json.dumps(out)


@pytest.mark.parametrize(("kwargs", "fragment"), [
    ({"y": 2.0, "epsilon": None}, "The 'y' parameter must be 0 or 1; got 2.0"),
    ({"y": 1.0, "epsilon": -1.0, "delta": 1e-5}, "The 'epsilon' parameter must be finite and > 0"),
    ({"y": 1.0, "epsilon": 1.0}, "The 'delta' parameter must be in (0, 1); got None"),
])
def test_inversion_validates_its_parameters(kwargs: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigurationError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        update_inversion(np.ones(3) * 0.5, **kwargs)


# --- Membership inference -------------------------------------------------------------------

def test_membership_inference_with_and_without_dp() -> None:
    # Tiny sites and an over-trained MLP make the non-private model overfit, so the
    # loss-threshold attack sees a real gap; DP-SGD at epsilon 1 closes it.
    tiny = synthetic_federation(n_sites=3, seed=1, size_scale=0.05)
    config = SimulationConfig.create(model="mlp", rounds=3, local_epochs=20, optimizer="adam",
                                     lr=0.01, batch_size=16)

    no_dp, dp = membership_inference(tiny, config, epsilons=[None, 1.0], seed=0)

    assert no_dp["epsilon"] is None and dp["epsilon"] == 1.0
    for row in (no_dp, dp):
        assert 0.0 <= row["attack_auc"] <= 1.0  # type: ignore[operator]
        assert 0.0 <= row["attack_advantage"] <= 1.0  # type: ignore[operator]
        assert row["n_members"] == sum(s.n_train for s in tiny.sites)
    assert no_dp["attack_auc"] > 0.55  # type: ignore[operator]
    assert 0.4 <= dp["attack_auc"] <= 0.6  # type: ignore[operator]
    assert dp["attack_auc"] <= no_dp["attack_auc"] + 0.02  # type: ignore[operator]


def test_run_audit_rejects_a_bad_epsilon(federation: FederatedDataset) -> None:
    with pytest.raises(ConfigurationError, match="The 'epsilon' parameter must be finite"):
        run_audit(federation, SimulationConfig.create(rounds=1), epsilon=float("inf"))


# --- CLI ------------------------------------------------------------------------------------

def test_cli_audit_writes_json_and_markdown(tmp_path: Path) -> None:
    out = tmp_path / "audit.json"
    result = CliRunner().invoke(app, ["audit", "--dataset", "synthetic", "--sites", "3",
                                      "--rounds", "2", "--out", str(out)])

    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["canary"]["passed"] is True and report["canary"]["matches"] == []
    rows = report["membership_inference"]
    assert [(r["setting"], r["epsilon"]) for r in rows] == [
        ("as configured", None), ("as configured", 1.0), ("leaky control", None),
        ("leaky control", 1.0)]
    assert rows[2]["attack_auc"] > 0.55  # the control: the attack works where it can
    assert report["canary"]["control_detected"] is True
    assert report["update_inversion"]["dp"]["median_relative_error"] > 0.5
    markdown = out.with_suffix(".md").read_text()
    assert "Canary audit" in markdown and "Membership inference" in markdown
    assert "Update inversion" in result.output


@pytest.mark.parametrize(("args", "fragment"), [
    (["--dp-epsilon", "-1"], "the 'dp_epsilon' parameter must be greater than 0; got -1.0"),
    (["--rounds", "0"], "the 'rounds' parameter must be greater than or equal to 1; got 0"),
    (["--dataset", "mimic"], "got 'mimic'"),
])
def test_cli_audit_reports_invalid_settings(tmp_path: Path, args: list[str],
                                            fragment: str) -> None:
    result = CliRunner().invoke(app, ["audit", *args, "--out", str(tmp_path / "a.json")])

    assert result.exit_code == 2
    assert fragment in result.output
    assert not (tmp_path / "a.json").exists()
