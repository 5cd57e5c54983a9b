"""The store: read and write tuning winners, with provenance, in any SQLAlchemy database.

By default an SQLite file (``$XDG_DATA_HOME/tuneforge/tuneforge.db``), overridden by
``$TUNEFORGE_DB`` or an explicit URL (a bare path means an SQLite file); a PostgreSQL URL lets a
whole cluster share one database. SQLite runs in WAL mode with a busy timeout and every write
takes the write lock up front (``BEGIN IMMEDIATE``) and is retried while the file is locked, so
several tuner processes on one file lose nothing. Every write is one transaction.

The parts, one idea each: ``engine`` (URLs, opening), ``migrate`` (schema creation, version,
migration), ``records`` (the Winner and its rows), ``transfer`` (export, import and its checks),
``optuna_storage`` (Optuna's tables beside ours); this module holds the Store's reads and writes.
"""
from __future__ import annotations

import logging
import os
import random
import time
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence, TypeVar

import sqlalchemy as sa
from sqlalchemy import exc, select
from sqlalchemy.orm import Session

from tuneforge.db import optuna_storage
from tuneforge.db.engine import database_error, default_url, display_url, make_engine, normalize_url
from tuneforge.db.environment import Environment
from tuneforge.db.migrate import create_schema, migrate, schema_version
from tuneforge.db.records import (Winner, add_plan, env_difference, env_from_row, family, problem_from_row,
                                  problem_order, stale_reason, upsert_winner, winner_from_rows)
from tuneforge.db.schema import SCHEMA_VERSION, EnvironmentRow, ModelProblemRow, ProblemRow, WinnerRow
from tuneforge.db.transfer import ImportReport, file_format, frame, import_refusal, read_export, write_export
from tuneforge.dsl.problem import DEFAULT_BUCKETS, Problem, serving_bucket
from tuneforge.errors import DatabaseError, InputError

log = logging.getLogger("tuneforge.db")

WRITE_ATTEMPTS = 8             # a write still locked after the busy timeout is retried this often
T = TypeVar("T")


