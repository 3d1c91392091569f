"""Alembic's environment for the labeling database: the connection comes from
``rlhflab.labeling.store.migrate`` (no alembic.ini, no URL of its own)."""

from alembic import context

from rlhflab.labeling.store import Base

connection = context.config.attributes["connection"]
# batch mode: SQLite alters a table by copying it, which later revisions will need
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
