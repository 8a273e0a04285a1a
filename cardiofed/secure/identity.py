"""Sites' long-term signing keys, and the roster that lets each site check the others'.

In a secure sum the coordinator relays every site's public keys. A coordinator that
substituted its own keys for a site's would agree the masks in that site's place and
could unmask its input (the attack Bonawitz et al. answer with signed advertisements,
their section 4). Here each site holds an Ed25519 key of its own, and the hospitals
agree out of band on a roster: each site's name in the federation and its public key.
A node with a roster signs its advertisements and shares its keys only when every
advertisement of the sum is from a site on the roster and signed by that site's key.

The roster is a TOML file with one table::

    [sites]
    tier3_01 = "base64 of the site's 32-byte Ed25519 public key"
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from cardiofed.exceptions import ConfigurationError, InvalidUpdate
from cardiofed.names import safe_name

__all__ = ["IDENTITY_KEY", "SiteIdentity", "identity_key", "public_of", "read_roster",
           "roster_line"]

IDENTITY_KEY = "identity.key"  # the site's signing key, in the node's state_dir
KEY_BYTES = 32
SIGNATURE_BYTES = 64


def identity_key(path: Path) -> bytes:
    """The site's Ed25519 private key (raw bytes) in `path`, made there (readable by its
    owner only) on first use."""
    if path.exists():
        try:
            raw = base64.b64decode(path.read_bytes().strip(), validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if len(raw) != KEY_BYTES:
            raise ConfigurationError(f"The identity key file {path} does not hold a 32-byte "
                                     f"Ed25519 key in base64.")
        return raw
    raw = Ed25519PrivateKey.generate().private_bytes(Encoding.Raw, PrivateFormat.Raw,
                                                     NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(base64.b64encode(raw) + b"\n")
    return raw


def public_of(private: bytes) -> bytes:
    """The public key of an Ed25519 private key (raw bytes)."""
    return Ed25519PrivateKey.from_private_bytes(private).public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw)


def roster_line(site: str, private: bytes) -> str:
    """`site`'s line of the roster's ``[sites]`` table: the public key of `private`."""
    return f'{site} = "{base64.b64encode(public_of(private)).decode()}"'


def read_roster(path: Path) -> dict[str, bytes]:
    """Site name -> Ed25519 public key, from a roster file; every problem named."""
    from cardiofed._pydantic import read_toml

    raw = read_toml(path, "Roster", ConfigurationError)
    sites = raw.get("sites")
    if set(raw) != {"sites"} or not isinstance(sites, dict) or not sites:
        raise ConfigurationError(f"The roster {path} must hold one [sites] table of site "
                                 f"names and public keys, and nothing else.")
    roster = {}
    for name, key in sites.items():
        safe_name(name, f"roster {path}'s site name")
        try:
            public = base64.b64decode(key, validate=True) if isinstance(key, str) else b""
        except (binascii.Error, ValueError):
            public = b""
        if len(public) != KEY_BYTES:
            raise ConfigurationError(f"The roster {path}: site {name!r} needs a 32-byte "
                                     f"Ed25519 public key in base64.")
        roster[name] = public
    if len(set(roster.values())) != len(roster):
        raise ConfigurationError(f"The roster {path} gives two sites the same key.")
    return roster


@dataclass(frozen=True)
class SiteIdentity:
    """This site's signing key and the federation's roster."""

    private: bytes
    roster: dict[str, bytes]

    def sign(self, message: bytes) -> bytes:
        return Ed25519PrivateKey.from_private_bytes(self.private).sign(message)

    def check_own(self, site: str) -> None:
        """Refuse (:class:`ConfigurationError`) unless the roster gives `site` this node's
        own public key."""
        if self.roster.get(site) != public_of(self.private):
            raise ConfigurationError(f"The roster does not give site {site!r} this node's "
                                     f"identity key: sign nothing until the roster and "
                                     f"the key agree (`cardiofed node identity`).")

    def signed_by(self, site: str, message: bytes, signature: bytes) -> bool:
        """Whether `signature` is `site`'s roster key's signature of `message`."""
        public = self.roster.get(site)
        if public is None:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True

    def verify(self, site: str, message: bytes, signature: bytes | None) -> None:
        """Refuse (:class:`InvalidUpdate`, naming `site`) unless `signature` is `site`'s
        roster key's signature of `message`."""
        public = self.roster.get(site)
        if public is None:
            raise InvalidUpdate(f"{site!r} is not on this node's roster: a site the "
                                f"hospitals did not agree on takes part in the sum.")
        if signature is None:
            raise InvalidUpdate(f"{site!r}'s advertisement is not signed.")
        if not self.signed_by(site, message, signature):
            raise InvalidUpdate(f"{site!r}'s advertisement is not signed by its roster "
                                f"key: its keys may have been substituted.")