class Store:
    """The tuning database. ``create=False`` refuses to create a missing SQLite file."""

    def __init__(self, url: Optional[str | os.PathLike] = None, *, create: bool = True):
        self.url = normalize_url(url) if url else default_url()
        self.engine = make_engine(self.url, create)
        # Writes take the write lock at BEGIN (SQLite); other dialects ignore the option.
        self._writer = self.engine.execution_options(tf_write=True)
        where = display_url(self.url)
        try:
            # a read first: opening a current database writes nothing (retried like a write: another
            # process creating the schema holds SQLite's lock, past the busy timeout when hosts are loaded)
            version = self._retrying(lambda: self._read_once(lambda s: schema_version(s, where)))
            if version is None:
                if not create:
                    raise DatabaseError(f"{where} holds no tuneforge tables yet")
                self._write(lambda s: create_schema(s, where))
            elif version < SCHEMA_VERSION:
                self._write(lambda s: migrate(s, where))
        except DatabaseError:
            self.engine.dispose()
            raise

    # ------------------------------------------------------------------ transactions, retries
    def _write(self, fn: Callable[[Session], T]) -> T:
        """Run ``fn`` in one write transaction; retry while SQLite is locked or a concurrent writer
        inserted the same row first (the retry then sees it)."""
        def once() -> T:
            with Session(self._writer, expire_on_commit=False) as s, s.begin():
                return fn(s)
        return self._retrying(once)

    def _read_once(self, fn: Callable[[Session], T]) -> T:
        with Session(self.engine) as s:
            return fn(s)

    def _retrying(self, once: Callable[[], T]) -> T:
        """``once()``, again after a growing pause while SQLite is locked (WRITE_ATTEMPTS in all) or a
        concurrent writer inserted the same row first; any other database error at once, as one line."""
        delay = 0.05
        for attempt in range(WRITE_ATTEMPTS):
            try:
                return once()
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
        return database_error(self.url, e)

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
        self._write(lambda s: add_plan(s, model, tp, items))

    def record_winner(self, w: Winner) -> bool:
        """Upsert on (problem key, environment fingerprint). A local record always replaces an
        imported one and is never replaced by one; otherwise, with the same template hash the faster
        record stays, with another hash the newer record replaces the older (stale) one.
        Returns whether ``w`` was stored."""
        return self._write(lambda s: upsert_winner(s, w))

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
            found = [winner_from_rows(*row) for row in s.execute(q).all()]
        return sorted(found, key=lambda w: (problem_order(w.problem), w.fingerprint))

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
            others = [winner_from_rows(*row) for row in s.execute(q).all()]
        for w in others:
            if w.key not in usable:
                stale.append((w, stale_reason(w) or env_difference(env, w.env)))   # edited, else the difference
        return usable, stale

    def best(self, problem: Problem, env: Environment, template_hash: Optional[str] = None,
             buckets: Optional[Sequence[int]] = DEFAULT_BUCKETS) -> Optional[Winner]:
        """The winner that serves ``problem`` in ``env``: the exact shape if tuned, else the tuned
        bucket (a tuned m in ``buckets``; all tuned m if ``buckets`` is None) that serves its token
        count: the smallest tuned bucket >= m (``serving_bucket``: None above every one). Records with
        another template hash than ``template_hash``, or under an edited environment row, are stale:
        logged, never returned."""
        q = (self._select_winners().where(ProblemRow.family == family(problem),
                                          WinnerRow.fingerprint == env.fingerprint))
        with self._read() as s:
            candidates = [winner_from_rows(*row) for row in s.execute(q).all()]
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
        served = serving_bucket(m, [t for t in by_m if t is not None], buckets)
        return None if served is None else by_m[served]

    def environments(self) -> list[Environment]:
        """The trusted environments (an edited row, whose fields no longer hash to its fingerprint, is left out)."""
        with self._read() as s:
            envs = [(env_from_row(r), r.fingerprint) for r in s.scalars(
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
            return [(problem_from_row(p), role) for p, role in s.execute(q).all()]

    # --------------------------------------------------------------------- sharing, pruning
    def to_frame(self, winners: Optional[Iterable[Winner]] = None):
        """The winners (default: all) as a pandas DataFrame with EXPORT_COLUMNS; ``models`` lists
        the [model, tp, role] entries of each winner's problem. Winners of an edited environment row
        are left out (untrusted: an import would refuse them)."""
        winners = [w for w in (self.winners() if winners is None else winners) if not w.env_edited]
        with self._read() as s:
            plans: dict[str, list] = {}
            for key, model, tp, role in s.execute(select(ModelProblemRow.problem_key, ModelProblemRow.model,
                                                         ModelProblemRow.tp, ModelProblemRow.role)
                                                  .order_by(ModelProblemRow.model, ModelProblemRow.tp,
                                                            ModelProblemRow.role)):
                plans.setdefault(key, []).append([model, tp, role])
        return frame(winners, plans)

    def export(self, path: str | os.PathLike, winners: Optional[Iterable[Winner]] = None) -> int:
        """Write the winners (default: all) to ``path``: .csv or .json by extension. Returns the count."""
        path = Path(path)
        fmt = file_format(path)
        return write_export(path, fmt, self.to_frame(winners))

    def import_(self, path: str | os.PathLike) -> "ImportReport":
        """Merge the winners of an exported .csv or .json file, all in one transaction. Each record is
        checked first (problem key, environment, times, and the config against its template's space
        and constraints on the recorded device); a bad one is refused with a one-line reason, the
        rest go in. Imported winners are kept apart (``origin="imported"``): they never replace a
        local record; between imported ones the record_winner rule decides. Plans are merged too."""
        rows, refused = read_export(Path(path))
        good = []
        for i, w, models in rows:
            why = import_refusal(w)
            if why:
                refused.append((i, f"record {i} ({w.key}): {why}"))
            else:
                good.append((w, models))

        def write(s: Session) -> int:
            stored = 0
            for w, models in good:
                stored += upsert_winner(s, w)
                for model, tp, role in models:
                    add_plan(s, model, tp, [(w.problem, role)])
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
        """An Optuna RDBStorage on this database (``optuna_storage.open_storage``: Optuna's tables set
        up under a cross-process lock, SQLite commits without a per-commit fsync)."""
        return optuna_storage.open_storage(self.url, self.engine)

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
