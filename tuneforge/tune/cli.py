"""`tuneforge tune --model Qwen3-32B [--tp 8] [--target H800] [--budget 10m] ...`: plan the model's
problems, tune each (measured on this GPU, or predicted by the cost model for another target or
without a GPU), store the winners, print the strategy table."""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from datetime import datetime, timezone

from tuneforge.errors import InputError

_UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text: str) -> float:
    """'90s', '20m', '1h30m', '45' (seconds) -> seconds."""
    t = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        seconds = float(t)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)([smh])", t)
        if not parts or "".join(a + b for a, b in parts) != t:
            raise InputError(f"bad duration {text!r}: use e.g. 90s, 20m, 1h30m")
        seconds = sum(float(a) * _UNITS[u] for a, u in parts)
    if seconds <= 0:
        raise InputError(f"duration must be positive, got {text!r}")
    return seconds


def parse_buckets(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise InputError(f"bad bucket list {text!r}: use comma-separated token counts, e.g. 1,8,64") from None
    if any(v < 1 for v in values):
        raise InputError(f"token buckets must be >= 1, got {text!r}")
    return values


def _argument(parse):
    """An argparse type that reports our one-line message instead of 'invalid ... value'."""
    def convert(text):
        try:
            return parse(text)
        except InputError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = parse.__name__
    return convert


def register(subparsers) -> None:
    p = subparsers.add_parser("tune", help="tune a model's kernels and TP strategies, store the winners",
                              description=__doc__)
    p.add_argument("--model", required=True, help="built-in name (e.g. Qwen3-32B) or a HF config.json / its folder")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (default 1)")
    p.add_argument("--target", help="device to tune for (H100, H200, H800, B200, MI300X, MI308X, ...); "
                                    "default: this GPU, or H100 by the cost model without one")
    p.add_argument("--backend", choices=("measure", "costmodel"),
                   help="force measuring (needs the target's GPU here) or the cost model")
    p.add_argument("--budget", type=_argument(parse_duration), help="total wall-clock budget, e.g. 20m, 1h, 90s (problems reached once it is spent are skipped)")
    p.add_argument("--problem-budget", type=_argument(parse_duration),
                   help="wall-clock budget for any one problem, e.g. 30s (at least one config is always tried)")
    p.add_argument("--trials", type=int, help="configs evaluated per problem (default 40 measured, 16 predicted)")
    p.add_argument("--db", metavar="URL", help="database URL or SQLite path (default: $TUNEFORGE_DB or "
                                               "~/.local/share/tuneforge/tuneforge.db)")
    p.add_argument("--buckets", type=_argument(parse_buckets), help="decode token buckets (batch sizes), e.g. 1,8,64")
    p.add_argument("--prefill-buckets", type=_argument(parse_buckets),
                   help="prefill token buckets (chunk lengths), e.g. 512,2048; '' for none")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--summary-json", metavar="PATH", help="also write the results as JSON (rewritten after every problem: "
                   "a tune cut short leaves the problems it finished, marked complete: false)")
    p.add_argument("--no-verify", action="store_true", help="store winners without re-checking them")
    p.add_argument("--quiet", action="store_true", help="no per-problem progress lines")
    p.add_argument("--wide", action="store_true",
                   help="every column of the winners table (full problem keys, roles, baseline, %%SOL, source, "
                        "rejected configs) instead of a table that fits the terminal")
    p.set_defaults(func=cmd_tune)


def cmd_tune(args) -> int:
    import time

    started = time.monotonic()      # --budget counts the set-up (the GPU, the database) too

    from tuneforge.db.store import Store, default_url, display_url, normalize_url
    from tuneforge.tune.plan import plan as make_plan
    from tuneforge.tune.report import format_table
    from tuneforge.tune.tuner import Tuner, TuneOptions, choose_backend

    # every argument is checked before anything is printed or the database is touched
    if args.tp < 1:
        raise InputError(f"--tp must be >= 1, got {args.tp}")
    if args.trials is not None and args.trials < 1:
        raise InputError(f"--trials must be >= 1, got {args.trials}")
    if not 0 <= args.seed < 2**32:
        raise InputError(f"--seed must be in [0, 2**32), got {args.seed}")
    if args.summary_json and not os.path.isdir(os.path.dirname(os.path.abspath(args.summary_json))):
        raise InputError(f"cannot write {args.summary_json}: folder {os.path.dirname(args.summary_json)} "
                         f"does not exist")
    plan = make_plan(args.model, args.tp, decode_buckets=args.buckets, prefill_buckets=args.prefill_buckets,
                     dtype=args.dtype)
    choose_backend(args.target, args.backend)          # an unknown target, or measuring without its GPU
    url = normalize_url(args.db) if args.db else default_url()
    print(f"database: {display_url(url)}", flush=True)
    print(f"plan: {plan.summary()}", flush=True)
    store = Store(url)
    try:
        options = TuneOptions(target=args.target, backend=args.backend, trials=args.trials, budget_s=args.budget,
                              started=started, problem_budget_s=args.problem_budget,
                              seed=args.seed, verify=not args.no_verify,
                              progress=None if args.quiet else sys.stderr,
                              on_progress=_summary_keeper(args.summary_json, args.argv) if args.summary_json else None)
        tuner = Tuner(store, options)
        how = "measured on this GPU" if tuner.backend == "measure" else "predicted by the cost model"
        print(f"target: {tuner.spec.name} x{plan.tp} ({how}), {tuner.trials} trials per problem "
              f"(a trial is an evaluated config; rejected configs are counted apart)"
              + (f", budget {args.budget:.0f}s" if args.budget else "")
              + (f", {args.problem_budget:.0f}s per problem" if args.problem_budget else ""), flush=True)
        report = tuner.tune(plan)
    finally:
        store.close()
    print(format_table(report, wide=args.wide))
    d = report.to_dict()
    print(f"{d['tuned']} problems tuned ({d['kernel_winners']} won by a kernel, the rest by the torch baseline), "
          f"{d['baseline_only']} baseline-only, "
          + (f"{d['skipped']} skipped (budget spent: raise --budget), " if d["skipped"] else "")
          + f"{len(report.rows) - d['tuned'] - d['baseline_only'] - d['skipped']} failed, "
          f"in {report.elapsed_s:.1f}s; {d['n_trials']} trials (+{d['rejected']} rejected), {d['new_trials']} new; "
          f"{d['verifications_run']} configs verified under the interpreter; environment {report.fingerprint}")
    if args.summary_json:
        _write_summary(args.summary_json, report, args.argv)
        print(f"wrote {args.summary_json}")
    return 0 if all(r.status != "no-winner" for r in report.rows) else 1


def _write_summary(path: str, report, argv: list[str]) -> None:
    """The report as JSON, with the date and command, replacing ``path`` whole (a temporary file renamed
    over it): a reader, or a tune killed mid-write, never sees half a file. A running tune writes it after
    every problem (``complete``: false), so a tune cut short leaves the problems it finished."""
    d = report.to_dict()
    d.update(date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
             command=" ".join(shlex.quote(a) for a in ["tuneforge"] + argv))
    tmp = f"{path}.{os.getpid()}.tmp"          # one per process: two tuners never share it
    try:
        with open(tmp, "w") as f:
            json.dump(d, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:
        raise InputError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _summary_keeper(path: str, argv: list[str]):
    """A running tune's summary writer: a failed write is reported once and the tune goes on (the final
    write reports it as an error)."""
    warned = []

    def keep(report) -> None:
        try:
            _write_summary(path, report, argv)
        except InputError as e:
            if not warned:
                print(f"tuneforge: warning: {e} (the tune goes on)", file=sys.stderr, flush=True)
                warned.append(e)
    return keep
