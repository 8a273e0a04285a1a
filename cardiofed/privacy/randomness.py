"""Secret randomness for private releases.

The noise and the sampling masks of every differentially private release must come from
a source no other party can replay: a generator seeded from a known value (the study
plan's seed, a round number, a site index) lets whoever knows it regenerate the noise,
subtract it and read the records off the release. Every generator here is seeded
afresh from the operating system's CSPRNG (:func:`secrets.randbits`) at the site, per
release, and the seed is never stored or sent.

Non-private randomness (initial weights, shuffles of non-DP training, simulated clocks)
stays seeded and reproducible; reproducibility stops at a private release.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def secure_torch_generator() -> torch.Generator:
    """A CPU torch generator seeded with 64 secret bits from the OS CSPRNG."""
    import torch

    return torch.Generator().manual_seed(secrets.randbits(64))


def secure_numpy_rng() -> np.random.Generator:
    """A NumPy generator (PCG64) seeded with 128 secret bits from the OS CSPRNG."""
    return np.random.default_rng(secrets.randbits(128))
