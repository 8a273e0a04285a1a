"""A federated algorithm: a client step and a server step, nothing about transport.

:class:`FederatedAlgorithm` composes a local training recipe
(:class:`~cardiofed.training.local.LocalTrainingConfig`, with FedProx's proximal term
when ``proximal_mu > 0``) with a server optimiser
(:mod:`cardiofed.aggregation.server_optimizers`). The in-process simulator and the
networked coordinator are two backends that gather :class:`ClientUpdate` objects for
the same algorithm.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from cardiofed.aggregation.robust import RobustAggregation, SiteAggregation
from cardiofed.aggregation.server_optimizers import ServerOptimizer, ServerState
from cardiofed.aggregation.weighted_mean import sample_size_weights, weighted_mean
from cardiofed.models.kinds import Weights
from cardiofed.training.config import LocalTrainingConfig

if TYPE_CHECKING:  # the coordinator aggregates without PyTorch; only a client step trains
    from torch import nn

    from cardiofed.training.local import LocalResult


class LocalTrainer(Protocol):
    """What trains a model in place at a site (plain SGD, or DP-SGD with a ledger)."""

    def __call__(self, model: nn.Module, x: np.ndarray, y: np.ndarray,
                 config: LocalTrainingConfig, *, seed: int, anchor: Weights | None = None,
                 sample_weight: np.ndarray | None = None) -> LocalResult: ...


@dataclass(frozen=True, kw_only=True)
class ClientUpdate:
    """What a site returns after local training: ``delta = local - global`` and counts."""

    site: str
    delta: Weights
    num_samples: int
    num_steps: int
    train_loss: float
    # Loss of the incoming global model on the site's training rows (for loss-based
    # weighting such as q-FFL); NaN when not asked for (it is one more release).
    global_loss: float = float("nan")


@dataclass(frozen=True, kw_only=True)
class FederatedAlgorithm:
    """Local training recipe plus server optimiser (FedAvg, FedProx, FedAdam, FedYogi)."""

    name: str
    local: LocalTrainingConfig
    server: ServerOptimizer
    # Robust aggregation (weight cap, norm bound, rule); None: the plain weighted mean.
    robust: RobustAggregation | None = None

    def client_update(self, model: nn.Module, global_weights: Weights, x: np.ndarray,
                      y: np.ndarray, *, site: str, seed: int,
                      trainer: LocalTrainer | None = None,
                      report_global_loss: bool = False,
                      sample_weight: np.ndarray | None = None) -> ClientUpdate:
        """Train `model` from `global_weights` on the site's rows; return the update.

        `trainer` runs the local training; a site's DP wrapper
        (:meth:`cardiofed.privacy.SitePrivacy.train`) is passed here; by default
        :func:`~cardiofed.training.local.train_local`.
        """
        import torch

        from cardiofed.models.networks import get_weights, predict_logits, set_weights
        from cardiofed.training.local import train_local

        trainer = train_local if trainer is None else trainer
        set_weights(model, global_weights)
        global_loss = float("nan")
        if report_global_loss:
            global_loss = float(torch.nn.functional.binary_cross_entropy_with_logits(
                torch.from_numpy(predict_logits(model, x)),
                torch.as_tensor(y, dtype=torch.float64)))
        result = trainer(model, x, y, self.local, seed=seed, anchor=global_weights,
                         sample_weight=sample_weight)
        local = get_weights(model)
        return ClientUpdate(site=site, delta={k: local[k] - global_weights[k] for k in local},
                            num_samples=len(y), num_steps=result.num_steps,
                            train_loss=result.mean_loss, global_loss=global_loss)

    def init_server(self, weights: Weights) -> ServerState:
        return self.server.init(weights)

    def server_update(self, global_weights: Weights, updates: Sequence[ClientUpdate],
                      state: ServerState,
                      weights: Sequence[float] | None = None) -> tuple[Weights, ServerState]:
        """Weighted mean of the updates (sample-size weights unless `weights` are given,
        e.g. from a bias-correction rule), applied by the server optimiser."""
        new, state, _ = self.server_update_with_report(global_weights, updates, state, weights)
        return new, state

    def server_update_with_report(
            self, global_weights: Weights, updates: Sequence[ClientUpdate], state: ServerState,
            weights: Sequence[float] | None = None
    ) -> tuple[Weights, ServerState, list[SiteAggregation]]:
        """:meth:`server_update`, plus what robust aggregation did with each site's update
        (empty without robust aggregation)."""
        if not updates:
            return global_weights, state, []
        mean_delta, report = self.aggregate(updates, weights)
        new, state = self.server.step(global_weights, mean_delta, state)
        return new, state, report

    def aggregate(self, updates: Sequence[ClientUpdate], weights: Sequence[float] | None = None
                  ) -> tuple[Weights, list[SiteAggregation]]:
        """The updates' aggregate delta (sample-size weights unless `weights` are given)
        and what robust aggregation did with each (empty without it)."""
        if weights is None:
            weights = sample_size_weights([u.num_samples for u in updates])
        if self.robust is None:
            return weighted_mean([u.delta for u in updates], weights), []
        return self.robust.aggregate([u.delta for u in updates], weights,
                                     [u.site for u in updates])
