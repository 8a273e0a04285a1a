"""The coordinator's side of an attribution analysis: the sites' arrays of a step summed
(in site order) and the next state, or the result once the last step is in; and
:func:`run_attribution`, the whole analysis in one process, step by step as a networked
study runs it (:mod:`cardiofed.causal.study` holds the plan and each site's step)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from cardiofed.causal.estimators import (
    Effect,
    PairSums,
    WeightedSums,
    caliper_of,
    matching_effect,
    weighting_effect,
)
from cardiofed.causal.propensity import Standardiser, newton_step
from cardiofed.causal.study import (
    PRIVATE_MAX_STEP,
    PRIVATE_MIN_SD,
    Arrays,
    AttributionPlan,
    AttributionResult,
    SiteArrays,
    propensity_model,
    release,
    sandwich_matrices,
    site_step,
    start,
    summed_arms,
)
from cardiofed.exceptions import ConfigurationError, DataValidationError

# (plan, the step's state, each site's exact arrays, noise multiplier) -> the step's totals
StepSum = Callable[[AttributionPlan, dict[str, Any], list[Arrays], float], Arrays]


def add(total: Arrays | None, arrays: Arrays) -> Arrays:
    """The running sum of the sites' arrays (in site order)."""
    if total is None:
        return {k: np.asarray(v, dtype=np.float64) for k, v in arrays.items()}
    return {k: total[k] + arrays[k] for k in total}


def next_state(plan: AttributionPlan, state: dict[str, Any], totals: Arrays,
               sites: int) -> dict[str, Any]:
    """The coordinator's move once every site's arrays of the step are summed."""
    state = dict(state)
    step = state["step"]
    if step == "moments":
        n, s1 = float(totals["n"][0]), totals["sum"]
        if n < 2:
            raise DataValidationError(f"The sites hold {n:g} rows in all; an analysis "
                                      f"needs more.")
        if plan.private:
            standardiser = _private_standardiser(n, s1, totals["sumsq"], state["ranges"])
        else:
            standardiser = Standardiser.from_sums(n, s1, np.diag(totals["cross"]))
            state["moments"] = {"n": n, "sum": s1.tolist(), "cross": totals["cross"].tolist()}
        state["inputs"] = {"mean": standardiser.mean.tolist(), "sd": standardiser.sd.tolist(),
                           "beta": [0.0] * (len(s1) + 1)}
        state["step"] = "newton"
    elif step == "newton":
        state["iterations"] += 1
        fixed = plan.fixed_steps
        before = np.asarray(state["inputs"]["beta"])
        beta, converged = newton_step(before, totals["grad"], totals["info"],
                                      0 if fixed else state["iterations"])
        if plan.private:  # a noisy step is damped to PRIVATE_MAX_STEP (post-processing);
            # one that overflowed keeps its direction, a NaN part moves nothing
            top = np.finfo(np.float64).max
            step = np.nan_to_num(beta - before, nan=0.0, posinf=top, neginf=-top)
            largest = float(np.max(np.abs(step)))
            if largest > PRIVATE_MAX_STEP:
                step = step * (PRIVATE_MAX_STEP / largest)
            beta = before + step
        state["inputs"] = {**state["inputs"], "beta": beta.tolist()}
        if "noise_var.grad" in totals:  # the last step's gradient noise stays in beta
            state["grad_noise_var"] = float(totals["noise_var.grad"][0])
        if fixed is not None:
            converged = state["iterations"] >= fixed
        if converged and "matching" in plan.chosen_methods:
            moments = state["moments"]
            state["inputs"]["caliper"] = caliper_of(
                propensity_model(state), moments["n"], np.asarray(moments["sum"]),
                np.asarray(moments["cross"]))
        if converged:
            state["step"] = "estimate"
    elif step == "estimate":
        state["estimate"] = {k: v.tolist() for k, v in totals.items()}
        means = {m: list(WeightedSums(*totals[f"{m}.sums"]).means()) for m in plan.weighting}
        state["inputs"] = {**state["inputs"], "means": means}
        state["step"] = "sandwich" if plan.weighting else "done"
    elif step == "sandwich":
        state["sandwich"] = {k: v.tolist() for k, v in totals.items()}
        state["step"] = "done"
    else:
        raise ConfigurationError(f"The analysis is {step!r}; nothing comes next.")
    if state["step"] == "done":
        state["result"] = _result(plan, state, sites).to_dict()
    return state


def _private_standardiser(n: float, s1: np.ndarray, s2: np.ndarray,
                          ranges: Sequence[Sequence[float]]) -> Standardiser:
    """From noisy moments of the rows scaled to [-1, 1]: the mean kept in range and the
    SD at least PRIVATE_MIN_SD of the half range."""
    low, high = np.array(ranges, dtype=float).T
    half = (high - low) / 2
    mean_u = np.clip(s1 / n, -1, 1)
    sd_u = np.sqrt(np.maximum(s2 / n - mean_u ** 2, PRIVATE_MIN_SD ** 2))
    return Standardiser((low + high) / 2 + half * mean_u, half * sd_u)


