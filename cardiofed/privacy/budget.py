"""The site's own privacy budget and the ledger of what it has spent.

The budget ``(epsilon_max, delta)`` belongs to the site's configuration; delta defaults
to ``1 / (10 n)`` for ``n`` records and must be below ``1 / n``. The ledger is a JSON
file at the site, rewritten atomically after every release, so it survives restarts.
Before any release the site checks the planned events against its budget and refuses
(:class:`PrivacyBudgetExceeded`, with the numbers) a release that would exceed it.
Nothing the coordinator sends can change the budget: it is read only from the site's
own configuration and ledger.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from cardiofed.exceptions import ConfigurationError, PrivacyBudgetExceeded
from cardiofed.privacy.accountant import AccountantKind, GaussianEvent, PrivacyAccountant

LEDGER_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class SiteBudget:
    """A site's privacy budget: at most ``epsilon_max`` at ``delta``."""

    epsilon_max: float
    delta: float | None = None
    accountant: AccountantKind = "rdp"

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

    def delta_for(self, n_records: int) -> float:
        """The delta in force for a site of `n_records` (default ``1 / (10 n)``)."""
        if n_records < 1:
            raise ConfigurationError(f"A privacy budget needs n_records >= 1; got {n_records}.")
        if self.delta is None:
            return 1.0 / (10 * n_records)
        if self.delta >= 1.0 / n_records:
            raise ConfigurationError(
                f"The 'delta' parameter must be below 1/n = {1 / n_records:.3g} for a site "
                f"of {n_records} records (delta >= 1/n allows releasing a record outright); "
                f"got {self.delta!r}.")
        return self.delta


class PrivacyLedger:
    """Spent privacy of one site, persisted at `path` (in memory when `path` is None)."""

    def __init__(self, *, site: str, budget: SiteBudget, n_records: int,
                 path: str | Path | None = None) -> None:
        self.site = site
        self.budget = budget
        self.n_records = n_records
        self.delta = budget.delta_for(n_records)
        self.path = Path(path) if path is not None else None
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
        if state.get("version") != LEDGER_VERSION or state.get("site") != self.site:
            raise ConfigurationError(
                f"Privacy ledger {path} belongs to site {state.get('site')!r} (version "
                f"{state.get('version')!r}), not to {self.site!r} (version {LEDGER_VERSION}).")
        try:
            accountant = PrivacyAccountant.from_state_dict(state["accountant"])
            entries = list(state["entries"])
        except (KeyError, TypeError, AttributeError) as exc:
            raise ConfigurationError(f"Privacy ledger {path} is corrupt ({type(exc).__name__}: "
                                     f"{exc}); refusing to guess what was spent.") from None
        self.accountant, self.entries = accountant, entries

    def _save(self) -> None:
        if self.path is None:
            return
        state = {"version": LEDGER_VERSION, "site": self.site, "n_records": self.n_records,
                 "epsilon_max": self.budget.epsilon_max, "delta": self.delta,
                 "accountant": self.accountant.state_dict(), "entries": self.entries}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(state, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def spent(self) -> float:
        """Epsilon spent so far at the site's delta."""
        return self.accountant.get_epsilon(self.delta)

    def remaining(self) -> float:
        return max(0.0, self.budget.epsilon_max - self.spent())

    def check(self, planned: list[GaussianEvent], what: str) -> float:
        """Epsilon after `planned`; raises :class:`PrivacyBudgetExceeded` if over budget."""
        after = self.accountant.get_epsilon(self.delta, planned)
        if after > self.budget.epsilon_max:
            raise PrivacyBudgetExceeded(
                f"Site {self.site!r} refuses {what}: it would bring epsilon from "
                f"{self.spent():.4f} to {after:.4f}, above the site's epsilon_max "
                f"{self.budget.epsilon_max:g} (delta {self.delta:.3g}).")
        return after

    def record(self, events: list[GaussianEvent], what: str, **details: object) -> float:
        """Compose `events` into the ledger, persist it, and return epsilon spent."""
        for event in events:
            self.accountant.compose(event)
        epsilon = self.spent()
        self.entries.append({"time": time.time(), "what": what, "epsilon_after": epsilon,
                             "events": [e.__dict__ for e in events], **details})
        self._save()
        return epsilon
