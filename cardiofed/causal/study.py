"""One attribution analysis over a federation's sites, as steps that only exchange sums.

Each step is what every site computes from its own rows (:func:`site_step`) and what the
coordinator makes of their sums (:func:`next_state`); the simulator
(:func:`run_attribution`) and the networked study run these same functions, so their
results are equal.

1. ``moments``: row count, sums of x and of x x' (standardisation; the caliper).
2. ``newton`` (repeated): the propensity model's gradient and information at the
   current coefficients (:mod:`cardiofed.causal.propensity`), until the step is tiny.
3. ``estimate``: overlap histograms by arm; balance sums before and after; each weighting
   estimator's weighted sums; matching's pairs' sums (within the site).
4. ``sandwich`` (weighting only): the stacked estimating equations' two matrices at the
   federation's means (:mod:`cardiofed.causal.estimators`).
Then the effects, balance and E-values. The state between steps is JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cardiofed._pydantic import validation_problems
from cardiofed.causal.estimators import (
    ArmSums,
    Effect,
    PairSums,
    WeightedSums,
    arm_sums,
    caliper_of,
    e_value,
    e_value_limit,
    match_within_site,
    matching_effect,
    pair_sums,
    sandwich_terms,
    weighted_sums,
    weighting_effect,
    weights,
)
from cardiofed.causal.propensity import (
    PropensityModel,
    Standardiser,
    newton_step,
    newton_terms,
)
from cardiofed.exceptions import ConfigurationError, DataValidationError

METHODS = ("iptw", "overlap", "matching")
STEPS = ("moments", "newton", "estimate", "sandwich", "done")
OVERLAP_BINS = 20
SMD_LIMIT = 0.1
Arrays = dict[str, np.ndarray]


class AttributionPlan(BaseModel):
    """What an attribution study estimates: the treatment, the covariates, the estimand
    and the estimators. In a networked study `treatment` and `covariates` are features
    of the schema (or of the study's own feature file) and the outcome is the mapping's."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    treatment: str = Field("treated", min_length=1)
    covariates: list[str] = Field(min_length=1)
    estimand: Literal["ATE", "ATT"] = "ATT"
    methods: list[Literal["iptw", "overlap", "matching"]] | None = Field(
        None, description="default: every estimator that fits the estimand")
    trim: float = Field(0.0, ge=0, lt=0.5, description="weighting leaves out scores below "
                                                       "trim or above 1 - trim")
    seed: int = Field(0, description="the matching order (not a private release)")

    @model_validator(mode="after")
    def _consistent(self) -> AttributionPlan:
        if self.methods is not None and not self.methods:
            raise ValueError("methods: name at least one of iptw, overlap, matching")
        if self.methods is not None and len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods: {self.methods} names one twice")
        if "matching" in self.chosen_methods and self.estimand != "ATT":
            raise ValueError("matching estimates the ATT (1:1 matches of the treated); use "
                             "estimand 'ATT' or leave matching out")
        if self.treatment in self.covariates:
            raise ValueError(f"the treatment {self.treatment!r} is also a covariate")
        return self

    @property
    def chosen_methods(self) -> list[str]:
        if self.methods is not None:
            return list(self.methods)
        return [m for m in METHODS if m != "matching" or self.estimand == "ATT"]

    @property
    def weighting(self) -> list[str]:
        return [m for m in self.chosen_methods if m != "matching"]

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> AttributionPlan:
        """Validated, or a ConfigurationError naming each bad parameter and its value."""
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            raise ConfigurationError(f"Invalid attribution plan: "
                                     f"{validation_problems(exc, 'plan', values=True)}."
                                     ) from None


@dataclass(frozen=True)
class SiteArrays:
    """One site's rows, as its node holds them: covariates, treatment, outcome."""

    name: str
    x: np.ndarray
    treated: np.ndarray
    outcome: np.ndarray

    def check(self, n_columns: int) -> None:
        if self.x.ndim != 2 or self.x.shape[1] != n_columns or not (
                len(self.x) == len(self.treated) == len(self.outcome)):
            raise DataValidationError(f"site {self.name!r}: covariates must have "
                                      f"{n_columns} columns and one row per treatment and "
                                      f"outcome")
        if not (np.isin(self.treated, (0, 1)).all() and np.isin(self.outcome, (0, 1)).all()):
            raise DataValidationError(f"site {self.name!r}: treatment and outcome must be 0/1")
        if not np.isfinite(self.x).all():
            raise DataValidationError(f"site {self.name!r}: covariates must be finite (leave "
                                      f"out or impute the rows missing one)")


@dataclass
class AttributionResult:
    estimand: str
    covariates: list[str]
    propensity: PropensityModel
    effects: dict[str, Effect]
    balance: dict[str, np.ndarray]  # "before" and each method -> SMD per covariate
    overlap: dict[str, np.ndarray]  # "treated", "control": score histogram counts
    trimmed: int
    sites: int
    notes: list[str] = field(default_factory=list)

    def e_values(self, method: str) -> tuple[float, float]:
        eff = self.effects[method]
        return e_value(eff.risk_ratio), e_value_limit(eff.rr_low, eff.rr_high)

    def to_dict(self) -> dict[str, Any]:
        return {"estimand": self.estimand, "sites": self.sites, "trimmed": self.trimmed,
                "covariates": self.covariates,
                "propensity_newton_steps": self.propensity.iterations,
                "propensity": {"coefficients": self.propensity.beta.tolist(),
                               "mean": self.propensity.standardiser.mean.tolist(),
                               "sd": self.propensity.standardiser.sd.tolist()},
                "effects": {m: {**e.to_dict(), "e_value": self.e_values(m)[0],
                                "e_value_ci": self.e_values(m)[1]}
                            for m, e in self.effects.items()},
                "balance": {k: dict(zip(self.covariates, v.tolist(), strict=True))
                            for k, v in self.balance.items()},
                "balanced": {k: bool(np.all(np.abs(v) < SMD_LIMIT))
                             for k, v in self.balance.items()},
                "overlap": {k: v.tolist() for k, v in self.overlap.items()},
                "notes": self.notes}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> AttributionResult:
        """The inverse of :meth:`to_dict` (a networked study's stored result)."""
        names = list(Effect.__dataclass_fields__)
        p = raw["propensity"]
        return cls(raw["estimand"], list(raw["covariates"]),
                   PropensityModel(Standardiser(np.asarray(p["mean"]), np.asarray(p["sd"])),
                                   np.asarray(p["coefficients"]),
                                   raw["propensity_newton_steps"]),
                   {m: Effect(**{k: e[k] for k in names}) for m, e in raw["effects"].items()},
                   {k: np.array([v[c] for c in raw["covariates"]])
                    for k, v in raw["balance"].items()},
                   {k: np.asarray(v) for k, v in raw["overlap"].items()},
                   raw["trimmed"], raw["sites"], list(raw["notes"]))


# ---------------------------------------------------------------- the steps

def start(plan: AttributionPlan, columns: list[str]) -> dict[str, Any]:
    """The state before the first step (`columns`: the covariates' model columns)."""
    return {"step": "moments", "inputs": {}, "columns": columns, "iterations": 0}


def _model(state: dict[str, Any]) -> PropensityModel:
    inputs = state["inputs"]
    return PropensityModel(Standardiser(np.asarray(inputs["mean"]), np.asarray(inputs["sd"])),
                           np.asarray(inputs["beta"]), state["iterations"])


def _arm_arrays(prefix: str, sums: ArmSums) -> Arrays:
    return {f"{prefix}.w": sums.w, f"{prefix}.wx": sums.wx, f"{prefix}.wx2": sums.wx2}


def _arms(totals: dict[str, Any], prefix: str) -> ArmSums:
    return ArmSums(*(np.asarray(totals[f"{prefix}.{k}"]) for k in ("w", "wx", "wx2")))


def _site_weights(plan: AttributionPlan, method: str, e: np.ndarray, t: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Each patient's weight and its derivative; zero for the trimmed."""
    keep = _kept(plan, e)
    w, dw = weights(e, t, "overlap" if method == "overlap" else "iptw", plan.estimand)
    return w * keep, dw * keep


def _kept(plan: AttributionPlan, e: np.ndarray) -> np.ndarray:
    out: np.ndarray = (e >= plan.trim) & (e <= 1 - plan.trim)
    return out


def site_step(plan: AttributionPlan, state: dict[str, Any], site: SiteArrays,
              site_index: int) -> Arrays:
    """What `site` sends for the state's step: sums over its rows, never a row."""
    step = state["step"]
    site.check(len(state["columns"]))
    x, t, y = site.x, site.treated, site.outcome
    if step == "moments":
        return {"n": np.array([float(len(x))]), "sum": x.sum(axis=0), "cross": x.T @ x}
    model = _model(state)
    z = model.standardiser.design(x)
    if step == "newton":
        grad, info, loglik = newton_terms(z, t, model.beta)
        return {"grad": grad, "info": info, "loglik": np.array([loglik])}
    e = model.score(x)
    out: Arrays = {}
    if step == "estimate":
        edges = np.linspace(0, 1, OVERLAP_BINS + 1)
        out["overlap.treated"] = np.histogram(e[t == 1], edges)[0].astype(float)
        out["overlap.control"] = np.histogram(e[t == 0], edges)[0].astype(float)
        keep = _kept(plan, e)
        out["kept"] = np.array([float(np.sum(keep & (t == 0))), float(np.sum(keep & (t == 1)))])
        out.update(_arm_arrays("before", arm_sums(x, t)))
        for method in plan.weighting:
            w, _ = _site_weights(plan, method, e, t)
            out[f"{method}.sums"] = np.array(weighted_sums(w, t, y).astuple())
            out.update(_arm_arrays(method, arm_sums(x, t, w)))
        if "matching" in plan.chosen_methods:
            rng = np.random.default_rng([plan.seed, 0x3A7C, site_index])
            pairs = match_within_site(model.logit(x), t, state["inputs"]["caliper"], rng)
            out["matching.pairs"] = np.array(list(pair_sums(y, t, pairs).__dict__.values()))
            rows = pairs.ravel()
            out.update(_arm_arrays("matching", arm_sums(x[rows], t[rows])))
        return out
    if step == "sandwich":
        for method in plan.weighting:
            w, dw = _site_weights(plan, method, e, t)
            a, b = sandwich_terms(z, t, y, e, w, dw, tuple(state["inputs"]["means"][method]))
            out[f"{method}.a"], out[f"{method}.b"] = a, b
        return out
    raise ConfigurationError(f"step must be one of {', '.join(STEPS[:-1])}; got {step!r}.")


def expected_arrays(plan: AttributionPlan, step: str, k: int) -> dict[str, tuple[int, ...]]:
    """The arrays (and shapes) a site sends for `step` with `k` covariate columns."""
    p = k + 1

    def arms(prefix: str) -> dict[str, tuple[int, ...]]:
        return {f"{prefix}.w": (2,), f"{prefix}.wx": (2, k), f"{prefix}.wx2": (2, k)}

    if step == "moments":
        return {"n": (1,), "sum": (k,), "cross": (k, k)}
    if step == "newton":
        return {"grad": (p,), "info": (p, p), "loglik": (1,)}
    if step == "estimate":
        out = {"overlap.treated": (OVERLAP_BINS,), "overlap.control": (OVERLAP_BINS,),
               "kept": (2,), **arms("before")}
        for method in plan.weighting:
            out.update({f"{method}.sums": (4,), **arms(method)})
        if "matching" in plan.chosen_methods:
            out.update({"matching.pairs": (len(PairSums.__dataclass_fields__),),
                        **arms("matching")})
        return out
    if step == "sandwich":
        return {f"{m}.{ab}": (p + 2, p + 2) for m in plan.weighting for ab in "ab"}
    raise ConfigurationError(f"No site sends anything in step {step!r}.")


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
        n, s1, cross = float(totals["n"][0]), totals["sum"], totals["cross"]
        if n < 2:
            raise DataValidationError(f"The sites hold {n:g} rows in all; an analysis "
                                      f"needs more.")
        standardiser = Standardiser.from_sums(n, s1, np.diag(cross))
        state["moments"] = {"n": n, "sum": s1.tolist(), "cross": cross.tolist()}
        state["inputs"] = {"mean": standardiser.mean.tolist(), "sd": standardiser.sd.tolist(),
                           "beta": [0.0] * (len(s1) + 1)}
        state["step"] = "newton"
    elif step == "newton":
        state["iterations"] += 1
        beta, converged = newton_step(np.asarray(state["inputs"]["beta"]), totals["grad"],
                                      totals["info"], state["iterations"])
        state["inputs"] = {**state["inputs"], "beta": beta.tolist()}
        state["loglik"] = float(totals["loglik"][0])
        if converged:
            moments = state["moments"]
            state["inputs"]["caliper"] = caliper_of(
                _model(state), moments["n"], np.asarray(moments["sum"]),
                np.asarray(moments["cross"]))
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


def _result(plan: AttributionPlan, state: dict[str, Any], sites: int) -> AttributionResult:
    est = state["estimate"]
    effects: dict[str, Effect] = {}
    balance = {"before": _arms(est, "before").smd()}
    kept = est["kept"]
    for method in plan.weighting:
        effects[method] = weighting_effect(
            WeightedSums(*est[f"{method}.sums"]), np.asarray(state["sandwich"][f"{method}.a"]),
            np.asarray(state["sandwich"][f"{method}.b"]), kept[1], kept[0])
        balance[method] = _arms(est, method).smd()
    notes = []
    if "matching" in plan.chosen_methods:
        pairs = PairSums(*est["matching.pairs"])
        try:
            effects["matching"] = matching_effect(pairs)
        except ValueError as exc:
            raise DataValidationError(str(exc)) from None
        balance["matching"] = _arms(est, "matching").smd()
        notes.append(f"matching: {pairs.pairs:g} pairs within a caliper of 0.2 SD of the "
                     f"propensity logit ({pairs.unmatched_treated:g} treated unmatched); "
                     f"its ATT is that of the matched treated")
    return AttributionResult(plan.estimand, state["columns"], _model(state),
                             {m: effects[m] for m in plan.chosen_methods}, balance,
                             {arm: np.asarray(est[f"overlap.{arm}"])
                              for arm in ("treated", "control")},
                             int(state["moments"]["n"] - sum(kept)), sites, notes)


# ---------------------------------------------------------------- in simulation

def run_attribution(sites: Sequence[SiteArrays], covariates: list[str], *,
                    estimand: str = "ATE", methods: Sequence[str] | None = None,
                    trim: float = 0.0, seed: int = 0) -> AttributionResult:
    """Every requested estimator over `sites`, step by step as a networked study runs.
    `trim`: leave out patients whose score is below `trim` or above ``1 - trim``
    (weighting only); `seed`: the matching order."""
    plan = AttributionPlan.parse({"covariates": covariates, "estimand": estimand,
                                  "methods": None if methods is None else list(methods),
                                  "trim": trim, "seed": seed})
    state = start(plan, covariates)
    while state["step"] != "done":
        totals: Arrays | None = None
        for index, site in enumerate(sites):
            totals = add(totals, site_step(plan, state, site, index))
        if totals is None:
            raise DataValidationError("An analysis needs at least one site.")
        state = next_state(plan, state, totals, len(sites))
    return AttributionResult.from_dict(state["result"])
