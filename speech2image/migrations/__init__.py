"""Alembic migrations of the history database (run by create_app and `speech2image db`)."""
