"""Record-level DP-SGD at one site, through Opacus.

Each step draws a Poisson sample of the site's rows (each row independently with
probability ``q = batch_size / n``), computes per-sample gradients
(:class:`opacus.GradSampleModule`), clips each to ``max_grad_norm`` and adds Gaussian
noise of standard deviation ``noise_multiplier * max_grad_norm``
(:class:`opacus.optimizers.DPOptimizer`). The privacy unit is one patient record of
the site. The function returns the :class:`GaussianEvent` it ran, for the ledger.

The noise and the Poisson masks come from a generator seeded with fresh secret bits
(:func:`cardiofed.privacy.randomness.secure_torch_generator`), never from a seed another
party knows: with a known seed the coordinator could replay the noise and remove it.

The sensitivity is the fixed clipping bound, never a quantity computed from the data.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from cardiofed.exceptions import ConfigurationError
from cardiofed.training.local import LocalResult, LocalTrainingConfig, bce_loss

if TYPE_CHECKING:  # imported at run time inside train_local_dp: cardiofed.privacy imports
    # this module (through site_privacy), so a module-level import would be circular.
    from cardiofed.privacy.accountant import GaussianEvent


@dataclass(frozen=True, kw_only=True)
class DPConfig:
    """DP-SGD settings: noise multiplier (sigma / sensitivity), the clipping bound of each
    record's gradient, and the separate bound of its output-bias part (``intercept_clip``;
    None: one flat bound over every parameter).

    The output bias's gradient of the log-loss is ``p - y``, never more than 1 in absolute
    value: with its own bound of 1 it is never clipped, so the intercept's score equation
    (mean predicted = observed) holds in expectation. Under one flat bound, the rare
    events' larger gradients are clipped hardest and the model under-predicts the risk
    (calibration-in-the-large +0.5 to +0.7 on the demo at epsilon 1). The price is a
    sensitivity of ``sqrt(max_grad_norm^2 + intercept_clip^2)`` instead of
    ``max_grad_norm``, which the noise is scaled to."""

    noise_multiplier: float
    max_grad_norm: float = 1.0
    intercept_clip: float | None = 1.0

    @property
    def sensitivity(self) -> float:
        """L2 bound of one record's clipped gradient: what the noise is scaled to."""
        return math.hypot(self.max_grad_norm, self.intercept_clip or 0.0)

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ConfigurationError(f"The 'noise_multiplier' parameter must be finite and > 0; "
                                     f"got {self.noise_multiplier!r}.")
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise ConfigurationError(f"The 'max_grad_norm' parameter must be finite and > 0; "
                                     f"got {self.max_grad_norm!r}.")
        if self.intercept_clip is not None and not (
                self.intercept_clip > 0 and math.isfinite(self.intercept_clip)):
            raise ConfigurationError(f"The 'intercept_clip' parameter must be finite and > 0 "
                                     f"(or None); got {self.intercept_clip!r}.")


def check_dp_training(config: LocalTrainingConfig) -> None:
    """Raise :class:`ConfigurationError` for local training DP-SGD does not run."""
    if config.proximal_mu > 0:
        raise ConfigurationError("DP-SGD does not support FedProx's proximal term "
                                 f"(proximal_mu={config.proximal_mu!r}); use fedavg, fedadam "
                                 "or fedyogi with differential privacy.")


def dp_schedule(n_records: int, config: LocalTrainingConfig) -> tuple[float, int]:
    """(Poisson sampling rate, steps) of one round of DP-SGD on `n_records` rows."""
    if n_records < 1:
        raise ValueError(f"DP-SGD needs at least one record; got {n_records}.")
    return min(1.0, config.batch_size / n_records), config.steps_for(n_records)


def train_local_dp(model: nn.Module, x: np.ndarray, y: np.ndarray, config: LocalTrainingConfig,
                   dp: DPConfig, *, n_public: int | None = None,
                   insecure_generator: torch.Generator | None = None
                   ) -> tuple[LocalResult, GaussianEvent]:
    """Train `model` in place with DP-SGD; return the result and the privacy event.

    ``n_public`` (the noisy record count a site released) plans the schedule: sampling
    rate, steps and the expected batch size that scales the noisy sum. Then nothing in the
    update's distribution, nor the event, depends on the exact count; left None, the
    exact count plans it (the simulator's baselines and tests).

    ``insecure_generator`` replaces the secret noise source with one the caller holds:
    the release is then NOT private (anyone with the generator's seed can remove the
    noise). It exists for privacy audits' positive controls and noise-statistics tests
    only; no configuration, command or service reaches it.
    """
    from cardiofed.privacy.accountant import GaussianEvent
    from cardiofed.privacy.randomness import secure_torch_generator

    check_dp_training(config)
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.float32)
    n_plan = len(yt) if n_public is None else n_public
    sample_rate, steps = dp_schedule(n_plan, config)
    generator = insecure_generator or secure_torch_generator()
    # Imported here: Opacus costs about 1.5 s at import, paid by every coordinator and
    # node process that imports this module without training privately.
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer, DPPerLayerOptimizer

    gsm = GradSampleModule(model, loss_reduction="sum")
    params = [p for p in gsm.parameters() if p.requires_grad]
    base: torch.optim.Optimizer
    if config.optimizer == "adam":
        base = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    else:
        base = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    expected = max(1, round(sample_rate * n_plan))
    optimizer: DPOptimizer
    if dp.intercept_clip is None or len(params) < 2:
        optimizer = DPOptimizer(base, noise_multiplier=dp.noise_multiplier,
                                max_grad_norm=dp.max_grad_norm, expected_batch_size=expected,
                                loss_reduction="mean", generator=generator)
    else:
        # The output bias is the models' last parameter; the others share max_grad_norm.
        others = len(params) - 1
        bounds = [dp.max_grad_norm / math.sqrt(others)] * others + [dp.intercept_clip]
        optimizer = DPPerLayerOptimizer(base, noise_multiplier=dp.noise_multiplier,
                                        max_grad_norm=bounds, expected_batch_size=expected,
                                        loss_reduction="mean", generator=generator)
    gsm.train()
    with warnings.catch_warnings():
        # Opacus' per-sample hooks fire on module outputs because inputs need no gradient;
        # PyTorch warns about exactly that, and it is what Opacus intends.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for _ in range(steps):
            mask = torch.rand(len(yt), generator=generator) < sample_rate
            optimizer.zero_grad(set_to_none=True)
            loss = bce_loss(gsm(xt[mask]), yt[mask], reduction="sum")
            loss.backward()  # an empty sample still takes a (pure noise) step, as accounted
            optimizer.step()
    gsm._close()
    event = GaussianEvent(noise_multiplier=dp.noise_multiplier, sample_rate=sample_rate,
                          steps=steps)
    # The training loss is a function of the records computed before any noise: it is
    # not part of the private release, so it is not returned (NaN) and never leaves.
    return LocalResult(num_steps=steps, mean_loss=float("nan")), event
