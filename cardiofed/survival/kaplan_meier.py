"""Federated Kaplan-Meier and Nelson-Aalen estimates on a public time grid.

Each site counts, at every point ``g_k`` of a public grid, its events in
``(g_{k-1}, g_k]`` (an event time is carried up to the next grid point) and the patients
whose follow-up ends in ``[g_k, g_{k+1})`` without an event there (a censoring time is
carried down: the patient was at risk at ``g_k`` and not at the next point); an event
after the last point counts as followed to it (:func:`site_counts`). Only these counts
leave the site. Summed over sites (:func:`pooled_counts`) they give the pooled estimates of
the times so coarsened exactly (:func:`kaplan_meier`): the grid is the only
approximation, and a grid of every distinct event time loses nothing (but tells the
coordinator those times). Censorings at a grid point count as at risk there, as usual.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cardiofed.survival._checks import check_grid, check_outcome, check_weights

__all__ = ["GridCounts", "SurvivalCurve", "kaplan_meier", "pooled_counts", "site_counts",
           "grid_positions"]


@dataclass(frozen=True)
class GridCounts:
    """What a site releases for Kaplan-Meier: counts per grid point, no times."""

    grid: np.ndarray      # (K,) public time points
    events: np.ndarray    # (K,) events in (g_{k-1}, g_k]
    censored: np.ndarray  # (K,) last at risk at g_k without an event there

    @property
    def at_risk(self) -> np.ndarray:
        """Patients at risk at each grid point."""
        return np.cumsum((self.events + self.censored)[::-1])[::-1]


def grid_positions(time: np.ndarray, event: np.ndarray, grid: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Per patient: the last grid index at which it is at risk (-1: at none), and whether
    it has an event at that point. An event is carried up to the next grid point, a
    censoring (or an event after the last point) down to the previous one."""
    up = np.searchsorted(grid, time, side="left")
    on_grid = event & (up < grid.size)
    last = np.where(on_grid, up, np.searchsorted(grid, time, side="right") - 1)
    return last, on_grid


def site_counts(time: object, event: object, grid: object,
                weights: object | None = None) -> GridCounts:
    """A site's counts on the public `grid` (see the module docstring); with `weights`
    (finite, >= 0, one per patient) the counts are sums of weights."""
    g = check_grid(grid)
    t, e = check_outcome(time, event)
    w = check_weights(weights, t.size)
    last, on_grid = grid_positions(t, e, g)
    seen = last >= 0
    events = np.bincount(last[on_grid], weights=w[on_grid], minlength=g.size)
    censored = np.bincount(last[seen & ~on_grid], weights=w[seen & ~on_grid],
                           minlength=g.size)
    return GridCounts(grid=g, events=events, censored=censored)


def pooled_counts(parts: Sequence[GridCounts]) -> GridCounts:
    """Sites' counts added (same grid): the pooled rows' counts."""
    if not parts:
        raise ValueError("Pooling counts needs at least one site's.")
    if any(p.grid.shape != parts[0].grid.shape or not np.array_equal(p.grid, parts[0].grid)
           for p in parts):
        raise ValueError("pooled_counts needs counts on the same grid.")
    return GridCounts(grid=parts[0].grid, events=np.sum([p.events for p in parts], axis=0),
                      censored=np.sum([p.censored for p in parts], axis=0))


@dataclass(frozen=True)
class SurvivalCurve:
    """Kaplan-Meier survival and Nelson-Aalen cumulative hazard at the grid points."""

    grid: np.ndarray
    at_risk: np.ndarray
    events: np.ndarray
    survival: np.ndarray          # Kaplan-Meier S(g_k)
    survival_se: np.ndarray       # Greenwood's standard error of S(g_k)
    cumulative_hazard: np.ndarray  # Nelson-Aalen H(g_k)

    def at(self, t: float) -> float:
        """S(t): the estimate at the last grid point <= t (1 before the first)."""
        k = int(np.searchsorted(self.grid, t, side="right"))
        return 1.0 if k == 0 else float(self.survival[k - 1])


def kaplan_meier(counts: GridCounts) -> SurvivalCurve:
    """Kaplan-Meier and Nelson-Aalen estimates from (summed) grid counts."""
    n = counts.at_risk
    d = counts.events
    safe = np.where(n > 0, n, 1.0)
    hazard = np.where(n > 0, d / safe, 0.0)
    survival = np.cumprod(1.0 - hazard)
    # Greenwood: Var S = S^2 sum d / (n (n - d)); undefined once everyone at risk failed.
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where((n > d) & (n > 0), d / (safe * (n - d)), np.where(d > 0, np.inf, 0.0))
    with np.errstate(invalid="ignore"):
        se = survival * np.sqrt(np.cumsum(terms))
    se = np.where(np.isfinite(se), se, np.nan)
    return SurvivalCurve(grid=counts.grid, at_risk=n, events=d, survival=survival,
                         survival_se=se, cumulative_hazard=np.cumsum(hazard))
