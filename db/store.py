"""The store: read and write tuning winners, with provenance, in any SQLAlchemy database.

By default an SQLite file (``$XDG_DATA_HOME/tuneforge/tuneforge.db``), overridden by
``$TUNEFORGE_DB`` or an explicit URL (a bare path means an SQLite file); a PostgreSQL URL lets a
whole cluster share one database. SQLite runs in WAL mode with a busy timeout and every write
takes the write lock up front (``BEGIN IMMEDIATE``) and is retried while the file is locked, so
several tuner processes on one file lose nothing. Every write is one transaction.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence, TypeVar

import sqlalchemy as sa
from sqlalchemy import event, exc, select
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session

from tuneforge.db.environment import Environment
from tuneforge.db.schema import (MIGRATIONS, OPTUNA_TABLES, SCHEMA_VERSION, SCHEMA_VERSION_KEY, TABLE_PREFIX,
                                 Base, EnvironmentRow, MetaRow, ModelProblemRow, ProblemRow, WinnerRow)
from tuneforge.dsl.problem import DEFAULT_BUCKETS, DTYPES, Problem, bucket
from tuneforge.errors import DatabaseError, InputError

log = logging.getLogger("tuneforge.db")

SQLITE_TIMEOUT_S = 60.0        # how long one SQLite statement waits for another process's lock
WRITE_ATTEMPTS = 8             # a write still locked after the busy timeout is retried this often
OPTUNA_SETUP_LOCK = 7204319     # PostgreSQL advisory lock key: Optuna's tables set up one process at a time
SOURCES = ("measured", "predicted")
ORIGINS = ("local", "imported")
ENV_EDITED = "environment fields edited"
T = TypeVar("T")


# ----------------------------------------------------------------------------------------- URLs

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


def _first_line(e: BaseException) -> str:
    orig = getattr(e, "orig", None) or e
    text = str(orig).strip().splitlines()
    return text[0] if text else type(orig).__name__


# --------------------------------------------------------------------------------------- Winner

@dataclass
class Winner:
    problem: Problem
    env: Environment
    config: dict
    time_s: float
    baseline_s: float
    speedup: float
    pct_sol: float
    source: str                      # "measured" | "predicted"
    template_hash: str
    study_name: str
    n_trials: int                    # configs evaluated (rejected ones not counted)
    created_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    origin: str = "local"            # "local" | "imported"
    # the fingerprint the database keys the record by; a read whose environment fields no longer
    # hash to it (the row was edited) makes the winner untrusted
    row_fingerprint: Optional[str] = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if self.source not in SOURCES:
            raise InputError(f"winner source must be one of {SOURCES}, got {self.source!r}")
        if self.origin not in ORIGINS:
            raise InputError(f"winner origin must be one of {ORIGINS}, got {self.origin!r}")
        if self.created_at.tzinfo is None:       # SQLite hands back naive datetimes; they are UTC
            self.created_at = self.created_at.replace(tzinfo=timezone.utc)

    @property
    def strategy(self) -> Optional[str]:
        return self.config.get("strategy")

    @property
    def key(self) -> str:
        return self.problem.key

    @property
    def fingerprint(self) -> str:
        return self.row_fingerprint or self.env.fingerprint

    @property
    def env_edited(self) -> bool:
        return self.row_fingerprint is not None and self.row_fingerprint != self.env.fingerprint


@dataclass
class ImportReport:
    """What ``Store.import_`` did: winners stored, winners kept out by the stored ones (local,
    faster or newer), and one line per refused record."""
    stored: int
    kept_out: int
    refused: list[str]


def stale_reason(w: Winner, template_hashes: Optional[dict[str, str]] = None) -> Optional[str]:
    """Why ``w`` must not serve, or None: its environment row was edited (the fields no longer hash
    to its fingerprint), or its template's source changed (ops in ``template_hashes``)."""
    if w.env_edited:
        return f"{ENV_EDITED} (recorded as {w.row_fingerprint}, the fields hash to {w.env.fingerprint})"
    now = (template_hashes or {}).get(w.problem.op)
    if now is not None and now != w.template_hash:
        return f"template {w.problem.op} changed since tuning (hash {w.template_hash}, now {now})"
    return None


