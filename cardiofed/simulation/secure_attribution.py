"""A private attribution analysis over secure sums: each step one sum of every site's
exact arrays, the distributed noise added once.

Each site scales its step's arrays block by block so that one patient moves the whole
vector by at most 1 (block j divided by its noise unit,
:func:`~cardiofed.causal.study.noise_units`), encodes it into the ring with stochastic
rounding and its share of the noise, as every secure sum does
(:func:`~cardiofed.secure.simulate.ring_sum`). The coordinator unscales the unmasked
sum; each block's noise variance per entry (``noise_var.<block>``, which the intervals
use) is that of one release at the study's noise multiplier, split over the sites the
noise may not lose, rather than one release's per site. The noise multiplier is the one
each site's budget sets for the plan's releases: every site spends the same epsilon.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from cardiofed.causal.study import AttributionPlan, noise_units
from cardiofed.exceptions import ConfigurationError
from cardiofed.privacy.randomness import secure_numpy_rng
from cardiofed.secure.noise import MIN_SITE_SIGMA, DistributedNoise, integer_sensitivity
from cardiofed.secure.quantise import RingCodec
from cardiofed.secure.simulate import ring_sum
from cardiofed.simulation.secure_runner import SCALE_PER_ROOT_DIM
from cardiofed.simulation.secure_statistics import MAX_SITE_RECORDS, noise_sites

Arrays = dict[str, np.ndarray]


def secure_step_sum(plan: AttributionPlan, state: dict[str, Any], site_arrays: Sequence[Arrays],
                    noise_multiplier: float, dropout: float) -> Arrays:
    """The step's totals over the sites' exact `site_arrays` from one secure sum with
    distributed noise (see the module docstring), with each block's noise variance."""
    units = noise_units(plan, state)
    order = [(name, unit) for names, unit in units.values() for name in names]
    if set(site_arrays[0]) != {name for name, _ in order}:
        raise ConfigurationError(f"A secure attribution step sums its blocks' arrays "
                                 f"{sorted(n for n, _ in order)}; the sites computed "
                                 f"{sorted(site_arrays[0])}.")
    shapes = {name: np.shape(site_arrays[0][name]) for name, _ in order}
    vectors = {f"site {k}": np.concatenate([np.ravel(a[name]) / unit for name, unit in order])
               for k, a in enumerate(site_arrays)}
    length = len(next(iter(vectors.values())))
    n, min_sites = len(site_arrays), noise_sites(len(site_arrays), dropout)
    # Fine enough that rounding adds little to the noise, and each share at least
    # MIN_SITE_SIGMA ring units (the accounting's floor) however small the noise.
    floor = MIN_SITE_SIGMA * math.sqrt(min_sites) / noise_multiplier
    scale = 2.0 ** math.ceil(math.log2(max(SCALE_PER_ROOT_DIM * math.sqrt(length), floor)))
    sensitivity = integer_sensitivity(1.0, scale, length)  # ring units, rounding included
    noise = DistributedNoise(noise_multiplier=noise_multiplier, sensitivity=sensitivity,
                             min_sites=min_sites)
    codec = RingCodec.for_sum(n, bound=MAX_SITE_RECORDS, scale=scale,
                              noise_bound=noise.noise_bound(n))
    total = ring_sum(codec, vectors, {name: secure_numpy_rng() for name in vectors}, noise)
    out: Arrays = {}
    start = 0
    for name, unit in order:
        size = int(np.prod(shapes[name]))
        out[name] = total[start:start + size].reshape(shapes[name]) * unit
        start += size
    # Each site's share has SD noise_multiplier * sensitivity / sqrt(min_sites) ring units.
    per_unit = (noise_multiplier * sensitivity / scale) ** 2 * n / min_sites
    for block, (_, unit) in units.items():
        out[f"noise_var.{block}"] = np.array([per_unit * unit * unit])
    return out
