"""Analysis studies on the coordinator, whose rounds only exchange sums: attribution
(the steps of :mod:`cardiofed.causal.study`) and survival (the Newton rounds of
:mod:`cardiofed.survival.study`); a round's reports are summed in site order.

The analysis uses one set of sites throughout: those that reported its first round
(``moments``). A site outside it gets no task (a refusal row names why); if a site of
the set is missing from a later round that closes anyway (revoked, or the deadline
passed with ``min_sites`` reports), the analysis starts again from ``moments`` with the
sites that reported, and the round's outcome says so. An analysis that cannot go on
(no overlap, too few pairs) ends the study with the error in place of a result.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from cardiofed.causal import combine
from cardiofed.causal import study as causal_study
from cardiofed.causal.study import AttributionPlan
from cardiofed.coordinator import secure_sums
from cardiofed.coordinator.payloads import check_attribution
from cardiofed.exceptions import CardioFedError, InvalidUpdate
from cardiofed.schema import Catalogue, FeatureKind, encoded_feature_names
from cardiofed.store import Refusal, Round, Site, Study
from cardiofed.survival import study as survival_study
from cardiofed.survival.study import SurvivalPlan

Analysis = AttributionPlan | SurvivalPlan
# The round kinds of an analysis; "done" ends the study.
ANALYSIS_STEPS = (*causal_study.STEPS[:-1], *survival_study.STEPS[:-1])
PER_SITE_STEPS = survival_study.PER_SITE_STEPS  # reports kept per site, not summed


def columns_of(plan: Analysis, catalogue: Catalogue) -> list[str]:
    """The covariates' model columns, after checking the plan against the schema."""
    if isinstance(plan, AttributionPlan) and (
            plan.treatment not in catalogue.features
            or catalogue.feature(plan.treatment).kind is not FeatureKind.BINARY):
        binary = [f for f, v in catalogue.features.items() if v.kind is FeatureKind.BINARY]
        raise InvalidUpdate(f"attribution.treatment must be a binary feature of the schema "
                            f"or of the study's features ({', '.join(binary)}); got "
                            f"{plan.treatment!r}.")
    unknown = [c for c in plan.covariates if c not in catalogue.features]
    if unknown:
        raise InvalidUpdate(f"{_name(plan)}.covariates {unknown} are not features of the "
                            f"schema or of the study's features.")
    return encoded_feature_names(plan.covariates, catalogue)


def _name(plan: Analysis) -> str:
    return "attribution" if isinstance(plan, AttributionPlan) else "survival"


def begin(study: Study, plan: Analysis) -> str:
    """Set the study's analysis to its first step; returns the first round's kind."""
    study.analysis = _start(study, plan)
    study.phase = study.analysis["step"]
    return str(study.phase)


def _start(study: Study, plan: Analysis) -> dict[str, Any]:
    if isinstance(plan, SurvivalPlan):
        return survival_study.start(plan, study.feature_names, study.feature_ranges)
    return causal_study.start(plan, study.feature_names, study.feature_ranges)


def task_state(study: Study) -> dict[str, Any] | None:
    """What a site needs of the analysis for the current round: the step and its inputs."""
    if study.analysis is None:
        return None
    return {k: study.analysis[k] for k in ("step", "inputs", "columns", "iterations")}


def check_payload(plan: Analysis, study: Study, kind: str,
                  arrays: dict[str, np.ndarray]) -> int:
    k = len(study.feature_names)
    if isinstance(plan, SurvivalPlan):
        check_attribution(arrays, survival_study.expected_arrays(plan, kind, k))
        try:
            survival_study.check_sums(plan, kind, arrays)
        except CardioFedError as exc:
            raise InvalidUpdate(str(exc)) from None
        return 0
    return check_attribution(arrays, causal_study.expected_arrays(plan, kind, k))


def close_round(db: Session, study: Study, plan: Analysis, rnd: Round,
                names: list[str], totals: dict[str, np.ndarray] | None,
                now: datetime, *, reports: dict[str, dict[str, np.ndarray]] | None = None
                ) -> None:
    """Fold a closed round's sums (or, for a step kept per site, its `reports`) into the
    analysis and open the next round (or finish)."""
    state = dict(study.analysis or {})
    outcome = f"closed with {len(names)} reports"
    # the first step of a start fixes the analysis's sites
    first = rnd.kind in ("moments", "km") or (
        rnd.kind == "cox" and "kaplan_meier" not in state and state["newton"]["beta"] is None)
    if not first and names != state["sites"]:
        left = [n for n in state["sites"] if n not in names]
        state = {**_start(study, plan), "sites": names,
                 "restarts": state.get("restarts", 0) + 1}
        outcome = (f"analysis restarted from its first step without {', '.join(left)} "
                   f"(it uses one set of sites throughout)")
    else:
        if first:
            state["sites"] = names
        try:
            if isinstance(plan, SurvivalPlan) and rnd.kind in PER_SITE_STEPS:
                state = survival_study.with_site_reports(plan, state, reports or {})
            else:
                assert totals is not None
                state = (survival_study.next_state(plan, state, totals)
                         if isinstance(plan, SurvivalPlan)
                         else combine.next_state(plan, state, totals, len(names)))
        except CardioFedError as exc:
            state = {**state, "step": "done", "error": str(exc)}
            outcome = f"analysis stopped: {exc}"
    rnd.closed_at = now
    rnd.outcome = outcome[:200]
    study.analysis = state
    if state["step"] == "done":
        study.phase = "done"
        if isinstance(plan, SurvivalPlan) and "result" in state:
            _register_cox(db, study, rnd, state["result"].get("baselines_at_horizon"))
        return
    study.current_round += 1
    study.phase = state["step"]
    step, attempt = secure_sums.open_step(bool(study.plan.get("secure_aggregation")),
                                          state["step"])
    db.add(Round(study_id=study.id, number=study.current_round, kind=state["step"],
                 model_version=0, opened_at=now,
                 deadline=now + timedelta(seconds=study.round_timeout_s),
                 secure_step=step, secure_attempt=attempt))
    members = set(state["sites"])
    for site in db.scalars(select(Site).where(Site.study_id == study.id, ~Site.revoked)):
        if site.name not in members:
            db.add(Refusal(study_id=study.id, site_id=site.id, round_number=study.current_round,
                           reason=f"not in the analysis: a {_name(plan)} study uses the sites "
                                  f"of its first step throughout", created_at=now))


def summary(study: Study) -> dict[str, Any] | None:
    """The analysis's progress for the status (None for a model study)."""
    a = study.analysis
    if a is None:
        return None
    return {"kind": "survival" if "newton" in a else "attribution",
            "step": a["step"], "newton_steps": a["iterations"], "sites": a.get("sites"),
            "restarts": a.get("restarts", 0), "error": a.get("error"),
            "finished": "result" in a}


def _register_cox(db: Session, study: Study, rnd: Round,
                  by_site: dict[str, float] | None) -> None:
    """A finished survival study's model enters the model registry: one baseline as the
    study's version 1; stratified, one version per site with a baseline (its own), in the
    analysis's site order. What stops it is said in the round's outcome, never raised."""
    from cardiofed.serving import registry
    from cardiofed.serving.survival import study_model

    sites: list[str | None] = [None] if by_site is None else list(by_site)
    try:
        models = [study_model(study, site) for site in sites]
        for number, model in enumerate(models, start=1):
            registry.register(db, model, number=number, commit=False)
    except CardioFedError as exc:
        rnd.outcome = f"{rnd.outcome}; model not registered: {exc}"[:200]
