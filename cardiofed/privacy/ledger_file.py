"""The hospital's one privacy ledger on disk: append-only, hash-chained, sealed.

A node keeps one ledger for every release it ever makes, whatever the study, its
columns, its covariates, or the name a coordinator enrolled the site under: the file is
``<ledger_dir>/ledger.jsonl`` and nothing in its path comes from another party. Its first
line is a header (format, a random ledger id, delta and accountant, and how the ledger
began); every further line is one release. Each line carries a MAC that chains it to
the line before it (``mac_i = HMAC-SHA256(key, mac_{i-1} || entry_i)``), so an entry
edited, removed or reordered breaks the chain.

The key lives in the *seal*, a file outside ``ledger_dir`` (default
``<ledger_dir>.seal`` beside it, mode 0600), with the ledger id, the number of entries
and the chain's head, rewritten after every append. Together they make a reset
visible: a ledger whose seal is gone, a seal whose ledger is gone (a moved or deleted
folder, a config pointing somewhere new), a seal of another ledger, or fewer entries
than the seal counted all raise :class:`~cardiofed.exceptions.PrivacyLedgerError` with
what happened and how to reset deliberately (:func:`reset_ledger`, which archives the
old files and records the reset in the new ledger's header).

What this cannot stop: whoever administers the site can delete the ledger *and* its seal
together, which starts a new, empty ledger. The seal is kept apart so that no single
folder move, restore or clean-up does that by accident, and no coordinator can.

Writers hold an exclusive ``flock`` on ``<ledger_dir>/ledger.lock`` while they read the
newest entries, check the budget and append, so several node processes of one hospital
share one ledger without spending the same budget twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cardiofed.exceptions import ConfigurationError, PrivacyLedgerError

LEDGER_FORMAT = 3
LEDGER_FILE = "ledger.jsonl"
LOCK_FILE = "ledger.lock"
log = logging.getLogger("cardiofed.privacy")


def default_seal_file(ledger_dir: Path) -> Path:
    """Where a ledger's seal lives unless configured: beside the folder, not in it."""
    ledger_dir = Path(ledger_dir)
    return ledger_dir.with_name(ledger_dir.name + ".seal")


def _canonical(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"),
                      allow_nan=False).encode("utf-8")


def _mac(key: bytes, previous: str, value: object) -> str:
    return hmac.new(key, previous.encode("ascii") + _canonical(value),
                    hashlib.sha256).hexdigest()


def _write_atomic(path: Path, text: str, mode: int = 0o600) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@dataclass
class _Seal:
    key: bytes
    ledger_id: str
    entries: int
    head: str
    ledger_dir: str

    def to_json(self) -> str:
        return json.dumps({"format": LEDGER_FORMAT, "key": self.key.hex(),
                           "ledger_id": self.ledger_id, "entries": self.entries,
                           "head": self.head, "ledger_dir": self.ledger_dir}, indent=1)


