"""The per-site story: each model's AUC with its interval, by site and site type."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from cardiofed.data.synthetic import synthetic_federation
from cardiofed.experiments.clinical_value import ClinicalValue, clinical_value
from cardiofed.simulation.config import SimulationConfig
from cardiofed.simulation.experiment import (
    FEDERATED,
    LOCAL,
    POOLED,
    RECALIBRATED,
    TRUE_RISK,
    ExperimentResult,
    run_experiment,
)

Valued = tuple[ExperimentResult, ClinicalValue]


@pytest.fixture(scope="module")
def value() -> Valued:
    data = synthetic_federation(n_sites=4, seed=2, size_scale=0.5, eval_size=3000)
    result = run_experiment(data, SimulationConfig.create(rounds=3, recalibrate=True,
                                                          eval_every=0))
    return result, clinical_value(result)


def test_every_model_and_the_true_risks_are_compared_at_every_site(value: Valued) -> None:
    result, v = value
    assert v.models == [LOCAL, FEDERATED, RECALIBRATED, POOLED, TRUE_RISK]
    assert v.headline == RECALIBRATED
    for site, by_model in v.sites.items():
        for model, (auc, low, high) in by_model.items():
            assert auc == pytest.approx(roc_auc_score(*result.predictions[site][model]))
            assert low < auc < high


def test_a_site_type_pools_its_sites_patients(value: Valued) -> None:
    result, v = value
    members = [s for s, t in result.site_types.items() if t == "community"]
    y = np.concatenate([result.predictions[s][LOCAL][0] for s in members])
    p = np.concatenate([result.predictions[s][LOCAL][1] for s in members])
    assert v.types["community"][LOCAL][0] == pytest.approx(roc_auc_score(y, p))


def test_the_story_names_gains_verdicts_and_the_achievable(value: Valued) -> None:
    _, v = value
    lines = v.type_lines()
    assert len(lines) == len(v.types)
    community = next(line for line in lines if line.startswith("community"))
    assert "vs local-only" in community and "significantly better at" in community
    assert "of the AUC achievable at its sites" in community
    assert len(v.rows()) == len(v.sites) + len(v.types)
    assert len(v.compact_rows()[0]) == len(v.compact_header)
    assert v.to_markdown().count("\n|") >= len(v.sites)
    json.dumps(v.to_dict(), allow_nan=False)
