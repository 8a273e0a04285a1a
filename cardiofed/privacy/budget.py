"""The site's own privacy budget and the ledger of what it has spent.

The budget ``(epsilon_max, delta)`` belongs to the site's configuration. It is split
across the kinds of release a site makes (``statistics``, ``train``, ``evaluate``;
:data:`DEFAULT_SHARES`): each kind's noise is calibrated so that the total composed
after it stays within the cumulative share of what the study may spend, so the total
never exceeds ``epsilon_max`` and the report shows epsilon per kind and in total. A
study may spend what earlier studies left, or at most ``study_epsilon`` of it.

:class:`PrivacyLedger` composes every release the site has made, whatever the study or
kind, into one total (Opacus' RDP or PRV accountant, :mod:`cardiofed.privacy.accountant`)
and refuses (:class:`PrivacyBudgetExceeded`, with the numbers) a release that would
exceed the budget. A hospital node's ledger is one file for the hospital
(:mod:`cardiofed.privacy.ledger_file`: append-only, hash-chained, sealed with a key kept
outside the ledger's folder), opened with :func:`open_site_ledger`; the simulator's
ledgers live in memory. A release is charged *before* it is computed
(:meth:`PrivacyLedger.charge`, under the file's lock), so no failure in the computation
leaves it uncharged. Nothing the coordinator sends can change the budget.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cardiofed.exceptions import ConfigurationError, PrivacyBudgetExceeded
from cardiofed.privacy.accountant import AccountantKind, GaussianEvent, PrivacyAccountant
from cardiofed.privacy.ledger_file import LedgerFile, open_ledger_file

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
    # The most one study may add to the ledger's total (None: all that is left).
    study_epsilon: float | None = None

    def __post_init__(self) -> None:
        if not (self.epsilon_max > 0 and math.isfinite(self.epsilon_max)):
            raise ConfigurationError(f"The 'epsilon_max' parameter must be finite and > 0; "
                                     f"got {self.epsilon_max!r}.")
        if self.delta is not None and not 0 < self.delta < 1:
            raise ConfigurationError(f"The 'delta' parameter must be in (0, 1); "
                                     f"got {self.delta!r}.")
        if self.study_epsilon is not None and not (
                self.study_epsilon > 0 and math.isfinite(self.study_epsilon)):
            raise ConfigurationError(f"The 'study_epsilon' parameter must be finite and > 0; "
                                     f"got {self.study_epsilon!r}.")
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

    def ledger_header(self) -> dict[str, Any]:
        """What a new ledger file fixes for its life: delta (default
        :data:`MAX_DEFAULT_DELTA`) and the accountant."""
        return {"delta": self.delta if self.delta is not None else MAX_DEFAULT_DELTA,
                "accountant": self.accountant}

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


class PrivacyLedger:
    """Everything one site has released, composed; in memory, or in its ledger file.

    ``n_records`` sets the default delta of an in-memory ledger (:meth:`SiteBudget.
    delta_for`); a ledger file fixes delta and accountant in its header when it is
    created, and :meth:`check_records` checks delta against each data set it covers."""

    def __init__(self, *, site: str, budget: SiteBudget, n_records: int | None = None,
                 file: LedgerFile | None = None) -> None:
        self.site = site
        self.budget = budget
        self.file = file
        if file is not None:
            self.delta = float(file.header["delta"])
            if budget.delta is not None and budget.delta != self.delta:
                raise ConfigurationError(
                    f"The 'delta' parameter is {budget.delta!r}, but the site's ledger "
                    f"{file.path} accounts at delta {self.delta!r} since it was created; a "
                    f"ledger keeps one delta (leave delta out, or reset the ledger).")
            if file.header.get("accountant") != budget.accountant:
                raise ConfigurationError(
                    f"The 'accountant' parameter is {budget.accountant!r}, but the site's "
                    f"ledger {file.path} composes with {file.header.get('accountant')!r}.")
        else:
            if n_records is None:
                raise ConfigurationError("An in-memory privacy ledger needs n_records.")
            self.delta = budget.delta_for(n_records)
        self.accountant = PrivacyAccountant(budget.accountant)
        self.entries: list[dict[str, Any]] = []
        self._sync()

    def _sync(self) -> None:
        """Entries and accountant from the ledger file's newest verified state."""
        if self.file is None:
            return
        self.entries = list(self.file.entries)
        self.accountant = PrivacyAccountant(self.budget.accountant, [
            GaussianEvent(**e) for entry in self.entries for e in entry["events"]])

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the ledger file's lock (re-entrant), with its newest entries loaded, so
        that a calibration and the charge it leads to see the same ledger."""
        if self.file is None:
            yield
            return
        with self.file.locked():
            self._sync()
            yield

    def check_records(self, n_records: int) -> None:
        """Raise unless the ledger's delta is below 1/n for a data set of `n_records`."""
        if n_records < 1:
            raise ConfigurationError(f"A privacy budget needs n_records >= 1; got {n_records}.")
        if self.delta >= 1.0 / n_records:
            raise ConfigurationError(
                f"The site's ledger accounts at delta {self.delta:.3g}, not below 1/n = "
                f"{1 / n_records:.3g} for a data set of {n_records} records (delta >= 1/n "
                f"allows releasing a record outright): set [privacy] delta lower when the "
                f"ledger is created.")

    def spent(self, kind: str | None = None) -> float:
        """Epsilon spent so far at the site's delta: in total (all releases composed), or
        by the releases of one `kind` alone."""
        if kind is None:
            return self.accountant.get_epsilon(self.delta)
        return self.epsilon_of([e for e in self.entries if e.get("kind") == kind])

    def epsilon_of(self, entries: list[dict[str, Any]]) -> float:
        """Epsilon of the events of `entries` alone, composed, at the ledger's delta."""
        events = [GaussianEvent(**e) for entry in entries for e in entry["events"]]
        return PrivacyAccountant(self.budget.accountant, events).get_epsilon(self.delta)

    def spent_by_kind(self) -> dict[str, float]:
        """Epsilon of each release kind alone (attribution when it has any), and the
        composed ``total``."""
        kinds = [*RELEASE_KINDS, *([ATTRIBUTION] if self.releases(ATTRIBUTION) else [])]
        return {**{k: self.spent(k) for k in kinds}, "total": self.spent()}

    def remaining(self) -> float:
        return max(0.0, self.budget.epsilon_max - self.spent())

    def releases(self, kind: str, study: str | None = None) -> list[dict[str, Any]]:
        """The ledger's entries of one kind (for one study)."""
        return [e for e in self.entries if e.get("kind") == kind
                and (study is None or e.get("study") == study)]

    def target(self, kind: str, study: str | None = None) -> float:
        """The total epsilon a release of `kind` may bring the ledger to: what other
        studies spent, plus the kind's cumulative share of what this study may spend
        (what was left, at most ``study_epsilon``)."""
        before = self.epsilon_of([e for e in self.entries if e.get("study") != study])
        left = max(0.0, self.budget.epsilon_max - before)
        if self.budget.study_epsilon is not None:
            left = min(left, self.budget.study_epsilon)
        return min(self.budget.epsilon_max, before + self.budget.cumulative_share(kind) * left)

    def check(self, planned: list[GaussianEvent], what: str, *, kind: str | None = None,
              study: str | None = None) -> float:
        """Epsilon after `planned`; raises :class:`PrivacyBudgetExceeded` if over budget,
        or, for a release of `kind`, over that kind's cumulative share (:meth:`target`),
        so that one kind never eats the share kept for the kinds after it. The numbers
        in a refusal are rounded to 2 decimals."""
        after = self.accountant.get_epsilon(self.delta, planned)
        if kind is not None and after > (limit := self.target(kind, study)) + 1e-9:
            raise PrivacyBudgetExceeded(
                f"Site {self.site!r} refuses {what}: it would bring epsilon from "
                f"{self.spent():.2f} to {after:.2f}, above {limit:.2f}, what its budget share "
                f"allows once {kind} releases are made (epsilon_max "
                f"{self.budget.epsilon_max:g}, delta {self.delta:.3g}).")
        if after > self.budget.epsilon_max:
            raise PrivacyBudgetExceeded(
                f"Site {self.site!r} refuses {what}: it would bring epsilon from "
                f"{self.spent():.2f} to {after:.2f}, above the site's epsilon_max "
                f"{self.budget.epsilon_max:g} (delta {self.delta:.3g}).")
        return after

    def record(self, events: list[GaussianEvent], what: str, *, kind: str = "train",
               study: str | None = None, **details: object) -> float:
        """Compose `events` into the ledger, persist them, and return epsilon spent."""
        with self.locked():
            return self._append(events, what, kind, study, details)

    def charge(self, events: list[GaussianEvent], what: str, *, kind: str,
               study: str | None = None, **details: object) -> float:
        """Check `events` against the budget (:meth:`check`) and record them, in one step
        under the ledger file's lock: what a release does *before* it is computed."""
        with self.locked():
            self.check(events, what, kind=kind, study=study)
            return self._append(events, what, kind, study, details)

    def _append(self, events: list[GaussianEvent], what: str, kind: str, study: str | None,
                details: dict[str, object]) -> float:
        _kind_index(kind)
        for event in events:
            self.accountant.compose(event)
        epsilon = self.spent()
        entry = {"time": time.time(), "kind": kind, "study": study, "what": what,
                 "epsilon_after": epsilon, "events": [e.__dict__ for e in events], **details}
        if self.file is not None:
            self.file.append(entry)  # fsynced, and the seal advanced, before it counts
            self.entries = list(self.file.entries)
        else:
            self.entries.append(entry)
        return epsilon


