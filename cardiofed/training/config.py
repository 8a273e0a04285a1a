"""How a site trains in one round, without PyTorch: the coordinator validates a plan's
training settings with it and never trains (:mod:`cardiofed.training.local` does)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cardiofed.exceptions import ConfigurationError

__all__ = ["LocalOptimizer", "LocalTrainingConfig"]

LocalOptimizer = Literal["sgd", "adam"]


@dataclass(frozen=True, kw_only=True)
class LocalTrainingConfig:
    """How a site trains in one round.

    ``local_steps`` (if set) fixes the number of mini-batch steps per round, as FLamby
    does; otherwise the site runs ``local_epochs`` passes over its data.
    """

    lr: float = 0.05
    batch_size: int = 32
    local_epochs: int = 1
    local_steps: int | None = None
    optimizer: LocalOptimizer = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    proximal_mu: float = 0.0

    def __post_init__(self) -> None:
        _check(self.lr > 0, "lr", self.lr, "> 0")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, ">= 1")
        _check(self.local_epochs >= 1, "local_epochs", self.local_epochs, ">= 1")
        _check(self.local_steps is None or self.local_steps >= 1, "local_steps",
               self.local_steps, ">= 1 or None")
        _check(self.optimizer in ("sgd", "adam"), "optimizer", self.optimizer, "'sgd' or 'adam'")
        _check(0 <= self.momentum < 1, "momentum", self.momentum, "in [0, 1)")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        _check(self.proximal_mu >= 0, "proximal_mu", self.proximal_mu, ">= 0")

    def steps_for(self, n_samples: int) -> int:
        """Mini-batch steps one round takes on `n_samples` rows."""
        if self.local_steps is not None:
            return self.local_steps
        return self.local_epochs * -(-n_samples // self.batch_size)


def _check(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise ConfigurationError(f"The {name!r} parameter must be {expected}; got {value!r}.")
