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

import math
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
    arm_sums,
    e_value,
    e_value_limit,
    match_within_site,
    pair_sums,
    sandwich_terms,
    weighted_sums,
    weights,
)
from cardiofed.causal.propensity import (
    MAX_NEWTON,
    PropensityModel,
    Standardiser,
    newton_terms,
    sigmoid,
)
from cardiofed.exceptions import ConfigurationError, DataValidationError

METHODS = ("iptw", "overlap", "matching")
# A private analysis (AttributionPlan.private): every row clipped to the schema's ranges;
# noisy moments of the covariates (scaled to [-1, 1] by those ranges) set the
# standardiser; each row's standardised covariates clipped to an L2 norm of
# PRIVATE_Z_NORM * sqrt(k) (a winsorisation of outlying patients, which bounds every
# row's part in every sum); a fixed number of Newton steps; weighting only (iptw with
# trim > 0). Each of these releases is one Gaussian mechanism at the site.
PRIVATE_NEWTON_STEPS = 6
PRIVATE_Z_NORM = 2.0
PRIVATE_MIN_SD = 0.05  # of the half range: the floor of a noisy standard deviation
# The most one private Newton step moves any coefficient (standardised covariates): noise
# can leave the summed information near-singular, and one such step once sent the
# coefficients into the hundreds, past what the nodes accept, and the study stopped.
PRIVATE_MAX_STEP = 1.0
# The weighted sums (the effect's numerators and denominators) and the means' parts of
# the sandwich get this many times the share of each other block of their step.
PRIVATE_PRIORITY = 4.0
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
    private: bool = Field(False, description="a schedule sites with a privacy budget can "
                                             "take part in (see PRIVATE_SCHEDULE)")
    newton_steps: int | None = Field(None, ge=1, le=MAX_NEWTON, description=(
        "a fixed number of Newton steps (default: until converged; private: 8)"))
    outcome: Literal["binary", "continuous"] = Field("binary", description=(
        "binary: a risk difference and ratio; continuous: a difference in means"))

    @model_validator(mode="after")
    def _consistent(self) -> AttributionPlan:
        if self.private and self.outcome == "continuous":
            raise ValueError("a private analysis of a continuous outcome is not available "
                             "(its sums need declared bounds on the outcome); use "
                             "private = false")
        if self.private and "matching" in (self.methods or []):
            raise ValueError("matching cannot be private (one patient can change every "
                             "later match); use iptw or overlap")
        if self.private and "iptw" in self.chosen_methods and self.trim <= 0:
            raise ValueError("a private analysis with iptw needs trim > 0 (the weights "
                             "must be bounded); e.g. trim = 0.02, or use overlap only")
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
        return [m for m in METHODS if m != "matching" or (self.estimand == "ATT"
                                                            and not self.private)]

    @property
    def fixed_steps(self) -> int | None:
        """The number of Newton steps when it is fixed in advance."""
        return self.newton_steps or (PRIVATE_NEWTON_STEPS if self.private else None)

    @property
    def releases(self) -> int:
        """The Gaussian releases a site makes in a private analysis (moments, Newton,
        estimate, sandwich)."""
        return (self.fixed_steps or MAX_NEWTON) + 3

    def release_shapes(self, state: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        """The sums a site computes for the analysis step in `state` (before noise)."""
        return {name: shape for name, shape in expected_arrays(
            self, state["step"], len(state["columns"])).items()
                if not name.startswith("noise_var.")}

    def add_noise(self, state: dict[str, Any], arrays: Arrays, noise_multiplier: float,
                  rng: np.random.Generator) -> Arrays:
        """The step's sums as released (:func:`release`): the privacy package's
        :class:`~cardiofed.privacy.site_privacy.PrivateAnalysis` interface."""
        return release(self, state, arrays, noise_multiplier, rng)

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

    def check(self, n_columns: int, continuous: bool = False) -> None:
        if self.x.ndim != 2 or self.x.shape[1] != n_columns or not (
                len(self.x) == len(self.treated) == len(self.outcome)):
            raise DataValidationError(f"site {self.name!r}: covariates must have "
                                      f"{n_columns} columns and one row per treatment and "
                                      f"outcome")
        if not np.isin(self.treated, (0, 1)).all():
            raise DataValidationError(f"site {self.name!r}: treatment must be 0/1")
        if continuous:
            if not np.isfinite(np.asarray(self.outcome, dtype=float)).all():
                raise DataValidationError(f"site {self.name!r}: a continuous outcome must "
                                          f"be finite (leave out or impute the rows "
                                          f"missing it)")
        elif not np.isin(self.outcome, (0, 1)).all():
            raise DataValidationError(f"site {self.name!r}: the outcome must be 0/1 (or "
                                      f"declare the plan's outcome 'continuous')")
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

def start(plan: AttributionPlan, columns: list[str],
          ranges: Sequence[Sequence[float]] | None = None) -> dict[str, Any]:
    """The state before the first step (`columns`: the covariates' model columns;
    `ranges`: their schema ranges, which a private analysis clips to)."""
    state: dict[str, Any] = {"step": "moments", "inputs": {}, "columns": columns,
                             "iterations": 0}
    if plan.private:
        if ranges is None or len(ranges) != len(columns):
            raise ConfigurationError("A private analysis needs the schema's range of every "
                                     "covariate column.")
        state["ranges"] = [list(map(float, r)) for r in ranges]
    return state


def _scaled(x: np.ndarray, ranges: Sequence[Sequence[float]]) -> np.ndarray:
    """Rows clipped to `ranges`, scaled to [-1, 1]."""
    low, high = np.array(ranges, dtype=float).T
    out: np.ndarray = (np.clip(x, low, high) - (low + high) / 2) / ((high - low) / 2)
    return out


def _clipped_design(model: PropensityModel, x: np.ndarray, bound: float) -> np.ndarray:
    """The design with each row's standardised covariates clipped to L2 norm `bound`."""
    z = model.standardiser.design(x)
    norms = np.linalg.norm(z[:, 1:], axis=1)
    z[:, 1:] *= np.minimum(1.0, bound / np.maximum(norms, 1e-300))[:, None]
    return z


def propensity_model(state: dict[str, Any]) -> PropensityModel:
    inputs = state["inputs"]
    return PropensityModel(Standardiser(np.asarray(inputs["mean"]), np.asarray(inputs["sd"])),
                           np.asarray(inputs["beta"]), state["iterations"])


def _arm_arrays(prefix: str, sums: ArmSums) -> Arrays:
    return {f"{prefix}.w": sums.w, f"{prefix}.wx": sums.wx, f"{prefix}.wx2": sums.wx2}


def summed_arms(totals: dict[str, Any], prefix: str) -> ArmSums:
    return ArmSums(*(np.asarray(totals[f"{prefix}.{k}"]) for k in ("w", "wx", "wx2")))


def _site_weights(plan: AttributionPlan, method: str, e: np.ndarray, t: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Each patient's weight and its derivative; zero for the trimmed."""
    keep = _kept(plan, e)
    # A trimmed patient's score is replaced before weighting: 1/e may be infinite.
    w, dw = weights(np.where(keep, e, 0.5), t, "overlap" if method == "overlap" else "iptw",
                    plan.estimand)
    return w * keep, dw * keep


def _kept(plan: AttributionPlan, e: np.ndarray) -> np.ndarray:
    out: np.ndarray = (e >= plan.trim) & (e <= 1 - plan.trim)
    return out


STATE_MAX = 1e3  # the largest |coefficient| or outcome mean a state may carry


def check_state(plan: AttributionPlan, state: dict[str, Any],
                ranges: Sequence[Sequence[float]]) -> None:
    """The release gate of an attribution step: raise :class:`ConfigurationError`, naming
    the value, unless the coordinator's state is one a site can compute with safely: a
    known step, one column per range, finite coefficients and outcome means at most
    :data:`STATE_MAX` in absolute value, positive SDs; in a private analysis means within
    the site's ranges and SDs at least ``PRIVATE_MIN_SD`` of the half range (so every
    standardised covariate is bounded before it is clipped). Depends only on the state
    and the site's declared ranges, never on a record."""
    step = state.get("step")
    if step not in STEPS[:-1]:
        raise ConfigurationError(f"step must be one of {', '.join(STEPS[:-1])}; got {step!r}.")
    k = len(ranges)
    if not isinstance(state.get("columns"), list) or len(state["columns"]) != k:
        raise ConfigurationError(f"The state names {state.get('columns')!r}; this site has "
                                 f"{k} covariate columns.")
    if step == "moments":
        return
    inputs = state.get("inputs")
    if not isinstance(inputs, dict):
        raise ConfigurationError("The state carries no inputs for its step.")

    def vector(name: str, size: int) -> np.ndarray:
        value = np.asarray(inputs.get(name), dtype=np.float64)
        if value.shape != (size,) or not np.isfinite(value).all() \
                or np.abs(value).max(initial=0.0) > STATE_MAX:
            raise ConfigurationError(f"The state's {name!r} must be {size} finite numbers at "
                                     f"most {STATE_MAX:g} in absolute value; got "
                                     f"{inputs.get(name)!r}.")
        return value

    mean, sd, _ = vector("mean", k), vector("sd", k), vector("beta", k + 1)
    low, high = np.array(ranges, dtype=np.float64).T
    floor = PRIVATE_MIN_SD * (high - low) / 2 if plan.private else np.zeros(k)
    if plan.private and ((mean < low) | (mean > high)).any():
        raise ConfigurationError(f"The state's means {mean.tolist()} must lie within the "
                                 f"site's ranges.")
    if (sd <= 0).any() or (sd < floor).any():
        raise ConfigurationError(f"The state's SDs {sd.tolist()} must be > 0"
                                 + (f" and at least {PRIVATE_MIN_SD:g} of each half range"
                                    if plan.private else "") + ".")
    if "caliper" in inputs:
        caliper = inputs["caliper"]
        if not (isinstance(caliper, int | float) and math.isfinite(caliper) and caliper >= 0):
            raise ConfigurationError(f"The state's caliper must be finite and >= 0; got "
                                     f"{caliper!r}.")
    if step == "sandwich":
        means = inputs.get("means")
        if not isinstance(means, dict) or set(means) != set(plan.weighting):
            raise ConfigurationError(f"The state's outcome means must name "
                                     f"{plan.weighting}; got {means!r}.")
        for method in plan.weighting:
            value = np.asarray(means[method], dtype=np.float64)
            if value.shape != (2,) or not np.isfinite(value).all() \
                    or np.abs(value).max() > STATE_MAX:
                raise ConfigurationError(f"The state's outcome means of {method} must be 2 "
                                         f"finite numbers; got {means[method]!r}.")


def site_step(plan: AttributionPlan, state: dict[str, Any], site: SiteArrays,
              site_index: int, ranges: Sequence[Sequence[float]] | None = None) -> Arrays:
    """What `site` sends for the state's step: sums over its rows, never a row. In a
    private analysis the rows are first clipped to `ranges` (the site's schema ranges),
    which bound each row's part in every sum (:func:`release_blocks`)."""
    step = state["step"]
    site.check(len(state["columns"]), continuous=plan.outcome == "continuous")
    x, t, y = site.x, site.treated, site.outcome
    if plan.private:
        if ranges is None:
            raise ConfigurationError("A private analysis clips each row to the schema's "
                                     "ranges; give them.")
        if step == "moments":
            u = _scaled(x, ranges)
            return {"n": np.array([float(len(u))]), "sum": u.sum(axis=0),
                    "sumsq": (u ** 2).sum(axis=0)}
        low, high = np.array(ranges, dtype=float).T
        x = np.clip(x, low, high)
    if step == "moments":
        return {"n": np.array([float(len(x))]), "sum": x.sum(axis=0), "cross": x.T @ x}
    model = propensity_model(state)
    z = (_clipped_design(model, x, _z_norm(len(state["columns"]))) if plan.private
         else model.standardiser.design(x))
    cols = z[:, 1:]  # balance on the standardised columns (an SMD does not change)
    if step == "newton":
        grad, info, _ = newton_terms(z, t, model.beta)
        return {"grad": grad, "info": info}
    e = sigmoid(z @ model.beta)
    out: Arrays = {}
    if step == "estimate":
        edges = np.linspace(0, 1, OVERLAP_BINS + 1)
        out["overlap.treated"] = np.histogram(e[t == 1], edges)[0].astype(float)
        out["overlap.control"] = np.histogram(e[t == 0], edges)[0].astype(float)
        keep = _kept(plan, e)
        out["kept"] = np.array([float(np.sum(keep & (t == 0))), float(np.sum(keep & (t == 1)))])
        out["rows"] = np.array([float(len(x))])
        out.update(_arm_arrays("before", arm_sums(cols, t)))
        for method in plan.weighting:
            w, _ = _site_weights(plan, method, e, t)
            out[f"{method}.sums"] = np.array(weighted_sums(w, t, y).astuple())
            out.update(_arm_arrays(method, arm_sums(cols, t, w)))
        if "matching" in plan.chosen_methods:
            pairs = match_within_site(model.logit(x), t, state["inputs"]["caliper"],
                                      matching_order(plan.seed, site_index))
            out["matching.pairs"] = np.array(list(pair_sums(y, t, pairs).__dict__.values()))
            rows = pairs.ravel()
            out.update(_arm_arrays("matching", arm_sums(cols[rows], t[rows])))
        return out
    if step == "sandwich":
        for method in plan.weighting:
            w, dw = _site_weights(plan, method, e, t)
            a, b = sandwich_terms(z, t, y, e, w, dw, tuple(state["inputs"]["means"][method]))
            out.update(_sandwich_blocks(method, a, b))
        return out
    raise ConfigurationError(f"step must be one of {', '.join(STEPS[:-1])}; got {step!r}.")


def matching_order(seed: int, site_index: int) -> np.random.Generator:
    """The order a site matches its treated patients in (public: not a private release)."""
    return np.random.default_rng([seed, 0x3A7C, site_index])


def _sandwich_blocks(method: str, a: np.ndarray, b: np.ndarray) -> Arrays:
    """The sandwich's matrices in blocks: propensity (bb), mean by propensity (mb), means
    (mm; A's is diagonal), which a private release bounds separately."""
    p = len(a) - 2
    return {f"{method}.a_bb": a[:p, :p], f"{method}.a_mb": a[p:, :p],
            f"{method}.a_mm": np.diag(a[p:, p:]).copy(), f"{method}.b_bb": b[:p, :p],
            f"{method}.b_mb": b[p:, :p], f"{method}.b_mm": b[p:, p:]}


def sandwich_matrices(totals: dict[str, Any], method: str) -> tuple[np.ndarray, np.ndarray]:
    """The sums of :func:`_sandwich_blocks`, put together again (B symmetric)."""
    def block(name: str) -> np.ndarray:
        return np.asarray(totals[f"{method}.{name}"])

    a = np.block([[block("a_bb"), np.zeros((len(block("a_bb")), 2))],
                  [block("a_mb"), np.diag(block("a_mm"))]])
    b = np.block([[block("b_bb"), block("b_mb").T], [block("b_mb"), block("b_mm")]])
    return a, b


# ---------------------------------------------------------------- private releases

def _weight_bounds(plan: AttributionPlan, method: str) -> tuple[float, float]:
    """The largest weight and |d weight / d logit| of a kept patient (scores in
    [trim, 1 - trim])."""
    if method == "overlap":
        return 1.0, 0.25
    odds = (1 - plan.trim) / plan.trim
    return (1 / plan.trim if plan.estimand == "ATE" else max(1.0, odds)), odds


def _z_norm(k: int) -> float:
    return PRIVATE_Z_NORM * math.sqrt(k)


def release_blocks(plan: AttributionPlan, step: str, k: int,
                   means: dict[str, list[float]] | None = None
                   ) -> dict[str, tuple[list[str], float]]:
    """The arrays of `step` in blocks, each with the L2 norm one patient's part in it can
    have at most: rows scaled to [-1, 1] (moments), or standardised covariates clipped
    to norm ``PRIVATE_Z_NORM * sqrt(k)``; weights bounded by the trim; for the sandwich
    |y - mu| is at most the largest of |mu| and |1 - mu| for the federation's `means`.
    One patient touches every block; :func:`release` shares the release's sensitivity
    out among them."""
    c = _z_norm(k)
    r = math.sqrt(1.0 + c * c)  # ||z|| with the intercept
    if step == "moments":
        return {"n": (["n"], 1.0), "sum": (["sum"], math.sqrt(k)),
                "sumsq": (["sumsq"], math.sqrt(k))}
    if step == "newton":
        return {"grad": (["grad"], r), "info": (["info"], r * r / 4)}
    if step == "estimate":
        blocks = {"overlap": (["overlap.treated", "overlap.control"], 1.0),
                  "counts": (["kept", "rows"], math.sqrt(2)),
                  "before.w": (["before.w"], 1.0), "before.wx": (["before.wx"], c),
                  "before.wx2": (["before.wx2"], c * c)}
        for m in plan.weighting:
            w, _ = _weight_bounds(plan, m)
            blocks.update({f"{m}.sums": ([f"{m}.sums"], w * math.sqrt(2)),
                           f"{m}.w": ([f"{m}.w"], w), f"{m}.wx": ([f"{m}.wx"], w * c),
                           f"{m}.wx2": ([f"{m}.wx2"], w * c * c)})
        return blocks
    if step == "sandwich":
        blocks = {}
        for m in plan.weighting:
            w, dw = _weight_bounds(plan, m)
            u = max([1.0, *(abs(v) for mu in (means or {}).get(m, []) for v in (mu, 1 - mu))])
            bounds = {"a_bb": r * r / 4, "a_mb": dw * u * r, "a_mm": w, "b_bb": r * r,
                      "b_mb": w * u * r, "b_mm": (w * u) ** 2}
            blocks.update({f"{m}.{k}": ([f"{m}.{k}"], v) for k, v in bounds.items()})
        return blocks
    raise ConfigurationError(f"A private analysis releases nothing in step {step!r}.")


def noise_units(plan: AttributionPlan, state: dict[str, Any]
                ) -> dict[str, tuple[list[str], float]]:
    """The step's blocks, each with its arrays and its noise per unit of noise multiplier:
    block j is released scaled by ``sqrt(a_j) / bound_j`` (shares a_j summing to 1), so
    the release's sensitivity is 1 and block j's noise ``bound_j / sqrt(a_j)`` per unit."""
    blocks = release_blocks(plan, state["step"], len(state["columns"]),
                            state["inputs"].get("means"))
    priority = {b: PRIVATE_PRIORITY if b.endswith((".sums", ".b_mm", ".a_mm")) else 1.0
                for b in blocks}
    total = sum(priority.values())
    return {block: (names, bound * math.sqrt(total / priority[block]))
            for block, (names, bound) in blocks.items()}


def release(plan: AttributionPlan, state: dict[str, Any], arrays: Arrays,
            noise_multiplier: float, rng: np.random.Generator | None) -> Arrays:
    """A private analysis's arrays as a site releases them: one Gaussian mechanism of
    ``noise_multiplier`` (none for a site without a budget: 0) over the step's blocks
    (:func:`noise_units`), and each block's noise variance per entry as
    ``noise_var.<block>``, which the intervals take into account."""
    out = dict(arrays)
    for block, (names, unit) in noise_units(plan, state).items():
        std = noise_multiplier * unit
        if std > 0:
            assert rng is not None, "noise needs the site's secret generator"
            for name in names:
                out[name] = arrays[name] + rng.normal(0.0, std, arrays[name].shape)
        out[f"noise_var.{block}"] = np.array([std * std])
    return out


def expected_arrays(plan: AttributionPlan, step: str, k: int) -> dict[str, tuple[int, ...]]:
    """The arrays (and shapes) a site sends for `step` with `k` covariate columns."""
    p = k + 1

    def arms(prefix: str) -> dict[str, tuple[int, ...]]:
        return {f"{prefix}.w": (2,), f"{prefix}.wx": (2, k), f"{prefix}.wx2": (2, k)}

    out: dict[str, tuple[int, ...]]
    if step == "moments":
        out = ({"n": (1,), "sum": (k,), "sumsq": (k,)} if plan.private
               else {"n": (1,), "sum": (k,), "cross": (k, k)})
    elif step == "newton":
        out = {"grad": (p,), "info": (p, p)}
    elif step == "estimate":
        out = {"overlap.treated": (OVERLAP_BINS,), "overlap.control": (OVERLAP_BINS,),
               "kept": (2,), "rows": (1,), **arms("before")}
        for method in plan.weighting:
            out.update({f"{method}.sums": (4,), **arms(method)})
        if "matching" in plan.chosen_methods:
            out.update({"matching.pairs": (len(PairSums.__dataclass_fields__),),
                        **arms("matching")})
    elif step == "sandwich":
        shapes = {"a_bb": (p, p), "a_mb": (2, p), "a_mm": (2,), "b_bb": (p, p),
                  "b_mb": (2, p), "b_mm": (2, 2)}
        out = {f"{m}.{k}": v for m in plan.weighting for k, v in shapes.items()}
    else:
        raise ConfigurationError(f"No site sends anything in step {step!r}.")
    if plan.private:
        out.update({f"noise_var.{b}": (1,) for b in release_blocks(plan, step, k)})
    return out
