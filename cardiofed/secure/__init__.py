"""Secure aggregation: the coordinator learns the sum of the sites' vectors, not one of them.

Pairwise masking with X25519 key agreement and a ChaCha20 stream as PRG, Shamir shares
of each site's keys for the sites that drop out after sending, a sparse neighbour graph
so each site's cost grows like log n (SecAgg+: Bonawitz et al., CCS 2017; Bell et al.,
CCS 2020), and quantisation with stochastic rounding into a ring whose width is chosen
so that the sum cannot wrap. Pure functions and small state objects; nothing here knows
about transport.
"""

from cardiofed.secure.protocol import (
    Advertisement,
    SecureSite,
    SecureSum,
    SumPlan,
    unmask_sum,
)
from cardiofed.secure.quantise import RingCodec

__all__ = ["Advertisement", "RingCodec", "SecureSite", "SecureSum", "SumPlan", "unmask_sum"]
