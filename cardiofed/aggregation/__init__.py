"""Pure aggregation functions: weighted means and server optimisers."""

from cardiofed.aggregation.server_optimizers import (
    ServerAdaptive,
    ServerOptimizer,
    ServerSGD,
    ServerState,
)
from cardiofed.aggregation.weighted_mean import (
    Accumulator,
    accumulate,
    finalize,
    sample_size_weights,
    tail_average,
    weighted_mean,
)

__all__ = [
    "Accumulator", "ServerAdaptive", "ServerOptimizer", "ServerSGD", "ServerState",
    "accumulate", "finalize", "sample_size_weights", "tail_average", "weighted_mean",
]
