"""Experiment-level evaluation above the simulator: acceptability at every kind of site,
clinical value, effective data, the privacy audit and the experiment summary."""
