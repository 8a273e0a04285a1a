"""Effect estimators computed from per-site sums, and their intervals.

Weighting (inverse probability of treatment for the ATE with stabilised weights, the ATT
weights, overlap weights): the effect is a ratio of sums, and its variance the sandwich
of the stacked estimating equations (the propensity model's score and the two weighted
means; Lunceford & Davidian 2004), whose two matrices are sums over patients too, so a
site sends them and nothing else. Matching: 1:1 greedy nearest-neighbour matching on the
logit of the propensity score within each site, without replacement, with a caliper of
0.2 SD of the logit (Austin 2011), for the ATT; the matched pairs' sums are combined and
the variance is the paired one. Balance: standardised mean differences from sums per
arm. Sensitivity: the E-value (VanderWeele & Ding 2017).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from cardiofed.causal.propensity import PropensityModel

Weighting = Literal["iptw", "overlap"]
Estimand = Literal["ATE", "ATT"]
Z95 = 1.959963984540054  # scipy.stats.norm.ppf(0.975), without importing SciPy
CALIPER_SD = 0.2


def weights(e: np.ndarray, t: np.ndarray, method: Weighting, estimand: Estimand
            ) -> tuple[np.ndarray, np.ndarray]:
    """Each patient's weight and its derivative with respect to the propensity logit."""
    if method == "overlap":  # the ATO: the population with the most overlap
        return np.where(t == 1, 1 - e, e), np.where(t == 1, -1.0, 1.0) * e * (1 - e)
    if estimand == "ATT":
        return np.where(t == 1, 1.0, e / (1 - e)), np.where(t == 1, 0.0, e / (1 - e))
    return (np.where(t == 1, 1 / e, 1 / (1 - e)),
            np.where(t == 1, -(1 - e) / e, e / (1 - e)))


@dataclass
class WeightedSums:
    """What one site sends for a weighting estimator (first pass: the means)."""

    treated_weight: float
    treated_outcome: float
    control_weight: float
    control_outcome: float

    def __add__(self, other: WeightedSums) -> WeightedSums:
        return WeightedSums(*(a + b for a, b in zip(self.astuple(), other.astuple(),
                                                    strict=True)))

    def astuple(self) -> tuple[float, float, float, float]:
        return (self.treated_weight, self.treated_outcome, self.control_weight,
                self.control_outcome)

    def means(self) -> tuple[float, float]:
        return (self.treated_outcome / self.treated_weight,
                self.control_outcome / self.control_weight)


def weighted_sums(w: np.ndarray, t: np.ndarray, y: np.ndarray) -> WeightedSums:
    return WeightedSums(float(np.sum(w * t)), float(np.sum(w * t * y)),
                        float(np.sum(w * (1 - t))), float(np.sum(w * (1 - t) * y)))


