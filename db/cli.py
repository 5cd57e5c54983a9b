"""`tuneforge db list | show KEY | export FILE | import FILE | prune`: browse, share and clean the
tuning database. Every command first prints which database it uses."""
from __future__ import annotations

import argparse
import json
from datetime import timedelta

from tuneforge.db.store import Store, Winner, display_url, normalize_url, default_url
from tuneforge.errors import InputError

LIST_COLUMNS = ["problem", "measured/predicted", "device", "fingerprint", "strategy", "time_us", "baseline_us",
                "speedup", "pct_sol", "config"]


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
                           description="Delete winners recorded with another template source than the "
                                       "current kernels (the default), or those of --fingerprint and/or "
                                       "older than --older-than days.")
    a.add_argument("--fingerprint", help="delete this environment's winners")
    a.add_argument("--older-than", type=float, metavar="DAYS", help="delete winners older than DAYS")
    a.add_argument("--dry-run", action="store_true", help="only show what would be deleted")
    a.set_defaults(func=cmd_prune)


def _open(args, create: bool = False) -> Store:
    url = normalize_url(args.db) if getattr(args, "db", None) else default_url()
    print(f"database: {display_url(url)}")
    return Store(url, create=create)


def _table(winners: list[Winner]) -> str:
    """One row per winner; text left-aligned, numbers right-aligned (pandas aligns all text right)."""
    rows = [[w.key, w.source, w.env.label, w.fingerprint, w.strategy or "-", w.time_s * 1e6, w.baseline_s * 1e6,
             w.speedup, w.pct_sol, _short(json.dumps(w.config, sort_keys=True))] for w in winners]
    cells = [[f"{v:.4g}" if isinstance(v, float) else str(v) for v in r] for r in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(LIST_COLUMNS)]
    numeric = [isinstance(v, float) for v in rows[0]] if rows else [False] * len(LIST_COLUMNS)

    def line(values):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()
    return "\n".join([line(LIST_COLUMNS), *map(line, cells)])


def _short(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def cmd_list(args) -> int:
    with _open(args) as store:
        winners = store.winners(fingerprint=args.fingerprint, model=args.model, tp=args.tp, op=args.op)
        if not winners:
            print("no winners stored" + (" matching the filters" if any(
                (args.fingerprint, args.model, args.tp, args.op)) else ""))
            return 0
        print(_table(winners))
        print(f"{len(winners)} winner(s)")
    return 0


def cmd_show(args) -> int:
    with _open(args) as store:
        winners = store.winners(key=args.key)
        if not winners:
            raise InputError(f"no winner stored for problem {args.key!r} (see `tuneforge db list`)")
        for w in winners:
            print(f"\n{w.key}  [{w.source}]")
            fields = {"device": w.env.label, "fingerprint": w.fingerprint, **w.env.to_dict(),
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
    with _open(args, create=True) as store:
        n = store.import_(args.file)
    print(f"imported {args.file}: {n} winner(s) stored (the others were slower or older than the stored ones)")
    return 0


def cmd_prune(args) -> int:
    hashes = None
    if args.fingerprint is None and args.older_than is None:
        from tuneforge.dsl import all_templates
        hashes = {op: t.source_hash for op, t in all_templates().items()}
    with _open(args) as store:
        age = timedelta(days=args.older_than) if args.older_than is not None else None
        doomed = store.prune(hashes, args.fingerprint, age, dry_run=args.dry_run)
        if doomed:
            print(_table(doomed))
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{verb} {len(doomed)} winner(s)")
    return 0
