"""CardioFed's one store: the tables both services use (the coordinator's and the risk
API's), the engine and session factory, credentials as stored, and the schema's
migrations. Neither service owns it; both depend on it."""

from cardiofed.store.credentials import hash_secret, new_secret, sha256
from cardiofed.store.engine import make_engine, make_sessionmaker, session_factory
from cardiofed.store.tables import (
    TALLY_SHARDS,
    AdminKey,
    ApiKey,
    AuditEvent,
    Base,
    ModelVersion,
    Refusal,
    RegisteredModel,
    ReportTally,
    Round,
    SecureMessage,
    Site,
    Study,
    UiSession,
    Update,
    utcnow,
)

__all__ = [
    "TALLY_SHARDS", "AdminKey", "ApiKey", "AuditEvent", "Base", "ModelVersion",
    "Refusal", "RegisteredModel", "ReportTally", "Round", "SecureMessage", "Site", "Study",
    "UiSession",
    "Update", "hash_secret", "make_engine", "make_sessionmaker", "new_secret",
    "session_factory", "sha256", "utcnow",
]
