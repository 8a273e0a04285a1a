"""Real vectors <-> integers modulo 2^bits, by clipping and unbiased stochastic rounding.

A site's vector ``x`` is clipped to ``[-bound, bound]`` per coordinate, scaled by
``scale`` and rounded up with probability equal to the fraction (so the rounded value's
expectation is ``x * scale``), then taken modulo ``2^bits``. Sums of encoded vectors are
decoded by reading the ring's upper half as negative. :meth:`RingCodec.for_sum` picks the
smallest width at which the sum of ``n`` encoded vectors (plus integer noise up to a
stated bound) cannot wrap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cardiofed.exceptions import ConfigurationError

MAX_BITS = 64


@dataclass(frozen=True)
class RingCodec:
    """Encoding of real vectors into ``Z_{2^bits}`` (see the module docstring)."""

    bits: int
    scale: float
    bound: float

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= MAX_BITS:
            raise ConfigurationError(f"The 'bits' parameter must be in [2, {MAX_BITS}]; got "
                                     f"{self.bits!r}.")
        for name in ("scale", "bound"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ConfigurationError(f"The {name!r} parameter must be a finite number "
                                         f"> 0; got {value!r}.")

    @classmethod
    def for_sum(cls, n_vectors: int, *, bound: float, scale: float,
                noise_bound: float = 0.0) -> RingCodec:
        """The narrowest codec whose ring holds any sum of `n_vectors` encoded vectors plus
        integer noise of magnitude at most `noise_bound` (in ring units) without wrapping."""
        if n_vectors < 1:
            raise ConfigurationError(f"The 'n_vectors' parameter must be >= 1; got "
                                     f"{n_vectors!r}.")
        if not (math.isfinite(noise_bound) and noise_bound >= 0):
            raise ConfigurationError(f"The 'noise_bound' parameter must be a finite number "
                                     f">= 0; got {noise_bound!r}.")
        largest = n_vectors * (math.ceil(bound * scale) + 1) + math.ceil(noise_bound)
        bits = (2 * largest + 1).bit_length()  # signed: [-largest, largest] fits
        if bits > MAX_BITS:
            raise ConfigurationError(
                f"A sum of {n_vectors:,} vectors bounded by {bound:g} at scale {scale:g} "
                f"(noise up to {noise_bound:g}) needs {bits} bits, more than {MAX_BITS}; "
                f"lower the scale or the bound.")
        return cls(bits=max(bits, 2), scale=scale, bound=bound)

    @property
    def modulus_mask(self) -> np.uint64:
        return np.uint64((1 << self.bits) - 1)

    def encode(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """`x` clipped, scaled and stochastically rounded, as ring elements (uint64);
        `rng` must be the site's secret generator (the rounding is part of the release)."""
        x = np.asarray(x, dtype=np.float64)
        if not np.isfinite(x).all():
            raise ValueError("A vector to encode must be finite.")
        y = np.clip(x, -self.bound, self.bound) * self.scale
        low = np.floor(y)
        ints = (low + (rng.random(y.shape) < (y - low))).astype(np.int64)
        return self.wrap(ints)

    def wrap(self, ints: np.ndarray) -> np.ndarray:
        """Signed integers as ring elements."""
        return np.asarray(ints, dtype=np.int64).astype(np.uint64) & self.modulus_mask

    def signed(self, ring: np.ndarray) -> np.ndarray:
        """Ring elements as signed integers (the upper half of the ring is negative)."""
        ring = np.asarray(ring, dtype=np.uint64) & self.modulus_mask
        half = np.uint64(1 << (self.bits - 1))
        out = ring.astype(np.int64)  # exact below 2^63
        if self.bits == MAX_BITS:
            return out  # two's complement already
        return np.where(ring >= half, out - (1 << self.bits), out)

    def decode(self, ring: np.ndarray) -> np.ndarray:
        """A ring element (a sum of encodings) back to reals."""
        return self.signed(ring).astype(np.float64) / self.scale

    def add(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (np.asarray(a, np.uint64) + np.asarray(b, np.uint64)) & self.modulus_mask

    def sub(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return (np.asarray(a, np.uint64) - np.asarray(b, np.uint64)) & self.modulus_mask
