"""The store's schema, versioned by Alembic: revisions in ``versions/``, applied by
``cardiofed db upgrade`` (:func:`upgrade`).

An empty database is created at :data:`HEAD` directly (``create_all``, then stamped),
which the migrations reproduce exactly (tested). A database of a release from before
migrations (no ``alembic_version`` table) is adopted by :func:`upgrade`: the nullable
columns those releases added in place are added, then it is stamped at the first
revision and upgraded from there.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text

from cardiofed.exceptions import SchemaOutOfDate
from cardiofed.store.tables import Base

BASELINE = "0001"  # the schema of the last release before migrations
HEAD = "0003"  # the newest revision (a test checks it against versions/)


def alembic_config(connection: Connection | None = None) -> Config:
    """The migrations' Alembic configuration, bound to `connection` when given."""
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent))
    config.attributes["connection"] = connection
    return config


def revision_of(connection: Connection) -> str | None:
    """The database's schema revision (None: unversioned or empty)."""
    return MigrationContext.configure(connection).get_current_revision()


def ensure_schema(engine: Engine) -> None:
    """Create the schema in an empty database; refuse one at another revision."""
    with engine.begin() as conn:
        revision = revision_of(conn)
        if revision == HEAD:
            return
        if revision is None and not inspect(conn).get_table_names():
            Base.metadata.create_all(conn)
            _stamp(conn, HEAD)
            return
    raise SchemaOutOfDate(
        f"The database at {engine.url.render_as_string(hide_password=True)} has schema "
        f"revision {revision or 'none (a release before migrations)'}; this release needs "
        f"{HEAD}. Back it up, then run `cardiofed db upgrade --database-url ...`.")


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Migrate the database to :data:`HEAD`; returns (revision before, revision after).
    An empty database gets the whole schema."""
    with engine.begin() as conn:
        before = revision_of(conn)
        if before is None and inspect(conn).get_table_names():
            _adopt_unversioned(conn)
        command.upgrade(alembic_config(conn), "head")
        after = revision_of(conn)
    assert after is not None
    return before, after


def _adopt_unversioned(conn: Connection) -> None:
    """A database of a release before migrations: add the nullable columns those
    releases added in place (``create_all`` never alters a table), then stamp it at
    :data:`BASELINE`. A table that lacks a required column cannot be adopted."""
    existing = inspect(conn)
    tables = set(existing.get_table_names())
    later = _added_since_baseline()
    for table in Base.metadata.sorted_tables:
        if table.name not in tables:
            table.create(conn)
            continue
        have = {c["name"] for c in existing.get_columns(table.name)}
        for column in table.columns:
            if column.name in have or (table.name, column.name) in later:
                continue
            if not column.nullable:
                raise SchemaOutOfDate(f"Database table {table.name!r} lacks column "
                                      f"{column.name!r}, which cannot be added in place.")
            kind = column.type.compile(dialect=conn.dialect)
            conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))
    _stamp(conn, BASELINE)


def _added_since_baseline() -> set[tuple[str, str]]:
    """The (table, column) pairs the revisions after :data:`BASELINE` add (each
    declares them as ``added_columns``): an adopted database gets them by migrating."""
    scripts = ScriptDirectory.from_config(alembic_config())
    return {pair for rev in scripts.walk_revisions(base=BASELINE, head="heads")
            if rev.revision != BASELINE for pair in getattr(rev.module, "added_columns", ())}


def _stamp(conn: Connection, revision: str) -> None:
    """Record `revision` as the database's schema revision, running no migration."""
    MigrationContext.configure(conn).stamp(ScriptDirectory.from_config(alembic_config()),
                                           revision)
