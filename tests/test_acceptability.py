"""Tests for cardiofed.evaluation.acceptability."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cardiofed.evaluation.acceptability import (
    AcceptabilityCriteria,
    LocalComparison,
    _weighted_auc,
    acceptability_report,
    assess,
    auc_confidence_interval,
)
from cardiofed.evaluation.metrics import binary_metrics
from cardiofed.exceptions import ConfigurationError

FAST = AcceptabilityCriteria(n_bootstrap=100)


def _expit(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def two_groups(slope: float = 1.0, shift: float = 0.0, n: int = 100) -> tuple[np.ndarray,
                                                                               np.ndarray]:
    """Two risk groups of `n` each with observed event rates 0.75 and 0.25.

    Predicted logits are +-logit(0.75) / slope + shift, so the (saturated) calibration fits
    are exact: calibration slope = `slope`, calibration-in-the-large = -`shift`. AUC by
    hand: (75*75 + 0.5 * 2 * 75*25) / (100*100) = 0.75.
    """
    half = math.log(3.0) / slope  # logit(0.75) = log 3
    hi, lo = _expit(half + shift), _expit(-half + shift)
    k = round(0.75 * n)
    y = np.r_[np.ones(k), np.zeros(n - k), np.ones(n - k), np.zeros(k)]
    p = np.r_[np.full(n, hi), np.full(n, lo)]
    return y, p


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    p = 1.0 / (1.0 + np.exp(-(x - 1.0)))
    return (rng.random(n) < p).astype(np.int64), p


# --------------------------------------------------------------------------- criteria


@pytest.mark.parametrize(("settings", "name"), [
    ({"min_auc": 1.5}, "min_auc"),
    ({"min_auc": math.nan}, "min_auc"),
    ({"slope_range": (1.2, 0.8)}, "slope_range"),
    ({"slope_range": (0.8,)}, "slope_range"),
    ({"max_abs_citl": -0.1}, "max_abs_citl"),
    ({"threshold": 2}, "threshold"),
    ({"n_bootstrap": -1}, "n_bootstrap"),
    ({"n_bootstrap": True}, "n_bootstrap"),
    ({"n_bootstrap": 10.0}, "n_bootstrap"),
    ({"ci_level": 1.0}, "ci_level"),
])
def test_criteria_validation_names_parameter_and_value(settings: dict[str, object],
                                                       name: str) -> None:
    with pytest.raises(ConfigurationError, match=name) as info:
        AcceptabilityCriteria(**settings)  # type: ignore[arg-type]
    assert repr(next(iter(settings.values()))) in str(info.value)


def test_criteria_defaults_and_list_slope_range() -> None:
    c = AcceptabilityCriteria()
    assert (c.min_auc, c.slope_range, c.max_abs_citl, c.threshold, c.n_bootstrap,
            c.ci_level) == (0.70, (0.8, 1.2), 0.1, 0.5, 500, 0.95)
    assert AcceptabilityCriteria(slope_range=[0.9, 1.1]).slope_range == (0.9, 1.1)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- verdicts


def test_constructed_two_group_metrics_are_exact() -> None:
    y, p = two_groups(slope=0.62)
    m = binary_metrics(y, p)
    assert m["auc"] == pytest.approx(0.75)
    assert m["calibration_slope"] == pytest.approx(0.62, abs=1e-8)
    assert m["calibration_intercept"] == pytest.approx(0.0, abs=1e-8)


def test_slope_062_fails_with_exact_reason() -> None:
    a = assess(*two_groups(slope=0.62), FAST, rng=np.random.default_rng(0))
    assert a.auc_ok and a.citl_ok
    assert not a.slope_ok
    assert not a.acceptable
    assert a.reasons == ["calibration slope 0.62 outside [0.8, 1.2]"]


def test_citl_and_auc_failures_with_reasons() -> None:
    # Shifting every logit by +0.3 makes calibration-in-the-large exactly -0.3.
    a = assess(*two_groups(shift=0.3), AcceptabilityCriteria(min_auc=0.8, n_bootstrap=0),
               rng=np.random.default_rng(0))
    assert (a.auc_ok, a.slope_ok, a.citl_ok, a.acceptable) == (False, True, False, False)
    assert a.reasons == ["AUC 0.75 below minimum 0.8",
                         "calibration-in-the-large -0.30 outside [-0.1, 0.1]"]
    assert a.auc_ci == (pytest.approx(math.nan, nan_ok=True),) * 2  # n_bootstrap=0


def test_well_calibrated_passes() -> None:
    a = assess(*two_groups(), FAST, rng=np.random.default_rng(0))
    assert a.acceptable and a.reasons == []


def test_reason_shows_enough_digits_near_a_bound() -> None:
    # A slope of 0.799 must not read "0.80 outside [0.8, 1.2]".
    a = assess(*two_groups(slope=0.799), FAST, rng=np.random.default_rng(0))
    assert a.reasons == ["calibration slope 0.799 outside [0.8, 1.2]"]


def test_nan_metrics_are_not_ok() -> None:
    y = np.zeros(20)
    p = np.linspace(0.1, 0.4, 20)
    a = assess(y, p, FAST, rng=np.random.default_rng(0))
    assert not (a.auc_ok or a.slope_ok or a.citl_ok or a.acceptable)
    assert "AUC not estimable (one outcome class)" in a.reasons
    assert "calibration slope not estimable" in a.reasons
    assert all(math.isnan(v) for v in a.auc_ci)


def test_threshold_reaches_sensitivity() -> None:
    y, p = two_groups()
    lo = assess(y, p, AcceptabilityCriteria(threshold=0.0, n_bootstrap=0),
                rng=np.random.default_rng(0))
    assert lo.metrics["sensitivity"] == 1.0 and lo.metrics["specificity"] == 0.0


# --------------------------------------------------------------------------- bootstrap


def test_weighted_auc_matches_sklearn_with_ties_and_multiplicities() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200).astype(np.float64)
    p = np.round(rng.random(200), 1)  # many ties
    order = np.argsort(p, kind="stable")
    sp = p[order]
    starts = np.flatnonzero(np.r_[True, sp[1:] != sp[:-1]])
    idx = rng.integers(0, 200, 200)
    weights = np.vstack([np.ones(200), np.bincount(idx, minlength=200)]).astype(np.float64)
    got = _weighted_auc(order, starts, y[order] == 1.0, weights)
    assert got[0] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert got[1] == pytest.approx(roc_auc_score(y[idx], p[idx]), abs=1e-12)


def test_ci_contains_point_auc_and_narrows_with_more_data() -> None:
    widths = []
    for n in (150, 3000):
        y, p = synthetic(n, seed=n)
        low, high = auc_confidence_interval(y, p, n_bootstrap=300, level=0.95,
                                            rng=np.random.default_rng(0))
        assert low < roc_auc_score(y, p) < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2


def test_ci_wider_at_higher_level() -> None:
    y, p = synthetic(300, seed=1)
    w = [np.subtract(*auc_confidence_interval(y, p, n_bootstrap=300, level=lv,
                                              rng=np.random.default_rng(0)))
         for lv in (0.5, 0.95)]
    assert -w[1] > -w[0] > 0


def test_ci_deterministic_by_rng_seed() -> None:
    y, p = synthetic(200, seed=2)

    def ci(seed: int) -> tuple[float, float]:
        return auc_confidence_interval(y, p, n_bootstrap=200, level=0.9,
                                       rng=np.random.default_rng(seed))

    assert ci(5) == ci(5)
    assert ci(5) != ci(6)


def test_ci_skips_one_class_resamples_and_nan_when_impossible() -> None:
    # One positive in 30: many resamples miss it and are skipped, the rest still count.
    y = np.r_[1, np.zeros(29)]
    p = np.linspace(0.9, 0.0, 30)
    low, high = auc_confidence_interval(y, p, n_bootstrap=200, level=0.9,
                                        rng=np.random.default_rng(0))
    assert low == pytest.approx(1.0) and high == pytest.approx(1.0)
    nan_ci = auc_confidence_interval(np.zeros(5), np.full(5, 0.2), n_bootstrap=50, level=0.9,
                                     rng=np.random.default_rng(0))
    assert all(math.isnan(v) for v in nan_ci)
    with pytest.raises(ConfigurationError, match="level"):
        auc_confidence_interval(y, p, n_bootstrap=10, level=1.5, rng=np.random.default_rng(0))


# --------------------------------------------------------------------------- the report


def federation() -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, str]]:
    preds = {"a": synthetic(200, 10), "b": synthetic(150, 11), "c": two_groups(slope=0.62)}
    return preds, {"a": "tier3", "b": "tier3", "c": "community"}


def test_report_pools_sites_of_each_type() -> None:
    preds, types = federation()
    rep = acceptability_report(preds, types, criteria=FAST, seed=0)
    assert list(rep.types) == ["tier3", "community"]
    assert rep.type_members == {"tier3": ["a", "b"], "community": ["c"]}
    tier3 = rep.types["tier3"]
    pooled = binary_metrics(np.r_[preds["a"][0], preds["b"][0]],
                            np.r_[preds["a"][1], preds["b"][1]])
    assert tier3.n == 350
    for key, value in pooled.items():
        assert tier3.metrics[key] == pytest.approx(value, nan_ok=True)
    assert rep.types["community"].metrics == rep.sites["c"].metrics


def test_report_deterministic_by_seed() -> None:
    preds, types = federation()
    one = acceptability_report(preds, types, criteria=FAST, seed=3).to_dict()
    two = acceptability_report(preds, types, criteria=FAST, seed=3).to_dict()
    other = acceptability_report(preds, types, criteria=FAST, seed=4).to_dict()
    assert one == two
    assert one["sites"]["a"]["auc_ci"] != other["sites"]["a"]["auc_ci"]
    # A site's interval does not depend on which other sites are in the report.
    alone = acceptability_report({"a": preds["a"]}, types, criteria=FAST, seed=3).to_dict()
    assert alone["sites"]["a"]["auc_ci"] == one["sites"]["a"]["auc_ci"]


def test_worse_off_check_and_summary() -> None:
    preds, types = federation()
    ya, pa = preds["a"]
    yb, pb = preds["b"]
    rng = np.random.default_rng(0)
    local = {
        # Local-only at "a" knows the outcome almost perfectly: federated is worse there.
        "a": (ya, np.clip(0.8 * ya + 0.1 + 0.01 * rng.random(ya.size), 0, 1)),
        "b": (yb, pb.copy()),  # identical predictions: a tie
        "c": (preds["c"][0], np.full(preds["c"][0].size, 0.5)),  # uninformative: better
    }
    rep = acceptability_report(preds, types, criteria=FAST, seed=0, local_only=local)
    a, b, c = rep.comparisons["a"], rep.comparisons["b"], rep.comparisons["c"]
    assert a.status == "worse" and a.not_worse is False
    assert a.local_auc == pytest.approx(1.0)
    assert a.difference == pytest.approx(roc_auc_score(ya, pa) - 1.0)
    assert b.status == "tie" and b.not_worse is True and b.difference == 0.0
    assert c.status == "better" and c.difference == pytest.approx(0.25)
    summary = rep.summary
    assert summary["no_site_worse_off"] is False
    assert summary["n_worse_off"] == 1
    aucs = {s: roc_auc_score(*preds[s]) for s in preds}
    assert summary["worst_site"] == min(aucs, key=aucs.__getitem__)
    assert summary["worst_site_auc"] == pytest.approx(min(aucs.values()))
    assert summary["auc_spread"] == pytest.approx(max(aucs.values()) - min(aucs.values()))
    assert summary["n_acceptable"] == sum(s.acceptable for s in rep.sites.values())

    # With a tolerance that covers the gap, "a" is no longer worse off.
    tolerant = acceptability_report(preds, types, criteria=FAST, seed=0, local_only=local,
                                    tolerance=0.5)
    assert tolerant.comparisons["a"].status == "within tolerance"
    assert tolerant.summary["no_site_worse_off"] is True


def test_worse_off_undetermined_without_local_models() -> None:
    preds, types = federation()
    rep = acceptability_report(preds, types, criteria=FAST, seed=0)
    assert rep.comparisons == {} and rep.summary["no_site_worse_off"] is None
    partial = acceptability_report(preds, types, criteria=FAST, seed=0,
                                   local_only={"b": preds["b"]})
    assert partial.summary["no_site_worse_off"] is None  # "a" and "c" were not compared


def test_local_comparison_nan() -> None:
    c = LocalComparison.of(0.7, math.nan, 0.0)
    assert c.status == "not estimable" and c.not_worse is None


def test_report_outputs_rows_dict_html_markdown() -> None:
    preds, types = federation()
    preds["<b>&x|y"] = preds.pop("c")
    types["<b>&x|y"] = "community"
    rep = acceptability_report(preds, types, criteria=FAST, seed=0,
                               local_only={"a": preds["a"]})
    rows = rep.rows()
    assert [(r["level"], r["name"]) for r in rows] == [
        ("site", "a"), ("site", "b"), ("site", "<b>&x|y"), ("type", "tier3"),
        ("type", "community")]
    assert rows[0]["vs_local"] == "tie" and rows[1]["vs_local"] == ""
    bad = rows[2]
    assert bad["acceptable"] is False
    assert bad["reasons"] == "calibration slope 0.62 outside [0.8, 1.2]"

    json.dumps(rep.to_dict(), allow_nan=False)  # JSON-ready, nan -> None

    page = rep.to_html()
    assert "<b>&x|y" not in page and "&lt;b&gt;&amp;x|y" in page
    assert page.count("not acceptable") == sum(not r["acceptable"] for r in rows)
    assert page.count("\u2713 acceptable") == sum(r["acceptable"] for r in rows)
    assert page.startswith('<section class="acceptability">')

    md = rep.to_markdown()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert len(table) == 2 + len(rows)
    assert "<b>&x\\|y" in md  # pipe escaped, table intact
    assert all(line.count("|") - line.count("\\|") == table[0].count("|") for line in table)
    assert "sites acceptable" in md


def test_report_validation() -> None:
    preds, types = federation()
    with pytest.raises(ConfigurationError, match="site_types"):
        acceptability_report(preds, {"a": "tier3"}, criteria=FAST)
    with pytest.raises(ConfigurationError, match="tolerance"):
        acceptability_report(preds, types, criteria=FAST, tolerance=-1.0)
    with pytest.raises(ConfigurationError, match="seed"):
        acceptability_report(preds, types, criteria=FAST, seed=-1)
