"""DP as a wrapper around everything a site releases: calibrate, charge, then compute.

:class:`SitePrivacy` owns the site's ledger and the study's planned schedule. Each of
its release methods draws its noise from a secret source at the site
(:mod:`cardiofed.privacy.randomness`), calibrates it so that the ledger's total stays
within the release kind's cumulative share of the budget, and charges the ledger
*before* it computes anything from the records (a release over budget is refused). The
charge depends only on public values: the plan, the site's budget and the noisy record
count of the study's statistics release, never on the exact count, so neither the
ledger's epsilon nor the noise it implies tells anyone how many records the site holds.
Whatever fails inside a computation yields a release that does not depend on the
records (pure noise for DP-SGD, the neutral score for an evaluation), already charged:

* :meth:`release_statistics`: the federated preprocessing statistics (Gaussian noise on
  histograms and the record count, :func:`~cardiofed.data.preprocessing.private_site_statistics`);
* :meth:`train`: one round of DP-SGD, with the signature of
  :func:`cardiofed.training.local.train_local`, so any algorithm's client step runs
  privately by being handed it (no algorithm is subclassed for DP);
* :meth:`release_intercept_sums`: the final model's intercept score and information on
  the site's training rows (:mod:`cardiofed.aggregation.intercept_step`), the last part
  of the training share when the study plans it;
* :meth:`release_evaluation`: noisy score histograms per label of the site's test split
  (:mod:`cardiofed.evaluation.private_metrics`), from which metrics are computed;
* :meth:`release_attribution`: one step of a private attribution analysis.

A secure study's sums (statistics, each training round, the evaluation, each
attribution step) are charged by :meth:`charge_secure_sum`, :meth:`charge_secure_round`
and :meth:`charge_secure_attribution` at the study's noise multiplier, the largest any
site's share needs, before the site computes its vector.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from cardiofed.aggregation.intercept_step import SENSITIVITY, intercept_sums
from cardiofed.algorithms.base import ClientUpdate
from cardiofed.data.preprocessing import (
    SiteStatistics,
    private_site_statistics,
    statistics_sensitivity,
)
from cardiofed.exceptions import ConfigurationError, PrivacyBudgetExceeded
from cardiofed.models.networks import Weights, get_weights, set_weights
from cardiofed.privacy.accountant import GaussianEvent, calibrate_noise
from cardiofed.privacy.budget import ATTRIBUTION, PrivacyLedger
from cardiofed.privacy.dp_sgd import DPConfig, check_dp_training, dp_schedule, train_local_dp
from cardiofed.privacy.randomness import secure_numpy_rng, secure_torch_generator
from cardiofed.privacy.release_gate import finite_or_zeros
from cardiofed.training.local import LocalResult, LocalTrainingConfig


class PrivateAnalysis(Protocol):
    """What a multi-step private analysis declares to be released through
    :meth:`SitePrivacy.release_attribution` (the causal package's ``AttributionPlan``):
    how many Gaussian releases it makes, the arrays each step sends, and how a step's
    arrays get their noise. Privacy knows the interface, not the analysis."""

    @property
    def releases(self) -> int: ...

    def release_shapes(self, state: dict[str, Any]) -> dict[str, tuple[int, ...]]: ...

    def add_noise(self, state: dict[str, Any], arrays: dict[str, np.ndarray],
                  noise_multiplier: float, rng: np.random.Generator
                  ) -> dict[str, np.ndarray]: ...

log = logging.getLogger("cardiofed.privacy")

# The intercept step's part of what the training share leaves after the statistics (1/16:
# epsilon 0.05 of the default 0.8).
INTERCEPT_FRACTION = 1 / 16


@dataclass
class SitePrivacy:
    """A site's ledger, the study's planned training schedule and the DP-SGD settings.

    ``dp`` is the DP-SGD noise; left None it is calibrated at the first training round
    for the whole planned schedule (``rounds`` rounds of ``local``), composed after what
    the ledger holds, so that taking part in every round stays within the training
    share of the budget (and the final evaluation still fits in the rest). With
    ``intercept_step`` DP-SGD leaves :data:`INTERCEPT_FRACTION` of that share to
    :meth:`release_intercept_sums`."""

    ledger: PrivacyLedger
    local: LocalTrainingConfig | None = None
    rounds: int = 1
    max_grad_norm: float = 2.0
    study: str | None = None
    dp: DPConfig | None = None
    intercept_step: bool = False

    def _target(self, kind: str) -> float:
        """The total a release of `kind` may bring the ledger to; refused if spent."""
        target = self.ledger.target(kind, self.study)
        spent = self.ledger.spent()
        if target <= spent:
            raise PrivacyBudgetExceeded(
                f"Site {self.ledger.site!r} has spent epsilon {spent:.2f}; its budget share "
                f"for {kind} releases allows {target:.2f} (epsilon_max "
                f"{self.ledger.budget.epsilon_max:g}): it makes no further {kind} release.")
        return target

    def _calibrate(self, kind: str, sample_rate: float, steps: int,
                   reserve: float = 0.0) -> float:
        """The noise that brings the ledger to `kind`'s target, less `reserve` of what is
        left below it (kept for a later release of the same kind)."""
        target = self._target(kind)
        target -= reserve * (target - self.ledger.spent())
        try:
            return calibrate_noise(target_epsilon=target, delta=self.ledger.delta,
                                   sample_rate=sample_rate, steps=steps,
                                   accountant=self.ledger.accountant)
        except ConfigurationError as exc:
            raise PrivacyBudgetExceeded(f"Site {self.ledger.site!r} cannot make a {kind} "
                                        f"release within its budget: {exc}") from None

    def _charge(self, kind: str, what: str, **details: object) -> GaussianEvent:
        """Calibrate one (q = 1) Gaussian release of `kind` and charge it to the ledger."""
        with self.ledger.locked():  # calibrate on the newest ledger, then charge
            event = GaussianEvent(noise_multiplier=self._calibrate(kind, 1.0, 1),
                                  sample_rate=1.0, steps=1)
            self.ledger.charge([event], what, kind=kind, study=self.study,
                               noise_multiplier=event.noise_multiplier, **details)
        return event

    def charge_release(self, kind: str, what: str) -> float:
        """Charge one (q = 1) Gaussian release of `kind` of L2 sensitivity 1, before it is
        computed, and return its noise standard deviation: for releases other packages
        compute (counts in which each patient is one cell), with noise from
        :func:`~cardiofed.privacy.randomness.secure_numpy_rng`."""
        return self._charge(kind, what).noise_multiplier

    # -- statistics -------------------------------------------------------------------
    def release_statistics(self, x: np.ndarray, edges: np.ndarray) -> SiteStatistics:
        """The site's preprocessing statistics under the Gaussian mechanism (charged
        first: the noisy record count is drawn before and kept in the ledger)."""
        rng = secure_numpy_rng()
        noise_unit = float(rng.standard_normal())
        with self.ledger.locked():
            sigma = self._calibrate("statistics", 1.0, 1)
            noise_std = sigma * statistics_sensitivity(x.shape[1])
            released_n = float(len(x)) + noise_std * noise_unit
            event = GaussianEvent(noise_multiplier=sigma, sample_rate=1.0, steps=1)
            self.ledger.charge([event], "statistics release", kind="statistics",
                               study=self.study, noise_multiplier=sigma, released_n=released_n)
        stats, _ = private_site_statistics(x, edges, noise_std=noise_std, rng=rng,
                                           released_n=released_n)
        return stats

    def secure_sum_noise(self, kind: str) -> float:
        """The noise multiplier this site needs on a secure sum released once per study,
        the statistics or the evaluation (one q = 1 Gaussian event within `kind`'s
        share)."""
        return self._calibrate(kind, 1.0, 1)

    def charge_secure_sum(self, kind: str, noise_multiplier: float) -> None:
        """Charge the study's secure sum of `kind` (statistics, evaluate) at its
        `noise_multiplier` (refused when below what this site's budget needs)."""
        with self.ledger.locked():
            self._charge_secure_sum(kind, noise_multiplier, self.secure_sum_noise(kind),
                                    f"{'evaluation' if kind == 'evaluate' else kind} "
                                    f"release (secure sum)")

    def _charge_secure_sum(self, kind: str, noise_multiplier: float, needed: float,
                           what: str) -> None:
        """Charge one secure sum of `kind` at the study's `noise_multiplier`; refused when
        it is below the `needed` this site's budget calls for."""
        if noise_multiplier < needed:
            raise PrivacyBudgetExceeded(
                f"Site {self.ledger.site!r} refuses {what}: the sum's noise multiplier "
                f"{noise_multiplier:.3g} is below the {needed:.3g} its budget needs.")
        event = GaussianEvent(noise_multiplier=noise_multiplier, sample_rate=1.0, steps=1)
        self.ledger.charge([event], what, kind=kind, study=self.study,
                           noise_multiplier=noise_multiplier, secure_sum=True)

    def released_n(self) -> int | None:
        """The noisy record count of this study's statistics release (at least 1): what
        the site declares as its sample size, rather than the exact count."""
        released = self.ledger.releases("statistics", self.study)
        if not released:
            return None
        return max(1, round(float(released[-1]["released_n"])))

    def declare(self, update: ClientUpdate) -> ClientUpdate:
        """The update as the site declares it: its sample size is the noisy count of its
        statistics release (the exact count is never released), and no training loss."""
        n = self.released_n()
        return replace(update, num_samples=update.num_samples if n is None else n,
                       train_loss=float("nan"), global_loss=float("nan"))

    # -- training ---------------------------------------------------------------------
    def public_n(self) -> int:
        """The record count DP-SGD's schedule is planned on: the noisy count of this
        study's statistics release. Training without one is refused, so nothing that
        leaves the site (nor the ledger's epsilon) depends on the exact count."""
        n = self.released_n()
        if n is None:
            raise PrivacyBudgetExceeded(
                f"Site {self.ledger.site!r} trains privately only after the study's "
                f"statistics release: its noisy record count plans the DP-SGD schedule (the "
                f"exact count is never used in a release).")
        return n

    def training_noise(self) -> DPConfig:
        """The DP-SGD noise of this study (calibrated once, kept in the ledger)."""
        if self.dp is None:
            earlier = [e for e in self.ledger.releases("train", self.study)
                       if not e.get("intercept_step")]
            if earlier:  # after a restart: the noise calibrated for the whole schedule
                sigma = float(earlier[-1]["noise_multiplier"])
            else:
                if self.local is None:
                    raise ConfigurationError("SitePrivacy needs the study's local training "
                                             "config ('local') to calibrate DP-SGD.")
                self._target("train")  # a spent ledger says so before anything else
                sample_rate, steps = dp_schedule(self.public_n(), self.local)
                sigma = self._calibrate("train", sample_rate, steps * self.rounds,
                                        INTERCEPT_FRACTION if self.intercept_step else 0.0)
            self.dp = DPConfig(noise_multiplier=sigma, max_grad_norm=self.max_grad_norm)
        return self.dp

    def train(self, model: nn.Module, x: np.ndarray, y: np.ndarray,
              config: LocalTrainingConfig, *, seed: int, anchor: Weights | None = None,
              sample_weight: np.ndarray | None = None,
              what: str = "a training round") -> LocalResult:
        """Charge the round (refused if over budget), then run DP-SGD on the schedule of
        the public record count. If DP-SGD fails or its result is not finite, the model
        moves by noise alone (already charged): nothing about the failure depends on a
        record that the noise would not hide.

        `seed` (public: derived from the plan) is deliberately unused: DP-SGD's noise and
        sampling come from a secret source at the site."""
        if sample_weight is not None:
            raise ConfigurationError("DP-SGD does not take per-sample weights (covariate-shift "
                                     "correction); switch one of them off.")
        check_dp_training(config)  # a plan DP-SGD cannot run is refused before any charge
        with self.ledger.locked():
            dp = self.training_noise()
            n_public = self.public_n()
            schedule = dp_schedule(n_public, config)
            planned = GaussianEvent(noise_multiplier=dp.noise_multiplier,
                                    sample_rate=schedule[0], steps=schedule[1])
            self.ledger.charge([planned], what, kind="train", study=self.study,
                               noise_multiplier=dp.noise_multiplier,
                               max_grad_norm=dp.max_grad_norm,
                               intercept_clip=dp.intercept_clip)
        start = get_weights(model)
        try:
            result, _ = train_local_dp(model, x, y, config, dp, n_public=n_public)
            if all(np.isfinite(v).all() for v in get_weights(model).values()):
                return result
        except Exception as exc:  # noqa: BLE001 - any failure gets the same release
            log.warning("DP-SGD failed (%s); releasing noise alone", type(exc).__name__)
        set_weights(model, start)
        _noise_only_step(model, config, dp, n_public)
        return LocalResult(num_steps=schedule[1], mean_loss=float("nan"))

    def release_intercept_sums(self, y_true: np.ndarray, y_prob: np.ndarray
                               ) -> tuple[float, float, float]:
        """``sum(y - p)`` and ``sum p (1 - p)`` over the site's training rows with the final
        model's risks `y_prob` (:func:`~cardiofed.aggregation.intercept_step.intercept_sums`),
        each with Gaussian noise, and the noise's standard deviation (charged first, as
        the study's last training release: the rest of the training share); one per
        study."""
        with self.ledger.locked():
            if any(e.get("intercept_step") for e in self.ledger.releases("train", self.study)):
                raise PrivacyBudgetExceeded(
                    f"Site {self.ledger.site!r} has made this study's intercept step release; "
                    f"it makes one per study.")
            event = self._charge("train", "intercept step release", intercept_step=True)
        score, information = intercept_sums(y_true, y_prob)
        std = event.noise_multiplier * SENSITIVITY
        noise = secure_numpy_rng().standard_normal(2) * std
        return float(score + noise[0]), float(information + noise[1]), std

    # -- secure training (distributed DP) ----------------------------------------------
    def charged_secure_noise(self) -> float | None:
        """The noise multiplier this study's secure training sums were charged at (None
        before the first)."""
        earlier = self.ledger.releases("train", self.study)
        return float(earlier[0]["noise_multiplier"]) if earlier else None

    def secure_training_noise(self) -> float:
        """The noise multiplier this site needs on the secure sum of each of the study's
        `rounds` training rounds (one q = 1 Gaussian event per round within its training
        share): calibrated once and kept in the ledger. The study's noise is the largest
        any site needs; each site refuses a round whose noise is below its own."""
        charged = self.charged_secure_noise()
        return charged if charged is not None else self._calibrate("train", 1.0, self.rounds)

    def charge_secure_round(self, noise_multiplier: float, what: str) -> None:
        """Charge one round's secure sum at the study's `noise_multiplier` (refused when
        it is below what this site's budget needs, or the budget is spent)."""
        with self.ledger.locked():
            self._charge_secure_sum("train", noise_multiplier, self.secure_training_noise(),
                                    what)

    # -- attribution ------------------------------------------------------------------
    def attribution_noise(self, plan: PrivateAnalysis) -> float:
        """The noise multiplier of each of the study's attribution releases (on its own,
        or the least it needs on a secure sum): the one its budget sets for the plan's
        releases, fixed at the first (later steps take the multiplier that one had)."""
        earlier = self.ledger.releases(ATTRIBUTION, self.study)
        return (float(earlier[0]["noise_multiplier"]) if earlier
                else self._calibrate(ATTRIBUTION, 1.0, plan.releases))

    def charge_secure_attribution(self, noise_multiplier: float, plan: PrivateAnalysis,
                                  what: str) -> None:
        """Charge one attribution step's secure sum at the study's `noise_multiplier`
        (refused when below what this site's budget needs)."""
        with self.ledger.locked():
            self._charge_secure_sum(ATTRIBUTION, noise_multiplier,
                                    self.attribution_noise(plan), what)

    def release_attribution(self, plan: PrivateAnalysis, state: dict[str, Any],
                            compute: Callable[[], dict[str, np.ndarray]], what: str
                            ) -> dict[str, np.ndarray]:
        """One step of a private attribution analysis: charged (its noise calibrated once
        for the plan's releases), then `compute` gives the step's sums over the site's
        rows and the plan adds the noise. If `compute` fails or a sum is not finite,
        the step's sums are released as zeros plus the same noise (already charged)."""
        with self.ledger.locked():
            sigma = self.attribution_noise(plan)
            event = GaussianEvent(noise_multiplier=sigma, sample_rate=1.0, steps=1)
            self.ledger.charge([event], what, kind=ATTRIBUTION, study=self.study,
                               noise_multiplier=sigma)
        arrays = finite_or_zeros(compute, plan.release_shapes(state), "attribution step")
        return plan.add_noise(state, arrays, sigma, secure_numpy_rng())

    # -- evaluation -------------------------------------------------------------------
    def release_evaluation(self, y_true: np.ndarray, y_prob: np.ndarray,
                           edges: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """Noisy score histograms (negatives, positives) of the site's test split over
        `edges`, and the noise's standard deviation (charged first). A score that is not
        a probability (NaN, or outside [0, 1]) counts as 0.5, clipped into [0, 1]: the
        release is computed whatever the scores are."""
        from cardiofed.evaluation.private_metrics import (
            as_probabilities,
            release_score_histograms,
        )

        event = self._charge("evaluate", "evaluation release")
        neg, pos = release_score_histograms(y_true, as_probabilities(y_prob), edges,
                                            noise_std=event.noise_multiplier,
                                            rng=secure_numpy_rng())
        return neg, pos, event.noise_multiplier


def _noise_only_step(model: nn.Module, config: LocalTrainingConfig, dp: DPConfig,
                     n_public: int) -> None:
    """What DP-SGD releases when every clipped gradient is zero: each step adds Gaussian
    noise of std ``noise_multiplier * sensitivity / expected batch`` times the step size
    (plain SGD's), from a secret source."""
    sample_rate, steps = dp_schedule(n_public, config)
    expected = max(1, round(sample_rate * n_public))
    std = config.lr * dp.noise_multiplier * dp.sensitivity / expected * math.sqrt(steps)
    generator = secure_torch_generator()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * std)
