"""Distributed differential privacy: each site adds a share of the noise, the sum carries
the study's guarantee against a coordinator that sees only sums.

Every site adds discrete Gaussian noise ``N_Z(0, sigma_site^2)`` (Canonne, Kamath and
Steinke, NeurIPS 2020) to its encoded integer vector before masking. A sum of at least
``min_sites`` such vectors holds at least ``min_sites`` shares of noise. Kairouz, Liu and
Steinke (ICML 2021, "The Distributed Discrete Gaussian Mechanism", Theorem 1) bound the
sum's Renyi DP at order alpha by ``alpha * Delta^2 / (2 n sigma_site^2) + tau * d`` with
``tau = 10 * sum_{k=1}^{n-1} exp(-2 pi^2 sigma_site^2 k / (k + 1))``: the Gaussian
mechanism of noise ``sqrt(n) * sigma_site`` plus a term that :data:`MIN_SITE_SIGMA`
makes negligible (``tau * d < 1e-28`` for any n and d up to 10^9; tested, not assumed).
So a site charges its ledger one Gaussian event with noise multiplier
``sqrt(min_sites) * sigma_site / Delta`` for the sum.

``Delta`` is the L2 sensitivity in ring units: a site's vector is clipped to L2 norm
``clip`` and scaled by ``scale``; stochastic rounding moves each of its ``d`` coordinates
by less than 1, so ``Delta = clip * scale + sqrt(d)`` (:func:`integer_sensitivity`).

Assumptions, stated where the guarantee is used: at least ``min_sites`` sites' noisy
inputs are in every sum the coordinator unmasks (it refuses fewer), and the coordinator
colludes with fewer than ``threshold`` sites of any neighbourhood (a colluding site can
subtract its own noise share, so the guarantee is computed for ``min_sites`` honest
sites, not all of them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cardiofed.exceptions import ConfigurationError
from cardiofed.privacy.accountant import GaussianEvent

MIN_SITE_SIGMA = 3.0
TAIL_SDS = 12.0  # the ring holds the summed noise up to 12 SDs (chance < 1e-32 per value)


def integer_sensitivity(clip: float, scale: float, dim: int) -> float:
    """L2 sensitivity, in ring units, of a vector clipped to norm `clip`, scaled by
    `scale` and stochastically rounded in `dim` coordinates."""
    return clip * scale + math.sqrt(dim)


def tau(site_sigma: float, n_sites: int) -> float:
    """Kairouz et al.'s ``tau`` of a sum of `n_sites` discrete Gaussians of `site_sigma`:
    exact up to 1,001 sites, beyond that an upper bound (the terms shrink with k, so the
    rest are bounded by the 1,000th)."""
    def term(k: int) -> float:
        return math.exp(-2 * math.pi**2 * site_sigma**2 * k / (k + 1))

    head = sum(term(k) for k in range(1, min(n_sites, 1001)))
    return 10 * (head + max(n_sites - 1001, 0) * term(1000))


@dataclass(frozen=True)
class DistributedNoise:
    """The noise one secure sum carries: the sum's `noise_multiplier` (of the integer
    sensitivity `sensitivity`), split over at least `min_sites` honest sites."""

    noise_multiplier: float
    sensitivity: float
    min_sites: int

    def __post_init__(self) -> None:
        if self.min_sites < 1:
            raise ConfigurationError(f"The 'min_sites' parameter must be >= 1; got "
                                     f"{self.min_sites!r}.")
        for name in ("noise_multiplier", "sensitivity"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigurationError(f"The {name!r} parameter must be a finite number "
                                         f"> 0; got {value!r}.")
        if self.site_sigma < MIN_SITE_SIGMA:
            raise ConfigurationError(
                f"Each site's noise would be {self.site_sigma:.3g} ring units, below "
                f"{MIN_SITE_SIGMA:g}, where the sum of discrete Gaussians is no longer "
                f"accounted as one Gaussian; raise the codec's scale (it multiplies the "
                f"sensitivity and the noise alike).")

    @property
    def site_sigma(self) -> float:
        """The standard deviation of each site's share (ring units)."""
        return self.noise_multiplier * self.sensitivity / math.sqrt(self.min_sites)

    def event(self) -> GaussianEvent:
        """What a site charges its ledger for one secure sum it takes part in."""
        return GaussianEvent(noise_multiplier=self.noise_multiplier, sample_rate=1.0, steps=1)

    def sum_sd(self, n_inputs: int, scale: float) -> float:
        """The SD of `n_inputs` sites' shares summed, in decoded units (the ring's
        `scale`)."""
        return self.site_sigma / scale * math.sqrt(n_inputs)

    def noise_bound(self, n_sites: int) -> float:
        """A bound on the summed noise of `n_sites` sites (for the ring's width)."""
        return TAIL_SDS * math.sqrt(n_sites) * self.site_sigma

    def sample(self, size: int, rng: np.random.Generator) -> np.ndarray:
        """One site's share: `size` draws of ``N_Z(0, site_sigma^2)``; `rng` must be the
        site's secret generator."""
        return discrete_gaussian(self.site_sigma, size, rng)


def discrete_gaussian(sigma: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """`size` draws of the discrete Gaussian ``N_Z(0, sigma^2)`` by Canonne et al.'s
    rejection sampler (Algorithm 3): a discrete Laplace proposal of scale
    ``t = floor(sigma) + 1``, accepted with probability
    ``exp(-(|y| - sigma^2 / t)^2 / (2 sigma^2))``."""
    if not (math.isfinite(sigma) and sigma > 0):
        raise ConfigurationError(f"The 'sigma' parameter must be a finite number > 0; got "
                                 f"{sigma!r}.")
    t = math.floor(sigma) + 1
    p = 1.0 - math.exp(-1.0 / t)
    out = np.empty(0, dtype=np.int64)
    while out.size < size:
        batch = 2 * (size - out.size) + 16  # about 1 / (acceptance) proposals per draw
        y = rng.geometric(p, batch) - rng.geometric(p, batch)  # discrete Laplace(t)
        accept = rng.random(batch) < np.exp(-(np.abs(y) - sigma**2 / t) ** 2
                                            / (2 * sigma**2))
        out = np.concatenate([out, y[accept].astype(np.int64)])
    return out[:size]
