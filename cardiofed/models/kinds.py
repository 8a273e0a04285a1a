"""What a risk model is without PyTorch: its kinds, its weights as named arrays, and the
threads numerical work may use. Scoring a logistic regression needs nothing more
(:mod:`cardiofed.serving.model`); the networks themselves are in
:mod:`cardiofed.models.networks`."""

from __future__ import annotations

import os
import sys
from typing import Literal

import numpy as np

from cardiofed.exceptions import ConfigurationError

Weights = dict[str, np.ndarray]
ModelKind = Literal["logistic", "mlp"]
MODEL_KINDS: tuple[str, ...] = ("logistic", "mlp")
# Each kind's output bias, the parameter added to every log-odds (the intercept).
OUTPUT_BIAS: dict[str, str] = {"logistic": "linear.bias", "mlp": "net.4.bias"}


def set_threads() -> int:
    """Threads for CardioFed's numerical work: one, unless ``$CARDIOFED_TORCH_THREADS``
    asks for more, for PyTorch and for the BLAS and OpenMP pools NumPy, SciPy and
    scikit-learn use. The built-in models are tiny: a second thread mostly spins, and on
    a shared machine spinning threads starve each other (the demo ran 10x slower beside
    one busy process). PyTorch is not imported for this: loaded later, it reads the
    same count from ``OMP_NUM_THREADS``. Returns the number set."""
    from threadpoolctl import threadpool_limits

    raw = os.environ.get("CARDIOFED_TORCH_THREADS", "1")
    if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:
        raise ConfigurationError(f"CARDIOFED_TORCH_THREADS must be a whole number >= 1; got "
                                 f"{raw!r}.")
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(raw))
    else:
        os.environ["OMP_NUM_THREADS"] = raw
    threadpool_limits(limits=int(raw))
    return int(raw)
