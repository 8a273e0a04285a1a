"""Alembic's environment for the store: runs on the connection it is handed
(:func:`cardiofed.store.migrations.alembic_config`), online only."""

from __future__ import annotations

from alembic import context

from cardiofed.store.tables import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("Run migrations through `cardiofed db upgrade`, which supplies the "
                       "database connection.")
context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
