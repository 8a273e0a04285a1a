"""The tables of CardioFed's one store (SQLite by default, PostgreSQL by URL).

The coordinator's studies, sites, rounds, updates, models, dashboard sessions and admin
audit log; the risk API's model registry and keys (:mod:`cardiofed.serving`). Secrets
(enrolment tokens, site and admin credentials, API keys) are stored only as SHA-256
hashes (:mod:`cardiofed.store.credentials`). Binary payloads (model weights, optimiser
state, updates) are safetensors bytes. The schema evolves through the Alembic
migrations of :mod:`cardiofed.store.migrations`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class AdminKey(Base):
    __tablename__ = "admin_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    # "viewer": reads everything, changes nothing; NULL (keys made before roles): admin
    role: Mapped[str | None] = mapped_column(String(16), nullable=True)
    # When the key was revoked: it authenticates nothing since, its dashboard sessions end.
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class ReportTally(Base):
    """How many reports a round has, in TALLY_SHARDS rows per round (an upload adds one
    to its site's row in its own transaction), so that "is the round complete?" is a
    sum of a few rows, not a count over thousands, and uploads rarely share a row."""
    __tablename__ = "report_tallies"
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), primary_key=True)
    shard: Mapped[int] = mapped_column(Integer, primary_key=True)
    reports: Mapped[int] = mapped_column(Integer)


TALLY_SHARDS = 16


class UiSession(Base):
    """A dashboard login, by the hash of its cookie's token (the CSRF token is derived
    from the token itself)."""
    __tablename__ = "ui_sessions"
    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    admin_key_id: Mapped[int] = mapped_column(ForeignKey("admin_keys.id"))
    role: Mapped[str] = mapped_column(String(16))
    expires_at: Mapped[datetime] = mapped_column(DateTime)


class AuditEvent(Base):
    """Who (which admin key, through which door) did what to which study, when."""
    __tablename__ = "audit_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(32))
    study_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    detail: Mapped[str] = mapped_column(String(300), default="")


class Study(Base):
    __tablename__ = "studies"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    plan: Mapped[dict[str, object]] = mapped_column(JSON)
    feature_names: Mapped[list[str]] = mapped_column(JSON)
    feature_ranges: Mapped[list[list[float]]] = mapped_column(JSON)
    min_sites: Mapped[int] = mapped_column(Integer)
    round_timeout_s: Mapped[float] = mapped_column(Float)
    phase: Mapped[str] = mapped_column(String(16), default="statistics")
    current_round: Mapped[int] = mapped_column(Integer, default=0)
    model_version: Mapped[int] = mapped_column(Integer, default=0)
    outcome: Mapped[str | None] = mapped_column(String(32), nullable=True)
    preprocessor: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    server_state: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    # Sites not revoked (kept by create_study and revoke_site; NULL in databases made
    # before it: counted then).
    active_sites: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # An analysis study's state (cardiofed.causal.study, cardiofed.survival.study) between its
    # steps, then its result or the error that stopped it.
    analysis: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # A regional study relayed into a national one (cardiofed.protocol.relay): its
    # training and evaluation rounds are opened by the region's node with the national
    # model, and each closed round keeps the aggregate that node sends upward.
    relay: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    # Why the study does not advance: paused by an operator or for want of active sites
    # (min_sites), or cancelled (then phase is "done"); None while it runs.
    halted: Mapped[str | None] = mapped_column(String(300), nullable=True)


class Site(Base):
    __tablename__ = "sites"
    __table_args__ = (UniqueConstraint("study_id", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[str] = mapped_column(ForeignKey("studies.id"))
    name: Mapped[str] = mapped_column(String(64))
    index: Mapped[int] = mapped_column(Integer)
    enrol_token_hash: Mapped[str | None] = mapped_column(String(64), unique=True, nullable=True)
    credential_hash: Mapped[str | None] = mapped_column(String(64), unique=True, nullable=True)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    last_seen: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    # How the site declared its releases in its first report: "dp" (its own noise) or
    # "off" (exact); None until then (or a node of an earlier release).
    privacy: Mapped[str | None] = mapped_column(String(8), nullable=True)


class Round(Base):
    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("study_id", "number"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[str] = mapped_column(ForeignKey("studies.id"))
    number: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))  # statistics | train | evaluate
    model_version: Mapped[int] = mapped_column(Integer)
    opened_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    deadline: Mapped[datetime] = mapped_column(DateTime)
    closed_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    outcome: Mapped[str | None] = mapped_column(String(200), nullable=True)
    # What robust aggregation did with each site's update when this round was folded.
    aggregation: Mapped[list[dict[str, object]] | None] = mapped_column(JSON, nullable=True)
    # A relay study's round, once closed: the aggregate its region sends upward.
    relay_result: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    # A training round's loss: the median of the global model's loss the sites reported
    # (NaN-free; NULL when none did, e.g. private sites); a study stops on it once
    # converged (cardiofed.algorithms.stopping).
    loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    # A secure round (cardiofed.protocol.secure_sums): the step its secure sum is at, and
    # which attempt (a sum that lost too many sites before any input starts again).
    secure_step: Mapped[str | None] = mapped_column(String(16), nullable=True)
    secure_attempt: Mapped[int | None] = mapped_column(Integer, nullable=True)


class Update(Base):
    __tablename__ = "updates"
    __table_args__ = (UniqueConstraint("round_id", "site_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"))
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id"))
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    sha256: Mapped[str] = mapped_column(String(64))
    num_samples: Mapped[int] = mapped_column(Integer)
    received_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    # Asynchronous studies: versions published since the update's base version when it
    # arrived, and the version it was folded into (NULL while buffered, or discarded).
    staleness: Mapped[int | None] = mapped_column(Integer, nullable=True)
    aggregated_into: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Why the update was set aside instead of folded (it no longer passes the checks).
    quarantine: Mapped[str | None] = mapped_column(String(300), nullable=True)


class SecureMessage(Base):
    """A site's message for a step of a secure round's sum (JSON): public keys, sealed
    shares, a masked vector or revealed shares; never a site's release in the clear.
    Deleted once the round's sum is unmasked or given up."""

    __tablename__ = "secure_messages"
    __table_args__ = (UniqueConstraint("round_id", "site_id", "step", "attempt"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"))
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id"))
    step: Mapped[str] = mapped_column(String(16))
    attempt: Mapped[int] = mapped_column(Integer)
    body: Mapped[bytes] = mapped_column(LargeBinary)
    received_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class ModelVersion(Base):
    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("study_id", "version"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[str] = mapped_column(ForeignKey("studies.id"))
    version: Mapped[int] = mapped_column(Integer)
    weights: Mapped[bytes] = mapped_column(LargeBinary)
    sha256: Mapped[str] = mapped_column(String(64))
    round_number: Mapped[int] = mapped_column(Integer)
    participants: Mapped[list[str]] = mapped_column(JSON, default=list)
    metrics: Mapped[dict[str, object]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Refusal(Base):
    """A task a site's node refused (outside the plan it pinned), with its reason."""

    __tablename__ = "refusals"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[str] = mapped_column(ForeignKey("studies.id"))
    site_id: Mapped[int] = mapped_column(ForeignKey("sites.id"))
    round_number: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class RegisteredModel(Base):
    """A model version in the registry: the standalone model file and its card."""

    __tablename__ = "registered_models"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[str] = mapped_column(String(100), unique=True)
    study: Mapped[str] = mapped_column(String(64))
    number: Mapped[int] = mapped_column(Integer)  # n of "<study>-v<n>"
    artifact: Mapped[bytes] = mapped_column(LargeBinary)  # RiskModel.to_bytes()
    card: Mapped[dict[str, object]] = mapped_column(JSON)
    content_sha256: Mapped[str] = mapped_column(String(64))
    promoted: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class ApiKey(Base):
    """A partner's key to the risk API (stored as a hash), its scopes and rate limit, and
    the studies whose models it may use (NULL: every study)."""

    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list[str]] = mapped_column(JSON)
    rate_limit_per_minute: Mapped[int] = mapped_column(Integer)
    studies: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