def _result(plan: AttributionPlan, state: dict[str, Any], sites: int) -> AttributionResult:
    est = state["estimate"]
    effects: dict[str, Effect] = {}
    balance = {"before": summed_arms(est, "before").smd()}
    kept = est["kept"]
    notes = []
    for method in plan.weighting:
        noise = None
        if plan.private:
            noise = (state.get("grad_noise_var", 0.0), est[f"noise_var.{method}.sums"][0])
        effects[method] = weighting_effect(
            WeightedSums(*est[f"{method}.sums"]),
            *sandwich_matrices(state["sandwich"], method), kept[1], kept[0], noise=noise)
        balance[method] = summed_arms(est, method).smd()
    if plan.private:
        notes.append("private: every site's sums carry Gaussian noise (none from a site "
                     "without a budget); the intervals add the noise's variance, the "
                     "balance and counts are noisy")
    if "matching" in plan.chosen_methods:
        pairs = PairSums(*est["matching.pairs"])
        try:
            effects["matching"] = matching_effect(pairs)
        except ValueError as exc:
            raise DataValidationError(str(exc)) from None
        balance["matching"] = summed_arms(est, "matching").smd()
        notes.append(f"matching: {pairs.pairs:g} pairs within a caliper of 0.2 SD of the "
                     f"propensity logit ({pairs.unmatched_treated:g} treated unmatched); "
                     f"its ATT is that of the matched treated")
    if plan.outcome == "continuous":  # a difference in means: no ratio, no E-value
        nan = math.nan
        effects = {m: replace(e, risk_ratio=nan, rr_low=nan, rr_high=nan)
                   for m, e in effects.items()}
        notes.append("continuous outcome: the effect is a difference in means (the "
                     "'risk' fields hold the arms' means); no ratio or E-value")
    return AttributionResult(plan.estimand, state["columns"], propensity_model(state),
                             {m: effects[m] for m in plan.chosen_methods}, balance,
                             {arm: np.asarray(est[f"overlap.{arm}"])
                              for arm in ("treated", "control")},
                             max(0, round(est["rows"][0] - sum(kept))), sites, notes)


def run_attribution(sites: Sequence[SiteArrays], covariates: list[str], *,
                    estimand: str = "ATE", methods: Sequence[str] | None = None,
                    trim: float = 0.0, seed: int = 0, private: bool = False,
                    epsilon: float | None = None, delta: float = 1e-5,
                    ranges: Sequence[Sequence[float]] | None = None,
                    outcome: str = "binary",
                    step_sum: StepSum | None = None) -> AttributionResult:
    """Every requested estimator over `sites`, step by step as a networked study runs.
    `trim`: leave out patients whose score is below `trim` or above ``1 - trim``
    (weighting only); `seed`: the matching order. `private` (implied by `epsilon`): the
    private schedule, rows clipped to `ranges` (default: the schema's for `covariates`);
    `epsilon`: every site spends it (at `delta`) on its releases, with noise from a
    secret source. `outcome` "continuous": the effect is a difference in means.
    `step_sum` (a private plan): how each step's exact site arrays become its totals,
    given the noise multiplier; by default each site's own release, summed (secure sums:
    :func:`cardiofed.simulation.secure_attribution.run_secure_attribution`)."""
    plan = AttributionPlan.parse({"covariates": covariates, "estimand": estimand,
                                  "methods": None if methods is None else list(methods),
                                  "trim": trim, "seed": seed,
                                  "private": private or epsilon is not None,
                                  "outcome": outcome})
    sigma, rng = 0.0, None
    if plan.private:
        if ranges is None:
            from cardiofed.data.dataset import feature_ranges_for

            ranges = feature_ranges_for(covariates)
        if epsilon is not None:
            from cardiofed.privacy.accountant import calibrate_noise
            from cardiofed.privacy.randomness import secure_numpy_rng

            sigma = calibrate_noise(target_epsilon=epsilon, delta=delta, sample_rate=1.0,
                                    steps=plan.releases)
            rng = secure_numpy_rng()
    state = start(plan, covariates, ranges)
    if not sites:
        raise DataValidationError("An analysis needs at least one site.")
    while state["step"] != "done":
        exact = [site_step(plan, state, site, index, ranges)
                 for index, site in enumerate(sites)]
        if step_sum is not None and plan.private:
            totals = step_sum(plan, state, exact, sigma)
        else:
            totals = None
            for arrays in exact:
                totals = add(totals, release(plan, state, arrays, sigma, rng)
                             if plan.private else arrays)
        assert totals is not None
        state = next_state(plan, state, totals, len(sites))
    return AttributionResult.from_dict(state["result"])
