"""Simulated wall-clock time: how long each site takes to train, and when it is online.

A site's task (fetch the model, train, upload) takes

    (overhead_s + work_samples / samples_per_s) * LogNormal(0, jitter) + 2 * latency_s

seconds of *online* time: a site that is offline (a clinic PC switched off at night)
pauses and resumes when it is back. Simulated time starts at 09:00 on day 0.

:func:`default_speeds` imitates a real federation: tier-3 hospitals have GPU servers,
tier-2 hospitals are about 5x slower, and community clinics 10-100x slower (drawn per
clinic, log-uniformly, from the seed) and offline 10 hours a night. Everything is
deterministic given the seed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from cardiofed.data.dataset import SiteTypes
from cardiofed.exceptions import ConfigurationError

DAY_S = 86_400.0
START_OF_DAY_S = 9 * 3600.0  # t = 0 is 09:00


@dataclass(frozen=True, kw_only=True)
class SiteSpeed:
    """A site's compute speed, network delay and daily offline window."""

    samples_per_s: float
    overhead_s: float = 0.0
    latency_s: float = 0.0
    offline_hours: float = 0.0
    offline_from_h: float = 0.0  # hour of the day (0-24) the offline window starts
    jitter: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.samples_per_s < math.inf:
            raise ConfigurationError(f"The 'samples_per_s' parameter must be a finite number "
                                     f"> 0; got {self.samples_per_s!r}.")
        for name in ("overhead_s", "latency_s", "jitter"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ConfigurationError(f"The {name!r} parameter must be a finite number "
                                         f">= 0; got {getattr(self, name)!r}.")
        if not 0 <= self.offline_hours < 24:
            raise ConfigurationError(f"The 'offline_hours' parameter must be in [0, 24); got "
                                     f"{self.offline_hours!r}.")
        if not 0 <= self.offline_from_h < 24:
            raise ConfigurationError(f"The 'offline_from_h' parameter must be in [0, 24); got "
                                     f"{self.offline_from_h!r}.")

    def task_seconds(self, work_samples: int, rng: np.random.Generator) -> float:
        """Online seconds one task takes (training `work_samples` samples)."""
        compute = self.overhead_s + work_samples / self.samples_per_s
        factor = float(rng.lognormal(0.0, self.jitter)) if self.jitter else 1.0
        return compute * factor + 2 * self.latency_s

    def _phase(self, t: float) -> float:
        """Seconds since the start of the current offline window (mod one day)."""
        return (t + START_OF_DAY_S - self.offline_from_h * 3600.0) % DAY_S

    def is_online(self, t: float) -> bool:
        return self._phase(t) >= self.offline_hours * 3600.0

    def finish(self, start: float, busy_s: float) -> float:
        """When a task of `busy_s` online seconds that starts at `start` is done."""
        if self.offline_hours == 0:
            return start + busy_s
        t, left, off = start, busy_s, self.offline_hours * 3600.0
        while True:
            phase = self._phase(t)
            if phase < off:  # offline: wait for the morning
                t += off - phase
                phase = off
            window = DAY_S - phase  # online seconds until the next offline window
            if left <= window:
                return t + left
            left -= window
            t += window


TYPE_SPEEDS: dict[str, SiteSpeed] = {
    SiteTypes.TIER3: SiteSpeed(samples_per_s=2000.0, overhead_s=10.0, latency_s=0.2, jitter=0.2),
    SiteTypes.TIER2: SiteSpeed(samples_per_s=400.0, overhead_s=30.0, latency_s=1.0, jitter=0.2),
}


def default_speeds(site_types: Mapping[str, str], seed: int) -> dict[str, SiteSpeed]:
    """Speeds that imitate reality, by site type (unknown types get tier-2 speed).

    Community clinics are ``f`` times slower than a tier-3 hospital in throughput and
    overhead, ``f`` log-uniform in [10, 100], with 5 s network latency, offline for 10
    hours from about 20:00 (+-2 h) every night.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 51_966]))
    fast = TYPE_SPEEDS[SiteTypes.TIER3]
    speeds = {}
    for name, site_type in site_types.items():  # draws in site order: deterministic
        slow = float(np.exp(rng.uniform(np.log(10.0), np.log(100.0))))
        evening = float(rng.uniform(18.0, 22.0))
        if site_type == SiteTypes.COMMUNITY:
            speeds[name] = SiteSpeed(samples_per_s=fast.samples_per_s / slow,
                                     overhead_s=fast.overhead_s * slow, latency_s=5.0,
                                     offline_hours=10.0, offline_from_h=evening, jitter=0.3)
        else:
            speeds[name] = TYPE_SPEEDS.get(site_type, TYPE_SPEEDS[SiteTypes.TIER2])
    return speeds
