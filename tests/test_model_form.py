"""Model forms: log terms, treated/untreated blood pressure, sex interactions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cardiofed.data.dataset import FederatedDataset, feature_ranges_for
from cardiofed.data.model_form import model_form
from cardiofed.data.preprocessing import (
    bin_edges,
    local_preprocessor,
    merge_statistics,
    site_statistics,
)
from cardiofed.data.synthetic import SYNTHETIC_FEATURES, synthetic_federation
from cardiofed.exceptions import ConfigurationError
from cardiofed.schema import encoded_feature_names
from cardiofed.serving import provenance
from cardiofed.serving.model import RiskModel
from cardiofed.simulation.config import SimulationConfig
from cardiofed.simulation.experiment import FEDERATED, ExperimentResult, run_experiment

NAMES = encoded_feature_names(SYNTHETIC_FEATURES)
# age, sex=male, total_cholesterol, hdl_cholesterol, systolic_bp, bp_treated,
# current_smoker, diabetes
ROW = np.array([[61.0, 1.0, 210.0, 45.0, 150.0, 1.0, 0.0, 1.0],
                [45.0, 0.0, 180.0, 60.0, 120.0, 0.0, 1.0, 0.0]])


def test_raw_is_the_encoded_columns() -> None:
    assert model_form("raw", NAMES) is None


def test_unknown_form_names_the_parameter() -> None:
    with pytest.raises(ConfigurationError, match="'feature_transform'.*'cubic'"):
        model_form("cubic", NAMES)


def test_log_form_logs_the_schema_s_log_scale_features_and_splits_blood_pressure() -> None:
    form = model_form("log", NAMES)
    assert form is not None
    assert form.names == ["log(age)", "sex=male", "log(total_cholesterol)",
                          "log(hdl_cholesterol)", "log(systolic_bp)*bp_treated",
                          "log(systolic_bp)*(1-bp_treated)", "bp_treated", "current_smoker",
                          "diabetes"]
    terms = form.apply(ROW)
    # A product is centred on the log of the geometric midpoint of the range (60-300).
    c = np.log(np.sqrt(60 * 300))
    np.testing.assert_allclose(terms[0], [np.log(61), 1, np.log(210), np.log(45),
                                          np.log(150) - c, 0, 1, 0, 1])
    np.testing.assert_allclose(terms[1], [np.log(45), 0, np.log(180), np.log(60), 0,
                                          np.log(120) - c, 0, 1, 0])


def test_log_clips_into_the_plausible_range_first() -> None:
    """UCI's cholesterol 0 (a missing-value code) must not become -inf."""
    form = model_form("log", ["age", "total_cholesterol"])
    assert form is not None
    terms = form.apply(np.array([[50.0, 0.0], [50.0, 9999.0]]))
    np.testing.assert_allclose(terms[:, 1], np.log([70.0, 700.0]))


def test_clinical_form_adds_a_sex_interaction_of_every_other_term() -> None:
    form = model_form("clinical", NAMES)
    assert form is not None
    assert form.n_columns == 9 + 8
    assert "sex=male*sex=male" not in form.names
    terms = form.apply(ROW)
    names = form.names
    age_centre, sbp_centre = np.log(np.sqrt(18 * 110)), np.log(np.sqrt(60 * 300))
    assert terms[0, names.index("log(age)*sex=male")] == pytest.approx(np.log(61) - age_centre)
    assert terms[1, names.index("log(age)*sex=male")] == 0.0  # a woman
    assert terms[0, names.index("log(systolic_bp)*bp_treated*sex=male")] == pytest.approx(
        np.log(150) - sbp_centre)


def test_centring_keeps_the_model_and_removes_the_near_collinearity() -> None:
    """log(age) * male without centring is almost 4 * male; centred, it is not."""
    rng = np.random.default_rng(1)
    n = 5000
    x = np.column_stack([rng.uniform(30, 79, n), (rng.random(n) < 0.5).astype(float)])
    form = model_form("clinical", ["age", "sex=male"])
    assert form is not None
    terms = form.apply(x)
    male, interaction = terms[:, 1], terms[:, 2]
    assert abs(np.corrcoef(male, interaction)[0, 1]) < 0.5
    assert np.corrcoef(x[:, 1], np.log(x[:, 0]) * x[:, 1])[0, 1] > 0.99