def sandwich_terms(z: np.ndarray, t: np.ndarray, y: np.ndarray, e: np.ndarray,
                   w: np.ndarray, dw: np.ndarray, mu: tuple[float, float]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """A site's sums of the stacked estimating equations' derivative (A) and outer
    product (B), at the federation's propensity coefficients and means (second pass)."""
    mu1, mu0 = mu
    p = z.shape[1]
    psi = np.column_stack([z * (t - e)[:, None], t * w * (y - mu1), (1 - t) * w * (y - mu0)])
    a = np.zeros((p + 2, p + 2))
    a[:p, :p] = -(z * (e * (1 - e))[:, None]).T @ z
    a[p, :p] = (t * (y - mu1) * dw) @ z
    a[p + 1, :p] = ((1 - t) * (y - mu0) * dw) @ z
    a[p, p] = -np.sum(t * w)
    a[p + 1, p + 1] = -np.sum((1 - t) * w)
    return a, psi.T @ psi


@dataclass(frozen=True)
class Effect:
    """An effect with 95% intervals: risk difference and risk ratio."""

    treated_risk: float
    control_risk: float
    risk_difference: float
    rd_low: float
    rd_high: float
    risk_ratio: float
    rr_low: float
    rr_high: float
    n_treated: float
    n_control: float

    def to_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


# Risks below this count as this for the risk ratio: a noisy (private) mean can be <= 0.
MIN_RISK = 1e-6


def _effect(mu1: float, mu0: float, var_rd: float, var_log_rr: float, n1: float, n0: float
            ) -> Effect:
    rd, se_rd = mu1 - mu0, math.sqrt(max(var_rd, 0.0))
    rr, se_lrr = max(mu1, MIN_RISK) / max(mu0, MIN_RISK), math.sqrt(max(var_log_rr, 0.0))
    spread = math.exp(min(Z95 * se_lrr, 700.0))
    return Effect(mu1, mu0, rd, rd - Z95 * se_rd, rd + Z95 * se_rd, rr, rr / spread,
                  rr * spread, n1, n0)


def weighting_effect(sums: WeightedSums, a: np.ndarray, b: np.ndarray, n1: float, n0: float,
                     noise: tuple[float, float] | None = None) -> Effect:
    """The effect from the combined sums and the sandwich ``A^-1 B A^-T``. `noise`: the
    variance per entry of the Gaussian noise on the propensity model's last gradient and
    on the weighted sums (a private analysis); it adds to the estimating equations'
    variance (B), so the interval covers the noise too (to first order)."""
    mu1, mu0 = sums.means()
    if noise is not None:
        grad_var, sums_var = noise
        p = len(b) - 2
        b = b + np.diag([grad_var] * p + [sums_var * (1 + mu1 ** 2), sums_var * (1 + mu0 ** 2)])
    a_inv = np.linalg.inv(a)
    v = a_inv @ b @ a_inv.T
    c_rd = np.zeros(len(v))
    c_rd[-2:] = (1.0, -1.0)
    c_rr = np.zeros(len(v))
    c_rr[-2:] = (1 / max(mu1, MIN_RISK), -1 / max(mu0, MIN_RISK))
    return _effect(mu1, mu0, float(c_rd @ v @ c_rd), float(c_rr @ v @ c_rr), n1, n0)


# ---------------------------------------------------------------- matching

def match_within_site(logit: np.ndarray, t: np.ndarray, caliper: float,
                      rng: np.random.Generator) -> np.ndarray:
    """Pairs (treated index, control index): greedy 1:1 nearest neighbour on the logit,
    treated patients in random order, controls without replacement, within `caliper`."""
    treated = np.flatnonzero(t == 1)
    controls = np.flatnonzero(t == 0)
    available = np.ones(len(controls), bool)
    pairs = []
    for i in rng.permutation(treated):
        if not available.any():
            break
        distance = np.where(available, np.abs(logit[controls] - logit[i]), np.inf)
        j = int(np.argmin(distance))
        if distance[j] <= caliper:
            available[j] = False
            pairs.append((i, controls[j]))
    return np.array(pairs, dtype=int).reshape(-1, 2)


@dataclass
class PairSums:
    """What a site sends for matching: sums over its matched pairs."""

    pairs: float = 0.0
    treated: float = 0.0
    control: float = 0.0
    treated_sq: float = 0.0
    control_sq: float = 0.0
    cross: float = 0.0
    unmatched_treated: float = 0.0

    def __add__(self, other: PairSums) -> PairSums:
        return PairSums(*(a + b for a, b in zip(self.__dict__.values(),
                                                other.__dict__.values(), strict=True)))


def pair_sums(y: np.ndarray, t: np.ndarray, pairs: np.ndarray) -> PairSums:
    yt, yc = y[pairs[:, 0]].astype(float), y[pairs[:, 1]].astype(float)
    return PairSums(len(pairs), yt.sum(), yc.sum(), (yt ** 2).sum(), (yc ** 2).sum(),
                    (yt * yc).sum(), float(np.sum(t == 1) - len(pairs)))


def matching_effect(s: PairSums) -> Effect:
    """The ATT of the matched treated, with paired variances (Austin 2011)."""
    n = s.pairs
    if n < 2 or s.control == 0:
        raise ValueError(f"matching found {n:g} pairs; too few to estimate an effect")
    m1, m0 = s.treated / n, s.control / n
    v1 = (s.treated_sq - n * m1 ** 2) / (n - 1)
    v0 = (s.control_sq - n * m0 ** 2) / (n - 1)
    cov = (s.cross - n * m1 * m0) / (n - 1)
    var_rd = (v1 + v0 - 2 * cov) / n
    var_log_rr = (v1 / m1 ** 2 + v0 / m0 ** 2 - 2 * cov / (m1 * m0)) / n if m1 > 0 else math.inf
    return _effect(m1, m0, var_rd, var_log_rr, n, n)


# ---------------------------------------------------------------- balance, sensitivity

@dataclass
class ArmSums:
    """Per covariate and arm: sum of weights, of weighted x and of weighted x^2."""

    w: np.ndarray  # (2,) control, treated
    wx: np.ndarray  # (2, k)
    wx2: np.ndarray  # (2, k)

    def __add__(self, other: ArmSums) -> ArmSums:
        return ArmSums(self.w + other.w, self.wx + other.wx, self.wx2 + other.wx2)

    def smd(self) -> np.ndarray:
        """Standardised mean differences (treated minus control over the root mean of
        the two arms' weighted variances)."""
        mean = self.wx / self.w[:, None]
        var = np.maximum(self.wx2 / self.w[:, None] - mean ** 2, 0.0)
        pooled = np.sqrt((var[0] + var[1]) / 2)
        out: np.ndarray = np.divide(mean[1] - mean[0], pooled, out=np.zeros_like(pooled),
                                    where=pooled > 0)
        return out


def arm_sums(x: np.ndarray, t: np.ndarray, w: np.ndarray | None = None) -> ArmSums:
    w = np.ones(len(x)) if w is None else w
    arms = [t == 0, t == 1]
    return ArmSums(np.array([w[a].sum() for a in arms]),
                   np.array([(w[a, None] * x[a]).sum(axis=0) for a in arms]),
                   np.array([(w[a, None] * x[a] ** 2).sum(axis=0) for a in arms]))


def e_value(rr: float) -> float:
    """The E-value of a risk ratio: the strength of association an unmeasured confounder
    would need with both treatment and outcome to explain the estimate away."""
    rr = 1 / rr if rr < 1 else rr
    return rr + math.sqrt(rr * (rr - 1))


def e_value_limit(low: float, high: float) -> float:
    """The E-value of the interval's limit closest to 1 (1 when it contains 1)."""
    if low <= 1 <= high:
        return 1.0
    return e_value(low if low > 1 else high)


def caliper_of(model: PropensityModel, n: float, s1: np.ndarray, cross: np.ndarray) -> float:
    """0.2 SD of the propensity logit over every site, from the federation's row count,
    sums of x and of x x' (the logit is linear in x: its variance is a' Cov(x) a)."""
    a = model.beta[1:] / model.standardiser.sd
    scatter = cross - np.outer(s1, s1) / n
    return CALIPER_SD * math.sqrt(max(float(a @ scatter @ a), 0.0) / (n - 1))