class LedgerFile:
    """One hospital's ledger file and its seal. Use :func:`open_ledger_file`."""

    def __init__(self, ledger_dir: Path, seal_file: Path, seal: _Seal,
                 header: dict[str, Any], entries: list[dict[str, Any]]) -> None:
        self.ledger_dir = ledger_dir
        self.seal_file = seal_file
        self._seal = seal
        self.header = header
        self.entries = entries
        self._guard = threading.RLock()
        self._depth = 0

    @property
    def path(self) -> Path:
        return self.ledger_dir / LEDGER_FILE

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the ledger's exclusive lock, with the newest entries read and verified
        (re-entrant: a nested call holds it already)."""
        with self._guard:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            with _exclusive(self.ledger_dir):
                self._depth = 1
                try:
                    self.header, self.entries, self._seal = _read_verified(
                        self.ledger_dir, self.seal_file)
                    yield
                finally:
                    self._depth = 0

    def append(self, entry: dict[str, Any]) -> None:
        """Append `entry` (call inside :meth:`locked`), fsync it, then advance the seal."""
        mac = _mac(self._seal.key, self._seal.head, entry)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(_canonical({"entry": entry, "mac": mac}).decode("utf-8") + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.entries.append(entry)
        self._seal.entries += 1
        self._seal.head = mac
        _write_atomic(self.seal_file, self._seal.to_json())


def _how_to_reset(ledger_dir: Path) -> str:
    return (f"If this was deliberate and the records' privacy is accounted elsewhere, start "
            f"a new ledger with `cardiofed node reset-ledger --config <node.toml> --reason "
            f"\"...\"` (the old files are archived and the reset is recorded); otherwise "
            f"restore {ledger_dir} and its seal from backup.")


def _read_seal(seal_file: Path) -> _Seal:
    try:
        raw = json.loads(seal_file.read_text(encoding="utf-8"))
        return _Seal(key=bytes.fromhex(raw["key"]), ledger_id=str(raw["ledger_id"]),
                     entries=int(raw["entries"]), head=str(raw["head"]),
                     ledger_dir=str(raw.get("ledger_dir", "")))
    except (ValueError, KeyError, TypeError) as exc:
        raise PrivacyLedgerError(f"The privacy ledger's seal {seal_file} is unreadable "
                                 f"({type(exc).__name__}: {exc}); refusing to guess what "
                                 f"was spent.") from None


def _read_verified(ledger_dir: Path, seal_file: Path
                   ) -> tuple[dict[str, Any], list[dict[str, Any]], _Seal]:
    """Header and entries of the ledger in `ledger_dir`, verified against its seal."""
    path = ledger_dir / LEDGER_FILE
    seal = _read_seal(seal_file)
    if not path.exists():
        raise PrivacyLedgerError(
            f"The privacy ledger {seal.ledger_id[:8]} (last at {seal.ledger_dir}, "
            f"{seal.entries} releases) is not in {ledger_dir}: the folder was moved or "
            f"deleted, or the config points at a new one. The node stops rather than start "
            f"again from zero. Point [privacy] ledger_dir at the ledger. "
            f"{_how_to_reset(ledger_dir)}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
    except ValueError as exc:
        raise PrivacyLedgerError(f"The privacy ledger {path} is corrupt ({exc}). "
                                 f"{_how_to_reset(ledger_dir)}") from None
    if not records or not isinstance(records[0], dict) or "header" not in records[0]:
        raise PrivacyLedgerError(f"The privacy ledger {path} has no header. "
                                 f"{_how_to_reset(ledger_dir)}")
    header = records[0]["header"]
    if not isinstance(header, dict) or header.get("ledger_id") != seal.ledger_id:
        got = header.get("ledger_id") if isinstance(header, dict) else None
        raise PrivacyLedgerError(
            f"The privacy ledger {path} (id {str(got)[:8]}) is not the one its seal "
            f"{seal_file} belongs to (id {seal.ledger_id[:8]}): another ledger was put in "
            f"its place. {_how_to_reset(ledger_dir)}")
    head = _mac(seal.key, "", header)
    if not hmac.compare_digest(head, str(records[0].get("mac", ""))):
        raise PrivacyLedgerError(f"The privacy ledger {path} fails its integrity check at "
                                 f"its header: it was edited. {_how_to_reset(ledger_dir)}")
    entries: list[dict[str, Any]] = []
    at_seal = head if seal.entries == 0 else None
    for i, record in enumerate(records[1:], start=1):
        entry = record.get("entry") if isinstance(record, dict) else None
        if not isinstance(entry, dict) or not hmac.compare_digest(
                _mac(seal.key, head, entry), str(record.get("mac", ""))):
            raise PrivacyLedgerError(
                f"The privacy ledger {path} fails its integrity check at release {i}: an "
                f"entry was edited, removed or reordered. {_how_to_reset(ledger_dir)}")
        head = str(record["mac"])
        entries.append(entry)
        if i == seal.entries:
            at_seal = head
    if len(entries) < seal.entries or at_seal != seal.head:
        raise PrivacyLedgerError(
            f"The privacy ledger {path} holds {len(entries)} releases; its seal counted "
            f"{seal.entries}: releases were removed. {_how_to_reset(ledger_dir)}")
    if len(entries) > seal.entries:  # a crash between the append and the seal's update
        seal.entries, seal.head = len(entries), head
        _write_atomic(seal_file, seal.to_json())
    return header, entries, seal


def _check_places(ledger_dir: Path, seal_file: Path) -> None:
    ledger_dir, seal_file = ledger_dir.resolve(), seal_file.resolve()
    if seal_file.is_relative_to(ledger_dir):
        raise ConfigurationError(f"The ledger's seal {seal_file} must live outside ledger_dir "
                                 f"{ledger_dir}: moving or deleting that folder must not take "
                                 f"the seal with it.")


def open_ledger_file(ledger_dir: str | Path, *, seal_file: str | Path | None = None,
                     create: dict[str, Any] | None = None) -> LedgerFile:
    """The ledger in `ledger_dir`, verified against its seal.

    A ledger and seal that both do not exist yet are created when `create` is given (delta
    and accountant, fixed for the ledger's life, for the header); anything else that does
    not match raises :class:`PrivacyLedgerError` saying what happened."""
    ledger_dir = Path(ledger_dir)
    seal_path = Path(seal_file) if seal_file is not None else default_seal_file(ledger_dir)
    _check_places(ledger_dir, seal_path)
    ledger_path = ledger_dir / LEDGER_FILE
    absent = PrivacyLedgerError(f"There is no privacy ledger in {ledger_dir} (and no seal "
                                f"at {seal_path}).")
    if create is None and not (seal_path.exists() or ledger_path.exists()):
        raise absent  # before the lock, whose file would make the folder
    with _exclusive(ledger_dir):  # two nodes starting at once create one ledger
        if not seal_path.exists():
            if ledger_path.exists():
                raise PrivacyLedgerError(
                    f"The privacy ledger {ledger_path} has no seal at {seal_path} (the key "
                    f"that proves it was not edited): the seal was deleted or moved, or the "
                    f"config names another. Put the seal back, or set [privacy] seal_file to "
                    f"it. {_how_to_reset(ledger_dir)}")
            if create is None:
                raise absent
            _create(ledger_dir, seal_path, create)
        header, entries, seal = _read_verified(ledger_dir, seal_path)
    return LedgerFile(ledger_dir, seal_path, seal, header, entries)


@contextlib.contextmanager
def _exclusive(ledger_dir: Path) -> Iterator[None]:
    """The ledger folder's exclusive ``flock`` (the folder is made if need be)."""
    ledger_dir.mkdir(parents=True, exist_ok=True)
    with open(ledger_dir / LOCK_FILE, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _create(ledger_dir: Path, seal_file: Path, header: dict[str, Any]) -> None:
    ledger_dir.mkdir(parents=True, exist_ok=True)
    seal_file.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": LEDGER_FORMAT, "ledger_id": secrets.token_hex(16),
              "created": time.time(), **header}
    key = secrets.token_bytes(32)
    head = _mac(key, "", header)
    _write_atomic(ledger_dir / LEDGER_FILE,
                  _canonical({"header": header, "mac": head}).decode("utf-8") + "\n", 0o644)
    _write_atomic(seal_file, _Seal(key, header["ledger_id"], 0, head,
                                   str(ledger_dir.resolve())).to_json())
    log.info("privacy ledger %s created in %s (seal %s)", header["ledger_id"][:8], ledger_dir,
             seal_file)


def reset_ledger(ledger_dir: str | Path, *, reason: str, create: dict[str, Any],
                 seal_file: str | Path | None = None) -> Path:
    """Start a new ledger deliberately: archive the old ledger and seal (whatever state
    they are in) under a timestamped name, write a new ledger whose header records the
    reset, the reason and what the old one held, and log a warning. Returns the new
    ledger's path."""
    if not reason.strip():
        raise ConfigurationError("A ledger reset needs a reason (it is recorded and logged).")
    ledger_dir = Path(ledger_dir)
    seal_path = Path(seal_file) if seal_file is not None else default_seal_file(ledger_dir)
    _check_places(ledger_dir, seal_path)
    previous: dict[str, Any] = {}
    if seal_path.exists():
        with contextlib.suppress(PrivacyLedgerError):
            seal = _read_seal(seal_path)
            previous = {"ledger_id": seal.ledger_id, "releases": seal.entries}
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    archived = []
    # The ledger, its seal, and ledgers of earlier releases (JSON), which a new ledger
    # would otherwise import again.
    for path in (ledger_dir / LEDGER_FILE, seal_path, *sorted(ledger_dir.glob("*.json"))):
        if path.exists():
            target = path.with_name(f"{path.name}.reset-{stamp}")
            os.replace(path, target)
            archived.append(str(target))
    _create(ledger_dir, seal_path, {**create, "reset": {
        "time": time.time(), "reason": reason, "previous": previous, "archived": archived}})
    log.warning("privacy ledger in %s RESET deliberately (reason: %s); the previous ledger "
                "%s with %s releases is archived and no longer counts", ledger_dir, reason,
                str(previous.get("ledger_id", "(missing)"))[:8],
                previous.get("releases", "an unknown number of"))
    return ledger_dir / LEDGER_FILE
