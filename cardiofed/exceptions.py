"""CardioFed's exceptions, all in one place.

    CardioFedError
    ├── DataValidationError   a site's export does not fit the schema or its mapping
    │                         (also a ValueError)
    ├── ConfigurationError    invalid settings; the message names parameter and value
    │                         (also a ValueError)
    └── PrivacyBudgetExceeded a site refuses a release that would exceed its budget

Domain code raises these; only the HTTP layers translate them into status codes.
"""

from __future__ import annotations


class CardioFedError(Exception):
    """Base class of every error CardioFed raises on purpose."""


class DataValidationError(CardioFedError, ValueError):
    """A value, column or file does not satisfy the canonical schema or mapping."""


class ConfigurationError(CardioFedError, ValueError):
    """A setting is invalid; the message names the parameter and the value."""


class PrivacyBudgetExceeded(CardioFedError):
    """A site refuses a release: it would spend more than the site's epsilon_max."""
