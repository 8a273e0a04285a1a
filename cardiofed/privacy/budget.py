"""The site's own privacy budget and the ledger of what it has spent.

The budget ``(epsilon_max, delta)`` belongs to the site's configuration; delta defaults
to ``min(1e-5, 1 / (10 n))`` for ``n`` records and must be below ``1 / n``. The budget
is split across the kinds of release a site makes (``statistics``, ``train``,
``evaluate``; :data:`DEFAULT_SHARES`): each kind's noise is calibrated so that the
total composed after it stays within the cumulative share of the budget, so the total
never exceeds ``epsilon_max`` and the report shows epsilon per kind and in total.

The ledger is a JSON file at the site, rewritten atomically after every release, so it
survives restarts. It is bound to the site's data: a fingerprint of the records names
the file (:func:`ledger_path`) and is checked on load, and a marker beside it (and one
in the node's state) remembers that it existed, so a deleted ledger is refused rather
than silently recreated at zero (:func:`open_ledger`; an explicit, logged ``reset``
overrides). Before any release the site checks the planned events against its budget
and refuses (:class:`PrivacyBudgetExceeded`, with the numbers) a release that would
exceed it. Nothing the coordinator sends can change the budget: it is read only from
the site's own configuration and ledger.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cardiofed.exceptions import ConfigurationError, PrivacyBudgetExceeded
from cardiofed.privacy.accountant import AccountantKind, GaussianEvent, PrivacyAccountant

if TYPE_CHECKING:
    from cardiofed.data.dataset import SiteData

LEDGER_VERSION = 2
RELEASE_KINDS = ("statistics", "train", "evaluate")
# Shares of epsilon_max, in the order a study releases them.
DEFAULT_SHARES: dict[str, float] = {"statistics": 0.1, "train": 0.8, "evaluate": 0.1}
MAX_DEFAULT_DELTA = 1e-5
log = logging.getLogger("cardiofed.privacy")


# An attribution study's releases (cardiofed.causal.study): a study of their own, with no
# shares, which may spend what the site's budget has left.
ATTRIBUTION = "attribution"


def _kind_index(kind: str) -> int:
    """Position of a release kind in :data:`RELEASE_KINDS` (ATTRIBUTION after them); an
    unknown kind is an error."""
    if kind == ATTRIBUTION:
        return len(RELEASE_KINDS)
    if kind not in RELEASE_KINDS:
        raise ConfigurationError(f"Unknown release kind {kind!r}; expected one of "
                                 f"{', '.join(RELEASE_KINDS)} or {ATTRIBUTION}.")
    return RELEASE_KINDS.index(kind)


@dataclass(frozen=True, kw_only=True)
class SiteBudget:
    """A site's privacy budget: at most ``epsilon_max`` at ``delta``."""

    epsilon_max: float
    delta: float | None = None
    accountant: AccountantKind = "rdp"
    shares: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_SHARES))

    def __post_init__(self) -> None:
        if not (self.epsilon_max > 0 and math.isfinite(self.epsilon_max)):
            raise ConfigurationError(f"The 'epsilon_max' parameter must be finite and > 0; "
                                     f"got {self.epsilon_max!r}.")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ConfigurationError(f"The 'delta' parameter must be in (0, 1); "
                                     f"got {self.delta!r}.")
        if self.accountant not in ("rdp", "prv"):
            raise ConfigurationError(f"The 'accountant' parameter must be 'rdp' or 'prv'; "
                                     f"got {self.accountant!r}.")
        shares = dict(self.shares)
        if set(shares) != set(RELEASE_KINDS) or not all(
                isinstance(v, int | float) and math.isfinite(v) and v > 0
                for v in shares.values()) or not math.isclose(sum(shares.values()), 1.0):
            raise ConfigurationError(
                f"The 'shares' parameter must give each of {', '.join(RELEASE_KINDS)} a share "
                f"> 0, summing to 1; got {shares!r}.")

    def cumulative_share(self, kind: str) -> float:
        """Share of the budget that may be spent once releases of `kind` are made."""
        upto = RELEASE_KINDS[:_kind_index(kind) + 1]
        return min(1.0, sum(self.shares[k] for k in upto))

    def delta_for(self, n_records: int) -> float:
        """The delta in force for a site of `n_records` (default ``min(1e-5, 1 / (10 n))``)."""
        if n_records < 1:
            raise ConfigurationError(f"A privacy budget needs n_records >= 1; got {n_records}.")
        if self.delta is None:
            return min(MAX_DEFAULT_DELTA, 1.0 / (10 * n_records))
        if self.delta >= 1.0 / n_records:
            raise ConfigurationError(
                f"The 'delta' parameter must be below 1/n = {1 / n_records:.3g} for a site "
                f"of {n_records} records (delta >= 1/n allows releasing a record outright); "
                f"got {self.delta!r}.")
        return self.delta