def open_site_ledger(*, site: str, budget: SiteBudget, ledger_dir: str | Path,
                     seal_file: str | Path | None = None) -> PrivacyLedger:
    """The hospital's one ledger in `ledger_dir` (:mod:`cardiofed.privacy.ledger_file`),
    created with the budget's delta (default :data:`MAX_DEFAULT_DELTA`) and accountant if
    neither it nor its seal exists. Ledgers of earlier releases found there (one JSON file
    per site and data set) are imported entry by entry, so what they spent still counts;
    an import cut short is resumed at the next open, never repeated. `site` names the
    site in messages only, never in a path."""
    file = open_ledger_file(ledger_dir, seal_file=seal_file, create=budget.ledger_header())
    ledger = PrivacyLedger(site=site, budget=budget, file=file)
    legacy = sorted(Path(ledger_dir).glob("*.json"))
    if legacy:
        with ledger.locked():
            for path in legacy:
                _import_legacy(ledger, path)
    return ledger


def _import_legacy(ledger: PrivacyLedger, path: Path) -> None:
    """The entries of an earlier release's ledger file (format 1 or 2) that the ledger
    does not hold yet (counted by ``imported_from``), recorded again."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        entries = state["entries"] if state.get("version") in (1, 2) else None
    except (ValueError, KeyError, AttributeError):
        entries = None
    if entries is None:
        log.warning("privacy ledger import: %s is not a ledger of an earlier release; "
                    "skipped", path)
        return
    done = sum(e.get("imported_from") == path.name for e in ledger.entries)
    for entry in entries[done:]:
        events = [GaussianEvent(**e) for e in entry["events"]]
        kind = entry.get("kind", "train")
        ledger.record(events, str(entry.get("what", "imported release")), kind=kind,
                      study=entry.get("study"), imported_from=path.name)
    if len(entries) > done:
        log.warning("privacy ledger import: %d releases of %s now count in the site's one "
                    "ledger", len(entries) - done, path)
