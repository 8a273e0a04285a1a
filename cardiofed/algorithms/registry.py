"""Build an algorithm by name: ``fedavg``, ``fedprox``, ``fedadam``, ``fedyogi``,
``scaffold`` (FedAvg's server step; the control variates live in the simulator, see
:mod:`cardiofed.algorithms.scaffold`)."""

from __future__ import annotations

from dataclasses import replace

from cardiofed.aggregation.robust import RobustAggregation
from cardiofed.aggregation.server_optimizers import ServerAdaptive, ServerOptimizer, ServerSGD
from cardiofed.algorithms.base import FederatedAlgorithm
from cardiofed.exceptions import ConfigurationError
from cardiofed.training.config import LocalTrainingConfig

ALGORITHMS: tuple[str, ...] = ("fedavg", "fedprox", "fedadam", "fedyogi", "scaffold")


def make_algorithm(name: str, local: LocalTrainingConfig, *, server_lr: float | None = None,
                   proximal_mu: float = 0.01, beta1: float = 0.9, beta2: float = 0.99,
                   tau: float = 1e-3, robust: RobustAggregation | None = None
                   ) -> FederatedAlgorithm:
    """An algorithm from its name and settings.

    ``server_lr`` defaults to 1.0 for FedAvg/FedProx/SCAFFOLD and 0.01 for FedAdam/FedYogi
    (Reddi et al. 2021). ``proximal_mu`` applies to FedProx only.
    """
    if name not in ALGORITHMS:
        raise ConfigurationError(f"The 'algorithm' parameter must be one of {list(ALGORITHMS)}; "
                                 f"got {name!r}.")
    server: ServerOptimizer
    if name in ("fedavg", "fedprox", "scaffold"):
        server = ServerSGD(lr=1.0 if server_lr is None else server_lr)
    else:
        server = ServerAdaptive(variant=name.removeprefix("fed"),
                                lr=0.01 if server_lr is None else server_lr,
                                beta1=beta1, beta2=beta2, tau=tau)
    if name == "fedprox":
        if proximal_mu <= 0:
            raise ConfigurationError(
                f"The 'proximal_mu' parameter must be > 0 for fedprox; got {proximal_mu!r}.")
        local = replace(local, proximal_mu=proximal_mu)
    else:
        local = replace(local, proximal_mu=0.0)
    return FederatedAlgorithm(name=name, local=local, server=server, robust=robust)
