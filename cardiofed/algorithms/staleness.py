"""Buffered asynchronous aggregation: staleness weights and when the buffer flushes.

FedBuff (Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation",
AISTATS 2022): sites train on the latest global model they have and upload when done;
the server folds updates into a buffer and publishes a new global model once ``K``
updates have arrived (or, here, once ``T`` seconds have passed since the last
publication with at least one update waiting). An update's *staleness* ``s`` is the
number of versions published since the one it was trained from; it is discounted by

* ``constant``:   ``1``
* ``polynomial``: ``(1 + s) ** -a``                                 (Xie et al. 2019)
* ``hinge``:      ``1`` if ``s <= b`` else ``1 / (a (s - b) + 1)``  (Xie et al. 2019)

and refused beyond ``max_staleness``. The buffer's aggregate is

    delta = sum_i w_i g(s_i) delta_i / sum_i w_i

with ``w_i`` the site weights of the synchronous rule (sample size, bias correction), so
fresh updates reduce to the synchronous weighted mean and stale ones shrink the step
rather than only losing relative weight (FedBuff's ``1/K`` normalisation when all
``w_i`` are equal). The server optimiser (server learning rate, FedAdam, ...) then applies
``delta`` as in a synchronous round. Pure functions; no clock or transport here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from cardiofed.aggregation.robust import SiteAggregation
from cardiofed.aggregation.server_optimizers import ServerState
from cardiofed.algorithms.base import ClientUpdate, FederatedAlgorithm
from cardiofed.exceptions import ConfigurationError
from cardiofed.models.kinds import Weights

StalenessKind = Literal["constant", "polynomial", "hinge"]
STALENESS_KINDS: tuple[str, ...] = ("constant", "polynomial", "hinge")


class StaleUpdate(ValueError):
    """An update trained from a version older than the rule's ``max_staleness`` allows."""


@dataclass(frozen=True, kw_only=True)
class StalenessRule:
    """How much an update trained ``s`` versions ago counts, and the oldest accepted."""

    kind: StalenessKind = "polynomial"
    exponent: float = 0.5  # a
    hinge: int = 4  # b
    max_staleness: int = 50

    def __post_init__(self) -> None:
        if self.kind not in STALENESS_KINDS:
            raise ConfigurationError(f"The 'staleness' parameter must be one of "
                                     f"{', '.join(STALENESS_KINDS)}; got {self.kind!r}.")
        if not self.exponent >= 0:
            raise ConfigurationError(f"The 'staleness_exponent' parameter must be >= 0; got "
                                     f"{self.exponent!r}.")
        if isinstance(self.hinge, bool) or not isinstance(self.hinge, int) or self.hinge < 0:
            raise ConfigurationError(f"The 'staleness_hinge' parameter must be an integer "
                                     f">= 0; got {self.hinge!r}.")
        if isinstance(self.max_staleness, bool) or not isinstance(self.max_staleness, int) \
                or self.max_staleness < 0:
            raise ConfigurationError(f"The 'max_staleness' parameter must be an integer >= 0; "
                                     f"got {self.max_staleness!r}.")

    def check(self, staleness: int) -> None:
        """Raise :class:`StaleUpdate` (with the reason) if `staleness` is not accepted."""
        if staleness < 0:
            raise ValueError(f"Staleness must be >= 0; got {staleness}.")
        if staleness > self.max_staleness:
            raise StaleUpdate(f"the update was trained from a model {staleness} versions old; "
                              f"the study accepts at most max_staleness={self.max_staleness}")

    def weight(self, staleness: int) -> float:
        """The discount ``g(s)`` of an accepted update (raises :class:`StaleUpdate`)."""
        self.check(staleness)
        if self.kind == "constant":
            return 1.0
        if self.kind == "polynomial":
            return float((1.0 + staleness) ** -self.exponent)
        if staleness <= self.hinge:
            return 1.0
        return 1.0 / (self.exponent * (staleness - self.hinge) + 1.0)


def discounted(update: ClientUpdate, factor: float) -> ClientUpdate:
    """`update` with its delta scaled by `factor` (the staleness discount)."""
    return replace(update, delta={k: v * factor for k, v in update.delta.items()})


def publish_buffer(algorithm: FederatedAlgorithm, weights: Weights,
                   buffer: Sequence[tuple[ClientUpdate, int]], state: ServerState,
                   rule: StalenessRule, site_weights: Sequence[float] | None = None
                   ) -> tuple[Weights, ServerState, list[SiteAggregation]]:
    """The new global model from a buffer of ``(update, staleness)``: each update
    discounted by its staleness, then the algorithm's weighted mean (`site_weights`, or
    sample sizes) and server optimiser, as in a synchronous round; with what robust
    aggregation did to each update."""
    return algorithm.server_update_with_report(
        weights, [discounted(u, rule.weight(s)) for u, s in buffer], state, site_weights)


def window(buffer: Sequence[tuple[ClientUpdate, int]],
           latest: Mapping[str, tuple[ClientUpdate, int]], version: int,
           rule: StalenessRule) -> list[tuple[ClientUpdate, int]]:
    """The buffer's ``(update, staleness)`` and, for every other site, its latest update
    already folded (`latest`: site -> (update, version it was trained from)), with its
    staleness now; those past the rule's ``max_staleness`` are left out. One update per
    site: a robust rule over the window sees f malicious sites as f of every site heard
    from recently, however often they upload (MIFA, Gu et al. 2021, reuses the latest
    update of every client the same way)."""
    fresh = {u.site for u, _ in buffer}
    kept = list(buffer)
    for site in sorted(latest):
        update, trained_from = latest[site]
        if site not in fresh and version - trained_from <= rule.max_staleness:
            kept.append((update, version - trained_from))
    return kept


def buffer_ready(count: int, *, buffer_size: int, since_publication_s: float,
                 timeout_s: float | None, min_count: int = 1) -> bool:
    """Whether a buffer holding `count` updates (of distinct sites) should produce a new
    global model: ``buffer_size`` updates, or (with `timeout_s`) at least `min_count`
    once `timeout_s` seconds have passed since the last model was published. Never from
    fewer than `min_count` (2f + 1 under a robust rule tolerating f sites)."""
    if count < max(min_count, 1):
        return False  # a version is never published from nothing, nor from too few
    if count >= buffer_size:
        return True
    return timeout_s is not None and since_publication_s >= timeout_s
