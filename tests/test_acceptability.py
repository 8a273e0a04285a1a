"""Acceptability judged on intervals: three verdicts, significance-based comparisons,
the share of the achievable AUC."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cardiofed.evaluation.metrics import binary_metrics
from cardiofed.exceptions import ConfigurationError
from cardiofed.experiments.acceptability import (
    AcceptabilityCriteria,
    Verdict,
    acceptability_report,
    assess,
)


def _expit(x: np.ndarray | float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=float)))


def cohort(n: int, seed: int, *, slope: float = 1.0, shift: float = 0.0,
           signal: float = 1.2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Outcomes drawn from true risks; the model predicts logit (lp - shift) / slope, so its
    calibration slope is `slope` and its calibration-in-the-large about `shift`."""
    rng = np.random.default_rng(seed)
    lp = signal * rng.normal(size=n) - 1.5
    truth = _expit(lp)
    y = (rng.random(n) < truth).astype(np.int64)
    return y, _expit((lp - shift) / slope), truth


# --------------------------------------------------------------------------- criteria


@pytest.mark.parametrize(("settings", "name"), [
    ({"min_auc": 1.5}, "min_auc"),
    ({"min_auc": math.nan}, "min_auc"),
    ({"slope_range": (1.2, 0.8)}, "slope_range"),
    ({"slope_range": (0.8,)}, "slope_range"),
    ({"max_abs_citl": -0.1}, "max_abs_citl"),
    ({"threshold": 2.0}, "threshold"),
    ({"ci_level": 1.0}, "ci_level"),
    ({"ci_level": True}, "ci_level"),
])
def test_criteria_validation_names_parameter_and_value(settings: dict[str, object],
                                                       name: str) -> None:
    with pytest.raises(ConfigurationError, match=name):
        AcceptabilityCriteria(**settings)  # type: ignore[arg-type]


def test_criteria_defaults_describe_the_interval_rule() -> None:
    c = AcceptabilityCriteria(slope_range=[0.7, 1.3])  # type: ignore[arg-type]
    assert c.slope_range == (0.7, 1.3)
    assert "each judged on its 95% interval" in c.describe()


# --------------------------------------------------------------------------- verdicts


def test_a_large_well_calibrated_site_is_acceptable() -> None:
    y, p, _ = cohort(20_000, 0)
    a = assess(y, p)
    assert a.verdict is Verdict.ACCEPTABLE and a.acceptable and a.reasons == []
    assert a.point_acceptable
    low, high = a.auc_ci
    assert low < a.auc < high


def test_a_large_miscalibrated_site_is_not_acceptable_with_the_reason() -> None:
    y, p, _ = cohort(20_000, 1, slope=0.6)
    a = assess(y, p)
    assert a.verdict is Verdict.NOT_ACCEPTABLE
    slope = a.checks[1]
    assert slope.verdict is Verdict.NOT_ACCEPTABLE
    assert slope.value == pytest.approx(0.6, abs=0.05)
    assert a.reasons[0] == "calibration slope 0.597 [0.574, 0.619] outside [0.8, 1.2]"


def test_a_small_site_has_insufficient_evidence_where_the_interval_spans_the_limit() -> None:
    """100 patients with ~20 events: the slope's interval is about +-0.5 wide."""
    y, p, _ = cohort(100, 2)
    a = assess(y, p)
    assert a.checks[1].verdict is Verdict.INSUFFICIENT
    assert a.verdict is Verdict.INSUFFICIENT and not a.acceptable
    assert any("spans the limit of [0.8, 1.2]" in r for r in a.reasons)


def test_a_site_with_one_outcome_class_has_insufficient_evidence() -> None:
    a = assess(np.zeros(30), np.full(30, 0.1))
    assert a.verdict is Verdict.INSUFFICIENT
    assert "AUC not estimable" in a.reasons


def test_not_acceptable_wins_over_insufficient_evidence() -> None:
    y, p, _ = cohort(20_000, 3, shift=0.5)  # CITL about -0.5 with a tight interval
    a = assess(y, p, AcceptabilityCriteria(min_auc=0.95))
    assert a.checks[0].verdict is Verdict.NOT_ACCEPTABLE  # AUC well below 0.95
    assert a.verdict is Verdict.NOT_ACCEPTABLE


# --------------------------------------------------------------------------- the report


def federation() -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, str],
                          dict[str, tuple[np.ndarray, np.ndarray]]]:
    sites = {"a": cohort(5000, 10), "b": cohort(4000, 11), "c": cohort(150, 12, slope=0.62)}
    preds = {s: (y, p) for s, (y, p, _) in sites.items()}
    truth = {s: (y, t) for s, (y, _, t) in sites.items()}
    return preds, {"a": "tier3", "b": "tier3", "c": "community"}, truth


