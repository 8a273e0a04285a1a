"""Differential privacy: accounting, the hospital's one ledger, the release gate, the
DP wrapper around everything a site releases, audits."""

from cardiofed.privacy.accountant import GaussianEvent, PrivacyAccountant, calibrate_noise
from cardiofed.privacy.budget import PrivacyLedger, SiteBudget, open_site_ledger
from cardiofed.privacy.site_privacy import SitePrivacy

__all__ = ["GaussianEvent", "PrivacyAccountant", "PrivacyLedger", "SiteBudget", "SitePrivacy",
           "calibrate_noise", "open_site_ledger"]
