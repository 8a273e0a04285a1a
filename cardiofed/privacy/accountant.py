"""Privacy accounting behind one small interface, backed by Opacus' accountants.

Every release a site makes is a *subsampled Gaussian mechanism* event: DP-SGD steps
(noise multiplier ``sigma``, Poisson sampling rate ``q``, ``steps`` of them) or a
noised release of federated statistics (``q = 1``, one step). :class:`PrivacyAccountant`
composes the events with Rényi DP (default) or the PRV accountant (Gopi et al. 2021)
and answers ``get_epsilon(delta)``. Its state is a plain list of events, so it is
persisted with the site's ledger and survives restarts.

:func:`calibrate_noise` finds the smallest noise multiplier that keeps a planned
schedule, composed after what was already spent, within a target epsilon; the result
never overshoots the target.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Literal

from cardiofed.exceptions import ConfigurationError

AccountantKind = Literal["rdp", "prv"]
# Orders added to Opacus' defaults (up to 63): larger ones give tighter bounds for small
# epsilon over long schedules.
_EXTRA_RDP_ORDERS = [80, 96, 128, 192, 256, 512]
# Opacus' RDPAccountant.DEFAULT_ALPHAS, then the extra orders.
_RDP_ORDERS = [*[1 + x / 10.0 for x in range(1, 100)], *range(12, 64), *_EXTRA_RDP_ORDERS]


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> Any:
    """Opacus' RDP of one sampled-Gaussian step at every order (a read-only array)."""
    from opacus.accountants.analysis.rdp import compute_rdp

    rdp = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1,
                      orders=_RDP_ORDERS)
    rdp.flags.writeable = False
    return rdp


