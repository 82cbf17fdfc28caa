"""Alembic migration tree (SQLite and PostgreSQL)."""
