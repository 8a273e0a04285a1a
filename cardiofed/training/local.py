"""Local training at one site: mini-batch SGD or Adam, optional proximal term (FedProx).

The same function trains a site's model in the simulator, in the hospital node and
for the local-only and pooled baselines. Mini-batches are drawn by shuffling with a
generator seeded by the caller, so a run is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cardiofed.models.kinds import Weights
from cardiofed.training.config import LocalOptimizer, LocalTrainingConfig

__all__ = ["LocalOptimizer", "LocalResult", "LocalTrainingConfig", "bce_loss", "train_local"]


@dataclass(frozen=True)
class LocalResult:
    num_steps: int
    mean_loss: float


_bce_rows = nn.BCEWithLogitsLoss(reduction="none")


def bce_loss(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Binary cross-entropy of each record, averaged (or summed). A record of 2-D labels
    is a patient's intervals (a discrete-time survival model,
    :mod:`cardiofed.survival.discrete`): -1 marks an interval the patient was not at risk
    in, and the patient's loss is the sum over the others."""
    if y.ndim == 1:
        return nn.functional.binary_cross_entropy_with_logits(logits, y, reduction=reduction)
    at_risk = y >= 0
    per_record = (_bce_rows(logits, y.clamp(min=0)) * at_risk).sum(dim=-1)
    return per_record.mean() if reduction == "mean" else per_record.sum()


class PlainSGD:
    """``p -= lr * grad``: what :class:`torch.optim.SGD` does without momentum or weight
    decay, bit for bit (tested), without its per-step dispatch (a third of a small
    model's step) or its import of ``torch._dynamo`` (a second and 70 MB on first use)."""

    def __init__(self, params: list[nn.Parameter], lr: float) -> None:
        self.params, self.lr = params, lr

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for p in self.params:
            if p.grad is not None:
                p.add_(p.grad, alpha=-self.lr)


def _optimizer(params: list[nn.Parameter], config: LocalTrainingConfig
               ) -> torch.optim.Optimizer | PlainSGD:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.momentum or config.weight_decay:
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    return PlainSGD(params, config.lr)


def train_local(model: nn.Module, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor,
                config: LocalTrainingConfig, *, seed: int, anchor: Weights | None = None,
                sample_weight: np.ndarray | None = None,
                grad_correction: Weights | None = None) -> LocalResult:
    """Train `model` in place on preprocessed rows `x` and labels `y`.

    ``anchor`` are the global weights the proximal term ``mu/2 ||w - anchor||^2``
    pulls towards (FedProx); ignored when ``config.proximal_mu`` is 0.
    ``sample_weight`` weights each row's loss (covariate-shift correction);
    ``grad_correction`` is added to every step's gradient (SCAFFOLD's ``c - c_i``).
    """
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.float32)
    n = len(yt)
    if n == 0:
        raise ValueError("train_local needs at least one training row; got 0.")
    wt = None
    if sample_weight is not None:
        if sample_weight.shape != (n,) or not np.isfinite(sample_weight).all() \
                or (sample_weight < 0).any():
            raise ValueError(f"sample_weight must be {n} finite non-negative values; got "
                             f"shape {sample_weight.shape}.")
        wt = torch.as_tensor(sample_weight, dtype=torch.float32)
    params = list(model.parameters())
    opt = _optimizer(params, config)
    correction = None
    if grad_correction is not None:
        correction = [torch.from_numpy(grad_correction[name])
                      for name, _ in model.named_parameters()]
    prox = None
    if config.proximal_mu > 0 and anchor is not None:
        prox = [torch.from_numpy(anchor[name]) for name, _ in model.named_parameters()]
    generator = torch.Generator().manual_seed(seed)
    steps = config.steps_for(n)
    bs = min(config.batch_size, n)
    model.train()
    total, done, order, pos = 0.0, 0, torch.randperm(n, generator=generator), 0
    while done < steps:
        if pos >= n:  # start a new epoch: reshuffle
            order, pos = torch.randperm(n, generator=generator), 0
        idx = order[pos:pos + bs]
        pos += bs
        opt.zero_grad()  # torch's default: set_to_none
        if wt is None:
            loss = bce_loss(model(xt[idx]), yt[idx])
        else:
            loss = (wt[idx] * _bce_rows(model(xt[idx]), yt[idx])).mean()
        objective = loss
        if prox is not None:
            objective = loss + 0.5 * config.proximal_mu * sum(
                ((p - a) ** 2).sum() for p, a in zip(params, prox, strict=True))
        objective.backward()
        if correction is not None:
            for p, c in zip(params, correction, strict=True):
                assert p.grad is not None  # every parameter takes part in the loss
                p.grad.add_(c)
        opt.step()
        total += float(loss.detach())
        done += 1
    return LocalResult(num_steps=steps, mean_loss=total / steps)
