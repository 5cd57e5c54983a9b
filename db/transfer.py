"""Sharing winners between databases: the export file (CSV or JSON, one flat record per winner)
and the checks an imported record passes before it is stored (it parses, its key and fingerprint
match its columns, the database can keep it, its op's template accepts its config on the
recorded device). ``Store.export`` / ``Store.import_`` are the entry points.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Iterable, Optional

from tuneforge.db.engine import first_line
from tuneforge.db.environment import Environment
from tuneforge.db.records import Winner, validate
from tuneforge.dsl.problem import DTYPES, Problem
from tuneforge.errors import InputError


# Flat columns of an exported winner (CSV / JSON); dicts and lists are JSON text in CSV.
EXPORT_COLUMNS = ("problem_key", "op", "dims", "dtype", "world", "fingerprint",
                  *Environment.__dataclass_fields__, "config", "time_s", "baseline_s", "speedup", "pct_sol",
                  "source", "template_hash", "study_name", "n_trials", "created_at", "models")


@dataclass
class ImportReport:
    """What ``Store.import_`` did: winners stored, winners kept out by the stored ones (local,
    faster or newer), and one line per refused record."""
    stored: int
    kept_out: int
    refused: list[str]


def frame(winners: Iterable[Winner], plans: dict[str, list]):
    """The winners as a pandas DataFrame with EXPORT_COLUMNS; ``plans``: problem key -> its
    [model, tp, role] entries (the ``models`` column)."""
    import pandas as pd
    rows = [dict(problem_key=w.key, op=w.problem.op, dims=[[k, v] for k, v in w.problem.dims],
                 dtype=w.problem.dtype, world=w.problem.world, fingerprint=w.fingerprint, **w.env.to_dict(),
                 config=w.config, time_s=w.time_s, baseline_s=w.baseline_s, speedup=w.speedup,
                 pct_sol=w.pct_sol, source=w.source, template_hash=w.template_hash, study_name=w.study_name,
                 n_trials=w.n_trials, created_at=w.created_at.isoformat(), models=plans.get(w.key, []))
            for w in winners]
    return pd.DataFrame(rows, columns=list(EXPORT_COLUMNS))


def write_export(path: Path, fmt: str, df) -> int:
    """Write an export frame to ``path`` as ``fmt`` (csv | json). Returns the record count."""
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


def file_format(path: Path) -> str:
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in ("csv", "json"):
        raise InputError(f"{path}: unknown file type {path.suffix or '(none)'!r}; use .csv or .json")
    return fmt


def read_export(path: Path) -> tuple[list[tuple[int, Winner, list]], list[tuple[int, str]]]:
    """Parse an exported file into (record number, imported winner, its [model, tp, role] list)
    and (record number, one line) for each record that does not parse; a file that is no export is
    a one-line InputError."""
    import pandas as pd
    fmt = file_format(path)
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
        raise InputError(f"{path} is not a tuneforge {fmt.upper()} export: {first_line(e)}") from None
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
            # dims are sizes or 0/1 flags (moe_gemm's act, gemm_fused's norm / epi): none negative, and
            # a token count of at least 1; the template's own checks judge the rest (import_refusal)
            if problem.dtype not in DTYPES or problem.world < 1 or any(v < 0 for _, v in problem.dims) \
                    or problem.shape.get("m", 1) < 1:
                raise ValueError(f"problem {problem.key} has an unknown dtype, a negative dim or fewer than 1 token")
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
            refused.append((i, f"record {i}{f' ({key})' if key else ''}: {first_line(e)}"))
            continue
        out.append((i, w, models))
    return out, refused


def device_of(env: Environment):
    """The device spec a winner's constraints are checked on: the predicted target's spec, or the
    measured GPU's (its own SM count and memory), as the tuner checked them."""
    from tuneforge.dsl.devices import gpu_spec, spec
    if env.predicted:
        return spec(env.gpu_name)
    return replace(gpu_spec(env.gpu_name), sms=env.sm_count, memory_gb=env.memory_gb)


def import_refusal(w: Winner) -> Optional[str]:
    """Why an imported winner may not be stored, or None: what the database cannot keep
    (``validate``), a baseline record with parameters, or a config its op's template would reject
    (outside the space, or against a constraint on the recorded device)."""
    try:
        config = validate(w)
    except InputError as e:
        return str(e).removeprefix(f"winner for {w.key}: ")     # the refusal line names the record already
    if config.get("baseline"):
        return None if config == {"baseline": True} else f"baseline config {config} has other parameters"
    from tuneforge.dsl.template import get
    try:
        template = get(w.problem.op)
        device = device_of(w.env)
    except (KeyError, InputError) as e:
        return str(e.args[0] if isinstance(e, KeyError) else e)
    try:
        why = template.reject_reason(config, w.problem, device)
    except Exception as e:   # noqa: BLE001 - a shape the template cannot even describe is no winner of it
        why = f"{type(e).__name__}: {first_line(e)}"
    return f"{w.problem.op} config {json.dumps(config, sort_keys=True)}: {why}" if why else None
