"""A private attribution analysis over secure sums: each step one sum of every site's
exact arrays, the distributed noise added once.

Each site scales its step's arrays block by block so that one patient moves the whole
vector by at most 1 (block j divided by its noise unit,
:func:`~cardiofed.causal.study.noise_units`), encodes it into the ring with stochastic
rounding and its share of the noise, as every secure sum does
(:func:`~cardiofed.secure.simulate.ring_sum`). The coordinator unscales the unmasked
sum; each block's noise variance per entry (``noise_var.<block>``, which the intervals
use) is that of one release at the study's noise multiplier, split over the sites the
noise may not lose, rather than one release's per site. The noise multiplier is the
largest any site's budget needs for the plan's releases.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from cardiofed.causal.combine import run_attribution
from cardiofed.causal.study import (
    AttributionPlan,
    AttributionResult,
    SiteArrays,
    expected_arrays,
    noise_units,
)
from cardiofed.exceptions import ConfigurationError
from cardiofed.privacy.randomness import secure_numpy_rng
from cardiofed.secure.noise import MIN_SITE_SIGMA, DistributedNoise, integer_sensitivity
from cardiofed.secure.quantise import RingCodec
from cardiofed.secure.simulate import ring_sum
from cardiofed.simulation.secure_runner import SCALE_PER_ROOT_DIM
from cardiofed.simulation.secure_statistics import MAX_SITE_RECORDS, noise_sites

Arrays = dict[str, np.ndarray]


def _layout(plan: AttributionPlan, state: dict[str, Any]
            ) -> list[tuple[str, tuple[int, ...], float]]:
    """The step's arrays in the vector's order: name, shape and noise unit."""
    shapes = expected_arrays(plan, state["step"], len(state["columns"]))
    return [(name, shapes[name], unit)
            for names, unit in noise_units(plan, state).values() for name in names]


def attribution_length(plan: AttributionPlan, state: dict[str, Any]) -> int:
    """How many values a site's vector holds in the step of `state`."""
    return sum(math.prod(shape) for _, shape, _ in _layout(plan, state))


def attribution_codec_and_noise(n_sites: int, length: int, noise_multiplier: float,
                                dropout: float) -> tuple[RingCodec, DistributedNoise]:
    """The ring and the noise of one step's secure sum of `length` scaled values (one
    patient moves a site's vector by at most 1)."""
    min_sites = noise_sites(n_sites, dropout)
    # Fine enough that rounding adds little to the noise, and each share at least
    # MIN_SITE_SIGMA ring units (the accounting's floor) however small the noise.
    floor = MIN_SITE_SIGMA * math.sqrt(min_sites) / noise_multiplier
    scale = 2.0 ** math.ceil(math.log2(max(SCALE_PER_ROOT_DIM * math.sqrt(length), floor)))
    noise = DistributedNoise(noise_multiplier=noise_multiplier,
                             sensitivity=integer_sensitivity(1.0, scale, length),
                             min_sites=min_sites)
    codec = RingCodec.for_sum(n_sites, bound=MAX_SITE_RECORDS, scale=scale,
                              noise_bound=noise.noise_bound(n_sites))
    return codec, noise


def attribution_vector(plan: AttributionPlan, state: dict[str, Any], arrays: Arrays
                       ) -> np.ndarray:
    """A site's part of the step's sum: its exact arrays, each block divided by its noise
    unit (sensitivity 1), in one vector."""
    layout = _layout(plan, state)
    if set(arrays) != {name for name, _, _ in layout}:
        raise ConfigurationError(f"A secure attribution step sums the arrays "
                                 f"{sorted(n for n, _, _ in layout)}; got {sorted(arrays)}.")
    return np.concatenate([np.ravel(arrays[name]) / unit for name, _, unit in layout])


def attribution_from_sum(plan: AttributionPlan, state: dict[str, Any], total: np.ndarray,
                         noise_sd: float) -> Arrays:
    """The step's totals from the unmasked sum of the sites' vectors, whose summed noise
    has SD `noise_sd` (decoded units), and each block's noise variance per entry
    (``noise_var.<block>``)."""
    out: Arrays = {}
    start = 0
    for name, shape, unit in _layout(plan, state):
        size = math.prod(shape)
        out[name] = np.asarray(total[start:start + size]).reshape(shape) * unit
        start += size
    per_unit = noise_sd ** 2  # the shares' variances, summed
    for block, (_, unit) in noise_units(plan, state).items():
        out[f"noise_var.{block}"] = np.array([per_unit * unit * unit])
    return out


def secure_step_sum(plan: AttributionPlan, state: dict[str, Any], site_arrays: Sequence[Arrays],
                    noise_multiplier: float, dropout: float) -> Arrays:
    """The step's totals over the sites' exact `site_arrays` from one secure sum with
    distributed noise (see the module docstring), with each block's noise variance."""
    vectors = {f"site {k}": attribution_vector(plan, state, a)
               for k, a in enumerate(site_arrays)}
    codec, noise = attribution_codec_and_noise(len(vectors), attribution_length(plan, state),
                                               noise_multiplier, dropout)
    total = ring_sum(codec, vectors, {name: secure_numpy_rng() for name in vectors}, noise)
    return attribution_from_sum(plan, state, total,
                                noise.sum_sd(len(vectors), codec.scale))


def run_secure_attribution(sites: Sequence[SiteArrays], covariates: list[str], *,
                           epsilon: float, secure_dropout: float = 0.2,
                           **settings: Any) -> AttributionResult:
    """:func:`~cardiofed.causal.combine.run_attribution`'s private schedule with every
    site spending `epsilon`, each step one secure sum whose noise is split over the
    sites it may not lose (``1 - secure_dropout`` of them); `settings` are
    ``run_attribution``'s (estimand, methods, trim, ...)."""
    if not 0.0 <= secure_dropout < 1.0:
        raise ConfigurationError(f"secure_dropout must be in [0, 1) (the share of sites a "
                                 f"sum may lose); got {secure_dropout!r}.")
    if not epsilon > 0:
        raise ConfigurationError(f"epsilon must be > 0 (the budget each site's share of "
                                 f"the noise covers); got {epsilon!r}.")

    def step_sum(plan: AttributionPlan, state: dict[str, Any], arrays: list[Arrays],
                 noise_multiplier: float) -> Arrays:
        return secure_step_sum(plan, state, arrays, noise_multiplier, secure_dropout)

    return run_attribution(sites, covariates, epsilon=epsilon, step_sum=step_sum, **settings)
