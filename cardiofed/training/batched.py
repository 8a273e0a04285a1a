"""Local training of many sites at once: the same SGD as :func:`train_local`, vectorised.

Every site of a round trains from the same global model on its own rows with its own
seeded mini-batch order, exactly as :func:`cardiofed.training.local.train_local` would
one site after another: the same permutations (``torch.randperm`` with the site's
generator), the same batches (the last of an epoch partial), the same loss (mean
binary cross-entropy, optionally row-weighted, plus FedProx's proximal term), the same
plain-SGD step with weight decay. The sites' parameters are stacked, and each step
updates every site that still has steps to run: logistic regression with its closed-
form gradient, the MLP with ``torch.func.vmap`` over per-site gradients. Rows live in
one array; each site's batches are index blocks into it.

Plain SGD only (no momentum, no Adam): :func:`batchable` says why a configuration is
left to the per-site loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from cardiofed.models.networks import Weights, make_model
from cardiofed.training.local import LocalTrainingConfig

__all__ = ["BatchedResult", "batchable", "train_batched"]


@dataclass(frozen=True)
class BatchedResult:
    """Per site, in input order: its new weights minus the global ones, its steps and the
    mean training loss over them."""

    deltas: list[Weights]
    steps: list[int]
    mean_loss: list[float]


def batchable(config: LocalTrainingConfig) -> str | None:
    """Why `config` needs the per-site loop, or None when it can be vectorised."""
    if config.optimizer != "sgd":
        return f"the {config.optimizer!r} optimiser keeps per-site moments"
    if config.momentum:
        return "momentum keeps a per-site velocity"
    return None


def _batches(n: int, config: LocalTrainingConfig, seed: int, width: int) -> np.ndarray:
    """(steps, width) local row indices in train_local's order, -1 where a batch is short:
    one permutation per epoch, cut into batches of min(batch_size, n), the last partial."""
    steps = config.steps_for(n)
    bs = min(config.batch_size, n)
    per_epoch = -(-n // bs)
    generator = torch.Generator().manual_seed(seed)
    epochs = []
    for _ in range(-(-steps // per_epoch)):
        order = np.full(per_epoch * bs, -1, dtype=np.int32)
        order[:n] = torch.randperm(n, generator=generator).numpy()
        epochs.append(order.reshape(per_epoch, bs))
    plan = np.concatenate(epochs)[:steps]
    if bs < width:
        plan = np.pad(plan, ((0, 0), (0, width - bs)), constant_values=-1)
    return plan


def train_batched(model_kind: str, global_weights: Weights, xs: Sequence[np.ndarray],
                  ys: Sequence[np.ndarray], config: LocalTrainingConfig, seeds: Sequence[int],
                  sample_weights: Sequence[np.ndarray | None] | None = None
                  ) -> BatchedResult:
    """Train every site (preprocessed rows `xs[k]`, labels `ys[k]`, seed `seeds[k]`) from
    `global_weights` with plain SGD; see the module docstring."""
    reason = batchable(config)
    if reason is not None:
        raise ValueError(f"train_batched runs plain SGD; {reason}.")
    sizes = np.array([len(y) for y in ys])
    if (sizes == 0).any():
        raise ValueError("train_batched needs at least one training row at every site.")
    width = int(min(config.batch_size, sizes.max()))
    plans = [_batches(int(n), config, seed, width) for n, seed in zip(sizes, seeds,
                                                                       strict=True)]
    steps = np.array([len(p) for p in plans])
    # Sites with the most steps first: at step s the sites still training are a prefix.
    order = np.argsort(-steps, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(sizes[order])[:-1]])
    data = _Rows(
        x=np.concatenate([xs[k] for k in order]).astype(np.float32, copy=False),
        y=np.concatenate([ys[k] for k in order]).astype(np.float32, copy=False),
        w=None if sample_weights is None or all(w is None for w in sample_weights) else
        np.concatenate([np.ones(sizes[k]) if sample_weights[k] is None else sample_weights[k]
                        for k in order]).astype(np.float32),
        # Each site's batches one after another, as row indices (-1: a short batch).
        flat=np.concatenate([np.where(plans[k] >= 0, plans[k] + offsets[i], -1)
                             for i, k in enumerate(order)]).astype(np.int64),
        first=np.concatenate([[0], np.cumsum(steps[order])[:-1]]),
        active=len(steps) - np.cumsum(np.bincount(steps))[:int(steps.max())])
    if model_kind == "logistic":
        params, loss = _train_logistic(global_weights, data, config)
    else:
        params, loss = _train_network(model_kind, global_weights, data, config)
    back = np.empty_like(order)
    back[order] = np.arange(len(order))  # sorted position of each site
    deltas = [{n: (params[n][back[k]] - global_weights[n]).astype(np.float32) for n in params}
              for k in range(len(xs))]
    return BatchedResult(deltas=deltas, steps=steps.tolist(),
                         mean_loss=(loss[back] / steps).tolist())


@dataclass
class _Rows:
    """Every site's rows in one array, sites sorted by their number of steps."""

    x: np.ndarray  # (rows, d) float32
    y: np.ndarray
    w: np.ndarray | None  # row weights, or None
    flat: np.ndarray  # (total batches, width) row indices, -1 padded
    first: np.ndarray  # each site's first batch in `flat`
    active: np.ndarray  # sites still training at each step (a prefix)
    safe: np.ndarray = field(init=False)  # `flat` with padding pointing at row 0
    mask: np.ndarray = field(init=False)  # 1 for a real row, 0 for padding
    weight: np.ndarray = field(init=False)  # row weight x mask
    count: np.ndarray = field(init=False)  # rows per batch

    def __post_init__(self) -> None:
        self.mask = (self.flat >= 0).astype(np.float32)
        self.safe = np.maximum(self.flat, 0)
        self.weight = self.mask if self.w is None else self.w[self.safe] * self.mask
        self.count = self.mask.sum(axis=1)

    def batch(self, s: int
              ) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Step `s`: how many sites train, and their batches: rows, labels, row weights
        (0 where padded), mask, and each batch's number of rows."""
        m = int(self.active[s])
        batches = self.first[:m] + s
        safe = self.safe[batches]
        return (m, self.x[safe], self.y[safe], self.weight[batches], self.mask[batches],
                self.count[batches])


