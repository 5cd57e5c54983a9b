"""Several tuners at once on one database, as a cluster's hosts run them: four real processes start
tuning the same tiny Qwen3 at the same instant on a NEW database (an SQLite file, and PostgreSQL
when ``TUNEFORGE_TEST_PG_URL`` is set). None may crash (Optuna's schema creation raced:
``UNIQUE constraint failed: alembic_version.version_num``, ``table trial_values already exists``),
no study may hold two trials with one number (trials appended without Optuna's locking), and every
planned problem must end with its winner."""
import multiprocessing as mp

import sqlalchemy as sa

from test_store import store_url  # noqa: F401  (an empty database of each kind, dropped afterwards)

from tuneforge.db.store import Store
from tuneforge.tune.plan import plan

TUNERS = 4
TRIALS = 4


def _tune(url: str, config_path: str, start, planned) -> None:
    """One tuner process: everything imported and planned first, then all start together; reports
    the problems its plan has a template for."""
    from tuneforge.tune.tuner import Tuner, TuneOptions
    p = plan(config_path, 1, decode_buckets=[1], prefill_buckets=[])
    start.wait(timeout=300)
    store = Store(url)
    report = Tuner(store, TuneOptions(target="H100", trials=TRIALS, progress=None)).tune(p)
    store.close()
    failed = [f"{r.problem}: {r.note}" for r in report.rows if r.status == "no-winner"]
    if failed:
        raise SystemExit(f"problems without a winner: {failed}")
    planned.put(sorted(i.key for i in p.tunable))


def test_four_tuners_at_once_on_a_new_database(store_url, tiny_config):  # noqa: F811
    ctx = mp.get_context("spawn")
    start, planned = ctx.Barrier(TUNERS), ctx.Queue()
    workers = [ctx.Process(target=_tune, args=(store_url, str(tiny_config), start, planned)) for _ in range(TUNERS)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
    assert [w.exitcode for w in workers] == [0] * TUNERS
    plans = [planned.get(timeout=10) for _ in range(TUNERS)]

    engine = sa.create_engine(store_url)
    with engine.connect() as c:
        duplicates = c.exec_driver_sql("SELECT study_id, number, count(*) FROM trials GROUP BY study_id, number "
                                       "HAVING count(*) > 1").all()
        numbers = c.exec_driver_sql("SELECT study_id, count(*), min(number), max(number) FROM trials "
                                    "GROUP BY study_id").all()
    engine.dispose()
    assert duplicates == []
    assert numbers and all(lo == 0 and hi == n - 1 for _, n, lo, hi in numbers)     # 0..n-1, no gaps
    with Store(store_url) as store:
        won = {w.key for w in store.winners(model="tiny-qwen3", tp=1)}
    assert plans[0] and all(won >= set(keys) for keys in plans)