def test_report_pools_sites_of_each_type() -> None:
    preds, types, _ = federation()
    rep = acceptability_report(preds, types)
    assert list(rep.types) == ["tier3", "community"]
    assert rep.type_members == {"tier3": ["a", "b"], "community": ["c"]}
    pooled = binary_metrics(np.r_[preds["a"][0], preds["b"][0]],
                            np.r_[preds["a"][1], preds["b"][1]])
    for key, value in pooled.items():
        assert rep.types["tier3"].metrics[key] == pytest.approx(value, nan_ok=True)
    assert rep.types["community"].metrics == rep.sites["c"].metrics


def test_worse_or_better_only_when_the_paired_difference_is_significant() -> None:
    preds, types, _ = federation()
    rng = np.random.default_rng(0)
    ya, pa = preds["a"]
    yb, pb = preds["b"]
    yc, pc = preds["c"]
    local = {
        "a": (ya, np.clip(0.8 * ya + 0.1 + 0.01 * rng.random(ya.size), 0, 1)),  # knows y
        "b": (yb, np.clip(pb + rng.normal(0, 0.3, pb.size), 0, 1)),  # much noisier
        "c": (yc, np.clip(pc + rng.normal(0, 0.01, pc.size), 0, 1)),  # about the same
    }
    rep = acceptability_report(preds, types, local_only=local)
    a, b, c = (rep.comparisons[s] for s in "abc")
    assert a.status == "worse" and a.auc_b == pytest.approx(1.0)
    assert a.difference == pytest.approx(roc_auc_score(ya, pa) - 1.0)
    assert b.status == "better"
    assert c.status == "no significant difference" and not c.significant
    summary = rep.summary
    assert summary["no_site_worse_off"] is False
    assert (summary["n_worse_off"], summary["n_better"]) == (1, 1)


def test_local_only_must_be_scored_on_the_same_rows() -> None:
    preds, types, _ = federation()
    y, p = preds["c"]
    with pytest.raises(ConfigurationError, match="same rows"):
        acceptability_report(preds, types, local_only={"c": (1 - y, p)})


def test_no_site_worse_off_needs_every_site_compared() -> None:
    preds, types, _ = federation()
    assert acceptability_report(preds, types).summary["no_site_worse_off"] is None
    partial = acceptability_report(preds, types, local_only={"b": preds["b"]})
    assert partial.summary["no_site_worse_off"] is None
    full = acceptability_report(preds, types, local_only=preds)
    assert full.summary["no_site_worse_off"] is True


def test_share_of_the_achievable_auc_and_case_mix_limits() -> None:
    preds, types, truth = federation()
    rep = acceptability_report(preds, types, achievable=truth)
    for s in preds:
        assert rep.share_of_achievable(s) == pytest.approx(
            roc_auc_score(*preds[s]) / roc_auc_score(*truth[s]))
    # The model is a monotone transform of the truth at "a": all of the achievable.
    assert rep.share_of_achievable("a") == pytest.approx(1.0)
    strict = acceptability_report(preds, types, achievable=truth,
                                  criteria=AcceptabilityCriteria(min_auc=0.99))
    assert strict.summary["limited_by_case_mix"] == ["a", "b", "c"]
    # c's 150 patients: even their true risks reach AUC 0.693 < 0.70.
    assert rep.summary["limited_by_case_mix"] == ["c"]


def test_report_outputs_rows_dict_html_markdown() -> None:
    preds, types, truth = federation()
    preds["<b>&x|y"] = preds.pop("c")
    truth["<b>&x|y"] = truth.pop("c")
    types["<b>&x|y"] = "community"
    rep = acceptability_report(preds, types, local_only={"a": preds["a"]}, achievable=truth)
    rows = rep.rows()
    assert [(r["level"], r["name"]) for r in rows] == [
        ("site", "a"), ("site", "b"), ("site", "<b>&x|y"), ("type", "tier3"),
        ("type", "community")]
    assert rows[0]["vs_local"] == "no significant difference" and rows[1]["vs_local"] == ""
    assert rows[0]["verdict"] == "acceptable"
    json.dumps(rep.to_dict(), allow_nan=False)  # JSON-ready, nan -> None

    page = rep.to_html()
    assert "<b>&x|y" not in page and "&lt;b&gt;&amp;x|y" in page
    assert page.count('class="ok"') == sum(r["verdict"] == "acceptable" for r in rows)
    assert page.startswith('<section class="acceptability">')

    md = rep.to_markdown()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(rows)
    assert "<b>&x\\|y" in md  # pipe escaped, table intact
    assert all(line.count("|") - line.count("\\|") == table[0].count("|") for line in table)
    assert "sites acceptable" in md and "of 0.7" in md  # share of the achievable AUC


def test_report_validation() -> None:
    preds, types, _ = federation()
    with pytest.raises(ConfigurationError, match="site_types"):
        acceptability_report(preds, {"a": "tier3"})
    with pytest.raises(ConfigurationError, match="at least one site"):
        acceptability_report({}, types)
