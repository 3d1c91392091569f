"""Alembic migrations of the labeling database (``rlhflab.labeling.store.migrate`` runs them)."""
