"""Model versions: stored per study (safetensors), entered into the model registry of
:mod:`cardiofed.serving` from version 1, with the server optimiser's state; a new
aggregate is kept only if it is finite and plausible.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
from sqlalchemy import (
    select,
)
from sqlalchemy.orm import Session

from cardiofed.aggregation.robust import SiteAggregation
from cardiofed.aggregation.server_optimizers import ServerState
from cardiofed.coordinator.studies import non_private_sites
from cardiofed.exceptions import (
    Conflict,
    NotFound,
)
from cardiofed.models.kinds import Weights
from cardiofed.serving import provenance, registry
from cardiofed.simulation.config import SimulationConfig
from cardiofed.simulation.secure_evaluation import CARD_NOTE, POOLED_SECURE
from cardiofed.store import (
    ModelVersion,
    Round,
    Study,
    sha256,
)
from cardiofed.wire import decode_arrays, encode_arrays

log = logging.getLogger("cardiofed.coordinator")


def initial_weights(plan: SimulationConfig, feature_names: list[str]) -> Weights:
    form = plan.model_form(feature_names)
    n_columns = len(feature_names) if form is None else form.n_columns
    from cardiofed.models.networks import get_weights, make_model  # PyTorch: 1.5 s to import

    return get_weights(make_model(plan.model, n_columns, seed=plan.seed))


MAX_ABS_WEIGHT = 1e4  # a logistic or MLP weight on standardised features never gets near


def plausible_model(rnd: Round, study: Study, old: tuple[Weights, ServerState],
          new: tuple[Weights, ServerState],
          report: list[SiteAggregation]) -> tuple[Weights, ServerState]:
    """The new global model if it is finite and plausible; else the previous one, kept
    (the version still advances, so the study goes on), with the reason. Records what
    robust aggregation did to each update on the round."""
    rnd.aggregation = [r.to_dict() for r in report]
    worst = max(float(np.max(np.abs(v))) if v.size else 0.0 for v in new[0].values())
    if math.isfinite(worst) and worst <= MAX_ABS_WEIGHT:
        return new
    log.warning("study %s round %d: aggregate refused (largest |weight| %s); the previous "
                "model is kept", study.id, rnd.number, worst)
    rnd.aggregation = [*rnd.aggregation, {"refused": f"aggregate refused: largest |weight| "
                                                     f"{worst:.3g} exceeds {MAX_ABS_WEIGHT:g}; "
                                                     f"the previous model is kept"}]
    return old  # the model and the server optimiser's state before this aggregate


def store_model(db: Session, study: Study, weights: Weights, *, version: int,
                 round_number: int, participants: list[str]) -> None:
    """Store a global model version; versions >= 1 also enter the model registry."""
    blob = encode_arrays(weights, {"study": study.id, "model_version": str(version)})
    db.add(ModelVersion(study_id=study.id, version=version, weights=blob, sha256=sha256(blob),
                        round_number=round_number, participants=participants))
    db.flush()
    if version >= 1 and study.preprocessor is not None:
        model = provenance.from_study(
            study=study.id, plan=study.plan, feature_names=study.feature_names,
            outcome=study.outcome, preprocessor_blob=study.preprocessor, weights=weights,
            participants=participants, round_number=round_number)
        try:
            registry.register(db, model, number=version, commit=False)
        except Conflict as exc:  # never let the registry hold training up
            log.warning("study %s, version %d not registered: %s", study.id, version, exc)


def card_metrics(db: Session, study: Study, metrics: dict[str, Any]) -> None:
    """The sites' evaluation of the final model (and the epsilon each node reports it has
    spent) go into the registered model's card."""
    privacy = {site: {"epsilon_spent": float(m["epsilon_spent"]),
                      "delta": float(m.get("epsilon_delta") or 0.0)}
               for site, m in metrics.items() if m.get("epsilon_spent") is not None}
    cards = {site: {k: v for k, v in m.items() if not k.startswith("epsilon_")}
             for site, m in metrics.items()}
    cards = {site: m for site, m in cards.items() if m}  # a site may decline to publish
    exact = non_private_sites(db, study)
    version = f"{study.id}-v{study.model_version}"
    try:
        notes = [*registry.load(db, version).card.notes,
                 CARD_NOTE if POOLED_SECURE in metrics else
                 "Metrics are as each site reported them: the coordinator checks their names "
                 "and ranges, not their truth."]
        if exact:
            notes = [*notes, f"Not private: {', '.join(exact)} released exact statistics and "
                             f"updates (no differential privacy of their own)."]
        registry.update_card(db, version, metrics=cards, privacy=privacy, notes=notes)
    except NotFound as exc:  # e.g. a version published before the registry existed
        log.warning("study %s: final metrics not added to the model card: %s", study.id, exc)


def model_blob(db: Session, study_id: str, version: int) -> ModelVersion:
    model = db.scalar(select(ModelVersion).where(ModelVersion.study_id == study_id,
                                                 ModelVersion.version == version))
    if model is None:
        raise NotFound(f"Study {study_id!r} has no model version {version}.")
    return model


def load_model(db: Session, study: Study, version: int) -> Weights:
    return decode_arrays(model_blob(db, study.id, version).weights)[0]


def dump_state(state: ServerState) -> bytes:
    arrays = {f"m/{k}": v for k, v in state.m.items()} | {f"v/{k}": v for k, v in state.v.items()}
    return encode_arrays({k: np.asarray(v) for k, v in arrays.items()}, {"step": str(state.step)})


def load_state(study: Study, initial: ServerState) -> ServerState:
    if study.server_state is None:
        return initial
    arrays, meta = decode_arrays(study.server_state)
    return ServerState(step=int(meta["step"]),
                       m={k[2:]: v for k, v in arrays.items() if k.startswith("m/")},
                       v={k[2:]: v for k, v in arrays.items() if k.startswith("v/")})
