"""Winners and their rows: the ``Winner`` record, when one is stale, and how it is validated,
mapped to and from the tables and upserted (the rules every write of a winner follows, local
or imported).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Optional, Sequence

import sqlalchemy as sa
from sqlalchemy import select
from sqlalchemy.orm import Session

from tuneforge.db.environment import Environment
from tuneforge.db.schema import EnvironmentRow, ModelProblemRow, ProblemRow, WinnerRow
from tuneforge.dsl.problem import Problem
from tuneforge.errors import InputError

SOURCES = ("measured", "predicted")
ORIGINS = ("local", "imported")
ENV_EDITED = "environment fields edited"


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


# ------------------------------------------------------------------------------------- rows

def family(problem: Problem) -> str:
    dims = ",".join(f"{k}={'*' if k == 'm' else v}" for k, v in problem.dims)
    return f"{problem.op}|{dims}|{problem.dtype}|w{problem.world}"


def problem_row(p: Problem) -> dict:
    return dict(key=p.key, op=p.op, dims=[[k, v] for k, v in p.dims], dtype=p.dtype, world=p.world,
                m=p.shape.get("m"), family=family(p))


def problem_from_row(r: ProblemRow) -> Problem:
    return Problem(r.op, tuple((str(k), int(v)) for k, v in r.dims), r.dtype, r.world)


def env_from_row(r: EnvironmentRow) -> Environment:
    return Environment.from_dict({k: getattr(r, k) for k in Environment.__dataclass_fields__})


def winner_from_rows(w: WinnerRow, p: ProblemRow, e: EnvironmentRow) -> Winner:
    return Winner(problem_from_row(p), env_from_row(e), dict(w.config), w.time_s, w.baseline_s, w.speedup,
                  w.pct_sol, w.source, w.template_hash, w.study_name, w.n_trials, w.created_at, w.origin,
                  row_fingerprint=e.fingerprint)


def problem_order(p: Problem) -> tuple:
    """Op, then the other dims as numbers (n=256 before n=1024), dtype, world, then the token count."""
    return (p.op, tuple((k, v) for k, v in p.dims if k != "m"), p.dtype, p.world, p.shape.get("m", -1))


def env_difference(env: Environment, other: Environment) -> str:
    diffs = [f"{k} {getattr(other, k)} (now {getattr(env, k)})" for k in Environment.__dataclass_fields__
             if getattr(env, k) != getattr(other, k)]
    return "recorded in another environment: " + ", ".join(diffs)


def insert_missing(s: Session, model, rows: list[dict], key: str) -> None:
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


def add_plan(s: Session, model: str, tp: int, items: Sequence[tuple[Problem, str]]) -> None:
    insert_missing(s, ProblemRow, [problem_row(p) for p, _ in items], "key")
    known = set(s.execute(select(ModelProblemRow.problem_key, ModelProblemRow.role)
                          .where(ModelProblemRow.model == model, ModelProblemRow.tp == int(tp))).all())
    fresh = {(p.key, role) for p, role in items} - known
    s.add_all(ModelProblemRow(model=model, tp=int(tp), problem_key=k, role=r) for k, r in sorted(fresh))


def _scalar(o):
    if hasattr(o, "item"):                   # numpy / torch scalars in a config
        return o.item()
    raise TypeError(f"{type(o).__name__} {o!r} is not JSON")


def validate(w: Winner) -> dict:
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


def upsert_winner(s: Session, w: Winner) -> bool:
    config = validate(w)
    insert_missing(s, ProblemRow, [problem_row(w.problem)], "key")
    insert_missing(s, EnvironmentRow, [{"fingerprint": w.fingerprint, **w.env.to_dict()}], "fingerprint")
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
