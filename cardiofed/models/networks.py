"""PyTorch risk models and their weights as named NumPy arrays.

Weights travel between sites and the coordinator as ``dict[str, np.ndarray]`` (the
``state_dict`` names), which is what safetensors stores; no module object leaves a site.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cardiofed.exceptions import ConfigurationError
from cardiofed.models.kinds import MODEL_KINDS, ModelKind, Weights, set_threads

__all__ = ["MLP", "MODEL_KINDS", "LogisticRegression", "ModelKind", "Weights", "get_weights",
           "make_model", "predict_logits", "predict_proba", "score", "set_threads",
           "set_weights"]


class LogisticRegression(nn.Module):
    """One linear layer; the output is the log-odds of the event."""

    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).squeeze(-1)


class MLP(nn.Module):
    """A small two-hidden-layer network (32, 16 units, ReLU); outputs log-odds."""

    def __init__(self, n_features: int, hidden: tuple[int, ...] = (32, 16)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = n_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def make_model(kind: str, n_features: int, *, seed: int) -> nn.Module:
    """A freshly initialised model; the same seed gives the same initial weights."""
    if kind not in MODEL_KINDS:
        raise ConfigurationError(f"model must be one of {list(MODEL_KINDS)}; got {kind!r}.")
    if n_features < 1:
        raise ConfigurationError(f"n_features must be >= 1; got {n_features}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LogisticRegression(n_features) if kind == "logistic" else MLP(n_features)


def get_weights(model: nn.Module) -> Weights:
    """A copy of the model's parameters as float32 NumPy arrays."""
    return {k: v.detach().cpu().numpy().astype(np.float32, copy=True)
            for k, v in model.state_dict().items()}


def set_weights(model: nn.Module, weights: Weights) -> None:
    """Load `weights` into `model` in place (names and shapes must match)."""
    state = model.state_dict()
    if set(state) != set(weights):
        raise ValueError(
            f"Weight names {sorted(weights)} do not match the model's {sorted(state)}.")
    with torch.no_grad():
        for name, tensor in state.items():
            value = weights[name]
            if tuple(value.shape) != tuple(tensor.shape):
                raise ValueError(f"Weight {name!r} has shape {value.shape}; "
                                 f"the model expects {tuple(tensor.shape)}.")
            tensor.copy_(torch.from_numpy(np.asarray(value, dtype=np.float32)))


def predict_logits(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Log-odds for preprocessed rows `x`."""
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(x, dtype=np.float32))).numpy().astype(np.float64)


def predict_proba(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Event probability for preprocessed rows `x`."""
    return 1.0 / (1.0 + np.exp(-predict_logits(model, x)))


def score(kind: str, weights: Weights, x: np.ndarray) -> np.ndarray:
    """Event probabilities of preprocessed rows `x` under a model given by its weights."""
    model = make_model(kind, x.shape[1], seed=0)
    set_weights(model, weights)
    return predict_proba(model, x)
