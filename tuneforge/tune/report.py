"""What a tuning run reports: one Row per planned problem, the Report of the run (its summary JSON),
the winners table, the short form of a config, and the one way trials are counted."""
from __future__ import annotations

import shutil
import textwrap
from dataclasses import dataclass, field
from typing import Optional

from optuna.trial import TrialState

from tuneforge.dsl.problem import Problem


@dataclass
class Row:
    """One line of the final table (and of the summary JSON)."""
    problem: str
    op: str
    roles: list
    status: str                     # tuned | baseline-only | skipped (budget spent) | no-winner
    config: Optional[dict]
    time_s: Optional[float]
    baseline_s: Optional[float]
    speedup: Optional[float]
    pct_sol: Optional[float]
    source: str                     # measured | predicted
    n_trials: int = 0               # evaluated configs (see count_trials), all runs
    new_trials: int = 0             # of them, evaluated in this run
    rejected: int = 0               # configs rejected before they ran, all runs
    study_name: str = ""
    note: str = ""

    @property
    def winner(self) -> str:
        if self.status == "baseline-only":
            return "baseline (no template)"
        if self.config is None:
            return "-"
        return describe_config(self.config)


@dataclass
class Report:
    model: str
    tp: int
    target: str
    backend: str
    database: str
    fingerprint: str
    rows: list[Row]
    elapsed_s: float
    plan_size: int
    environment: dict = field(default_factory=dict)   # the fingerprint's fields: GPU, versions, world size
    verifications_run: int = 0      # configs run under the interpreter to verify them (0: all verdicts known)
    complete: bool = True           # False: the problems finished so far of a tune still running (or cut short)

    def to_dict(self) -> dict:
        tuned = [r for r in self.rows if r.status == "tuned"]
        beat = [r for r in tuned if r.config and not r.config.get("baseline")]
        return {"model": self.model, "tp": self.tp, "target": self.target, "backend": self.backend,
                "database": self.database, "fingerprint": self.fingerprint, "environment": self.environment,
                "elapsed_s": round(self.elapsed_s, 3), "complete": self.complete,
                "problems": self.plan_size, "tuned": len(tuned), "kernel_winners": len(beat),
                "baseline_only": sum(r.status == "baseline-only" for r in self.rows),
                "skipped": sum(r.status == "skipped" for r in self.rows),
                "n_trials": sum(r.n_trials for r in self.rows), "new_trials": sum(r.new_trials for r in self.rows),
                "rejected": sum(r.rejected for r in self.rows), "verifications_run": self.verifications_run,
                "rows": [dict(problem=r.problem, op=r.op, roles=r.roles, status=r.status, winner=r.winner,
                              config=r.config, time_s=r.time_s, baseline_s=r.baseline_s, speedup=r.speedup,
                              pct_sol=r.pct_sol, source=r.source, n_trials=r.n_trials, new_trials=r.new_trials,
                              rejected=r.rejected, study_name=r.study_name, note=r.note) for r in self.rows]}




_ABBREV = {"block_m": "bm", "block_n": "bn", "block_k": "bk", "group_m": "g", "num_warps": "w",
           "num_stages": "s", "split_k": "sk", "programs_per_sm": "pps", "rows": "rows", "block": "blk"}


def describe_config(config: dict) -> str:
    """Strategy first, then the other parameters in short form (``gemm_ar bm128 bn256 bk64 w8 s3``)."""
    if config.get("baseline"):
        return "baseline"
    parts = [str(config["strategy"])] if "strategy" in config else []
    for k, v in sorted(config.items()):
        if k == "strategy":
            continue
        short = _ABBREV.get(k.lower(), k.lower())
        if isinstance(v, bool):
            if v:
                parts.append(short)
        else:
            parts.append(f"{short}{v}" if isinstance(v, (int, float)) and short.isalpha() else f"{short}={v}")
    return " ".join(parts)



def count_trials(trials: list) -> tuple[int, int]:
    """(trials, rejected) of finished trials: a trial is an evaluated config (COMPLETE, or FAIL: it
    compiled or ran and failed); a config the constraints or the launcher rejected before it ran
    (PRUNED) is counted apart. The budget, progress lines, table, summary and stored winners all
    count this way."""
    rejected = sum(t.state == TrialState.PRUNED for t in trials)
    return len(trials) - rejected, rejected



def trials_text(n_trials: int, rejected: int, new: int) -> str:
    """``16 trials (+5 rejected), 16 new``: the one way trials are counted (count_trials)."""
    return f"{n_trials} trials" + (f" (+{rejected} rejected)" if rejected else "") + f", {new} new"


