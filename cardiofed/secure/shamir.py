"""Shamir secret sharing of 32-byte secrets over the prime field of 2^521 - 1.

``split`` gives each holder (a positive integer id) a share; any `threshold` shares give
the secret back (:func:`combine`), fewer say nothing about it. The polynomial's
coefficients come from :mod:`secrets`.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping

from cardiofed.exceptions import ConfigurationError

PRIME = 2**521 - 1  # a Mersenne prime, larger than any 32-byte secret
SECRET_BYTES = 32
SHARE_BYTES = 66  # an element of the field, big-endian


def split(secret: bytes, threshold: int, holders: Iterable[int]) -> dict[int, bytes]:
    """Shares of `secret` for `holders` (distinct ids >= 1); `threshold` of them recover it."""
    ids = list(holders)
    if len(secret) != SECRET_BYTES:
        raise ConfigurationError(f"A shared secret has {SECRET_BYTES} bytes; got "
                                 f"{len(secret)}.")
    if len(set(ids)) != len(ids) or any(not 1 <= i < PRIME for i in ids):
        raise ConfigurationError("Share holders must be distinct ids >= 1.")
    if not 1 <= threshold <= len(ids):
        raise ConfigurationError(f"The 'threshold' parameter must be in [1, {len(ids)}] (the "
                                 f"holders); got {threshold!r}.")
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME)
                                                      for _ in range(threshold - 1)]
    return {i: _evaluate(coefficients, i).to_bytes(SHARE_BYTES, "big") for i in ids}


def combine(shares: Mapping[int, bytes], threshold: int) -> bytes:
    """The secret of `threshold` or more shares (id -> share), by Lagrange interpolation
    at 0; refused with fewer."""
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} shares cannot recover a secret shared with "
                         f"threshold {threshold}.")
    points = [(i, int.from_bytes(s, "big")) for i, s in list(shares.items())[:threshold]]
    secret = 0
    for i, y in points:
        num, den = 1, 1
        for j, _ in points:
            if j != i:
                num = num * -j % PRIME
                den = den * (i - j) % PRIME
        secret = (secret + y * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * SECRET_BYTES):
        raise ValueError("The shares do not combine to a secret: some are corrupt.")
    return secret.to_bytes(SECRET_BYTES, "big")


def _evaluate(coefficients: list[int], x: int) -> int:
    out = 0
    for c in reversed(coefficients):
        out = (out * x + c) % PRIME
    return out