def _train_logistic(start: Weights, data: _Rows, config: LocalTrainingConfig
                    ) -> tuple[Weights, np.ndarray]:
    """Closed-form gradient steps of logistic regression, every active site at once."""
    k_sites = len(data.first)
    w = np.repeat(start["linear.weight"][:, :].astype(np.float32), k_sites, axis=0)  # (K, d)
    b = np.repeat(start["linear.bias"].astype(np.float32), k_sites)  # (K,)
    w0, b0 = start["linear.weight"][0].astype(np.float32), np.float32(start["linear.bias"][0])
    mu, lr, decay = np.float32(config.proximal_mu), np.float32(config.lr), \
        np.float32(config.weight_decay)
    total = np.zeros(k_sites)
    for s in range(len(data.active)):
        m, xb, yb, weight, _, count = data.batch(s)
        z = np.matmul(xb, w[:m, :, None])[..., 0] + b[:m, None]
        rows = np.logaddexp(np.float32(0), z) - yb * z
        total[:m] += (weight * rows).sum(axis=1) / count
        err = weight * (1 / (1 + np.exp(-z)) - yb) / count[:, None]
        g_w = np.matmul(err[:, None, :], xb)[:, 0, :]
        g_b = err.sum(axis=1)
        if mu:
            g_w += mu * (w[:m] - w0)
            g_b += mu * (b[:m] - b0)
        if decay:
            g_w += decay * w[:m]
            g_b += decay * b[:m]
        w[:m] -= lr * g_w
        b[:m] -= lr * g_b
    return {"linear.weight": w[:, None, :], "linear.bias": b[:, None]}, total


def _train_network(model_kind: str, start: Weights, data: _Rows, config: LocalTrainingConfig
                   ) -> tuple[Weights, np.ndarray]:
    """Per-site gradients by ``torch.func.vmap`` over the stacked parameters."""
    k_sites = len(data.first)
    template = make_model(model_kind, data.x.shape[1], seed=0)
    names = [name for name, _ in template.named_parameters()]
    params = {n: torch.as_tensor(np.repeat(start[n][None], k_sites, axis=0)) for n in names}
    anchor = {n: torch.as_tensor(start[n]) for n in names}
    mu, lr, decay = config.proximal_mu, config.lr, config.weight_decay

    def site_loss(p: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor,
                  wb: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = functional_call(template, p, (xb,))
        rows = torch.nn.functional.binary_cross_entropy_with_logits(z, yb, reduction="none")
        loss = (wb * rows).sum() / mask.sum()
        objective = loss
        if mu > 0:
            objective = loss + 0.5 * mu * sum(((p[n] - anchor[n]) ** 2).sum() for n in names)
        return objective, loss

    per_site_grad = vmap(grad(site_loss, has_aux=True))
    total = np.zeros(k_sites)
    for s in range(len(data.active)):
        m, xb, yb, weight, mask, _ = data.batch(s)
        current = {n: params[n][:m] for n in names}
        grads, loss = per_site_grad(current, torch.from_numpy(xb), torch.from_numpy(yb),
                                    torch.from_numpy(weight), torch.from_numpy(mask))
        with torch.no_grad():
            for n in names:
                g = grads[n] + decay * current[n] if decay else grads[n]
                params[n][:m] = current[n] - lr * g
        total[:m] += loss.detach().double().numpy()
    return {n: v.numpy() for n, v in params.items()}, total