def progress_text(r: Row) -> str:
    if r.status == "baseline-only":
        return "baseline-only (no template)"
    if r.status == "skipped":
        return f"skipped: {r.note}"
    if r.status != "tuned":
        return f"NO WINNER: {r.note}"
    return (f"{trials_text(r.n_trials, r.rejected, r.new_trials)}: {describe_config(r.config)} "
            f"{_us(r.time_s)} vs baseline {_us(r.baseline_s)} {r.speedup:.2f}x {r.source}")



def format_table(report: Report, width: Optional[int] = None, wide: bool = False) -> str:
    """The winners, sorted by op, then the other dims, then the token count.

    Compact (the default) fits ``width`` columns (the terminal's, 80 when it is not one): the problem
    as its op and the dims that tell that op's rows apart (dtype and world size only where they
    differ), the winner, its time, its speedup over the torch baseline and the trials; a cell too long
    for its column wraps onto the next line, nothing is cut. ``wide``: every column (the whole problem
    key, every role, baseline time, % of speed of light, source, rejected configs), one line each."""
    rows = sorted(report.rows, key=_row_order)
    if wide:
        cols = ("problem", "roles", "winner", "time", "baseline", "speedup", "%SOL", "source", "trials", "rejected")
        lines = [(r.problem, ",".join(r.roles), _winner_cell(r), _us(r.time_s), _us(r.baseline_s), _speedup(r),
                  f"{r.pct_sol:.0f}%" if r.pct_sol is not None else "-", r.source, str(r.n_trials), str(r.rejected))
                 for r in rows]
        widths = [max(len(c), *(len(line[i]) for line in lines)) if lines else len(c) for i, c in enumerate(cols)]
        return "\n".join(_table_line(line, widths, left=3) for line in [cols, *lines])
    width = width or shutil.get_terminal_size((80, 24)).columns
    names = _short_names(rows)
    mixed = len({r.source for r in rows}) > 1
    cols = ("problem", "winner", "time", "speedup", "trials") + (("source",) if mixed else ())
    lines = [(names[r.problem], _winner_cell(r), _us(r.time_s), _speedup(r), str(r.n_trials))
             + ((r.source,) if mixed else ()) for r in rows]
    widths = [max(len(c), *(len(line[i]) for line in lines)) if lines else len(c) for i, c in enumerate(cols)]
    room = width - sum(widths[2:]) - 2 * (len(cols) - 1)        # for problem and winner together
    if widths[0] + widths[1] > room:              # the winner wraps first, the problem only if it must
        widths[0] = min(widths[0], max(12, room - 20))
        widths[1] = max(12, room - widths[0])
    out = [_table_line(cols, widths, left=2)]
    for line in lines:
        cells = [textwrap.wrap(v, w, break_on_hyphens=False) or [""] for v, w in zip(line, widths)]
        for k in range(max(map(len, cells))):
            out.append(_table_line([c[k] if k < len(c) else "" for c in cells], widths, left=2))
    return "\n".join(out)


def _table_line(cells, widths, left: int) -> str:
    """The first ``left`` columns (text) left-aligned, the others right-aligned."""
    return "  ".join(v.ljust(w) if i < left else v.rjust(w) for i, (v, w) in enumerate(zip(cells, widths))).rstrip()


def _winner_cell(r: Row) -> str:
    if r.status == "skipped":
        return f"skipped: {r.note}"
    return f"FAILED: {r.note}" if r.status == "no-winner" else r.winner


def _speedup(r: Row) -> str:
    return f"{r.speedup:.2f}x" if r.speedup else "-"


def _row_order(r: Row) -> tuple:
    p = Problem.from_key(r.problem)
    return (r.op, tuple((k, v) for k, v in p.dims if k != "m"), p.shape.get("m", 0), p.dtype, p.world)


def _short_names(rows: list[Row]) -> dict[str, str]:
    """problem key -> op and the dims that differ among that op's rows (the token count always)."""
    problems = {r.problem: Problem.from_key(r.problem) for r in rows}
    by_op: dict[str, list[Problem]] = {}
    for p in problems.values():
        by_op.setdefault(p.op, []).append(p)
    tails = {(p.dtype, p.world) for p in problems.values()}
    names = {}
    for key, p in problems.items():
        same = by_op[p.op]
        dims = [f"{k}={v}" for k, v in p.dims if k == "m" or len({q.shape.get(k) for q in same}) > 1]
        tail = f" {p.dtype} w{p.world}" if len(tails) > 1 else ""
        names[key] = " ".join([p.op, *dims]) + tail
    return names


def _us(t: Optional[float]) -> str:
    return f"{t * 1e6:.2f}us" if t else "-"

