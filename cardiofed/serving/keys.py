"""API keys of the risk API: scopes, per-key rate limits, revocation.

A key is shown once when created and stored only as its SHA-256. Scopes: ``score``
(``POST /v1/risk*`` with the promoted model), ``score:any-version`` (also pin any other
registered version), ``models:read`` (model cards) and ``admin`` (promote). A key may be
limited to named studies: it then scores, reads and promotes only their models. Each key
has a rate limit in requests per minute, enforced per serving process with a token
bucket (a batch request counts as one request; its size is capped separately).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC

from sqlalchemy import select
from sqlalchemy.orm import Session

from cardiofed.exceptions import (
    AuthenticationError,
    ConfigurationError,
    Conflict,
    NotFound,
    PermissionDenied,
)
from cardiofed.store import ApiKey, hash_secret, new_secret

ANY_VERSION = "score:any-version"
SCOPES = ("score", ANY_VERSION, "models:read", "attribution:read", "admin")


@dataclass(frozen=True)
class KeyInfo:
    """What the API needs to know about an authenticated key (`studies` None: all)."""

    id: int
    name: str
    scopes: frozenset[str]
    rate_limit_per_minute: int
    studies: frozenset[str] | None = None

    def require(self, scope: str) -> None:
        if scope not in self.scopes:
            raise PermissionDenied(f"API key {self.name!r} lacks the {scope!r} scope (it has "
                                   f"{', '.join(sorted(self.scopes)) or 'none'}).")

    def may_see(self, study: str) -> bool:
        return self.studies is None or study in self.studies

    def require_study(self, study: str, version: str) -> None:
        """Refuse a model of a study outside the key's studies."""
        if not self.may_see(study):
            raise PermissionDenied(
                f"API key {self.name!r} is limited to the models of "
                f"{', '.join(repr(s) for s in sorted(self.studies or ()))}; model {version!r} "
                f"belongs to study {study!r}.")

    def require_pin(self, version: str, promoted: str | None) -> None:
        """Refuse pinning `version` when it is not the `promoted` one, unless the key has
        ``score:any-version``."""
        if version != promoted and ANY_VERSION not in self.scopes:
            serves = f"the promoted version ({promoted})" if promoted else \
                "the promoted version (none is promoted)"
            raise PermissionDenied(f"API key {self.name!r} may score only with {serves}; "
                                   f"pinning {version!r} needs the {ANY_VERSION!r} scope.")


def create_key(db: Session, name: str, scopes: list[str], rate_limit_per_minute: int = 600,
               *, studies: Sequence[str] | None = None) -> str:
    """A new key (returned once); `scopes` from :data:`SCOPES`; `studies` limits it to
    those studies' models (None: every study)."""
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise ConfigurationError(f"The 'scopes' parameter must be a non-empty subset of "
                                 f"{', '.join(SCOPES)}; got {scopes}.")
    if ANY_VERSION in scopes and "score" not in scopes:
        raise ConfigurationError(f"The {ANY_VERSION!r} scope widens 'score'; give both. Got "
                                 f"{scopes}.")
    if studies is not None and (not studies or any(
            not isinstance(s, str) or not 1 <= len(s) <= 64 for s in studies)):
        raise ConfigurationError(f"The 'studies' parameter must be None (every study) or a "
                                 f"non-empty list of study names of 1 to 64 characters; got "
                                 f"{studies!r}.")
    if rate_limit_per_minute < 1:
        raise ConfigurationError(f"The 'rate_limit_per_minute' parameter must be >= 1; got "
                                 f"{rate_limit_per_minute}.")
    if not name or len(name) > 64:
        raise ConfigurationError(f"The 'name' parameter must have 1 to 64 characters; got "
                                 f"{name!r}.")
    if db.scalar(select(ApiKey).where(ApiKey.name == name)) is not None:
        raise Conflict(f"An API key named {name!r} already exists.")
    secret = "cfk_" + new_secret()
    db.add(ApiKey(name=name, key_hash=hash_secret(secret), scopes=sorted(set(scopes)),
                  rate_limit_per_minute=rate_limit_per_minute,
                  studies=None if studies is None else sorted(set(studies))))
    db.commit()
    return secret


def revoke_key(db: Session, name: str) -> None:
    key = db.scalar(select(ApiKey).where(ApiKey.name == name))
    if key is None:
        raise NotFound(f"No API key named {name!r}.")
    key.revoked = True
    db.commit()


def list_keys(db: Session) -> list[dict[str, object]]:
    return [{"name": k.name, "scopes": k.scopes, "studies": k.studies,
             "rate_limit_per_minute": k.rate_limit_per_minute, "revoked": k.revoked,
             "created_at": k.created_at.replace(tzinfo=UTC).isoformat(timespec="seconds")}
            for k in db.scalars(select(ApiKey).order_by(ApiKey.id))]


class KeyCache:
    """Authenticates keys, re-reading the database at most every `ttl_s` seconds per key
    (so a revocation made by another process takes effect within `ttl_s`)."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, KeyInfo | None]] = {}
        self._lock = threading.Lock()

    def authenticate(self, sessions: Callable[[], Session], secret: str | None) -> KeyInfo:
        if not secret:
            raise AuthenticationError("An API key is required (Authorization: Bearer ...).")
        digest = hash_secret(secret)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(digest)
        if hit is None or now - hit[0] >= self.ttl_s:
            with sessions() as db:
                row = db.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
                info = None if row is None or row.revoked else KeyInfo(
                    row.id, row.name, frozenset(row.scopes), row.rate_limit_per_minute,
                    None if row.studies is None else frozenset(row.studies))
            if row is not None:  # unknown tokens are not cached: the cache stays bounded
                with self._lock:
                    self._cache[digest] = (now, info)
        else:
            info = hit[1]
        if info is None:
            raise AuthenticationError("Unknown or revoked API key.")
        return info


class RateLimiter:
    """A token bucket per key: capacity = the per-minute limit, refilled continuously."""

    def __init__(self) -> None:
        self._buckets: dict[int, tuple[float, float]] = {}  # key id -> (tokens, updated)
        self._lock = threading.Lock()

    def retry_after(self, key: KeyInfo, now: float | None = None) -> float:
        """Take one token; 0 if allowed, else the seconds until one is available."""
        now = time.monotonic() if now is None else now
        capacity = float(key.rate_limit_per_minute)
        rate = capacity / 60.0
        with self._lock:
            tokens, updated = self._buckets.get(key.id, (capacity, now))
            tokens = min(capacity, tokens + (now - updated) * rate)
            if tokens >= 1.0:
                self._buckets[key.id] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key.id] = (tokens, now)
            return math.ceil((1.0 - tokens) / rate * 1000) / 1000
