"""The schema's life in a database: created once, its version read on every open, an older one migrated.

However many processes open a database at once, one creates or migrates its tables and the
others wait, then see it done (PostgreSQL: a transaction advisory lock; SQLite: ``BEGIN
IMMEDIATE`` already serializes the writers). ``where`` is the database as printed in errors.
"""
from __future__ import annotations

import logging
from typing import Optional

import sqlalchemy as sa
from sqlalchemy.orm import Session

from tuneforge.db.schema import MIGRATIONS, OPTUNA_TABLES, SCHEMA_VERSION, SCHEMA_VERSION_KEY, TABLE_PREFIX, Base, MetaRow
from tuneforge.errors import DatabaseError

log = logging.getLogger("tuneforge.db")


def schema_lock(s: Session) -> None:
    """Serialize schema changes: one process creates or migrates; the others wait, then see it done
    (SQLite: BEGIN IMMEDIATE already serialized us the same way)."""
    if s.connection().dialect.name == "postgresql":
        s.connection().exec_driver_sql("SELECT pg_advisory_xact_lock(7204318)")


def create_schema(s: Session, where: str) -> None:
    """Create the tables in an empty database, once, however many processes open it at once."""
    schema_lock(s)
    if schema_version(s, where) is not None:
        return
    Base.metadata.create_all(s.connection())
    s.add(MetaRow(key=SCHEMA_VERSION_KEY, value=str(SCHEMA_VERSION)))


def migrate(s: Session, where: str) -> None:
    """Bring an older schema to this version in one transaction (MIGRATIONS, then any new tables)."""
    schema_lock(s)
    version = schema_version(s, where)
    if version == SCHEMA_VERSION:
        return
    conn = s.connection()
    for v in range(version, SCHEMA_VERSION):
        for statement in MIGRATIONS[v]:
            conn.exec_driver_sql(statement)
    Base.metadata.create_all(conn)          # checkfirst: only the tables this version added
    s.get(MetaRow, SCHEMA_VERSION_KEY).value = str(SCHEMA_VERSION)
    log.warning("%s: schema migrated from version %d to %d", where, version, SCHEMA_VERSION)


def schema_version(s: Session, where: str) -> Optional[int]:
    """The schema version of a tuneforge database this tuneforge can use (as is, or migrated),
    None for an empty one (Optuna's tables allowed); a one-line DatabaseError naming ``where`` for
    anything else."""
    tables = set(sa.inspect(s.connection()).get_table_names())
    ours = {t for t in tables if t.startswith(TABLE_PREFIX)}
    if "tf_meta" not in tables:
        foreign = sorted(tables - ours - OPTUNA_TABLES)
        if foreign:
            raise DatabaseError(f"{where} is not a tuneforge database (it has other tables: "
                                f"{', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''})")
        if ours:
            raise DatabaseError(f"{where} is a damaged tuneforge database (tf_meta is missing)")
        return None
    raw = s.get(MetaRow, SCHEMA_VERSION_KEY)
    try:
        version = int(raw.value) if raw is not None else None
    except ValueError:
        version = None
    if version is None:
        raise DatabaseError(f"{where} is a damaged tuneforge database (no valid schema version in tf_meta)")
    if version > SCHEMA_VERSION:
        raise DatabaseError(f"{where} has schema version {version}, newer than this tuneforge "
                            f"understands ({SCHEMA_VERSION}): upgrade tuneforge")
    if version < SCHEMA_VERSION and not all(v in MIGRATIONS for v in range(version, SCHEMA_VERSION)):
        raise DatabaseError(f"{where} has schema version {version}, older than any this tuneforge "
                            f"can migrate (it migrates {min(MIGRATIONS)} and later to {SCHEMA_VERSION})")
    missing = {"tf_environment", "tf_problem", "tf_model_problem", "tf_winner"} - tables
    if version == SCHEMA_VERSION:           # an older version lacks the tables added since
        missing = {t.name for t in Base.metadata.sorted_tables} - tables
    if missing:
        raise DatabaseError(f"{where} is a damaged tuneforge database (missing {', '.join(sorted(missing))})")
    return version