def data_fingerprint(x: np.ndarray, y: np.ndarray) -> str:
    """SHA-256 of a site's training records (features, NaN-aware, and labels).

    Stays at the site, in its ledger: it binds the ledger to the data it accounts for."""
    h = hashlib.sha256()
    for arr in (np.ascontiguousarray(x, dtype=np.float64), np.ascontiguousarray(y, np.float64)):
        h.update(str(arr.shape).encode())
        h.update(np.nan_to_num(arr, nan=np.inf).tobytes())
    return h.hexdigest()


def site_fingerprint(site: SiteData) -> str:
    """:func:`data_fingerprint` of all of a site's records (training and test splits):
    the ledger accounts for every patient the site holds."""
    return data_fingerprint(np.vstack([site.x_train, site.x_test]),
                            np.concatenate([site.y_train, site.y_test]))


class PrivacyLedger:
    """Spent privacy of one site, persisted at `path` (in memory when `path` is None).

    ``fingerprint`` (of the records, :func:`data_fingerprint`) is stored and checked:
    a ledger written for other data is refused."""

    def __init__(self, *, site: str, budget: SiteBudget, n_records: int,
                 path: str | Path | None = None, fingerprint: str | None = None) -> None:
        self.site = site
        self.budget = budget
        self.n_records = n_records
        self.delta = budget.delta_for(n_records)
        self.path = Path(path) if path is not None else None
        self.fingerprint = fingerprint
        self.accountant = PrivacyAccountant(budget.accountant)
        self.entries: list[dict[str, object]] = []
        if self.path is not None and self.path.exists():
            self._load(self.path)

    def _load(self, path: Path) -> None:
        try:  # ValueError: invalid JSON (JSONDecodeError) or not UTF-8 (UnicodeDecodeError)
            state = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ConfigurationError(f"Privacy ledger {path} is corrupt ({exc}); refusing "
                                     f"to guess what was spent.") from None
        if not isinstance(state, dict):
            raise ConfigurationError(f"Privacy ledger {path} is corrupt (not a JSON object); "
                                     f"refusing to guess what was spent.")
        if state.get("version") not in (1, LEDGER_VERSION) or state.get("site") != self.site:
            raise ConfigurationError(
                f"Privacy ledger {path} belongs to site {state.get('site')!r} (version "
                f"{state.get('version')!r}), not to {self.site!r} (version {LEDGER_VERSION}).")
        stored = state.get("fingerprint")
        if stored is not None and self.fingerprint is not None and stored != self.fingerprint:
            raise ConfigurationError(
                f"Privacy ledger {path} accounts for other records (data fingerprint "
                f"{str(stored)[:12]}..., these records {self.fingerprint[:12]}...); it is not "
                f"this data's ledger.")
        try:
            accountant = PrivacyAccountant.from_state_dict(state["accountant"])
            entries = [{"kind": "train", **e} for e in state["entries"]]  # v1: DP-SGD only
        except (KeyError, TypeError, AttributeError) as exc:
            raise ConfigurationError(f"Privacy ledger {path} is corrupt ({type(exc).__name__}: "
                                     f"{exc}); refusing to guess what was spent.") from None
        self.accountant, self.entries = accountant, entries
        self.fingerprint = self.fingerprint or stored

    def _save(self) -> None:
        if self.path is None:
            return
        state = {"version": LEDGER_VERSION, "site": self.site, "n_records": self.n_records,
                 "fingerprint": self.fingerprint, "epsilon_max": self.budget.epsilon_max,
                 "delta": self.delta, "accountant": self.accountant.state_dict(),
                 "entries": self.entries}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(state, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def spent(self, kind: str | None = None) -> float:
        """Epsilon spent so far at the site's delta: in total (all releases composed), or
        by the releases of one `kind` alone."""
        if kind is None:
            return self.accountant.get_epsilon(self.delta)
        return self._epsilon_of([e for e in self.entries if e.get("kind") == kind])

    def _epsilon_of(self, entries: list[dict[str, object]]) -> float:
        """Epsilon of the events of `entries` alone, composed, at the site's delta."""
        events = [GaussianEvent(**e) for entry in entries
                  for e in entry["events"]]  # type: ignore[attr-defined]
        return PrivacyAccountant(self.budget.accountant, events).get_epsilon(self.delta)

    def spent_by_kind(self) -> dict[str, float]:
        """Epsilon of each release kind alone (attribution when it has any), and the
        composed ``total``."""
        kinds = [*RELEASE_KINDS, *([ATTRIBUTION] if self.releases(ATTRIBUTION) else [])]
        return {**{k: self.spent(k) for k in kinds}, "total": self.spent()}

    def remaining(self) -> float:
        return max(0.0, self.budget.epsilon_max - self.spent())

    def releases(self, kind: str, study: str | None = None) -> list[dict[str, object]]:
        """The ledger's entries of one kind (for one study)."""
        return [e for e in self.entries if e.get("kind") == kind
                and (study is None or e.get("study") == study)]

    def target(self, kind: str, study: str | None = None) -> float:
        """The total epsilon a release of `kind` may bring the ledger to: what other
        studies spent, plus the kind's cumulative share of the budget that was left."""
        before = self._epsilon_of([e for e in self.entries if e.get("study") != study])
        left = max(0.0, self.budget.epsilon_max - before)
        return min(self.budget.epsilon_max, before + self.budget.cumulative_share(kind) * left)

    def check(self, planned: list[GaussianEvent], what: str, *, kind: str | None = None,
              study: str | None = None) -> float:
        """Epsilon after `planned`; raises :class:`PrivacyBudgetExceeded` if over budget,
        or, for a release of `kind`, over that kind's cumulative share (:meth:`target`),
        so that one kind never eats the share kept for the kinds after it."""
        after = self.accountant.get_epsilon(self.delta, planned)
        if kind is not None and after > (limit := self.target(kind, study)) + 1e-9:
            raise PrivacyBudgetExceeded(
                f"Site {self.site!r} refuses {what}: it would bring epsilon from "
                f"{self.spent():.4f} to {after:.4f}, above {limit:.4f}, what its budget share "
                f"allows once {kind} releases are made (epsilon_max "
                f"{self.budget.epsilon_max:g}, delta {self.delta:.3g}).")
        if after > self.budget.epsilon_max:
            raise PrivacyBudgetExceeded(
                f"Site {self.site!r} refuses {what}: it would bring epsilon from "
                f"{self.spent():.4f} to {after:.4f}, above the site's epsilon_max "
                f"{self.budget.epsilon_max:g} (delta {self.delta:.3g}).")
        return after

    def record(self, events: list[GaussianEvent], what: str, *, kind: str = "train",
               study: str | None = None, **details: object) -> float:
        """Compose `events` into the ledger, persist it, and return epsilon spent."""
        _kind_index(kind)
        for event in events:
            self.accountant.compose(event)
        epsilon = self.spent()
        self.entries.append({"time": time.time(), "kind": kind, "study": study, "what": what,
                             "epsilon_after": epsilon, "events": [e.__dict__ for e in events],
                             **details})
        self._save()
        return epsilon


def ledger_path(ledger_dir: str | Path, site: str, fingerprint: str) -> Path:
    """Where a site's ledger for these records lives: one file per (site, data)."""
    return Path(ledger_dir) / f"{site}-{fingerprint[:16]}.json"


def open_ledger(*, site: str, budget: SiteBudget, n_records: int, fingerprint: str,
                ledger_dir: str | Path, markers: tuple[Path, ...] = (),
                reset: bool = False) -> PrivacyLedger:
    """The site's ledger for these records, refusing to recreate one that existed.

    A marker file (``<ledger>.created`` beside it, and each of `markers`, e.g. in the
    node's state directory) records that the ledger was created. If a marker exists but
    the ledger does not, the ledger was deleted: starting again at zero would hand out
    the budget twice, so this raises :class:`ConfigurationError` unless `reset` is
    given, which is logged as a warning with the fingerprint.
    """
    path = ledger_path(ledger_dir, site, fingerprint)
    own_markers = (path.with_name(path.name + ".created"), *markers)
    if not path.exists() and any(m.exists() for m in own_markers):
        if not reset:
            raise ConfigurationError(
                f"The privacy ledger {path} of site {site!r} existed for these records "
                f"(fingerprint {fingerprint[:12]}...) but is gone: refusing to start again "
                f"from zero, which would spend the budget twice. Restore the ledger from "
                f"backup; only if the records' privacy was never at risk, override with "
                f"reset_privacy_ledger (logged).")
        log.warning("privacy ledger %s of site %s (fingerprint %s) RESET by explicit "
                    "override; what was spent before is no longer accounted", path, site,
                    fingerprint[:12])
    ledger = PrivacyLedger(site=site, budget=budget, n_records=n_records, path=path,
                           fingerprint=fingerprint)
    ledger._save()
    for marker in own_markers:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"ledger": str(path), "fingerprint": fingerprint}))
    return ledger
