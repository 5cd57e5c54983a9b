"""`tuneforge db list | show KEY | export FILE | import FILE | prune`: browse, share and clean the
tuning database. Every command first prints which database it uses."""
from __future__ import annotations

import argparse
import json
import shutil
from datetime import timedelta
from itertools import groupby

from tuneforge.db.engine import default_url, display_url, normalize_url
from tuneforge.db.records import Winner, current_template_hashes, stale_reason
from tuneforge.db.store import Store
from tuneforge.errors import InputError

MIN_CONFIG_WIDTH = 16     # a compact table's config column never gets narrower than this


def register(subparsers) -> None:
    # --db is accepted before or after the action: `tuneforge db --db X list` or `tuneforge db list --db X`
    db_opt = argparse.ArgumentParser(add_help=False)
    db_opt.add_argument("--db", metavar="URL", default=argparse.SUPPRESS,
                        help="database URL or SQLite file path (default: $TUNEFORGE_DB or "
                             "~/.local/share/tuneforge/tuneforge.db)")
    p = subparsers.add_parser("db", parents=[db_opt], help="browse, share and clean the tuning database",
                              description=__doc__)
    actions = p.add_subparsers(dest="db_command", metavar="ACTION", required=True)

    a = actions.add_parser("list", parents=[db_opt], help="the stored winners as a table")
    a.add_argument("--fingerprint", help="only this environment")
    a.add_argument("--model", help="only problems planned for this model")
    a.add_argument("--tp", type=int, help="only problems planned at this TP degree")
    a.add_argument("--op", help="only this op")
    a.add_argument("--wide", action="store_true", help="one flat table with every column and the full configs "
                                                        "(default: one compact table per environment)")
    a.set_defaults(func=cmd_list)

    a = actions.add_parser("show", parents=[db_opt], help="every winner of one problem, in full")
    a.add_argument("key", metavar="KEY", help="problem key, e.g. 'gemm|m=16,n=1024,k=5120|bf16|w1'")
    a.set_defaults(func=cmd_show)

    a = actions.add_parser("export", parents=[db_opt], help="write the winners to a .csv or .json file")
    a.add_argument("file", metavar="FILE")
    a.add_argument("--fingerprint", help="only this environment")
    a.set_defaults(func=cmd_export)

    a = actions.add_parser("import", parents=[db_opt], help="merge the winners of an exported .csv/.json file")
    a.add_argument("file", metavar="FILE")
    a.set_defaults(func=cmd_import)

    a = actions.add_parser("prune", parents=[db_opt], help="delete stale winners",
                           description="Delete stale winners (the default: recorded with another template "
                                       "source than the current kernels, or under an edited environment "
                                       "row), or those of --fingerprint and/or older than --older-than days.")
    a.add_argument("--fingerprint", help="delete this environment's winners")
    a.add_argument("--older-than", type=float, metavar="DAYS", help="delete winners older than DAYS")
    a.add_argument("--dry-run", action="store_true", help="only show what would be deleted")
    a.set_defaults(func=cmd_prune)


def _open(args, create: bool = False) -> Store:
    """The store named by --db / $TUNEFORGE_DB / the default; a missing one is created only if ``create``."""
    url = normalize_url(args.db) if getattr(args, "db", None) else default_url(create_folder=create)
    print(f"database: {display_url(url)}")
    return Store(url, create=create)


def _align(header: list[str], rows: list[list], indent: str = "", last_width: int | None = None) -> list[str]:
    """Text left-aligned, numbers right-aligned; the last column cut to ``last_width``."""
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    if last_width is not None:
        cells = [r[:-1] + [_short(r[-1], last_width)] for r in cells]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(header)]
    numeric = [bool(rows) and all(isinstance(r[i], (int, float)) for r in rows) for i in range(len(header))]

    def line(values):
        return indent + "  ".join(v.rjust(w) if num else v.ljust(w)
                                  for v, w, num in zip(values, widths, numeric)).rstrip()
    return [line(header), *map(line, cells)]


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[:max(width - 3, 0)] + "..."