def current_template_hashes() -> dict[str, str]:
    """Every registered template's source hash: a winner recorded under another one is stale."""
    from tuneforge.dsl import all_templates
    return {op: t.source_hash for op, t in all_templates().items()}


# Flat columns of an exported winner (CSV / JSON); dicts and lists are JSON text in CSV.
EXPORT_COLUMNS = ("problem_key", "op", "dims", "dtype", "world", "fingerprint",
                  *Environment.__dataclass_fields__, "config", "time_s", "baseline_s", "speedup", "pct_sol",
                  "source", "template_hash", "study_name", "n_trials", "created_at", "models")


def _family(problem: Problem) -> str:
    dims = ",".join(f"{k}={'*' if k == 'm' else v}" for k, v in problem.dims)
    return f"{problem.op}|{dims}|{problem.dtype}|w{problem.world}"


def _problem_row(p: Problem) -> dict:
    return dict(key=p.key, op=p.op, dims=[[k, v] for k, v in p.dims], dtype=p.dtype, world=p.world,
                m=p.shape.get("m"), family=_family(p))


def _problem_from_row(r: ProblemRow) -> Problem:
    return Problem(r.op, tuple((str(k), int(v)) for k, v in r.dims), r.dtype, r.world)


def _env_from_row(r: EnvironmentRow) -> Environment:
    return Environment.from_dict({k: getattr(r, k) for k in Environment.__dataclass_fields__})


def _winner_from_rows(w: WinnerRow, p: ProblemRow, e: EnvironmentRow) -> Winner:
    return Winner(_problem_from_row(p), _env_from_row(e), dict(w.config), w.time_s, w.baseline_s, w.speedup,
                  w.pct_sol, w.source, w.template_hash, w.study_name, w.n_trials, w.created_at, w.origin,
                  row_fingerprint=e.fingerprint)


def _problem_order(p: Problem) -> tuple:
    """Op, then the other dims as numbers (n=256 before n=1024), dtype, world, then the token count."""
    return (p.op, tuple((k, v) for k, v in p.dims if k != "m"), p.dtype, p.world, p.shape.get("m", -1))


def _env_difference(env: Environment, other: Environment) -> str:
    diffs = [f"{k} {getattr(other, k)} (now {getattr(env, k)})" for k in Environment.__dataclass_fields__
             if getattr(env, k) != getattr(other, k)]
    return "recorded in another environment: " + ", ".join(diffs)


# ---------------------------------------------------------------------------------------- Store

