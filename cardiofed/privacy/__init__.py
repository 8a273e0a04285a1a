"""Differential privacy: accounting, per-site budgets, DP-SGD wrapper, audits."""

from cardiofed.privacy.accountant import GaussianEvent, PrivacyAccountant, calibrate_noise
from cardiofed.privacy.budget import PrivacyLedger, SiteBudget
from cardiofed.privacy.site_privacy import SitePrivacy

__all__ = ["GaussianEvent", "PrivacyAccountant", "PrivacyLedger", "SiteBudget", "SitePrivacy",
           "calibrate_noise"]
