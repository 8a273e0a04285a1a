"""Time-to-event models across sites: Kaplan-Meier, Nelson-Aalen and Cox proportional
hazards fitted from per-site sums (no row leaves a site)."""

from cardiofed.survival.cox import (
    CoxFit,
    CoxSums,
    absolute_risk,
    breslow_baseline,
    event_time_grid,
    fit_cox,
    site_cox_sums,
)
from cardiofed.survival.kaplan_meier import GridCounts, SurvivalCurve, kaplan_meier, site_counts

__all__ = ["CoxFit", "CoxSums", "GridCounts", "SurvivalCurve", "absolute_risk",
           "breslow_baseline", "event_time_grid", "fit_cox", "kaplan_meier", "site_counts",
           "site_cox_sums"]
