"""The final model's intercept, stepped to the sites that agree, from private sums.

Under DP-SGD the intercept is where noise shows: its noise moves every site's risks
together (about +/-0.15 on the log-odds scale in the epsilon-1 demo), and a site whose
labels disagree with the others' (which the exact label-quality check would have left
out) pulls it towards its own event rate. After training, each site releases two sums
over its training rows, with ``p`` the final model's risks: ``D = sum(y - p)``, the
intercept's score, and ``I = sum p (1 - p)``, its information, each with Gaussian noise
(:meth:`cardiofed.privacy.site_privacy.SitePrivacy.release_intercept_sums`). The step

    a = sum(D) / sum(I) over the sites kept

is one Newton step on the intercept's score equation, the equation the pooled
maximum-likelihood fit solves (its predicted events equal the observed), taken from
sums each site can release at little cost (one record moves them by at most 1 and 1/4).

Sites that disagree are left out one at a time, as in a funnel plot: the site whose
``D`` is furthest from ``a * I`` in units of its standard error,
``sqrt(I + noise_std ** 2 * (1 + a ** 2))`` (its events' binomial spread and the two
sums' noise), while that is beyond ``z_max`` and more than half of the sites would
remain (the intercept is the majority's). The one furthest goes first, and ``a`` is
computed again without it, so that a site far off does not make the others look off.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from cardiofed.evaluation.private_metrics import as_probabilities
from cardiofed.exceptions import ConfigurationError
from cardiofed.models.kinds import OUTPUT_BIAS, Weights

__all__ = ["SENSITIVITY", "InterceptStep", "intercept_step", "intercept_sums",
           "shift_intercept"]

SENSITIVITY = math.hypot(1.0, 0.25)  # L2 bound of one record's (y - p, p (1 - p))
Z_MAX = 3.0
MAX_STEP = 1.0  # on the log-odds scale: one Newton step further than this is not trusted


@dataclass(frozen=True)
class InterceptStep:
    """The step added to the model's intercept (log-odds), the sites it was computed
    from, and each site's z-score against it (``left_out``: the sites beyond ``z_max``
    that were left out, first left out first)."""

    step: float
    kept: list[str]
    left_out: list[str]
    z: dict[str, float]


def intercept_sums(y_true: np.ndarray, y_prob: np.ndarray) -> tuple[float, float]:
    """A site's exact ``(sum(y - p), sum p (1 - p))``, before its noise. A risk that is not
    a probability counts as 0.5, clipped into [0, 1], and a label is clipped into [0, 1],
    so the pair is finite and one record moves it by at most :data:`SENSITIVITY`."""
    probs = as_probabilities(y_prob)
    labels = np.clip(np.asarray(y_true, dtype=np.float64), 0.0, 1.0)
    return float(np.sum(labels - probs)), float(np.sum(probs * (1.0 - probs)))


def intercept_step(sums: Mapping[str, tuple[float, float]], noise_std: Mapping[str, float],
                   counts: Mapping[str, float], *, z_max: float = Z_MAX,
                   max_step: float = MAX_STEP) -> InterceptStep:
    """The intercept step from each site's released ``(D, I)``, the standard deviation of
    the noise on them and the site's public record count (see the module docstring); 0
    when the kept sites' information is not positive. A site's ``I`` is taken within
    ``[0, count / 4]`` (no record adds more than 1/4), so no site claims more weight than
    its count gives it; ``|step|`` is at most `max_step`."""
    if not sums:
        raise ConfigurationError("An intercept step needs at least one site's sums; got none.")
    for site, pair in sums.items():
        if len(pair) != 2 or not all(math.isfinite(v) for v in pair):
            raise ConfigurationError(f"Site {site!r}'s intercept sums must be two finite "
                                     f"numbers (D, I); got {pair!r}.")
        noise, count = noise_std.get(site), counts.get(site)
        if noise is None or not (noise >= 0 and math.isfinite(noise)):
            raise ConfigurationError(f"Site {site!r}'s noise_std must be finite and >= 0; "
                                     f"got {noise!r}.")
        if count is None or not (count >= 0 and math.isfinite(count)):
            raise ConfigurationError(f"Site {site!r}'s record count must be finite and >= 0; "
                                     f"got {count!r}.")
    if not (z_max > 0 and max_step > 0):
        raise ConfigurationError(f"The 'z_max' and 'max_step' parameters must be > 0; got "
                                 f"{z_max!r} and {max_step!r}.")
    sums = {site: (d, min(max(i, 0.0), counts[site] / 4)) for site, (d, i) in sums.items()}
    kept, left_out = list(sums), list[str]()
    while True:
        step = _newton_step(sums, kept, max_step)
        z = {site: _z(d, i, noise_std[site], step) for site, (d, i) in sums.items()}
        worst = max(kept, key=lambda site: abs(z[site]))
        if abs(z[worst]) <= z_max or 2 * (len(kept) - 1) <= len(sums):
            return InterceptStep(step=step, kept=kept, left_out=left_out, z=z)
        kept.remove(worst)
        left_out.append(worst)


def shift_intercept(weights: Weights, step: float, model: str) -> Weights:
    """`weights` of a `model` with `step` added to its output bias, which shifts every
    log-odds by `step`."""
    bias = OUTPUT_BIAS[model]
    return {**weights, bias: (weights[bias] + step).astype(weights[bias].dtype)}


def _newton_step(sums: Mapping[str, tuple[float, float]], kept: list[str],
                 max_step: float) -> float:
    score = sum(sums[site][0] for site in kept)
    information = sum(sums[site][1] for site in kept)
    if information <= 0:
        return 0.0
    return max(-max_step, min(max_step, score / information))


def _z(d: float, i: float, noise: float, step: float) -> float:
    return (d - step * i) / math.sqrt(i + noise ** 2 * (1 + step ** 2) + 1e-12)
