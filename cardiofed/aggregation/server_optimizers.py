"""Server optimisers: how the averaged client update moves the global model.

Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2. With
``delta`` the (weighted) mean of client updates ``local - global``:

* FedAvg / server SGD:  ``x <- x + eta * delta``
* FedAdam:  ``m <- b1 m + (1 - b1) delta``;  ``v <- b2 v + (1 - b2) delta^2``;
  ``x <- x + eta m / (sqrt(v) + tau)``
* FedYogi:  as FedAdam but ``v <- v - (1 - b2) delta^2 sign(v - delta^2)``

Each optimiser is a frozen config with pure ``init`` and ``step`` functions; the state
is plain arrays, so it can be persisted by the coordinator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from cardiofed.exceptions import ConfigurationError
from cardiofed.models.kinds import Weights


@dataclass(frozen=True)
class ServerState:
    """Optimiser moments (empty for server SGD) and the number of steps taken."""

    step: int = 0
    m: Weights = field(default_factory=dict)
    v: Weights = field(default_factory=dict)


class ServerOptimizer(Protocol):
    @property
    def name(self) -> str: ...

    def init(self, weights: Weights) -> ServerState: ...

    def step(self, weights: Weights, delta: Weights,
             state: ServerState) -> tuple[Weights, ServerState]: ...


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigurationError(f"The {name!r} parameter must be > 0; got {value!r}.")


def _unit(name: str, value: float) -> None:
    if not 0 <= value < 1:
        raise ConfigurationError(f"The {name!r} parameter must be in [0, 1); got {value!r}.")


@dataclass(frozen=True, kw_only=True)
class ServerSGD:
    """FedAvg's server step with a server learning rate (1.0 = plain averaging)."""

    lr: float = 1.0
    name: str = "sgd"

    def __post_init__(self) -> None:
        _positive("server_lr", self.lr)

    def init(self, weights: Weights) -> ServerState:
        return ServerState()

    def step(self, weights: Weights, delta: Weights,
             state: ServerState) -> tuple[Weights, ServerState]:
        new = {k: (w + self.lr * delta[k]).astype(np.float32) for k, w in weights.items()}
        return new, ServerState(step=state.step + 1)


@dataclass(frozen=True, kw_only=True)
class ServerAdaptive:
    """FedAdam (``variant="adam"``) or FedYogi (``variant="yogi"``)."""

    variant: str = "adam"
    lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.variant not in ("adam", "yogi"):
            raise ConfigurationError(
                f"The 'variant' parameter must be 'adam' or 'yogi'; got {self.variant!r}.")
        _positive("server_lr", self.lr)
        _positive("tau", self.tau)
        _unit("beta1", self.beta1)
        _unit("beta2", self.beta2)

    @property
    def name(self) -> str:
        return self.variant

    def init(self, weights: Weights) -> ServerState:
        # Reddi et al. initialise v to tau^2.
        return ServerState(m={k: np.zeros_like(w, dtype=np.float64) for k, w in weights.items()},
                           v={k: np.full(w.shape, self.tau**2) for k, w in weights.items()})

    def step(self, weights: Weights, delta: Weights,
             state: ServerState) -> tuple[Weights, ServerState]:
        m, v, new = {}, {}, {}
        for k, w in weights.items():
            d = np.asarray(delta[k], dtype=np.float64)
            m[k] = self.beta1 * state.m[k] + (1 - self.beta1) * d
            d2 = d * d
            if self.variant == "adam":
                v[k] = self.beta2 * state.v[k] + (1 - self.beta2) * d2
            else:
                v[k] = state.v[k] - (1 - self.beta2) * d2 * np.sign(state.v[k] - d2)
            new[k] = (w + self.lr * m[k] / (np.sqrt(v[k]) + self.tau)).astype(np.float32)
        return new, ServerState(step=state.step + 1, m=m, v=v)
