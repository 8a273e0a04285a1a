"""Key agreement, the masks' PRG and the encryption of shares between two sites.

X25519 gives two sites a shared secret that the coordinator relaying their public keys
cannot compute; HKDF-SHA256 turns it into a key per purpose and context (study, round,
the pair), ChaCha20's key stream expands a 32-byte seed into a mask of any length, and
AES-GCM seals the Shamir shares one site sends another through the coordinator.
"""

from __future__ import annotations

import secrets

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

KEY_BYTES = 32


def new_private_key() -> bytes:
    """A fresh X25519 private key (raw bytes) from the operating system's CSPRNG."""
    return X25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw,
                                                     NoEncryption())


def public_key(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw)


def agree(private: bytes, peer_public: bytes, purpose: bytes) -> bytes:
    """The 32-byte key two sites share for `purpose` (which names the study, round and
    use), from one's private key and the other's public key."""
    shared = X25519PrivateKey.from_private_bytes(private).exchange(
        X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None,
                info=b"cardiofed secure aggregation/" + purpose).derive(shared)


def new_seed() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def mask(seed: bytes, length: int) -> np.ndarray:
    """`length` pseudorandom uint64 values from the 32-byte `seed` (ChaCha20's key stream,
    nonce 0: each seed masks one vector)."""
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor()
    return np.frombuffer(stream.update(bytes(8 * length)), dtype="<u8").astype(np.uint64)


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """AES-GCM with a random 12-byte nonce (prefixed)."""
    nonce = secrets.token_bytes(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, sealed: bytes, associated: bytes) -> bytes:
    """The plaintext of :func:`seal`; raises ``cryptography.exceptions.InvalidTag`` when
    the ciphertext or its associated data were changed."""
    return AESGCM(key).decrypt(sealed[:12], sealed[12:], associated)
