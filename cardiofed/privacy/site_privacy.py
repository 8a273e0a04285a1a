"""DP as a wrapper around everything a site releases: calibrate, check, release, record.

:class:`SitePrivacy` owns the site's ledger and the study's planned schedule. Each of
its release methods draws its noise from a secret source at the site
(:mod:`cardiofed.privacy.randomness`), calibrates it so that the ledger's total stays
within the release kind's cumulative share of the budget, refuses a release over
budget, and records what it spent:

* :meth:`release_statistics`: the federated preprocessing statistics (Gaussian noise on
  histograms and the record count, :func:`~cardiofed.data.preprocessing.private_site_statistics`);
* :meth:`train`: one round of DP-SGD, with the signature of
  :func:`cardiofed.training.local.train_local`, so any algorithm's client step runs
  privately by being handed it (no algorithm is subclassed for DP);
* :meth:`release_evaluation`: noisy score histograms per label of the site's test split
  (:mod:`cardiofed.evaluation.private_metrics`), from which metrics are computed;
* :meth:`release_attribution`: one step of a private attribution analysis.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import nn

from cardiofed.algorithms.base import ClientUpdate
from cardiofed.data.preprocessing import (
    SiteStatistics,
    private_site_statistics,
    statistics_sensitivity,
)
from cardiofed.exceptions import ConfigurationError, PrivacyBudgetExceeded
from cardiofed.models.networks import Weights
from cardiofed.privacy.accountant import GaussianEvent, calibrate_noise
from cardiofed.privacy.budget import ATTRIBUTION, PrivacyLedger
from cardiofed.privacy.randomness import secure_numpy_rng
from cardiofed.training.dp import DPConfig, dp_schedule, train_local_dp
from cardiofed.training.local import LocalResult, LocalTrainingConfig

if TYPE_CHECKING:
    from cardiofed.causal.study import AttributionPlan


@dataclass
class SitePrivacy:
    """A site's ledger, the study's planned training schedule and the DP-SGD settings.

    ``dp`` is the DP-SGD noise; left None it is calibrated at the first training round
    for the whole planned schedule (``rounds`` rounds of ``local``), composed after what
    the ledger holds, so that taking part in every round stays within the training
    share of the budget (and the final evaluation still fits in the rest)."""

    ledger: PrivacyLedger
    local: LocalTrainingConfig | None = None
    rounds: int = 1
    max_grad_norm: float = 1.0
    study: str | None = None
    dp: DPConfig | None = None

    def _calibrate(self, kind: str, sample_rate: float, steps: int) -> float:
        target = self.ledger.target(kind, self.study)
        spent = self.ledger.spent()
        if target <= spent:
            raise PrivacyBudgetExceeded(
                f"Site {self.ledger.site!r} has spent epsilon {spent:.4f}; its budget share "
                f"for {kind} releases allows {target:.4f} (epsilon_max "
                f"{self.ledger.budget.epsilon_max:g}): it makes no further {kind} release.")
        try:
            return calibrate_noise(target_epsilon=target, delta=self.ledger.delta,
                                   sample_rate=sample_rate, steps=steps,
                                   accountant=self.ledger.accountant)
        except ConfigurationError as exc:
            raise PrivacyBudgetExceeded(f"Site {self.ledger.site!r} cannot make a {kind} "
                                        f"release within its budget: {exc}") from None

    def _release(self, kind: str, what: str) -> GaussianEvent:
        """Calibrate and check one (q = 1) Gaussian release of `kind`."""
        event = GaussianEvent(noise_multiplier=self._calibrate(kind, 1.0, 1), sample_rate=1.0,
                              steps=1)
        self.ledger.check([event], what, kind=kind, study=self.study)
        return event

    def _record_release(self, kind: str, what: str, event: GaussianEvent,
                        **details: object) -> None:
        self.ledger.record([event], what, kind=kind, study=self.study,
                           noise_multiplier=event.noise_multiplier, **details)

    # -- statistics -------------------------------------------------------------------
    def release_statistics(self, x: np.ndarray, edges: np.ndarray) -> SiteStatistics:
        """The site's preprocessing statistics under the Gaussian mechanism (charged)."""
        what = "statistics release"
        event = self._release("statistics", what)
        stats, n_rows = private_site_statistics(
            x, edges, noise_std=event.noise_multiplier * statistics_sensitivity(x.shape[1]),
            rng=secure_numpy_rng())
        self._record_release("statistics", what, event, released_n=n_rows)
        return stats

    def released_n(self) -> int | None:
        """The noisy record count of this study's statistics release (at least 1): what
        the site declares as its sample size, rather than the exact count."""
        released = self.ledger.releases("statistics", self.study)
        if not released:
            return None
        return max(1, round(float(released[-1]["released_n"])))  # type: ignore[arg-type]

    def declare(self, update: ClientUpdate) -> ClientUpdate:
        """The update as the site declares it: its sample size is the noisy count of its
        statistics release (the exact count is never released), and no training loss."""
        n = self.released_n()
        return replace(update, num_samples=update.num_samples if n is None else n,
                       train_loss=float("nan"), global_loss=float("nan"))

    # -- training ---------------------------------------------------------------------
    def training_noise(self, n_records: int) -> DPConfig:
        """The DP-SGD noise of this study (calibrated once, kept in the ledger)."""
        if self.dp is None:
            earlier = self.ledger.releases("train", self.study)
            if earlier:  # after a restart: the noise calibrated for the whole schedule
                sigma = float(earlier[-1]["noise_multiplier"])  # type: ignore[arg-type]
            else:
                if self.local is None:
                    raise ConfigurationError("SitePrivacy needs the study's local training "
                                             "config ('local') to calibrate DP-SGD.")
                sample_rate, steps = dp_schedule(n_records, self.local)
                sigma = self._calibrate("train", sample_rate, steps * self.rounds)
            self.dp = DPConfig(noise_multiplier=sigma, max_grad_norm=self.max_grad_norm)
        return self.dp

    def train(self, model: nn.Module, x: np.ndarray, y: np.ndarray,
              config: LocalTrainingConfig, *, seed: int, anchor: Weights | None = None,
              sample_weight: np.ndarray | None = None,
              what: str = "a training round") -> LocalResult:
        """Check the budget, run DP-SGD, record the spend; refuse if over budget.

        `seed` (public: derived from the plan) is deliberately unused: DP-SGD's noise and
        sampling come from a secret source at the site."""
        if sample_weight is not None:
            raise ConfigurationError("DP-SGD does not take per-sample weights (covariate-shift "
                                     "correction); switch one of them off.")
        dp = self.training_noise(len(y))
        sample_rate, steps = dp_schedule(len(y), config)
        planned = GaussianEvent(noise_multiplier=dp.noise_multiplier,
                                sample_rate=sample_rate, steps=steps)
        self.ledger.check([planned], what, kind="train", study=self.study)
        result, event = train_local_dp(model, x, y, config, dp)
        self.ledger.record([event], what, kind="train", study=self.study,
                           noise_multiplier=dp.noise_multiplier,
                           max_grad_norm=dp.max_grad_norm)
        return result

    # -- attribution ------------------------------------------------------------------
    def release_attribution(self, plan: AttributionPlan, state: dict[str, Any],
                            arrays: dict[str, np.ndarray], what: str
                            ) -> dict[str, np.ndarray]:
        """One step of a private attribution analysis (:func:`cardiofed.causal.study.
        release`), its noise calibrated once for the plan's releases (charged)."""
        from cardiofed.causal.study import release

        earlier = self.ledger.releases(ATTRIBUTION, self.study)
        sigma = (float(earlier[0]["noise_multiplier"]) if earlier  # type: ignore[arg-type]
                 else self._calibrate(ATTRIBUTION, 1.0, plan.releases))
        event = GaussianEvent(noise_multiplier=sigma, sample_rate=1.0, steps=1)
        self.ledger.check([event], what, kind=ATTRIBUTION, study=self.study)
        out = release(plan, state, arrays, sigma, secure_numpy_rng())
        self._record_release(ATTRIBUTION, what, event)
        return out

    # -- evaluation -------------------------------------------------------------------
    def release_evaluation(self, y_true: np.ndarray, y_prob: np.ndarray,
                           edges: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """Noisy score histograms (negatives, positives) of the site's test split over
        `edges`, and the noise's standard deviation (charged)."""
        from cardiofed.evaluation.private_metrics import release_score_histograms

        what = "evaluation release"
        event = self._release("evaluate", what)
        neg, pos = release_score_histograms(y_true, y_prob, edges,
                                            noise_std=event.noise_multiplier,
                                            rng=secure_numpy_rng())
        self._record_release("evaluate", what, event)
        return neg, pos, event.noise_multiplier