class Store:
    """The tuning database. ``create=False`` refuses to create a missing SQLite file."""

    def __init__(self, url: Optional[str | os.PathLike] = None, *, create: bool = True):
        self.url = normalize_url(url) if url else default_url()
        self.engine = self._make_engine(self.url, create)
        # Writes take the write lock at BEGIN (SQLite); other dialects ignore the option.
        self._writer = self.engine.execution_options(tf_write=True)
        try:
            with self._read() as s:        # a read first: opening a current database writes nothing
                version = self._schema_version(s)
            if version is None:
                if not create:
                    raise DatabaseError(f"{display_url(self.url)} holds no tuneforge tables yet")
                self._write(self._create_schema)
            elif version < SCHEMA_VERSION:
                self._write(self._migrate)
        except DatabaseError:
            self.engine.dispose()
            raise

    # ------------------------------------------------------------------ opening, schema, retries
    @staticmethod
    def _make_engine(url: str, create: bool) -> Engine:
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
            raise DatabaseError(f"cannot open tuneforge database {display_url(url)}: {_first_line(e)} "
                                f"(unknown database kind, or its driver is not installed)") from None
        if engine.dialect.name == "sqlite":
            _sqlite_setup(engine)
        return engine

    @staticmethod
    def _schema_lock(s: Session) -> None:
        """Serialize schema changes: one process creates or migrates; the others wait, then see it done
        (SQLite: BEGIN IMMEDIATE already serialized us the same way)."""
        if s.connection().dialect.name == "postgresql":
            s.connection().exec_driver_sql("SELECT pg_advisory_xact_lock(7204318)")

    def _create_schema(self, s: Session) -> None:
        """Create the tables in an empty database, once, however many processes open it at once."""
        self._schema_lock(s)
        if self._schema_version(s) is not None:
            return
        Base.metadata.create_all(s.connection())
        s.add(MetaRow(key=SCHEMA_VERSION_KEY, value=str(SCHEMA_VERSION)))

    def _migrate(self, s: Session) -> None:
        """Bring an older schema to this version in one transaction (MIGRATIONS, then any new tables)."""
        self._schema_lock(s)
        version = self._schema_version(s)
        if version == SCHEMA_VERSION:
            return
        conn = s.connection()
        for v in range(version, SCHEMA_VERSION):
            for statement in MIGRATIONS[v]:
                conn.exec_driver_sql(statement)
        Base.metadata.create_all(conn)          # checkfirst: only the tables this version added
        s.get(MetaRow, SCHEMA_VERSION_KEY).value = str(SCHEMA_VERSION)
        log.warning("%s: schema migrated from version %d to %d", display_url(self.url), version, SCHEMA_VERSION)

    def _schema_version(self, s: Session) -> Optional[int]:
        """The schema version of a tuneforge database this tuneforge can use (as is, or migrated),
        None for an empty one (Optuna's tables allowed); a one-line DatabaseError for anything else."""
        tables = set(sa.inspect(s.connection()).get_table_names())
        ours = {t for t in tables if t.startswith(TABLE_PREFIX)}
        where = display_url(self.url)
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

    def _write(self, fn: Callable[[Session], T]) -> T:
        """Run ``fn`` in one write transaction; retry while SQLite is locked or a concurrent writer
        inserted the same row first (the retry then sees it)."""
        delay = 0.05
        for attempt in range(WRITE_ATTEMPTS):
            try:
                with Session(self._writer, expire_on_commit=False) as s, s.begin():
                    return fn(s)
            except exc.OperationalError as e:
                locked = "locked" in str(e.orig) or "busy" in str(e.orig)
                if not locked or attempt == WRITE_ATTEMPTS - 1:
                    raise self._error(e) from None
            except exc.IntegrityError as e:
                if attempt >= 2:
                    raise self._error(e) from None
            except exc.SQLAlchemyError as e:
                raise self._error(e) from None
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")

    @contextmanager
    def _read(self) -> Iterator[Session]:
        try:
            with Session(self.engine) as s:
                yield s
        except exc.SQLAlchemyError as e:
            raise self._error(e) from None

    def _error(self, e: exc.SQLAlchemyError) -> DatabaseError:
        what = _first_line(e)
        if "file is not a database" in what:
            return DatabaseError(f"{display_url(self.url)} is not an SQLite database (corrupt or another file)")
        return DatabaseError(f"tuneforge database {display_url(self.url)}: {what}")

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({display_url(self.url)!r})"

    # ------------------------------------------------------------------------------ writing
    def add_plan(self, model: str, tp: int, items: Sequence[tuple[Problem, str]]) -> None:
        """Record that ``model`` at TP ``tp`` needs these problems, each in a role (``layer.mlp``)."""
        self._write(lambda s: _add_plan(s, model, tp, items))

    def record_winner(self, w: Winner) -> bool:
        """Upsert on (problem key, environment fingerprint). A local record always replaces an
        imported one and is never replaced by one; otherwise, with the same template hash the faster
        record stays, with another hash the newer record replaces the older (stale) one.
        Returns whether ``w`` was stored."""
        return self._write(lambda s: _upsert_winner(s, w))

    # ------------------------------------------------------------------------------ reading
    def _select_winners(self):
        return (select(WinnerRow, ProblemRow, EnvironmentRow)
                .join(ProblemRow, WinnerRow.problem_key == ProblemRow.key)
                .join(EnvironmentRow, WinnerRow.fingerprint == EnvironmentRow.fingerprint))

    def winners(self, fingerprint: Optional[str] = None, model: Optional[str] = None, tp: Optional[int] = None,
                op: Optional[str] = None, key: Optional[str] = None) -> list[Winner]:
        """Every stored winner matching the given filters (stale and untrusted ones included: see
        ``stale_reason``), ordered by op, shape, token count, environment."""
        q = self._select_winners()
        if fingerprint:
            q = q.where(WinnerRow.fingerprint == fingerprint)
        if op:
            q = q.where(ProblemRow.op == op)
        if key:
            q = q.where(ProblemRow.key == key)
        if model is not None or tp is not None:
            plan = select(ModelProblemRow.problem_key)
            if model is not None:
                plan = plan.where(ModelProblemRow.model == model)
            if tp is not None:
                plan = plan.where(ModelProblemRow.tp == int(tp))
            q = q.where(ProblemRow.key.in_(plan))
        with self._read() as s:
            found = [_winner_from_rows(*row) for row in s.execute(q).all()]
        return sorted(found, key=lambda w: (_problem_order(w.problem), w.fingerprint))

    def load_winners(self, env: Environment, template_hashes: Optional[dict[str, str]] = None
                     ) -> tuple[dict[str, Winner], list[tuple[Winner, str]]]:
        """The usable winners for ``env`` by problem key, and the stale ones with a reason: recorded
        with another template hash (ops in ``template_hashes``) or under an edited environment row
        (``stale_reason``), or in another environment of the same GPU kind and world size (other
        versions, driver, interconnect) where ``env`` has none."""
        usable: dict[str, Winner] = {}
        stale: list[tuple[Winner, str]] = []
        for w in self.winners(fingerprint=env.fingerprint):
            why = stale_reason(w, template_hashes)
            if why:
                stale.append((w, why))
            else:
                usable[w.key] = w
        q = (self._select_winners()
             .where(EnvironmentRow.gpu_name == env.gpu_name, EnvironmentRow.world_size == env.world_size,
                    EnvironmentRow.predicted == env.predicted, WinnerRow.fingerprint != env.fingerprint))
        with self._read() as s:
            others = [_winner_from_rows(*row) for row in s.execute(q).all()]
        for w in others:
            if w.key not in usable:
                stale.append((w, stale_reason(w) or _env_difference(env, w.env)))   # edited, else the difference
        return usable, stale

    def best(self, problem: Problem, env: Environment, template_hash: Optional[str] = None,
             buckets: Optional[Sequence[int]] = DEFAULT_BUCKETS) -> Optional[Winner]:
        """The winner that serves ``problem`` in ``env``: the exact shape if tuned, else the tuned
        bucket (a tuned m in ``buckets``; all tuned m if ``buckets`` is None) that serves its token
        count: the smallest tuned bucket >= m, else the largest. Records with another template hash
        than ``template_hash``, or under an edited environment row, are stale: logged, never returned."""
        q = (self._select_winners().where(ProblemRow.family == _family(problem),
                                          WinnerRow.fingerprint == env.fingerprint))
        with self._read() as s:
            candidates = [_winner_from_rows(*row) for row in s.execute(q).all()]
        fresh = []
        for w in candidates:
            why = stale_reason(w, {problem.op: template_hash} if template_hash is not None else None)
            if why:
                log.warning("stale winner for %s not used: %s", w.key, why)
            else:
                fresh.append(w)
        by_m = {w.problem.shape.get("m"): w for w in fresh}
        m = problem.shape.get("m")
        if m in by_m:
            return by_m[m]
        if m is None:
            return None
        tuned = [t for t in by_m if t is not None and (buckets is None or t in buckets)]
        return by_m[bucket(m, tuned)] if tuned else None

    def environments(self) -> list[Environment]:
        """The trusted environments (an edited row, whose fields no longer hash to its fingerprint, is left out)."""
        with self._read() as s:
            envs = [(_env_from_row(r), r.fingerprint) for r in s.scalars(
                select(EnvironmentRow).order_by(EnvironmentRow.gpu_name, EnvironmentRow.fingerprint))]
        return [e for e, fingerprint in envs if e.fingerprint == fingerprint]

    def models(self) -> list[tuple[str, int]]:
        with self._read() as s:
            return [(m, tp) for m, tp in s.execute(select(ModelProblemRow.model, ModelProblemRow.tp).distinct()
                                                   .order_by(ModelProblemRow.model, ModelProblemRow.tp))]

    def plan(self, model: str, tp: int) -> list[tuple[Problem, str]]:
        """The (problem, role) pairs recorded for ``model`` at TP ``tp``."""
        q = (select(ProblemRow, ModelProblemRow.role).join(ModelProblemRow, ModelProblemRow.problem_key == ProblemRow.key)
             .where(ModelProblemRow.model == model, ModelProblemRow.tp == int(tp))
             .order_by(ModelProblemRow.role, ProblemRow.family, ProblemRow.m))
        with self._read() as s:
            return [(_problem_from_row(p), role) for p, role in s.execute(q).all()]

    # --------------------------------------------------------------------- sharing, pruning
    def to_frame(self, winners: Optional[Iterable[Winner]] = None):
        """The winners (default: all) as a pandas DataFrame with EXPORT_COLUMNS; ``models`` lists
        the [model, tp, role] entries of each winner's problem. Winners of an edited environment row
        are left out (untrusted: an import would refuse them)."""
        import pandas as pd
        winners = [w for w in (self.winners() if winners is None else winners) if not w.env_edited]
        with self._read() as s:
            plans: dict[str, list] = {}
            for key, model, tp, role in s.execute(select(ModelProblemRow.problem_key, ModelProblemRow.model,
                                                         ModelProblemRow.tp, ModelProblemRow.role)
                                                  .order_by(ModelProblemRow.model, ModelProblemRow.tp,
                                                            ModelProblemRow.role)):
                plans.setdefault(key, []).append([model, tp, role])
        rows = [dict(problem_key=w.key, op=w.problem.op, dims=[[k, v] for k, v in w.problem.dims],
                     dtype=w.problem.dtype, world=w.problem.world, fingerprint=w.fingerprint, **w.env.to_dict(),
                     config=w.config, time_s=w.time_s, baseline_s=w.baseline_s, speedup=w.speedup,
                     pct_sol=w.pct_sol, source=w.source, template_hash=w.template_hash, study_name=w.study_name,
                     n_trials=w.n_trials, created_at=w.created_at.isoformat(), models=plans.get(w.key, []))
                for w in winners]
        return pd.DataFrame(rows, columns=list(EXPORT_COLUMNS))

    def export(self, path: str | os.PathLike, winners: Optional[Iterable[Winner]] = None) -> int:
        """Write the winners (default: all) to ``path``: .csv or .json by extension. Returns the count."""
        path = Path(path)
        fmt = _file_format(path)
        df = self.to_frame(winners)
        try:
            if fmt == "csv":
                for col in ("dims", "config", "models"):
                    df[col] = [json.dumps(v) for v in df[col]]
                df.to_csv(path, index=False)
            else:
                # json, not DataFrame.to_json: that rounds floats to 15 digits, and times must round-trip
                path.write_text(json.dumps(df.to_dict(orient="records"), indent=1) + "\n")
        except OSError as e:
            raise InputError(f"cannot write {path}: {e.strerror or e}") from None
        return len(df)

    def import_(self, path: str | os.PathLike) -> "ImportReport":
        """Merge the winners of an exported .csv or .json file, all in one transaction. Each record is
        checked first (problem key, environment, times, and the config against its template's space
        and constraints on the recorded device); a bad one is refused with a one-line reason, the
        rest go in. Imported winners are kept apart (``origin="imported"``): they never replace a
        local record; between imported ones the record_winner rule decides. Plans are merged too."""
        rows, refused = _read_export(Path(path))
        good = []
        for i, w, models in rows:
            why = _import_refusal(w)
            if why:
                refused.append((i, f"record {i} ({w.key}): {why}"))
            else:
                good.append((w, models))

        def write(s: Session) -> int:
            stored = 0
            for w, models in good:
                stored += _upsert_winner(s, w)
                for model, tp, role in models:
                    _add_plan(s, model, tp, [(w.problem, role)])
            return stored
        stored = self._write(write)
        return ImportReport(stored, len(good) - stored, [line for _, line in sorted(refused)])

    def prune(self, template_hashes: Optional[dict[str, str]] = None, fingerprint: Optional[str] = None,
              older_than: Optional[timedelta] = None, dry_run: bool = False) -> list[Winner]:
        """Delete the winners that match every given criterion: stale by ``template_hashes`` (recorded
        with another template hash than ``template_hashes[op]``, ops not listed are kept, or under an
        edited environment row: ``stale_reason``), in environment ``fingerprint``, created more than
        ``older_than`` ago. Returns them; ``dry_run`` deletes nothing."""
        if template_hashes is None and fingerprint is None and older_than is None:
            raise InputError("prune needs a criterion: current template hashes, a fingerprint or an age")
        cutoff = datetime.now(timezone.utc) - older_than if older_than is not None else None
        doomed = [w for w in self.winners(fingerprint=fingerprint)
                  if (template_hashes is None or stale_reason(w, template_hashes))
                  and (cutoff is None or w.created_at < cutoff)]
        if doomed and not dry_run:
            def delete(s: Session) -> None:
                for w in doomed:
                    s.execute(sa.delete(WinnerRow).where(WinnerRow.problem_key == w.key,
                                                         WinnerRow.fingerprint == w.fingerprint))
                # environments and problems nothing refers to any more go too
                s.execute(sa.delete(EnvironmentRow).where(
                    EnvironmentRow.fingerprint.not_in(select(WinnerRow.fingerprint))))
                s.execute(sa.delete(ProblemRow).where(ProblemRow.key.not_in(select(WinnerRow.problem_key)),
                                                      ProblemRow.key.not_in(select(ModelProblemRow.problem_key))))
            self._write(delete)
        return doomed

    # ------------------------------------------------------------------------------ Optuna
    @staticmethod
    def study_name(problem: Problem, env: Environment) -> str:
        return f"{problem.key}@{env.fingerprint}"

    def optuna_storage(self):
        """An Optuna RDBStorage on this database (Optuna's own tables, same SQLite timeout).

        Opening one creates Optuna's tables and stamps its schema version when they are missing;
        processes doing that at once on a new database race (``UNIQUE constraint failed:
        alembic_version.version_num``, ``table trial_values already exists``), so it happens under a
        cross-process lock. SQLite commits of Optuna's connections skip the fsync of each commit
        (``synchronous = NORMAL`` under WAL: a killed process loses nothing, a power cut at most the
        last commits), which roughly halves the cost of writing a trial through Optuna's API."""
        import optuna
        sqlite = self.engine.dialect.name == "sqlite"
        kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if sqlite else {}
        try:
            with self._optuna_setup_lock():
                storage = optuna.storages.RDBStorage(self.url, engine_kwargs=kwargs)
        except exc.SQLAlchemyError as e:
            raise self._error(e) from None
        if sqlite:
            @event.listens_for(storage.engine, "connect")
            def _on_connect(dbapi_conn, _record):
                dbapi_conn.execute("PRAGMA synchronous = NORMAL")
            storage.engine.dispose()         # the connections opened while setting up get it too
        return storage

    @contextmanager
    def _optuna_setup_lock(self) -> Iterator[None]:
        """One process at a time sets up Optuna's tables. SQLite: an flock on ``<file>.lock`` (never
        on the database file itself: closing another descriptor of it drops SQLite's own POSIX
        locks); PostgreSQL: a session advisory lock; an in-memory database needs none."""
        dialect, path = self.engine.dialect.name, self.engine.url.database
        if dialect == "sqlite" and path and path != ":memory:":
            import fcntl
            with open(path + ".lock", "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX)          # released when the file closes
                yield
        elif dialect == "postgresql":
            with self.engine.connect() as conn:
                conn.exec_driver_sql(f"SELECT pg_advisory_lock({OPTUNA_SETUP_LOCK})")
                try:
                    yield
                finally:
                    conn.exec_driver_sql(f"SELECT pg_advisory_unlock({OPTUNA_SETUP_LOCK})")
        else:
            yield

    # ------------------------------------------------------------------------------ verification
    def verifications(self) -> dict[tuple[str, str, str], str]:
        """Stored verdicts: (op, canonical config, template source hash) -> '' (the kernel matched its
        reference) or why it failed."""
        from tuneforge.db.schema import VerificationRow as V
        with self._read() as s:
            rows = s.execute(select(V.op, V.config_key, V.template_hash, V.result)).all()
        return {(op, key, h): result for op, key, h, result in rows}

    def record_verifications(self, records: Sequence[tuple[str, str, str, str, str]]) -> None:
        """Store (op, canonical config, template hash, problem key it ran at, result) verdicts; one
        already stored (by another tuner at the same time) is kept."""
        from tuneforge.db.schema import VerificationRow as V
        if not records:
            return
        now = datetime.now(timezone.utc)
        unique = {(op, key, h): (problem, result[:600]) for op, key, h, problem, result in records}

        def write(s: Session) -> None:
            have = {tuple(r) for r in s.execute(select(V.op, V.config_key, V.template_hash).where(
                V.op.in_({op for op, _, _ in unique})))}
            new = [dict(op=op, config_key=key, template_hash=h, problem_key=problem, result=result, created_at=now)
                   for (op, key, h), (problem, result) in unique.items() if (op, key, h) not in have]
            if new:
                s.execute(sa.insert(V), new)
        self._write(write)


# ------------------------------------------------------------------------------------ helpers

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


def _insert_missing(s: Session, model, rows: list[dict], key: str) -> None:
    """Insert the rows whose ``key`` is not in the table yet (a concurrent insert makes the write retry)."""
    if not rows:
        return
    unique = {r[key]: r for r in rows}
    col = getattr(model, key)
    have: set = set()
    keys = list(unique)
    for i in range(0, len(keys), 500):
        have.update(s.scalars(select(col).where(col.in_(keys[i:i + 500]))))
    new = [r for k, r in unique.items() if k not in have]
    if new:
        s.execute(sa.insert(model), new)


def _file_format(path: Path) -> str:
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in ("csv", "json"):
        raise InputError(f"{path}: unknown file type {path.suffix or '(none)'!r}; use .csv or .json")
    return fmt


def _read_export(path: Path) -> tuple[list[tuple[int, Winner, list]], list[tuple[int, str]]]:
    """Parse an exported file into (record number, imported winner, its [model, tp, role] list)
    and (record number, one line) for each record that does not parse; a file that is no export is
    a one-line InputError."""
    import pandas as pd
    fmt = _file_format(path)
    if not path.is_file():
        raise InputError(f"no such file: {path}")
    try:
        if fmt == "csv":
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
        else:
            records = json.loads(path.read_text())
            if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
                raise ValueError("expected a list of records")
            df = pd.DataFrame.from_records(records)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not a tuneforge {fmt.upper()} export: {_first_line(e)}") from None
    missing = [c for c in EXPORT_COLUMNS if c not in df.columns]
    if len(df) and missing:
        raise InputError(f"{path} is not a tuneforge export: missing columns {', '.join(missing)}")

    def structured(v):
        return json.loads(v) if isinstance(v, str) else v

    def flag(v) -> bool:
        if isinstance(v, str):
            if v.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"predicted must be true/false, got {v!r}")
            return v.lower() in ("true", "1")
        return bool(v)

    out, refused = [], []
    for i, r in enumerate(df.to_dict(orient="records"), start=1):
        try:
            problem = Problem(str(r["op"]), tuple((str(k), int(v)) for k, v in structured(r["dims"])),
                              str(r["dtype"]), int(r["world"]))
            if Problem.from_key(str(r["problem_key"])) != problem:
                raise ValueError(f"problem_key {r['problem_key']!r} does not match its op/dims/dtype/world")
            if problem.dtype not in DTYPES or problem.world < 1 or any(v < 1 for _, v in problem.dims):
                raise ValueError(f"problem {problem.key} has an unknown dtype or a size below 1")
            env = Environment(str(r["gpu_name"]), int(r["sm_count"]), float(r["memory_gb"]), int(r["world_size"]),
                              str(r["interconnect"]), str(r["torch_version"]), str(r["triton_version"]),
                              str(r["driver_version"]), flag(r["predicted"]))
            if env.fingerprint != r["fingerprint"]:
                raise ValueError(f"fingerprint {r['fingerprint']} does not match its environment columns")
            w = Winner(problem, env, dict(structured(r["config"])), float(r["time_s"]), float(r["baseline_s"]),
                       float(r["speedup"]), float(r["pct_sol"]), str(r["source"]), str(r["template_hash"]),
                       str(r["study_name"]), int(r["n_trials"]), datetime.fromisoformat(str(r["created_at"])),
                       origin="imported")
            models = [(str(m), int(tp), str(role)) for m, tp, role in structured(r["models"])]
        except (ValueError, TypeError, KeyError, json.JSONDecodeError) as e:
            key = r.get("problem_key")
            refused.append((i, f"record {i}{f' ({key})' if key else ''}: {_first_line(e)}"))
            continue
        out.append((i, w, models))
    return out, refused


