"""Transport-agnostic federated algorithms (client step / server step)."""

from cardiofed.algorithms.base import ClientUpdate, FederatedAlgorithm
from cardiofed.algorithms.registry import ALGORITHMS, make_algorithm

__all__ = ["ALGORITHMS", "ClientUpdate", "FederatedAlgorithm", "make_algorithm"]
