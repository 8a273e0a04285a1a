"""Secrets as the store keeps them: generated here, stored only as SHA-256 hashes."""

from __future__ import annotations

import hashlib
import secrets


def hash_secret(secret: str) -> str:
    """The stored form of an enrolment token, credential or API key."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_secret() -> str:
    """A fresh secret of 256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)


def sha256(data: bytes) -> str:
    """The hex digest of a payload (an update's identity for retries)."""
    return hashlib.sha256(data).hexdigest()
