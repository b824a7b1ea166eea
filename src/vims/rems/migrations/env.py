"""Alembic environment: run with the connection the REM-S store hands over."""

from __future__ import annotations

from alembic import context

from vims.rems.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - the store always passes one
    raise RuntimeError("run migrations through vims.rems.store.Store")
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
