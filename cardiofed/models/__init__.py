"""Risk models: their kinds and weights (:mod:`~cardiofed.models.kinds`, no PyTorch)
and the PyTorch networks (:mod:`~cardiofed.models.networks`)."""
