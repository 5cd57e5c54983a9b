"""Tuning database: SQLAlchemy schema and the store."""