def _device_of(env: Environment):
    """The device spec a winner's constraints are checked on: the predicted target's spec, or the
    measured GPU's (its own SM count and memory), as the tuner checked them."""
    from tuneforge.dsl.devices import gpu_spec, spec
    if env.predicted:
        return spec(env.gpu_name)
    return replace(gpu_spec(env.gpu_name), sms=env.sm_count, memory_gb=env.memory_gb)


def _import_refusal(w: Winner) -> Optional[str]:
    """Why an imported winner may not be stored, or None: what the database cannot keep
    (``_validate``), a baseline record with parameters, or a config its op's template would reject
    (outside the space, or against a constraint on the recorded device)."""
    try:
        config = _validate(w)
    except InputError as e:
        return str(e).removeprefix(f"winner for {w.key}: ")     # the refusal line names the record already
    if config.get("baseline"):
        return None if config == {"baseline": True} else f"baseline config {config} has other parameters"
    from tuneforge.dsl.template import get
    try:
        template = get(w.problem.op)
        device = _device_of(w.env)
    except (KeyError, InputError) as e:
        return str(e.args[0] if isinstance(e, KeyError) else e)
    try:
        why = template.reject_reason(config, w.problem, device)
    except Exception as e:   # noqa: BLE001 - a shape the template cannot even describe is no winner of it
        why = f"{type(e).__name__}: {_first_line(e)}"
    return f"{w.problem.op} config {json.dumps(config, sort_keys=True)}: {why}" if why else None


