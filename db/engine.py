"""Opening a database: URLs and the SQLAlchemy engine.

A bare path means an SQLite file; SQLite runs in WAL mode with a busy timeout, and transactions
are begun by us (``BEGIN IMMEDIATE`` for writes, so two writers never deadlock on a read-to-write
lock upgrade). Failures become one-line ``DatabaseError``s that name the database.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.engine import Engine, make_url

from tuneforge.errors import DatabaseError

SQLITE_TIMEOUT_S = 60.0        # how long one SQLite statement waits for another process's lock


def default_url(create_folder: bool = True) -> str:
    """``$TUNEFORGE_DB``, else the SQLite file under ``$XDG_DATA_HOME`` (its folder is created
    unless ``create_folder`` is False: a command that only reads leaves no trace)."""
    env = os.environ.get("TUNEFORGE_DB")
    if env:
        return normalize_url(env)
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    folder = Path(data_home) / "tuneforge"
    if create_folder:
        folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'tuneforge.db'}"


def normalize_url(url: str | os.PathLike) -> str:
    """A SQLAlchemy URL; a bare path (no ``scheme://``) becomes an SQLite file URL, and a plain
    ``postgresql://`` uses psycopg2 where psycopg (3, SQLAlchemy's default) is not installed."""
    url = os.fspath(url)
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser().resolve()}"
    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url[len("postgresql://"):]
    return url


def display_url(url: str) -> str:
    """The URL with any password hidden, for printing."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except exc.ArgumentError:
        return url


def first_line(e: BaseException) -> str:
    """The first line of an error's message (a wrapped driver error's own)."""
    orig = getattr(e, "orig", None) or e
    text = str(orig).strip().splitlines()
    return text[0] if text else type(orig).__name__


def make_engine(url: str, create: bool) -> Engine:
    """A SQLAlchemy engine on ``url`` (``create=False``: a missing SQLite file is refused); a
    one-line DatabaseError for a URL that is no database, a directory, a missing folder or driver."""
    try:
        parsed = make_url(url)
    except exc.ArgumentError:
        raise DatabaseError(f"not a database URL: {url!r} (expected e.g. sqlite:///path.db, "
                            f"postgresql://host/db, or a file path)") from None
    kwargs: dict = {}
    if parsed.get_backend_name() == "sqlite":
        path = parsed.database
        if path and path != ":memory:":
            if os.path.isdir(path):
                raise DatabaseError(f"cannot open tuneforge database {display_url(url)}: it is a directory")
            if not os.path.exists(path):
                if not create:
                    raise DatabaseError(f"no tuneforge database at {path}")
                if not os.path.isdir(os.path.dirname(path) or "."):
                    raise DatabaseError(f"cannot create tuneforge database {path}: "
                                        f"folder {os.path.dirname(path)} does not exist")
        kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_S}
    elif parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() == "psycopg2" \
            and "connect_timeout" not in parsed.query:
        kwargs["connect_args"] = {"connect_timeout": 10}
    try:
        engine = sa.create_engine(parsed, **kwargs)
    except (exc.ArgumentError, exc.NoSuchModuleError, ImportError) as e:
        raise DatabaseError(f"cannot open tuneforge database {display_url(url)}: {first_line(e)} "
                            f"(unknown database kind, or its driver is not installed)") from None
    if engine.dialect.name == "sqlite":
        _sqlite_setup(engine)
    return engine


def database_error(url: str, e: exc.SQLAlchemyError) -> DatabaseError:
    """A database failure as one line naming the database (its password hidden)."""
    what = first_line(e)
    if "file is not a database" in what:
        return DatabaseError(f"{display_url(url)} is not an SQLite database (corrupt or another file)")
    return DatabaseError(f"tuneforge database {display_url(url)}: {what}")


def _sqlite_setup(engine: Engine) -> None:
    """WAL + busy timeout on every connection; transactions begun by us (``BEGIN IMMEDIATE`` for
    writes, so two writers never deadlock on a read-to-write lock upgrade)."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None            # we emit BEGIN ourselves (see _on_begin)
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout = {int(SQLITE_TIMEOUT_S * 1000)}")
            cur.execute("PRAGMA journal_mode = WAL")
            cur.execute("PRAGMA foreign_keys = ON")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("tf_write") else "BEGIN")
