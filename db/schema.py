"""The tuning database's tables (SQLAlchemy 2.0 typed models).

Every table is prefixed ``tf_`` because Optuna's own tables (``studies``, ``trials``, ...) live in
the same database. ``tf_meta`` holds the schema version, checked each time a store opens.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, Optional

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SCHEMA_VERSION = 2
SCHEMA_VERSION_KEY = "schema_version"
TABLE_PREFIX = "tf_"
# Optuna's tables may share the database with ours (they are not "foreign" tables).
OPTUNA_TABLES = frozenset({
    "alembic_version", "studies", "study_directions", "study_user_attributes", "study_system_attributes",
    "trials", "trial_params", "trial_values", "trial_intermediate_values", "trial_user_attributes",
    "trial_system_attributes", "trial_heartbeats", "version_info",
})
# The statements that bring a database of schema version v to v + 1 (new tables are created by
# create_all afterwards). 1 -> 2: winners say where they came from (``origin``).
MIGRATIONS: dict[int, list[str]] = {
    1: ["ALTER TABLE tf_winner ADD COLUMN origin VARCHAR(16) NOT NULL DEFAULT 'local'"],
}


class Base(DeclarativeBase):
    pass


class MetaRow(Base):
    """Key/value facts about the database itself: ``schema_version``."""

    __tablename__ = "tf_meta"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))


class EnvironmentRow(Base):
    """One db.environment.Environment, keyed by its fingerprint."""

    __tablename__ = "tf_environment"
    fingerprint: Mapped[str] = mapped_column(String(32), primary_key=True)
    gpu_name: Mapped[str] = mapped_column(String(128))
    sm_count: Mapped[int] = mapped_column(Integer)
    memory_gb: Mapped[float] = mapped_column(Float)
    world_size: Mapped[int] = mapped_column(Integer)
    interconnect: Mapped[str] = mapped_column(String(128))
    torch_version: Mapped[str] = mapped_column(String(64))
    triton_version: Mapped[str] = mapped_column(String(64))
    driver_version: Mapped[str] = mapped_column(String(64))
    predicted: Mapped[bool]


class ProblemRow(Base):
    """One tuneforge.dsl.Problem. ``family`` is the key with the token dim replaced by ``*``, so the
    tuned buckets of one shape (all m, same other dims) are one indexed lookup."""

    __tablename__ = "tf_problem"
    key: Mapped[str] = mapped_column(String(512), primary_key=True)
    op: Mapped[str] = mapped_column(String(64), index=True)
    dims: Mapped[list[list[Any]]] = mapped_column(JSON)          # ordered [[name, size], ...]
    dtype: Mapped[str] = mapped_column(String(16))
    world: Mapped[int] = mapped_column(Integer)
    m: Mapped[Optional[int]] = mapped_column(Integer)             # the token dim, None if the op has none
    family: Mapped[str] = mapped_column(String(512), index=True)


class ModelProblemRow(Base):
    """Which problems a model at a TP degree needs, and where (``role``, e.g. ``layer.mlp``)."""

    __tablename__ = "tf_model_problem"
    __table_args__ = (UniqueConstraint("model", "tp", "problem_key", "role", name="uq_tf_model_problem"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(128), index=True)
    tp: Mapped[int] = mapped_column(Integer)
    problem_key: Mapped[str] = mapped_column(ForeignKey("tf_problem.key", ondelete="CASCADE"), index=True)
    role: Mapped[str] = mapped_column(String(128))


class WinnerRow(Base):
    """The best config found for one problem in one environment (at most one per pair)."""

    __tablename__ = "tf_winner"
    __table_args__ = (UniqueConstraint("problem_key", "fingerprint", name="uq_tf_winner_problem_env"),
                      Index("ix_tf_winner_fingerprint", "fingerprint"))
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    problem_key: Mapped[str] = mapped_column(ForeignKey("tf_problem.key", ondelete="CASCADE"))
    fingerprint: Mapped[str] = mapped_column(ForeignKey("tf_environment.fingerprint", ondelete="CASCADE"))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    time_s: Mapped[float] = mapped_column(Float)
    baseline_s: Mapped[float] = mapped_column(Float)
    speedup: Mapped[float] = mapped_column(Float)
    pct_sol: Mapped[float] = mapped_column(Float)                 # % of the hardware's speed of light
    source: Mapped[str] = mapped_column(String(16))               # "measured" | "predicted"
    # "local" (tuned into this database) | "imported" (from a file: never replaces a local record)
    origin: Mapped[str] = mapped_column(String(16), default="local", server_default="local")
    template_hash: Mapped[str] = mapped_column(String(64))
    study_name: Mapped[str] = mapped_column(String(600))
    n_trials: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class VerificationRow(Base):
    """A winner candidate checked against its op's reference (under Triton's interpreter, at a
    shrunken shape), so a re-run trusts the verdict instead of interpreting the kernel again. One row
    per (op, config, template source hash): a changed kernel source is verified anew."""

    __tablename__ = "tf_verification"
    __table_args__ = (UniqueConstraint("op", "config_key", "template_hash", name="uq_tf_verification"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    op: Mapped[str] = mapped_column(String(64))
    config_key: Mapped[str] = mapped_column(String(1024))        # dsl.problem.canonical_config
    template_hash: Mapped[str] = mapped_column(String(64))
    problem_key: Mapped[str] = mapped_column(String(512))        # the (shrunken) problem it ran at
    result: Mapped[str] = mapped_column(String(600))             # '' passed, else why it failed
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