def _table(winners: list[Winner], hashes: dict[str, str], wide: bool = False) -> tuple[str, bool]:
    """The winners as text, and whether anything was cut. Wide: one flat table, every column, the
    full configs. Compact: one table per environment under a line naming it, the config in short
    form cut to the terminal's width; the origin and stale columns only where some winner has them."""
    stale = {id(w): stale_reason(w, hashes) for w in winners}
    if wide:
        header = ["problem", "source", "origin", "device", "fingerprint", "strategy", "time_us", "baseline_us",
                  "speedup", "pct_sol", "trials", "stale", "config"]
        rows = [[w.key, w.source, w.origin, w.env.label, w.fingerprint, w.strategy or "-", w.time_s * 1e6,
                 w.baseline_s * 1e6, w.speedup, w.pct_sol, w.n_trials, stale[id(w)] or "-",
                 json.dumps(w.config, sort_keys=True)] for w in winners]
        return "\n".join(_align(header, rows)), False
    from tuneforge.tune.tuner import describe_config
    optional = [("origin", any(w.origin != "local" for w in winners), lambda w: w.origin),
                ("stale", any(stale.values()), lambda w: "stale" if stale[id(w)] else "-")]
    header = ["problem", "time_us", "speedup", "trials"] + [name for name, shown, _ in optional if shown] + ["config"]

    def row(w):
        return [w.key, w.time_s * 1e6, w.speedup, w.n_trials] + [get(w) for _, shown, get in optional if shown] \
            + [describe_config(w.config)]
    every = [row(w) for w in winners]
    # the config column gets what the other columns leave of the terminal (indent and gaps included)
    others = sum(max([len(h), *(len(f"{r[i]:.4g}" if isinstance(r[i], float) else str(r[i])) for r in every)]) + 2
                 for i, h in enumerate(header[:-1]))
    width = max(MIN_CONFIG_WIDTH, shutil.get_terminal_size().columns - 2 - others)
    cut = any(len(r[-1]) > width for r in every)
    out = []
    for fingerprint, group in groupby(sorted(winners, key=lambda w: (w.env.gpu_name, w.env.world_size,
                                                                     w.env.predicted, w.fingerprint)),
                                      key=lambda w: w.fingerprint):
        group = list(group)                # a stable sort: the store's order (op, shape, token count) within
        out.append(f"{group[0].env.label}, fingerprint {fingerprint}: {len(group)} winner(s)")
        out += _align(header, [row(w) for w in group], indent="  ", last_width=width)
    return "\n".join(out), cut


def cmd_list(args) -> int:
    with _open(args) as store:
        winners = store.winners(fingerprint=args.fingerprint, model=args.model, tp=args.tp, op=args.op)
    if not winners:
        print("no winners stored" + (" matching the filters" if any(
            (args.fingerprint, args.model, args.tp, args.op)) else ""))
        return 0
    hashes = current_template_hashes()
    text, cut = _table(winners, hashes, wide=args.wide)
    print(text)
    n_stale = sum(stale_reason(w, hashes) is not None for w in winners)
    n_envs = len({w.fingerprint for w in winners})
    print(f"{len(winners)} winner(s) in {n_envs} environment(s)"
          + (f"; {n_stale} stale (never used for dispatch; `tuneforge db prune` deletes them)" if n_stale else "")
          + ("; --wide shows every column and the full configs" if cut or (n_stale and not args.wide) else ""))
    return 0


def cmd_show(args) -> int:
    with _open(args) as store:
        winners = store.winners(key=args.key)
        if not winners:
            raise InputError(f"no winner stored for problem {args.key!r} (see `tuneforge db list`)")
        hashes = current_template_hashes()
        for w in winners:
            print(f"\n{w.key}  [{w.source}, {w.origin}]")
            fields = {"device": w.env.label, "fingerprint": w.fingerprint, "stale": stale_reason(w, hashes) or "-",
                      **w.env.to_dict(),
                      "config": json.dumps(w.config, sort_keys=True), "strategy": w.strategy or "-",
                      "time_us": f"{w.time_s * 1e6:.4g}", "baseline_us": f"{w.baseline_s * 1e6:.4g}",
                      "speedup": f"{w.speedup:.4g}", "pct_sol": f"{w.pct_sol:.4g}",
                      "template_hash": w.template_hash, "study": w.study_name, "trials": w.n_trials,
                      "created_at": w.created_at.isoformat(timespec="seconds")}
            width = max(map(len, fields))
            for k, v in fields.items():
                print(f"  {k.ljust(width)}  {v}")
    return 0


def cmd_export(args) -> int:
    with _open(args) as store:
        n = store.export(args.file, store.winners(fingerprint=args.fingerprint))
    print(f"exported {n} winner(s) to {args.file}")
    return 0


def cmd_import(args) -> int:
    """Exit status 1 when records were refused (the others are stored)."""
    with _open(args, create=True) as store:
        report = store.import_(args.file)
    for line in report.refused:
        print(f"refused {line}")
    print(f"imported {args.file}: {report.stored} winner(s) stored as imported, {report.kept_out} kept out "
          f"(the stored record is local, faster or newer), {len(report.refused)} refused")
    return 1 if report.refused else 0


def cmd_prune(args) -> int:
    current = current_template_hashes()
    hashes = current if args.fingerprint is None and args.older_than is None else None
    with _open(args) as store:
        age = timedelta(days=args.older_than) if args.older_than is not None else None
        doomed = store.prune(hashes, args.fingerprint, age, dry_run=args.dry_run)
        if doomed:
            print(_table(doomed, current)[0])
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{verb} {len(doomed)} winner(s)")
    return 0