@dataclass(frozen=True, kw_only=True)
class GaussianEvent:
    """``steps`` applications of the sampled Gaussian mechanism."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ConfigurationError(
                f"The 'noise_multiplier' parameter must be finite and > 0; "
                f"got {self.noise_multiplier!r}.")
        if not 0 < self.sample_rate <= 1:
            raise ConfigurationError(
                f"The 'sample_rate' parameter must be in (0, 1]; got {self.sample_rate!r}.")
        if self.steps < 1:
            raise ConfigurationError(f"The 'steps' parameter must be >= 1; got {self.steps!r}.")


class PrivacyAccountant:
    """Composes :class:`GaussianEvent` objects; ``get_epsilon(delta)`` for the total."""

    def __init__(self, kind: AccountantKind = "rdp",
                 events: list[GaussianEvent] | None = None) -> None:
        if kind not in ("rdp", "prv"):
            raise ConfigurationError(f"The 'accountant' parameter must be 'rdp' or 'prv'; "
                                     f"got {kind!r}.")
        self.kind: AccountantKind = kind
        self.events: list[GaussianEvent] = list(events or [])

    def compose(self, event: GaussianEvent) -> None:
        self.events.append(event)

    def get_epsilon(self, delta: float, extra: list[GaussianEvent] | None = None) -> float:
        """Epsilon of everything composed (plus `extra` planned events) at `delta`."""
        if not 0 < delta < 1:
            raise ConfigurationError(f"The 'delta' parameter must be in (0, 1); got {delta!r}.")
        events = self.events + list(extra or [])
        if not events:
            return 0.0
        # Events with the same (sigma, q) compose by adding steps: merging them is exact
        # and keeps each evaluation cheap however long the ledger grows.
        merged: dict[tuple[float, float], int] = {}
        for e in events:
            key = (e.noise_multiplier, e.sample_rate)
            merged[key] = merged.get(key, 0) + e.steps
        history = [(sigma, q, steps) for (sigma, q), steps in merged.items()]
        # Imported here, as in cardiofed.privacy.dp_sgd: Opacus costs about 1.5 s at import.
        if self.kind == "prv":
            from opacus.accountants import PRVAccountant

            prv = PRVAccountant()
            prv.history = history
            return float(prv.get_epsilon(delta=delta))
        from opacus.accountants.analysis.rdp import get_privacy_spent

        # As RDPAccountant.get_privacy_spent, with each event's per-step RDP cached: the
        # same sum, and the same epsilon to the last bit, at a fraction of the cost.
        rdp = sum([_rdp_per_step(sigma, q) * steps for sigma, q, steps in history])
        with warnings.catch_warnings():
            # Very small (large) events are best at the largest (smallest) order: the bound
            # is valid, if loose.
            warnings.filterwarnings("ignore", message="Optimal order is the")
            eps, _ = get_privacy_spent(orders=_RDP_ORDERS, rdp=rdp, delta=delta)
        return float(eps)

    def state_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "events": [asdict(e) for e in self.events]}

    @classmethod
    def from_state_dict(cls, state: dict[str, object]) -> PrivacyAccountant:
        events = state.get("events", [])
        if not isinstance(events, list):
            raise ConfigurationError("Accountant state 'events' must be a list.")
        kind = state.get("kind", "rdp")
        return cls(kind=kind, events=[GaussianEvent(**e) for e in events])  # type: ignore[arg-type]


def _excess(epsilon: float, target: float) -> float:
    """``log(epsilon / target)``: > 0 above the target (inf for an unbounded epsilon)."""
    return math.inf if not math.isfinite(epsilon) else math.log(max(epsilon, 1e-300) / target)


def calibrate_noise(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: PrivacyAccountant | None = None,
                    tolerance: float = 0.01, max_noise: float = 1e4) -> float:
    """Smallest noise multiplier (to within `tolerance`, relative, rounded up) such that
    ``steps`` sampled-Gaussian steps at `sample_rate`, composed after `accountant`'s
    events, keep epsilon at or below `target_epsilon`."""
    if not target_epsilon > 0:
        raise ConfigurationError(f"The 'target_epsilon' parameter must be > 0; "
                                 f"got {target_epsilon!r}.")
    base = accountant or PrivacyAccountant()
    spent = base.get_epsilon(delta)
    if spent >= target_epsilon:
        raise ConfigurationError(
            f"Nothing is left to calibrate: {spent:.4g} of target epsilon {target_epsilon:g} "
            f"is already spent.")

    def eps(sigma: float) -> float:
        return base.get_epsilon(delta, [GaussianEvent(noise_multiplier=sigma,
                                                      sample_rate=sample_rate, steps=steps)])

    low, high = 0.0, 1.0
    f_low, f_high = math.inf, _excess(eps(high), target_epsilon)
    while f_high > 0:
        if high >= max_noise:
            raise ConfigurationError(
                f"No noise multiplier up to {max_noise:g} reaches epsilon {target_epsilon:g} "
                f"for {steps} steps at sample rate {sample_rate:g}; plan fewer steps or a "
                f"larger budget.")
        low, f_low = high, f_high
        high = min(high * 8, max_noise)  # the interpolation narrows a wide bracket fast
        f_high = _excess(eps(high), target_epsilon)
    # The bracket [low, high] holds the threshold: eps(low) > target >= eps(high). Regula
    # falsi on log(eps) against log(sigma), nearly linear there, with the Illinois
    # correction (halve the end that stays) and a bisection step where it cannot
    # interpolate: 3 to 5 evaluations of the accountant instead of bisection's 7 to 10.
    stays = 0
    while high - low > tolerance * high:
        if low > 0 and math.isfinite(f_low) and f_low != f_high:
            x_low, x_high = math.log(low), math.log(high)
            mid = math.exp(x_high - f_high * (x_high - x_low) / (f_high - f_low))
        else:
            mid = (low + high) / 2
        if not low < mid < high:
            mid = (low + high) / 2
        f_mid = _excess(eps(mid), target_epsilon)
        if f_mid > 0:
            low, f_low = mid, f_mid
            stays = stays + 1 if stays > 0 else 1
            if stays > 1:
                f_high /= 2
        else:
            high, f_high = mid, f_mid
            stays = stays - 1 if stays < 0 else -1
            if stays < -1:
                f_low /= 2
    return high  # eps(high) <= target by the loop invariant
