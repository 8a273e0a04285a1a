"""Differential privacy: accounting, the hospital's one ledger, the release gate, the
DP wrapper around everything a site releases, audits."""

from typing import TYPE_CHECKING

from cardiofed.privacy.accountant import GaussianEvent, PrivacyAccountant, calibrate_noise
from cardiofed.privacy.budget import PrivacyLedger, SiteBudget, open_site_ledger

if TYPE_CHECKING:
    from cardiofed.privacy.site_privacy import SitePrivacy

__all__ = ["GaussianEvent", "PrivacyAccountant", "PrivacyLedger", "SiteBudget", "SitePrivacy",
           "calibrate_noise", "open_site_ledger"]


def __getattr__(name: str) -> object:
    # SitePrivacy trains with PyTorch; the coordinator, which imports this package for
    # its noise and accounting, never loads it.
    if name == "SitePrivacy":
        from cardiofed.privacy.site_privacy import SitePrivacy

        return SitePrivacy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
