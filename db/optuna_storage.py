"""Optuna's storage on the tuneforge database: its tables live beside ours (``Store.optuna_storage``)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from sqlalchemy import event, exc
from sqlalchemy.engine import Engine

from tuneforge.db.engine import SQLITE_TIMEOUT_S, database_error

OPTUNA_SETUP_LOCK = 7204319     # PostgreSQL advisory lock key: Optuna's tables set up one process at a time


def open_storage(url: str, engine: Engine):
    """An Optuna RDBStorage on the database at ``url`` (``engine``: the store's; Optuna's own tables,
    the same SQLite timeout).

    Opening one creates Optuna's tables and stamps its schema version when they are missing;
    processes doing that at once on a new database race (``UNIQUE constraint failed:
    alembic_version.version_num``, ``table trial_values already exists``), so it happens under a
    cross-process lock. SQLite commits of Optuna's connections skip the fsync of each commit
    (``synchronous = NORMAL`` under WAL: a killed process loses nothing, a power cut at most the
    last commits), which roughly halves the cost of writing a trial through Optuna's API."""
    import optuna
    sqlite = engine.dialect.name == "sqlite"
    kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if sqlite else {}
    try:
        with setup_lock(engine):
            storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except exc.SQLAlchemyError as e:
        raise database_error(url, e) from None
    if sqlite:
        @event.listens_for(storage.engine, "connect")
        def _on_connect(dbapi_conn, _record):
            dbapi_conn.execute("PRAGMA synchronous = NORMAL")
        storage.engine.dispose()         # the connections opened while setting up get it too
    return storage


@contextmanager
def setup_lock(engine: Engine) -> Iterator[None]:
    """One process at a time sets up Optuna's tables. SQLite: an flock on ``<file>.lock`` (never
    on the database file itself: closing another descriptor of it drops SQLite's own POSIX
    locks); PostgreSQL: a session advisory lock; an in-memory database needs none."""
    dialect, path = engine.dialect.name, engine.url.database
    if dialect == "sqlite" and path and path != ":memory:":
        import fcntl
        with open(path + ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)          # released when the file closes
            yield
    elif dialect == "postgresql":
        with engine.connect() as conn:
            conn.exec_driver_sql(f"SELECT pg_advisory_lock({OPTUNA_SETUP_LOCK})")
            try:
                yield
            finally:
                conn.exec_driver_sql(f"SELECT pg_advisory_unlock({OPTUNA_SETUP_LOCK})")
    else:
        yield
