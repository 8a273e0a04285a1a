"""DP as a wrapper around a site's local training: calibrate, check, train, record.

:class:`SitePrivacy` owns the site's ledger and DP-SGD settings. Its :meth:`train` has
the signature of :func:`cardiofed.training.local.train_local`, so any algorithm's client
step runs privately by being handed it; no algorithm is subclassed for DP.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from cardiofed.exceptions import ConfigurationError, PrivacyBudgetExceeded
from cardiofed.models.networks import Weights
from cardiofed.privacy.accountant import GaussianEvent, calibrate_noise
from cardiofed.privacy.budget import PrivacyLedger
from cardiofed.training.dp import DPConfig, dp_schedule, train_local_dp
from cardiofed.training.local import LocalResult, LocalTrainingConfig


@dataclass
class SitePrivacy:
    """A site's DP-SGD settings and its budget ledger."""

    ledger: PrivacyLedger
    dp: DPConfig

    @classmethod
    def calibrated(cls, ledger: PrivacyLedger, config: LocalTrainingConfig, *, rounds: int,
                   max_grad_norm: float = 1.0) -> SitePrivacy:
        """Noise for the whole planned schedule (`rounds` rounds of `config` on the
        site's records), composed after what the ledger already holds, so that taking
        part in every round spends at most the budget's epsilon_max. A site with nothing
        left raises :class:`PrivacyBudgetExceeded`."""
        if ledger.remaining() <= 0:
            raise PrivacyBudgetExceeded(
                f"Site {ledger.site!r} has spent epsilon {ledger.spent():.4f} of its "
                f"epsilon_max {ledger.budget.epsilon_max:g}; it takes part in no further "
                f"training.")
        sample_rate, steps = dp_schedule(ledger.n_records, config)
        sigma = calibrate_noise(target_epsilon=ledger.budget.epsilon_max, delta=ledger.delta,
                                sample_rate=sample_rate, steps=steps * rounds,
                                accountant=ledger.accountant)
        return cls(ledger=ledger, dp=DPConfig(noise_multiplier=sigma,
                                              max_grad_norm=max_grad_norm))

    def train(self, model: nn.Module, x: np.ndarray, y: np.ndarray,
              config: LocalTrainingConfig, *, seed: int, anchor: Weights | None = None,
              sample_weight: np.ndarray | None = None,
              what: str = "a training round") -> LocalResult:
        """Check the budget, run DP-SGD, record the spend; refuse if over budget."""
        if sample_weight is not None:
            raise ConfigurationError("DP-SGD does not take per-sample weights (covariate-shift "
                                     "correction); switch one of them off.")
        sample_rate, steps = dp_schedule(len(y), config)
        planned = GaussianEvent(noise_multiplier=self.dp.noise_multiplier,
                                sample_rate=sample_rate, steps=steps)
        self.ledger.check([planned], what)
        result, event = train_local_dp(model, x, y, config, self.dp, seed=seed)
        self.ledger.record([event], what, noise_multiplier=self.dp.noise_multiplier,
                           max_grad_norm=self.dp.max_grad_norm)
        return result
