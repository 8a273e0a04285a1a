"""CardioFed: federated training of cardiovascular risk models across hospitals."""

__version__ = "0.1.0"
