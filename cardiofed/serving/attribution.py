"""A finished attribution study as the risk API and the dashboard answer it: the
estimates with intervals, balance, overlap and card, read from the store."""

from __future__ import annotations

from typing import Any

from cardiofed.causal.study import AttributionResult
from cardiofed.exceptions import Conflict, NotFound
from cardiofed.protocol.schemas import AttributionResponse
from cardiofed.simulation.config import SimulationConfig
from cardiofed.store import Study

ASSUMPTIONS = ("No unmeasured confounding given the covariates, positivity (every patient "
               "could have been treated or not: see the overlap) and a well-specified "
               "propensity model (see the balance).")
RELEASES = {False: "Each site released exact sums of its rows (no differential privacy).",
            True: "Private plan: each site with a privacy budget released its sums with "
                  "Gaussian noise, charged to its own ledger; a site without one, exact "
                  "sums. The intervals include the noise; counts and balance are noisy."}


def finished_analysis(study: Study, plan: object, kind: str) -> dict[str, Any]:
    """The study's analysis once it has a result: 404 unless `plan` (the study's plan of
    that `kind`) is set, 409 while it runs or when it stopped with an error."""
    a = study.analysis
    if plan is None or a is None:
        raise NotFound(f"Study {study.id!r} is not {kind} study.")
    if "error" in a:
        raise Conflict(f"The analysis of study {study.id!r} stopped: {a['error']}")
    if "result" not in a:
        raise Conflict(f"The analysis of study {study.id!r} is not finished (step "
                       f"{a['step']!r}, {a['iterations']} Newton steps so far); ask again "
                       f"when its status says finished.")
    return a


def report(study: Study) -> AttributionResponse:
    """A finished study's estimates with intervals, balance, overlap and card."""
    plan = SimulationConfig.model_validate(study.plan).attribution
    a = finished_analysis(study, plan, "an attribution")
    assert plan is not None
    result = a["result"]
    return AttributionResponse.model_validate({
        "study": study.id,
        "estimand": result["estimand"],
        "estimate": result["effects"],
        "balance": result["balance"], "balanced": result["balanced"],
        "overlap": {"bins": len(result["overlap"]["treated"]), **result["overlap"]},
        "propensity": result["propensity"],
        "card": {"treatment": plan.treatment, "outcome": study.outcome,
                 "covariates": plan.covariates, "columns": result["covariates"],
                 "methods": plan.chosen_methods, "trim": plan.trim, "sites": a["sites"],
                 "patients": max(0, round(a["estimate"]["rows"][0])),
                 "trimmed": result["trimmed"], "private": plan.private,
                 "releases": RELEASES[plan.private],
                 "propensity_newton_steps": result["propensity_newton_steps"],
                 "restarts": a.get("restarts", 0), "notes": result["notes"],
                 "assumptions": ASSUMPTIONS},
    })


def result_of(body: dict[str, Any]) -> AttributionResult:
    """The analysis of a :func:`report` body (as the API returns it), for
    :func:`cardiofed.causal.report.write_report`."""
    card = body["card"]
    return AttributionResult.from_dict({
        "estimand": body["estimand"], "covariates": card["columns"],
        "propensity": body["propensity"],
        "propensity_newton_steps": card["propensity_newton_steps"],
        "effects": body["estimate"], "balance": body["balance"],
        "overlap": {arm: body["overlap"][arm] for arm in ("treated", "control")},
        "trimmed": card["trimmed"], "sites": len(card["sites"]), "notes": card["notes"]})