def test_without_sex_or_treatment_the_form_keeps_single_terms() -> None:
    form = model_form("clinical", ["age", "systolic_bp"])
    assert form is not None
    assert form.names == ["log(age)", "log(systolic_bp)"]


def test_missing_values_stay_missing_until_the_preprocessor_fills_them() -> None:
    form = model_form("clinical", NAMES)
    assert form is not None
    row = ROW[:1].copy()
    row[0, 0] = np.nan
    terms = form.apply(row)
    assert np.isnan(terms[0, form.names.index("log(age)")])
    pre = local_preprocessor(ROW.repeat(5, axis=0), np.array(ROW[0]), form)
    assert np.isfinite(pre.transform(row)).all()


def test_every_term_belongs_to_one_feature() -> None:
    form = model_form("clinical", NAMES)
    assert form is not None
    groups = form.feature_groups(SYNTHETIC_FEATURES)
    assert sorted(k for g in groups for k in g) == list(range(form.n_columns))
    sbp = groups[SYNTHETIC_FEATURES.index("systolic_bp")]
    assert [form.names[k] for k in sbp] == [
        "log(systolic_bp)*bp_treated", "log(systolic_bp)*(1-bp_treated)",
        "log(systolic_bp)*bp_treated*sex=male", "log(systolic_bp)*(1-bp_treated)*sex=male"]


def test_moments_from_histograms_match_the_rows_when_factors_are_independent() -> None:
    """Standardisation from released histograms: exact to the bin width for a single
    term; for a product, exact when the indicator is independent of the value."""
    rng = np.random.default_rng(0)
    n = 50_000
    x = np.column_stack([rng.uniform(30, 80, n), (rng.random(n) < 0.4).astype(float),
                         rng.normal(200, 30, n).clip(100, 400)])
    names = ["age", "sex=male", "total_cholesterol"]
    form = model_form("clinical", names)
    assert form is not None
    edges = bin_edges(feature_ranges_for(names))
    pre = merge_statistics([site_statistics(x, edges)], edges, names, form)
    exact = form.apply(x)
    np.testing.assert_allclose(pre.mean, exact.mean(axis=0), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(pre.std, exact.std(axis=0), rtol=2e-2, atol=2e-3)
    z = pre.transform(x)
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=0.02)
    np.testing.assert_allclose(z.std(axis=0), 1.0, atol=0.03)


def test_a_preprocessor_must_fit_its_form() -> None:
    form = model_form("log", NAMES)
    assert form is not None
    with pytest.raises(ValueError, match="8 encoded and 9 model columns"):
        local_preprocessor(ROW, ROW[0], None).__class__(
            fill=ROW[0], mean=np.zeros(8), std=np.ones(8), form=form)


Trained = tuple[FederatedDataset, ExperimentResult]


@pytest.fixture(scope="module")
def clinical_result() -> Trained:
    data = synthetic_federation(n_sites=4, seed=1, size_scale=0.5)
    config = SimulationConfig.create(rounds=3, eval_every=0, feature_transform="clinical")
    return data, run_experiment(data, config, baselines=False)


def test_a_simulation_trains_on_the_form_s_columns(clinical_result: Trained) -> None:
    _, result = clinical_result
    assert result.federated.weights["linear.weight"].shape == (1, 17)
    assert result.metrics["tier3_01"][FEDERATED]["auc"] > 0.6


def test_the_risk_model_records_the_form_and_explains_exactly(clinical_result: Trained,
                                                              tmp_path: Path) -> None:
    data, result = clinical_result
    model = provenance.from_experiment(result, study="clin", feature_names=data.feature_names,
                                       outcome=data.outcome)
    assert model.card.feature_transform == "clinical"
    x = data.sites[0].x_test[:20]
    explained = model.explain(x)
    np.testing.assert_allclose(explained.baseline + explained.contributions.sum(axis=1),
                               explained.logit, atol=1e-9)
    np.testing.assert_allclose(explained.risk,
                               result.estimator(data.sites[0].name).predict_proba(x)[:, 1],
                               atol=1e-5)
    path, _ = model.save(tmp_path / "m.safetensors")
    again = RiskModel.load(path)
    assert again.card.feature_transform == "clinical"
    np.testing.assert_allclose(again.risk(x), model.risk(x))
    with pytest.raises(ConfigurationError, match="feature_transform"):
        model.with_card(feature_transform="log")
