"""CardioFed's exceptions, all in one place.

    CardioFedError
    ├── DataValidationError   a site's export does not fit the schema or its mapping
    │                         (also a ValueError)
    ├── ConfigurationError    invalid settings; the message names parameter and value
    │   │                     (also a ValueError)
    │   └── PrivacyLedgerError    the site's privacy ledger is missing, moved, edited or
    │                             unsealed: the node stops rather than start from zero
    ├── PrivacyBudgetExceeded a site refuses a release that would exceed its budget
    ├── TaskRefused           a node refuses a task outside the study plan it pinned
    └── CoordinatorError      a request the coordinator refuses (HTTP status in brackets)
        ├── AuthenticationError   no, unknown or revoked credential            [401]
        ├── PermissionDenied      authenticated, but not allowed to do this     [403]
        ├── NotFound              no such study, site, round or model           [404]
        ├── Conflict              clashes with what was already accepted       [409]
        ├── PayloadTooLarge       over the configured size limit                [413]
        └── InvalidUpdate         malformed, mismatched or non-finite payload   [422]

Domain code raises these; only the HTTP layers translate them into status codes.
"""

from __future__ import annotations


class CardioFedError(Exception):
    """Base class of every error CardioFed raises on purpose."""


class DataValidationError(CardioFedError, ValueError):
    """A value, column or file does not satisfy the canonical schema or mapping."""


class ConfigurationError(CardioFedError, ValueError):
    """A setting is invalid; the message names the parameter and the value."""


class PrivacyLedgerError(ConfigurationError):
    """The site's privacy ledger cannot be trusted as it is (missing, moved, edited, or its
    seal lost): the node stops; the message says what happened and how to reset."""


class PrivacyBudgetExceeded(CardioFedError):
    """A site refuses a release: it would spend more than the site's epsilon_max."""


class TaskRefused(CardioFedError):
    """A hospital node refuses a task: outside the plan it pinned at enrolment, or a
    release parameter that is not the schema's or the site's own."""


class CoordinatorError(CardioFedError):
    """A request a service refuses: ``status_code`` is the HTTP status, :meth:`body` the
    JSON body (``detail``, and ``code`` where a client acts on the kind of refusal) and
    :meth:`headers` any extra response headers."""

    status_code = 400
    code: str | None = None

    def body(self) -> dict[str, object]:
        body: dict[str, object] = {"detail": str(self)}
        if self.code:
            body["code"] = self.code
        return body

    def headers(self) -> dict[str, str] | None:
        return None


class AuthenticationError(CoordinatorError):
    status_code = 401


class PermissionDenied(CoordinatorError):
    status_code = 403


class NotFound(CoordinatorError):
    status_code = 404


class Conflict(CoordinatorError):
    status_code = 409


class RoundClosed(Conflict):
    """An upload for a synchronous round that has closed (it went on without the site)."""

    code = "round_closed"


class StaleUpdateRefused(Conflict):
    """An asynchronous study refused an update trained from too old a model."""

    code = "stale_update"


class PayloadTooLarge(CoordinatorError):
    status_code = 413


class InvalidUpdate(CoordinatorError):
    status_code = 422


class SchemaOutOfDate(CardioFedError, RuntimeError):
    """The store's database is at an older schema revision than this release: run
    ``cardiofed db upgrade`` (after a backup)."""
