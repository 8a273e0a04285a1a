"""One attribution analysis over a federation's sites, each step from per-site sums.

1. The propensity model (:mod:`cardiofed.causal.propensity`), fitted by federated Newton.
2. Overlap: histograms of the scores by arm, summed over the sites.
3. Each estimator (:mod:`cardiofed.causal.estimators`): the sums of the first pass give
   the means, those of the second the sandwich; matching sends its pairs' sums.
4. Balance before and after each estimator; the E-value of each risk ratio.

Nothing here crosses a site boundary but the sums named in each step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import reduce
from typing import Any

import numpy as np

from cardiofed.causal.estimators import (
    ArmSums,
    Effect,
    Estimand,
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
from cardiofed.causal.propensity import PropensityModel, fit_propensity
from cardiofed.exceptions import ConfigurationError

METHODS = ("iptw", "overlap", "matching")
OVERLAP_BINS = 20
SMD_LIMIT = 0.1


@dataclass(frozen=True)
class SiteArrays:
    """One site's rows, as its node holds them: covariates, treatment, outcome."""

    name: str
    x: np.ndarray
    treated: np.ndarray
    outcome: np.ndarray


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
                "propensity_newton_steps": self.propensity.iterations,
                "effects": {m: {**e.to_dict(), "e_value": self.e_values(m)[0],
                                "e_value_ci": self.e_values(m)[1]}
                            for m, e in self.effects.items()},
                "balance": {k: dict(zip(self.covariates, v.tolist(), strict=True))
                            for k, v in self.balance.items()},
                "balanced": {k: bool(np.all(np.abs(v) < SMD_LIMIT))
                             for k, v in self.balance.items()},
                "overlap": {k: v.tolist() for k, v in self.overlap.items()},
                "notes": self.notes}


def run_attribution(sites: Sequence[SiteArrays], covariates: list[str], *,
                    estimand: Estimand = "ATE", methods: Sequence[str] = METHODS,
                    trim: float = 0.0, seed: int = 0) -> AttributionResult:
    """Every requested estimator over `sites`. `trim`: leave out patients whose score is
    below `trim` or above ``1 - trim`` (weighting only); `seed`: the matching order."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigurationError(f"methods must be among {', '.join(METHODS)}; got "
                                 f"{list(methods)}.")
    if estimand not in ("ATE", "ATT"):
        raise ConfigurationError(f"estimand must be 'ATE' or 'ATT'; got {estimand!r}.")
    if not 0 <= trim < 0.5:
        raise ConfigurationError(f"trim must be in [0, 0.5); got {trim!r}.")
    if "matching" in methods and estimand != "ATT":
        raise ConfigurationError("matching estimates the ATT (1:1 matches of the treated); "
                                 "use estimand 'ATT' or leave matching out.")
    for s in sites:
        if s.x.shape[1] != len(covariates) or not (np.isin(s.treated, (0, 1)).all()
                                                   and np.isin(s.outcome, (0, 1)).all()):
            raise ConfigurationError(f"site {s.name!r}: covariates must have "
                                     f"{len(covariates)} columns, treatment and outcome 0/1")
    model = fit_propensity([s.x for s in sites], [s.treated for s in sites])
    scores = [model.score(s.x) for s in sites]
    edges = np.linspace(0, 1, OVERLAP_BINS + 1)
    overlap = {arm: sum(np.histogram(e[s.treated == flag], edges)[0]
                        for s, e in zip(sites, scores, strict=True))
               for arm, flag in (("treated", 1), ("control", 0))}
    balance = {"before": reduce(lambda a, b: a + b, (arm_sums(s.x, s.treated)
                                                     for s in sites)).smd()}
    keep = [(e >= trim) & (e <= 1 - trim) for e in scores]
    effects: dict[str, Effect] = {}
    for method in (m for m in methods if m != "matching"):
        effects[method], balance[method] = _weighting(sites, scores, keep, model, method,
                                                      estimand)
    if "matching" in methods:
        effects["matching"], balance["matching"] = _matching(sites, model, seed)
    notes = []
    if "matching" in effects:
        unmatched = effects["matching"].n_treated
        notes.append(f"matching: {unmatched:g} pairs within a caliper of 0.2 SD of the "
                     f"propensity logit; its ATT is that of the matched treated")
    return AttributionResult(estimand, covariates, model, effects, balance,
                             {k: np.asarray(v) for k, v in overlap.items()},
                             int(sum((~k).sum() for k in keep)), len(sites), notes)


def _weighting(sites: Sequence[SiteArrays], scores: list[np.ndarray], keep: list[np.ndarray],
               model: PropensityModel, method: str, estimand: Estimand
               ) -> tuple[Effect, np.ndarray]:
    site_w = []
    for s, e, k in zip(sites, scores, keep, strict=True):
        w, dw = weights(e, s.treated, "overlap" if method == "overlap" else "iptw", estimand)
        site_w.append((w * k, dw * k))
    sums = reduce(lambda a, b: a + b, (weighted_sums(w, s.treated, s.outcome)
                                       for s, (w, _) in zip(sites, site_w, strict=True)),
                  WeightedSums(0, 0, 0, 0))
    mu = sums.means()
    a_total: np.ndarray | None = None
    b_total: np.ndarray | None = None
    for s, e, (w, dw) in zip(sites, scores, site_w, strict=True):
        a, b = sandwich_terms(model.standardiser.design(s.x), s.treated, s.outcome, e, w,
                              dw, mu)
        a_total = a if a_total is None else a_total + a
        b_total = b if b_total is None else b_total + b
    assert a_total is not None and b_total is not None
    n1 = float(sum(((s.treated == 1) & k).sum() for s, k in zip(sites, keep, strict=True)))
    n0 = float(sum(((s.treated == 0) & k).sum() for s, k in zip(sites, keep, strict=True)))
    smd = reduce(lambda a, b: a + b, (arm_sums(s.x, s.treated, w) for s, (w, _)
                                      in zip(sites, site_w, strict=True))).smd()
    return weighting_effect(sums, a_total, b_total, n1, n0), smd


def _matching(sites: Sequence[SiteArrays], model: PropensityModel, seed: int
              ) -> tuple[Effect, np.ndarray]:
    caliper = caliper_of(model, [s.x for s in sites])
    rng = np.random.default_rng([seed, 0x3A7C])
    total, arms = PairSums(), None
    for s in sites:
        pairs = match_within_site(model.logit(s.x), s.treated, caliper, rng)
        total = total + pair_sums(s.outcome, s.treated, pairs)
        rows = pairs.ravel()
        site_arms: ArmSums = arm_sums(s.x[rows], s.treated[rows])
        arms = site_arms if arms is None else arms + site_arms
    assert arms is not None
    return matching_effect(total), arms.smd()
