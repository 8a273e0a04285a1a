"""When a federation has converged: the plan's rounds are a maximum, and training stops
once the sites' training loss has stopped improving.

The signal is each round's loss as the sites report it (their mean mini-batch loss while
training from the global model, weighted by their declared sample sizes). Sites that
train under differential privacy release no loss: a round without one never counts
towards stopping, so a private study runs every round of its plan, as its DP-SGD
budget was calibrated for. Pure functions: the simulator and the coordinator's rounds
both call them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from cardiofed.exceptions import ConfigurationError


@dataclass(frozen=True)
class StoppingRule:
    """Stop after ``patience`` rounds whose loss is not below ``(1 - tolerance)`` times
    the best loss before them."""

    patience: int
    tolerance: float = 1e-3

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise ConfigurationError(f"The 'stop_patience' parameter must be >= 1; got "
                                     f"{self.patience!r}.")
        if not 0 <= self.tolerance < 1:
            raise ConfigurationError(f"The 'stop_tolerance' parameter must be in [0, 1); got "
                                     f"{self.tolerance!r}.")

    def stalled(self, losses: Sequence[float]) -> bool:
        """Whether the rounds' losses (oldest first; NaN where a round released none)
        show no improvement over the last ``patience`` rounds that reported one."""
        known = [x for x in losses if math.isfinite(x)]
        if len(known) <= self.patience:
            return False
        best_before = min(known[:-self.patience])
        return min(known[-self.patience:]) > best_before * (1 - self.tolerance)


def round_loss(losses: Sequence[float]) -> float:
    """One round's loss: the median of the sites' reported losses (NaN when no site
    reported one). A median, not a mean weighted by declared sample sizes: a minority of
    sites cannot stop a study early by the losses or the sizes they declare."""
    known = [x for x in losses if math.isfinite(x)]
    return float(statistics.median(known)) if known else float("nan")
