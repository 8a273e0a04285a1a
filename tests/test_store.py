"""The store's schema migrations: an empty database gets the schema the migrations make,
and a database created by the previous release (before migrations) is upgraded by
``cardiofed db upgrade`` with its rows intact, on SQLite and PostgreSQL."""

from __future__ import annotations

import sqlite3
from datetime import datetime
from pathlib import Path

import pytest
import release_0_1_tables as previous  # type: ignore[import-not-found]
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, select
from typer.testing import CliRunner

from cardiofed.cli import app
from cardiofed.exceptions import SchemaOutOfDate
from cardiofed.store import AdminKey, Base, Site, Study, hash_secret, make_engine, make_sessionmaker
from cardiofed.store.migrations import BASELINE, HEAD, alembic_config, revision_of, upgrade


@pytest.fixture(params=["sqlite", "postgresql"])
def url(tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if request.param == "postgresql":
        return str(request.getfixturevalue("postgres_url"))
    return f"sqlite:///{tmp_path}/store.db"


def _said(result: object) -> str:
    return " ".join(result.output.split())  # type: ignore[attr-defined]


def test_head_is_the_newest_migration() -> None:
    assert ScriptDirectory.from_config(alembic_config()).get_current_head() == HEAD
    assert BASELINE <= HEAD


def test_the_migrations_make_exactly_the_tables(url: str) -> None:
    # A schema change without a migration fails here: the migrations from an empty
    # database must give what the tables declare.
    engine = make_engine(url, check_schema=False)
    before, after = upgrade(engine)
    assert (before, after) == (None, HEAD)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    engine.dispose()


def test_an_empty_database_is_created_at_head(url: str) -> None:
    engine = make_engine(url)
    with engine.connect() as conn:
        assert revision_of(conn) == HEAD
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    engine.dispose()


def _previous_release_database(url: str) -> None:
    """A database as release 0.1.0 left it: a study, its sites and an admin key."""
    engine = previous.make_engine(url)
    with previous.make_sessionmaker(engine)() as db:
        db.add(previous.AdminKey(key_hash=hash_secret("old-admin"), role="admin"))
        db.add(previous.Study(id="s1", plan={"rounds": 2}, feature_names=["age"],
                              feature_ranges=[[20.0, 90.0]], min_sites=1,
                              round_timeout_s=60.0, created_at=datetime(2026, 1, 1)))
        db.flush()
        db.add(previous.Site(study_id="s1", name="tier3_01", index=0,
                             credential_hash=hash_secret("site-credential")))
        db.commit()
    engine.dispose()


def test_a_previous_release_database_is_upgraded_with_its_rows(url: str) -> None:
    _previous_release_database(url)
    with pytest.raises(SchemaOutOfDate, match="cardiofed db upgrade"):
        make_engine(url)

    result = CliRunner().invoke(app, ["db", "upgrade", "--database-url", url])
    assert result.exit_code == 0, result.output
    assert f"from schema revision none (a release before migrations) to {HEAD}" in _said(
        result)

    engine = make_engine(url)  # accepted now
    with make_sessionmaker(engine)() as db:
        assert db.scalar(select(Study.plan).where(Study.id == "s1")) == {"rounds": 2}
        assert db.scalar(select(Site.name).where(
            Site.credential_hash == hash_secret("site-credential"))) == "tier3_01"
        assert db.scalar(select(AdminKey.role)) == "admin"
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    engine.dispose()

    again = CliRunner().invoke(app, ["db", "upgrade", "--database-url", url])
    assert again.exit_code == 0 and "already at schema revision" in _said(again)
    current = CliRunner().invoke(app, ["db", "current", "--database-url", url])
    assert f"schema revision {HEAD}" in _said(current)


def test_an_older_unversioned_database_gains_the_columns_added_since(tmp_path: Path) -> None:
    # Releases before 0.1.0 lacked nullable columns that 0.1.0 added in place.
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE updates (id INTEGER PRIMARY KEY, round_id INTEGER, "
                    "site_id INTEGER, payload BLOB, sha256 VARCHAR(64), num_samples INTEGER, "
                    "received_at DATETIME)")
    engine = make_engine(f"sqlite:///{path}", check_schema=False)
    assert upgrade(engine) == (None, HEAD)
    columns = [c["name"] for c in inspect(engine).get_columns("updates")]
    assert columns[-3:] == ["staleness", "aggregated_into", "quarantine"]
    assert "studies" in inspect(engine).get_table_names()  # missing tables are created
    engine.dispose()


def test_a_table_without_a_required_column_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "odd.db"
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE updates (id INTEGER PRIMARY KEY)")
    engine = make_engine(f"sqlite:///{path}", check_schema=False)
    with pytest.raises(SchemaOutOfDate, match="lacks column 'round_id'"):
        upgrade(engine)
    engine.dispose()
    result = CliRunner().invoke(app, ["db", "upgrade", "--database-url", f"sqlite:///{path}"])
    assert result.exit_code != 0 and "lacks column" in _said(result)


@pytest.mark.parametrize("command", [["coordinator", "--insecure", "--database-url"],
                                     ["serve", "--db"]])
def test_the_services_refuse_an_older_database_and_name_the_upgrade(
        tmp_path: Path, command: list[str]) -> None:
    url = f"sqlite:///{tmp_path}/old.db"
    _previous_release_database(url)
    result = CliRunner().invoke(app, [*command, url])
    assert result.exit_code != 0 and "cardiofed db upgrade" in _said(result)
