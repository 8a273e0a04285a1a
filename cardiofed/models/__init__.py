"""Risk models: PyTorch networks and the scikit-learn style estimator."""

from cardiofed.models.networks import (
    MODEL_KINDS,
    Weights,
    get_weights,
    make_model,
    predict_proba,
    set_weights,
)

__all__ = ["MODEL_KINDS", "Weights", "get_weights", "make_model", "predict_proba", "set_weights"]