def _add_plan(s: Session, model: str, tp: int, items: Sequence[tuple[Problem, str]]) -> None:
    _insert_missing(s, ProblemRow, [_problem_row(p) for p, _ in items], "key")
    known = set(s.execute(select(ModelProblemRow.problem_key, ModelProblemRow.role)
                          .where(ModelProblemRow.model == model, ModelProblemRow.tp == int(tp))).all())
    fresh = {(p.key, role) for p, role in items} - known
    s.add_all(ModelProblemRow(model=model, tp=int(tp), problem_key=k, role=r) for k, r in sorted(fresh))


def _scalar(o):
    if hasattr(o, "item"):                   # numpy / torch scalars in a config
        return o.item()
    raise TypeError(f"{type(o).__name__} {o!r} is not JSON")


def _validate(w: Winner) -> dict:
    """The stored form of ``w``'s config; a one-line InputError for what the database cannot keep."""
    for name in ("time_s", "baseline_s", "speedup", "pct_sol"):
        value = getattr(w, name)
        positive = name in ("time_s", "baseline_s")
        if not (isinstance(value, (int, float)) and math.isfinite(value) and (value > 0 or not positive)):
            raise InputError(f"winner for {w.key}: {name} must be a {'positive ' if positive else ''}"
                             f"finite number, got {value!r}")
    env = w.env
    typed = Environment(str(env.gpu_name), int(env.sm_count), float(env.memory_gb), int(env.world_size),
                        str(env.interconnect), str(env.torch_version), str(env.triton_version),
                        str(env.driver_version), bool(env.predicted))
    if typed.fingerprint != env.fingerprint:  # e.g. memory_gb=80 (int): the stored copy would fingerprint apart
        raise InputError(f"winner for {w.key}: environment fields have the wrong types ({env})")
    try:
        return json.loads(json.dumps(w.config, default=_scalar, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise InputError(f"winner for {w.key}: config {w.config!r} cannot be stored as JSON: {e}") from None


def _upsert_winner(s: Session, w: Winner) -> bool:
    config = _validate(w)
    _insert_missing(s, ProblemRow, [_problem_row(w.problem)], "key")
    _insert_missing(s, EnvironmentRow, [{"fingerprint": w.fingerprint, **w.env.to_dict()}], "fingerprint")
    row = s.scalars(select(WinnerRow).where(WinnerRow.problem_key == w.key, WinnerRow.fingerprint == w.fingerprint)
                    .with_for_update()).one_or_none()
    values = dict(config=config, time_s=float(w.time_s), baseline_s=float(w.baseline_s),
                  speedup=float(w.speedup), pct_sol=float(w.pct_sol), source=w.source, origin=w.origin,
                  template_hash=w.template_hash, study_name=w.study_name, n_trials=int(w.n_trials),
                  created_at=w.created_at.astimezone(timezone.utc))
    if row is None:
        s.add(WinnerRow(problem_key=w.key, fingerprint=w.fingerprint, **values))
        return True
    stored_at = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=timezone.utc)
    if row.origin != w.origin:      # a claim read from a file never displaces what was tuned here
        better = w.origin == "local"
    elif row.template_hash == w.template_hash:
        better = w.time_s < row.time_s
    else:
        better = w.created_at > stored_at
    if better:
        for k, v in values.items():
            setattr(row, k, v)
    return better
