"""Model cards from where models are trained: a simulated experiment or a networked study."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from cardiofed.data.preprocessing import Preprocessor
from cardiofed.exceptions import ConfigurationError
from cardiofed.models.kinds import Weights
from cardiofed.serving.model import TERM, RiskModel, build_model
from cardiofed.simulation.config import SimulationConfig
from cardiofed.wire import decode_arrays

if TYPE_CHECKING:  # the simulator (PyTorch, scikit-learn): not the coordinator's import
    from cardiofed.simulation.experiment import ExperimentResult

OUTCOME_OF_DATASET = {"uci-heart": "heart_disease", "framingham": "chd_10y",
                      "synthetic": "cvd_10y"}


def from_experiment(result: ExperimentResult, *, study: str, feature_names: list[str],
                    outcome: str) -> RiskModel:
    """The federated model of a simulation, with its provenance and per-site metrics."""
    config = result.config
    if config.standardisation != "global":
        raise ConfigurationError("Only models trained with global standardisation can be "
                                 "registered: a per-site standardised model needs each "
                                 "site's own preprocessor to score.")
    pre = next(iter(result.preprocessors.values()))
    notes = ["Metrics are each site's test split in simulation."]
    if result.privacy:  # only what the sites' DP evaluation releases give may be published
        from cardiofed.simulation.secure_evaluation import CARD_NOTE

        metrics = {site: {k: _finite(v) for k, v in m.items()}
                   for site, m in result.released_metrics.items()}
        notes = [CARD_NOTE if config.secure_aggregation else
                 "Metrics are computed from each site's differentially private evaluation "
                 "release (noisy score histograms), with 95% intervals."]
    else:
        from cardiofed.simulation.experiment import FEDERATED

        metrics = {site: {k: _finite(v) for k, v in labels[FEDERATED].items()}
                   for site, labels in result.metrics.items() if FEDERATED in labels}
    privacy = {site: {k: v for k, v in p.items() if k.startswith("epsilon") or k == "delta"}
               for site, p in result.privacy.items()}
    names = pre.form.names if pre.form is not None else feature_names
    recal = {site: {"intercept": r.intercept, "slope": r.slope,
                    **{f"{TERM}{names[j]}": c for j, c in r.coefficients.items()}}
             for site, r in result.recalibrations.items() if r.fitted}
    return build_model(study=study, source="simulation", model=config.model,
                       algorithm=config.algorithm, settings=config.model_dump(),
                       rounds=result.federated.rounds,
                       sites=list(result.site_sizes), site_types=result.site_types,
                       # under DP the exact counts are never published
                       records=None if result.privacy else sum(result.site_sizes.values()),
                       encoded_names=feature_names, outcome=outcome,
                       weights=result.federated.weights, preprocessor=pre, metrics=metrics,
                       privacy=privacy, recalibration=recal, notes=notes,
                       study_features=config.study_features)


def from_study(*, study: str, plan: dict[str, Any], feature_names: list[str],
               outcome: str | None, preprocessor_blob: bytes, weights: Weights,
               participants: list[str], round_number: int) -> RiskModel:
    """A global model version of a networked study (metrics arrive with evaluation)."""
    config = SimulationConfig.model_validate(plan)
    pre = Preprocessor.from_arrays(decode_arrays(preprocessor_blob)[0],
                                   config.model_form(feature_names))
    return build_model(study=study, source="network", model=config.model,
                       algorithm=config.algorithm, settings=plan, rounds=round_number,
                       sites=participants, encoded_names=feature_names, outcome=outcome,
                       weights=weights, preprocessor=pre,
                       study_features=config.study_features)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
