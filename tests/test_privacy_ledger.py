"""The hospital's one ledger on disk: every release in one file, tamper-evident, and a
reset only by a deliberate, recorded act.

The attacks come from the audit of 2026-12-06: ledgers keyed by what the coordinator
controls (a column order, a name, an export refreshed by a row), a moved or deleted
folder, an edited file with entries removed.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cardiofed.exceptions import ConfigurationError, PrivacyLedgerError
from cardiofed.privacy.accountant import GaussianEvent, PrivacyAccountant
from cardiofed.privacy.budget import PrivacyLedger, SiteBudget, open_site_ledger
from cardiofed.privacy.ledger_file import (
    LEDGER_FILE,
    default_seal_file,
    open_ledger_file,
    reset_ledger,
)

BUDGET = SiteBudget(epsilon_max=50.0)


def event(sigma: float) -> GaussianEvent:
    return GaussianEvent(noise_multiplier=sigma, sample_rate=1.0, steps=1)


def ledger_at(folder: Path, budget: SiteBudget = BUDGET) -> PrivacyLedger:
    return open_site_ledger(site="tier2_a", budget=budget, ledger_dir=folder)


def spend(ledger: PrivacyLedger, n: int, study: str = "s1") -> None:
    for i in range(n):
        ledger.charge([event(5.0 + i)], f"release {i}", kind="train", study=study)


def test_one_file_for_every_study_kind_and_name(tmp_path: Path) -> None:
    # Studies with other names, encodings or data all charge the same ledger: its path
    # holds nothing another party chose.
    ledger = ledger_at(tmp_path / "ledger")
    for study, kind in [("s1", "statistics"), ("other-columns", "train"),
                        ("Tier2_A", "evaluate"), ("att", "attribution")]:
        ledger.charge([event(6.0)], "a release", kind=kind, study=study)

    again = ledger_at(tmp_path / "ledger")

    assert sorted(p.name for p in (tmp_path / "ledger").iterdir()) == [LEDGER_FILE,
                                                                        "ledger.lock"]
    assert default_seal_file(tmp_path / "ledger") == tmp_path / "ledger.seal"
    assert (tmp_path / "ledger.seal").stat().st_mode & 0o777 == 0o600
    assert [e["study"] for e in again.entries] == ["s1", "other-columns", "Tier2_A", "att"]
    assert again.spent() == pytest.approx(
        PrivacyAccountant(events=[event(6.0)] * 4).get_epsilon(1e-5), rel=1e-12)


def test_two_handles_on_one_ledger_see_each_others_releases(tmp_path: Path) -> None:
    # Two node processes of one hospital (two studies) share the ledger: each charge
    # reads the newest entries under the lock, so neither spends the other's share.
    first, second = ledger_at(tmp_path / "l"), ledger_at(tmp_path / "l")
    first.charge([event(5.0)], "a", kind="train", study="s1")
    second.charge([event(5.0)], "b", kind="train", study="s2")
    first.charge([event(5.0)], "c", kind="train", study="s1")

    assert [e["what"] for e in first.entries] == ["a", "b", "c"]
    assert first.spent() == ledger_at(tmp_path / "l").spent()


def _charge_in_process(folder: str, count: int) -> None:
    ledger = open_site_ledger(site="x", budget=BUDGET, ledger_dir=folder)
    for i in range(count):
        ledger.charge([event(20.0)], f"p{i}", kind="train", study="s")


def test_concurrent_processes_lose_no_release(tmp_path: Path) -> None:
    # No ledger yet: three node processes starting at once create one, then share it.
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_charge_in_process, args=(str(tmp_path / "l"), 10))
               for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
        assert w.exitcode == 0

    assert len(ledger_at(tmp_path / "l").entries) == 30


def test_the_seal_must_live_outside_the_ledger_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="must live outside ledger_dir"):
        open_site_ledger(site="a", budget=BUDGET, ledger_dir=tmp_path / "l",
                         seal_file=tmp_path / "l" / "seal")


@pytest.mark.parametrize(("loss", "message"), [
    ("ledger_dir deleted", "is not in .*: the folder was moved or deleted, or the config "
                           "points at a new one"),
    ("ledger file deleted", "is not in .*: the folder was moved or deleted"),
    ("seal deleted", "has no seal at .*: the seal was deleted or moved"),
    ("another ledger", "is not the one its seal .* belongs to"),
])
def test_a_lost_ledger_or_seal_is_refused_with_what_happened(
        tmp_path: Path, loss: str, message: str) -> None:
    ledger = ledger_at(tmp_path / "l")
    spend(ledger, 3)
    if loss == "ledger_dir deleted":
        shutil.rmtree(tmp_path / "l")
    elif loss == "ledger file deleted":
        (tmp_path / "l" / LEDGER_FILE).unlink()
    elif loss == "seal deleted":
        (tmp_path / "l.seal").unlink()
    else:  # a fresh ledger (and its seal) elsewhere, its file put in this one's place
        ledger_at(tmp_path / "m")
        shutil.copy(tmp_path / "m" / LEDGER_FILE, tmp_path / "l" / LEDGER_FILE)

    with pytest.raises(PrivacyLedgerError, match=message) as refusal:
        ledger_at(tmp_path / "l")
    assert "cardiofed node reset-ledger" in str(refusal.value)


def test_a_moved_ledger_is_found_where_the_config_points_with_its_seal(
        tmp_path: Path) -> None:
    ledger = ledger_at(tmp_path / "l")
    spend(ledger, 2)
    (tmp_path / "l").rename(tmp_path / "moved")
    (tmp_path / "l.seal").rename(tmp_path / "moved.seal")

    assert ledger_at(tmp_path / "moved").spent() == ledger.spent()


@st.composite
def tampering(draw: st.DrawFn) -> tuple[int, str, int]:
    n = draw(st.integers(min_value=1, max_value=6))
    how = draw(st.sampled_from(["delete", "edit", "swap", "truncate", "duplicate",
                                "edit header", "append forged"]))
    return n, how, draw(st.integers(min_value=1, max_value=n))


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=tampering())
def test_any_edit_of_the_file_is_detected(tmp_path_factory: pytest.TempPathFactory,
                                         case: tuple[int, str, int]) -> None:
    n, how, at = case
    folder = tmp_path_factory.mktemp("ledger") / "l"
    spend(ledger_at(folder), n)
    path = folder / LEDGER_FILE
    lines = path.read_text().splitlines()
    if how == "delete":
        del lines[at]
    elif how == "edit":  # a release made to look cheaper
        record = json.loads(lines[at])
        record["entry"]["events"][0]["noise_multiplier"] *= 10
        lines[at] = json.dumps(record)
    elif how == "swap" and n >= 2:
        other = 1 if at != 1 else 2
        lines[at], lines[other] = lines[other], lines[at]
    elif how == "truncate":
        lines = lines[:at]
    elif how == "duplicate":
        lines.insert(at, lines[at])
    elif how == "edit header":
        record = json.loads(lines[0])
        record["header"]["delta"] = 0.5
        lines[0] = json.dumps(record)
    else:  # an entry appended with a made-up MAC
        lines.append(json.dumps({"entry": {"kind": "train", "events": []}, "mac": "00" * 32}))
    if how == "swap" and n < 2:
        lines[1] = lines[1].replace('"release 0"', '"release X"')
    path.write_text("\n".join(lines) + "\n")

    with pytest.raises(PrivacyLedgerError, match="integrity check|releases were removed"):
        ledger_at(folder)


def test_a_crash_between_the_append_and_the_seal_is_recovered(tmp_path: Path) -> None:
    # The entry is fsynced before the seal advances: after a crash in between, the
    # ledger holds one release more than the seal counted, chained correctly; it counts.
    ledger = ledger_at(tmp_path / "l")
    spend(ledger, 2)
    seal_before = (tmp_path / "l.seal").read_text()
    spend(ledger, 1)
    (tmp_path / "l.seal").write_text(seal_before)  # the seal's update never happened

    recovered = ledger_at(tmp_path / "l")

    assert len(recovered.entries) == 3
    assert json.loads((tmp_path / "l.seal").read_text())["entries"] == 3


def test_delta_and_accountant_are_fixed_when_the_ledger_is_created(tmp_path: Path) -> None:
    ledger = ledger_at(tmp_path / "l", SiteBudget(epsilon_max=2.0))
    assert ledger.delta == 1e-5  # not a function of any data set's size
    assert ledger_at(tmp_path / "l", SiteBudget(epsilon_max=4.0)).delta == 1e-5

    with pytest.raises(ConfigurationError, match="accounts at delta 1e-05 since it was "
                                                 "created"):
        ledger_at(tmp_path / "l", SiteBudget(epsilon_max=2.0, delta=1e-6))
    with pytest.raises(ConfigurationError, match="composes with 'rdp'"):
        ledger_at(tmp_path / "l", SiteBudget(epsilon_max=2.0, accountant="prv"))
    with pytest.raises(ConfigurationError, match=r"not below 1/n = 1e-05 for a data set of "
                                                 r"100000 records"):
        ledger.check_records(100_000)
    ledger.check_records(99_999)


def test_a_deliberate_reset_archives_records_and_logs(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spend(ledger_at(tmp_path / "l"), 3)
    shutil.rmtree(tmp_path / "l")

    with pytest.raises(ConfigurationError, match="needs a reason"):
        reset_ledger(tmp_path / "l", reason=" ", create=BUDGET.ledger_header())
    with caplog.at_level(logging.WARNING, logger="cardiofed.privacy"):
        reset_ledger(tmp_path / "l", reason="disk failure, backup lost",
                     create=BUDGET.ledger_header())

    fresh = ledger_at(tmp_path / "l")
    assert fresh.entries == []
    assert fresh.file is not None
    assert fresh.file.header["reset"]["reason"] == "disk failure, backup lost"
    assert fresh.file.header["reset"]["previous"]["releases"] == 3
    assert [p.name.split(".reset-")[0] for p in tmp_path.glob("*.reset-*")] == ["l.seal"]
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "RESET deliberately" in warning.getMessage()
    assert "disk failure, backup lost" in warning.getMessage()


def test_ledgers_of_the_previous_release_are_imported_not_forgotten(tmp_path: Path) -> None:
    # Format 2 kept one file per (site name, data fingerprint): everything they hold is
    # composed into the hospital's one ledger when it is created.
    folder = tmp_path / "l"
    folder.mkdir()
    for name, sigmas in (("tier2_a-0123456789abcdef.json", [4.0, 5.0]),
                         ("tier2_a-2-fedcba9876543210.json", [6.0])):
        (folder / name).write_text(json.dumps({
            "version": 2, "site": "tier2_a", "entries": [
                {"kind": "train", "study": "old", "what": "round", "events": [
                    event(s).__dict__]} for s in sigmas]}))

    ledger = ledger_at(folder)

    assert [e["imported_from"] for e in ledger.entries] == [
        "tier2_a-0123456789abcdef.json", "tier2_a-0123456789abcdef.json",
        "tier2_a-2-fedcba9876543210.json"]
    assert ledger.spent() == pytest.approx(
        PrivacyAccountant(events=[event(4.0), event(5.0), event(6.0)]).get_epsilon(1e-5))
    assert len(ledger_at(folder).entries) == 3  # imported once


def test_an_import_cut_short_is_resumed_not_repeated(tmp_path: Path) -> None:
    folder = tmp_path / "l"
    folder.mkdir()
    (folder / "tier2_a-0123456789abcdef.json").write_text(json.dumps({
        "version": 2, "site": "tier2_a", "entries": [
            {"kind": "train", "study": "old", "what": f"round {k}",
             "events": [event(s).__dict__]} for k, s in enumerate((4.0, 5.0, 6.0))]}))
    # As if the first open had died after importing one entry.
    fresh = open_site_ledger(site="a", budget=BUDGET, ledger_dir=tmp_path / "other")
    fresh.record([event(4.0)], "round 0", kind="train", study="old",
                 imported_from="tier2_a-0123456789abcdef.json")
    for name in (LEDGER_FILE, "ledger.lock"):
        (tmp_path / "other" / name).rename(folder / name)
    (tmp_path / "other.seal").rename(tmp_path / "l.seal")

    resumed = ledger_at(folder)

    assert [e["what"] for e in resumed.entries] == ["round 0", "round 1", "round 2"]
    assert resumed.spent() == pytest.approx(
        PrivacyAccountant(events=[event(4.0), event(5.0), event(6.0)]).get_epsilon(1e-5))


def test_a_reset_archives_the_earlier_ledgers_it_would_import_again(tmp_path: Path) -> None:
    folder = tmp_path / "l"
    folder.mkdir()
    (folder / "tier2_a-0123456789abcdef.json").write_text(json.dumps({
        "version": 2, "site": "tier2_a", "entries": [
            {"kind": "train", "study": "old", "what": "round", "events": [event(4.0).__dict__]}]}))
    assert len(ledger_at(folder).entries) == 1

    reset_ledger(folder, reason="restored server", create=BUDGET.ledger_header())

    assert ledger_at(folder).entries == []
    assert sorted(p.name.split(".reset-")[0] for p in folder.glob("*.reset-*")) == [
        LEDGER_FILE, "tier2_a-0123456789abcdef.json"]


def test_reading_a_ledger_never_creates_one(tmp_path: Path) -> None:
    with pytest.raises(PrivacyLedgerError, match="There is no privacy ledger"):
        open_ledger_file(tmp_path / "none")
    assert not (tmp_path / "none").exists()
