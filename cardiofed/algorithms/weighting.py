"""How much each site's update counts: the bias-correction weighting rules, composed.

* ``sample-size``: FedAvg's n_k (large hospitals dominate);
* ``type-balanced``: each site type (tier-3, tier-2, community) gets an equal share;
* ``qffl``: more weight where the current model does worst, n_k L_k^q (Li et al. 2020);
* ``agnostic``: a minimax mixture updated by projected gradient ascent on the sites'
  losses (Mohri et al. 2019).

Site multipliers (e.g. 0 for a site whose labels disagree with the federation's) are
applied on top. Only the sites' reported losses and sizes are used, never rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from cardiofed.aggregation.site_weights import (
    agnostic_weights,
    combine,
    qffl_weights,
    type_balanced_weights,
)
from cardiofed.algorithms.base import ClientUpdate
from cardiofed.exceptions import ConfigurationError

WeightingKind = Literal["sample-size", "type-balanced", "qffl", "agnostic"]
WEIGHTINGS: tuple[str, ...] = ("sample-size", "type-balanced", "qffl", "agnostic")


@dataclass(frozen=True, kw_only=True)
class WeightingRule:
    """A weighting rule and its settings; ``weights`` is pure given the mixture state."""

    kind: WeightingKind = "sample-size"
    q: float = 1.0
    step: float = 0.5
    site_multipliers: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in WEIGHTINGS:
            raise ConfigurationError(f"The 'weighting' parameter must be one of "
                                     f"{list(WEIGHTINGS)}; got {self.kind!r}.")
        if self.q < 0:
            raise ConfigurationError(f"The 'qffl_q' parameter must be >= 0; got {self.q!r}.")
        if self.step <= 0:
            raise ConfigurationError(f"The 'afl_step' parameter must be > 0; got {self.step!r}.")

    @property
    def needs_loss(self) -> bool:
        """Whether sites must report the global model's loss on their data."""
        return self.kind in ("qffl", "agnostic")

    def weights(self, updates: Sequence[ClientUpdate], site_types: Mapping[str, str],
                mixture: Mapping[str, float] | None = None
                ) -> tuple[list[float], dict[str, float]]:
        """Weights for `updates` and the new mixture state (used by ``agnostic``)."""
        sites = [u.site for u in updates]
        sizes = [u.num_samples for u in updates]
        losses = [u.global_loss for u in updates]
        new_mixture = dict(mixture or {})
        if self.kind == "type-balanced":
            base = type_balanced_weights([site_types.get(s, "hospital") for s in sites], sizes)
        elif self.kind == "qffl":
            base = qffl_weights(losses, sizes, self.q)
        elif self.kind == "agnostic":
            previous = [new_mixture[s] for s in sites] if all(
                s in new_mixture for s in sites) else None
            base = agnostic_weights(losses, previous, step=self.step)
            new_mixture.update(zip(sites, base, strict=True))
        else:
            base = [float(n) for n in sizes]
        multipliers = [self.site_multipliers.get(s, 1.0) for s in sites]
        return combine(base, multipliers), new_mixture
