"""The tuning store on real databases: an SQLite file in tmp_path, and a PostgreSQL server
(``TUNEFORGE_TEST_PG_URL``; each test gets its own fresh database)."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import sqlite3
import uuid
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
import sqlalchemy as sa

from tuneforge.db.engine import default_url, normalize_url
from tuneforge.db.environment import Environment
from tuneforge.db.records import Winner, current_template_hashes, stale_reason
from tuneforge.db.schema import SCHEMA_VERSION
from tuneforge.db.store import Store
from tuneforge.db.transfer import ImportReport
from tuneforge.dsl import get
from tuneforge.dsl.problem import Problem
from tuneforge.errors import DatabaseError, InputError
from tuneforge.kernels import gemm as G
from tuneforge.dsl.devices import spec

H100 = Environment("NVIDIA H100 80GB HBM3", 132, 79.1, 8, "nvlink-or-pcie", "2.11.0", "3.6.0", "12.8", False)
H100_NEW_TORCH = replace(H100, torch_version="2.12.0")
H200 = replace(H100, gpu_name="NVIDIA H200", memory_gb=139.8)
H100_PREDICTED = Environment("H100", 132, 80.0, 8, "nvswitch:450GB/s", "2.13.0", "3.9.0", "cost-model", True)


def gemm(m: int, n: int = 1024, k: int = 512) -> Problem:
    return Problem.make("gemm", m=m, n=n, k=k)


def winner(problem: Problem, env: Environment = H100, time_s: float = 1e-5, template_hash: str = "h1",
           config: dict | None = None, created_at: datetime | None = None, source: str | None = None) -> Winner:
    baseline_s = 2e-5
    return Winner(problem, env, config if config is not None else {"BLOCK_M": 64, "num_warps": 4}, time_s,
                  baseline_s, baseline_s / time_s, 42.5, source or ("predicted" if env.predicted else "measured"),
                  template_hash, Store.study_name(problem, env), 30,
                  created_at or datetime.now(timezone.utc))


def real_config(problem: Problem, **changes) -> dict:
    """The template's default config for ``problem`` on an H100 (the space an import is checked against);
    for gemm the Triton kernel's tiles at every m (at 1-2 rows the template's default is a gemv config),
    whose parameters the tests change."""
    if problem.op == "gemm":
        return {"kernel": "triton", **G.default_config(problem, spec("H100")), **changes}
    return {**get(problem.op).default_config(problem, spec("H100")), **changes}


# ------------------------------------------------------------------------------ fixtures

def _postgres_base_url() -> str:
    url = os.environ.get("TUNEFORGE_TEST_PG_URL")
    if not url:
        if os.environ.get("CI"):
            pytest.fail("CI is set but TUNEFORGE_TEST_PG_URL is not: .ci/run must start PostgreSQL")
        pytest.skip("TUNEFORGE_TEST_PG_URL is not set (see .ci/run for a local PostgreSQL)")
    return url


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path):
    """A URL to an empty database of each kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'tuneforge.db'}"
        return
    base = sa.make_url(normalize_url(_postgres_base_url()))
    name = f"tf_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as c:
            c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture
def store(store_url):
    s = Store(store_url)
    yield s
    s.close()


# ------------------------------------------------------------------------------ basics

def test_winner_round_trip_and_plan(store):
    problems = [gemm(16), Problem.make("rmsnorm", m=16, n=5120), Problem.make("tp_mlp", world=8, m=16, hidden=5120,
                                                                               inter=25600)]
    stored = [winner(problems[0], config={"BLOCK_M": 64, "BLOCK_N": 128, "num_stages": 3, "tma": True}),
              winner(problems[1], config={"baseline": True}),
              winner(problems[2], config={"strategy": "ag_rs", "BLOCK_M": 32}, env=H100_PREDICTED)]
    for w in stored:
        assert store.record_winner(w)
    assert not store.record_winner(replace(stored[0], time_s=1.5e-5, config={"BLOCK_M": np.int64(32)}))
    store.add_plan("Qwen3-32B", 8, [(problems[0], "layer.mlp.down"), (problems[2], "layer.mlp")])
    store.add_plan("Qwen3-32B", 8, [(problems[0], "layer.mlp.down")])        # repeating a plan adds nothing

    got = {(w.key, w.fingerprint): w for w in store.winners()}
    assert got == {(w.key, w.fingerprint): w for w in stored}
    assert got[(problems[2].key, H100_PREDICTED.fingerprint)].strategy == "ag_rs"
    assert got[(problems[0].key, H100.fingerprint)].strategy is None
    assert all(w.created_at.tzinfo is not None for w in got.values())
    assert sorted(store.environments(), key=lambda e: e.fingerprint) == sorted([H100, H100_PREDICTED],
                                                                                 key=lambda e: e.fingerprint)
    assert store.models() == [("Qwen3-32B", 8)]
    assert sorted(store.plan("Qwen3-32B", 8), key=lambda x: x[1]) == [(problems[2], "layer.mlp"),
                                                                      (problems[0], "layer.mlp.down")]
    assert [w.key for w in store.winners(model="Qwen3-32B", tp=8)] == sorted([problems[0].key, problems[2].key])
    assert store.winners(model="Qwen3-32B", tp=4) == []
    assert [w.key for w in store.winners(op="rmsnorm")] == [problems[1].key]
    assert [w.key for w in store.winners(fingerprint=H100_PREDICTED.fingerprint)] == [problems[2].key]

    reopened = Store(store.url)                        # what was committed survives a new connection
    assert {(w.key, w.fingerprint): w for w in reopened.winners()} == got
    reopened.close()


def test_upsert_keeps_the_faster_record_per_problem_and_environment(store):
    p = gemm(64)
    assert store.record_winner(winner(p, time_s=2e-5, config={"BLOCK_M": 32}))
    assert not store.record_winner(winner(p, time_s=3e-5, config={"BLOCK_M": 16}))     # slower: kept out
    assert [w.config for w in store.winners()] == [{"BLOCK_M": 32}]
    assert store.record_winner(winner(p, time_s=1e-5, config={"BLOCK_M": 128}))        # faster: replaces
    assert store.record_winner(winner(p, env=H200, time_s=5e-5))                       # other env: own row
    rows = {w.fingerprint: w for w in store.winners()}
    assert len(rows) == 2 and rows[H100.fingerprint].config == {"BLOCK_M": 128}
    assert rows[H100.fingerprint].time_s == 1e-5


def test_upsert_replaces_a_record_of_another_template_by_the_newer_one(store):
    p = gemm(64)
    now = datetime.now(timezone.utc)
    assert store.record_winner(winner(p, time_s=1e-5, template_hash="old", created_at=now - timedelta(days=1)))
    # the kernel source changed: the new, slower winner replaces the stale one
    assert store.record_winner(winner(p, time_s=4e-5, template_hash="new", created_at=now))
    # an older record of another template (e.g. from an imported file) does not come back
    assert not store.record_winner(winner(p, time_s=1e-6, template_hash="old", created_at=now - timedelta(days=2)))
    [w] = store.winners()
    assert (w.template_hash, w.time_s) == ("new", 4e-5)


def test_write_errors_leave_nothing_behind(store):
    with pytest.raises(InputError, match="time_s"):
        store.record_winner(winner(gemm(8), time_s=float("nan")))
    with pytest.raises(InputError, match="pct_sol"):
        store.record_winner(replace(winner(gemm(8)), pct_sol=float("inf")))
    with pytest.raises(InputError, match="JSON"):
        store.record_winner(winner(gemm(8), config={"BLOCK_M": object()}))
    with pytest.raises(InputError, match="wrong types"):
        store.record_winner(winner(gemm(8), env=replace(H100, memory_gb=80)))
    with pytest.raises(InputError, match="source"):
        winner(gemm(8), source="guessed")
    assert store.winners() == [] and store.environments() == []


# ------------------------------------------------------------------------------ lookups

def test_best_serves_the_nearest_tuned_bucket(store):
    for m in (1, 16, 256):
        store.record_winner(winner(gemm(m), config={"BLOCK_M": m}))
    store.record_winner(winner(gemm(3000), config={"BLOCK_M": 3000}))   # an exact shape, not a bucket
    store.record_winner(winner(gemm(16, n=2048), config={"other": "n"}))

    def served(m, **kw):
        w = store.best(gemm(m), H100, **kw)
        return None if w is None else w.problem["m"]

    assert served(16) == 16                    # exact
    assert served(0) == 1
    assert served(9) == 16                     # smallest tuned bucket >= m
    assert served(17) == 256
    assert served(3000) == 3000                # an exact tuned shape serves itself
    assert served(2000) is None                # ... but no other m; above every bucket: the baseline
    assert served(2000, buckets=None) == 3000  # unless every tuned m counts
    assert served(16, buckets=(1, 256)) == 16
    assert served(17, buckets=(1,)) is None
    assert store.best(gemm(16, k=4096), H100) is None            # other dims are another shape
    assert store.best(gemm(16), H200) is None                    # other environment
    assert store.best(Problem.make("gemm", dtype="fp16", m=16, n=1024, k=512), H100) is None
    assert store.best(gemm(16, n=2048), H100).config == {"other": "n"}


def test_best_without_a_token_dim_needs_the_exact_shape(store):
    p = Problem.make("decode_attention", heads=8, kv_heads=1, head_dim=128, ctx=4096)
    store.record_winner(winner(p, config={"baseline": True}))
    assert store.best(p, H100).config == {"baseline": True}
    assert store.best(Problem.make("decode_attention", heads=8, kv_heads=1, head_dim=128, ctx=8192), H100) is None


def test_stale_records_are_reported_and_never_returned(store):
    store.record_winner(winner(gemm(16), template_hash="old"))
    store.record_winner(winner(gemm(32), template_hash="current"))
    store.record_winner(winner(Problem.make("rmsnorm", m=16, n=5120), template_hash="whatever"))
    store.record_winner(winner(gemm(64), env=H200))                     # another GPU: not ours, not stale

    # template changed: gemm m=16 is stale, m=32 usable; ops without a current hash are not judged
    assert store.best(gemm(16), H100, template_hash="current", buckets=None).problem["m"] == 32
    assert store.best(gemm(16), H100, template_hash="current", buckets=(16,)) is None
    usable, stale = store.load_winners(H100, {"gemm": "current"})
    assert sorted(usable) == sorted([gemm(32).key, Problem.make("rmsnorm", m=16, n=5120).key])
    assert [(w.key, "template gemm changed" in why and "old" in why) for w, why in stale] == [(gemm(16).key, True)]

    # the versions changed: nothing recorded under the old fingerprint is used, all of it is reported
    assert store.best(gemm(32), H100_NEW_TORCH) is None
    usable, stale = store.load_winners(H100_NEW_TORCH, {"gemm": "current"})
    assert usable == {}
    assert len(stale) == 3 and all("torch_version 2.11.0 (now 2.12.0)" in why for _, why in stale)

    # once the new environment has its own winner for a problem, the old record is no longer news
    store.record_winner(winner(gemm(32), env=H100_NEW_TORCH, template_hash="current"))
    usable, stale = store.load_winners(H100_NEW_TORCH, {"gemm": "current"})
    assert list(usable) == [gemm(32).key] and len(stale) == 2


# ------------------------------------------------------------------------------ sharing, pruning

@pytest.mark.parametrize("ext", ["csv", "json"])
def test_export_import_round_trip(store, tmp_path, ext):
    # the moe_gemm problem's act=0 is a flag, not a size: it travels like any dim
    down = Problem.make("moe_gemm", m=4, n=256, k=128, experts=8, topk=2, act=0)
    problems = [gemm(1), gemm(16), Problem.make("allreduce", world=8, m=16, n=5120), down]
    store.record_winner(winner(problems[0], config=real_config(problems[0], tma=False)))
    store.record_winner(winner(problems[1], env=H100_PREDICTED, config={"baseline": True}))
    store.record_winner(winner(problems[2], config=real_config(problems[2]), time_s=1 / 3 * 1e-5))
    store.record_winner(winner(down, config=real_config(down)))
    store.add_plan("Qwen3-32B", 8, [(problems[1], "layer.mlp.down"), (problems[2], "layer.attn.o_allreduce")])
    path = tmp_path / f"winners.{ext}"
    assert store.export(path) == 4

    with Store(tmp_path / "copy.db") as copy:
        assert copy.import_(path) == ImportReport(4, 0, [])
        # floats, configs, times: exact; kept apart as imported
        assert copy.winners() == [replace(w, origin="imported") for w in store.winners()]
        assert copy.plan("Qwen3-32B", 8) == store.plan("Qwen3-32B", 8)
        assert copy.import_(path) == ImportReport(0, 4, [])            # merging the same file again: no change

        # between imported records a faster one from another cluster's file wins; a slower one does not
        with Store(tmp_path / "other.db") as other:
            other.record_winner(winner(problems[0], time_s=5e-6, config=real_config(problems[0], block_n=128)))
            other.record_winner(winner(problems[2], time_s=9e-5, config=real_config(problems[2])))
            other.export(tmp_path / f"other.{ext}")
        assert copy.import_(tmp_path / f"other.{ext}") == ImportReport(1, 1, [])
        merged = {w.key: w for w in copy.winners(fingerprint=H100.fingerprint)}
        assert merged[problems[0].key].config == real_config(problems[0], block_n=128)
        assert merged[problems[2].key].time_s == 1 / 3 * 1e-5


def test_import_refuses_bad_records_one_line_each_and_never_displaces_local_ones(store, tmp_path):
    local, claimed = gemm(1), gemm(2)
    store.record_winner(winner(local, time_s=1e-5, config=real_config(local)))
    with Store(tmp_path / "source.db") as source:
        for m in (1, 2, 4, 8, 16, 32):
            source.record_winner(winner(gemm(m), config=real_config(gemm(m))))
        source.export(tmp_path / "w.json")
    records = json.loads((tmp_path / "w.json").read_text())
    records[0]["time_s"] = 1e-9                              # gemm m=1: a 1 ns claim against a local record
    records[1]["config"]["block_m"] = 3                      # outside the space
    records[2]["time_s"] = -1.0
    records[3]["gpu_name"] = "H999"                          # the environment no longer matches its fingerprint
    records[4]["problem_key"] = "gemm|m=16"
    (tmp_path / "bad.json").write_text(json.dumps(records))

    report = store.import_(tmp_path / "bad.json")
    assert report.stored == 1 and report.kept_out == 1, report      # gemm m=32 is stored; m=1 stays local
    assert [line.split(":")[0] for line in report.refused] == [
        f"record 2 ({claimed.key})", f"record 3 ({gemm(4).key})", f"record 4 ({gemm(8).key})",
        "record 5 (gemm|m=16)"]
    assert "block_m=3 is not one of [16, 32, 64, 128, 256]" in report.refused[0]
    assert report.refused[1] == f"record 3 ({gemm(4).key}): time_s must be a positive finite number, got -1.0"
    assert "fingerprint" in report.refused[2] and "malformed problem key" in report.refused[3]
    assert all("\n" not in line for line in report.refused)
    got = {w.key: w for w in store.winners()}
    assert sorted(got) == sorted([local.key, gemm(32).key])
    assert (got[local.key].origin, got[local.key].time_s) == ("local", 1e-5)
    assert got[gemm(32).key].origin == "imported"

    # a config that breaks a constraint on the recorded device, and an op no template knows, are refused too
    records = json.loads((tmp_path / "w.json").read_text())[:2]
    records[0]["config"] = real_config(gemm(1), block_m=256, block_n=256, block_k=256, num_stages=5)
    records[1]["op"] = "nosuchop"
    records[1]["problem_key"] = records[1]["problem_key"].replace("gemm", "nosuchop")
    records[1]["study_name"] = "x"
    (tmp_path / "bad2.json").write_text(json.dumps(records))
    report = store.import_(tmp_path / "bad2.json")
    assert report.stored == 0 and len(report.refused) == 2, report
    assert "nosuchop" in report.refused[1]


def test_local_records_replace_imported_ones_and_never_the_reverse(store):
    p = gemm(64)
    imported = winner(p, time_s=1e-9, config=real_config(p))
    imported.origin = "imported"
    assert store.record_winner(imported)
    assert store.record_winner(winner(p, time_s=3e-5, config=real_config(p)))      # local, slower: still replaces
    assert not store.record_winner(replace(imported, time_s=1e-12))               # imported: never displaces it
    [w] = store.winners()
    assert (w.origin, w.time_s) == ("local", 3e-5)


def test_import_file_errors_are_one_line_and_write_nothing(store, tmp_path):
    (tmp_path / "notes.json").write_text('{"hello": ')
    with pytest.raises(InputError, match="not a tuneforge JSON export"):
        store.import_(tmp_path / "notes.json")
    (tmp_path / "cols.csv").write_text("problem_key,op\ngemm|m=1|bf16|w1,gemm\n")
    with pytest.raises(InputError, match="missing columns"):
        store.import_(tmp_path / "cols.csv")
    with pytest.raises(InputError, match="use .csv or .json"):
        store.import_(tmp_path / "winners.xlsx")
    assert store.winners() == [] and store.environments() == []


def test_an_edited_environment_row_is_untrusted(store):
    p = gemm(16)
    store.record_winner(winner(p, config=real_config(p), template_hash=get("gemm").source_hash))
    store.record_winner(winner(gemm(32), env=H200, config=real_config(gemm(32)), template_hash=get("gemm").source_hash))
    engine = sa.create_engine(normalize_url(store.url))
    with engine.begin() as c:     # someone "fixes" the torch version in place: the fingerprint no longer fits
        c.execute(sa.text("UPDATE tf_environment SET torch_version = '2.12.0' WHERE fingerprint = :f"),
                  {"f": H100.fingerprint})
    engine.dispose()

    [w] = store.winners(fingerprint=H100.fingerprint)
    assert w.env_edited and w.fingerprint == H100.fingerprint
    assert stale_reason(w).startswith("environment fields edited")
    usable, stale = store.load_winners(H100, current_template_hashes())
    assert usable == {} and [(s.key, why.split(" (")[0]) for s, why in stale] == [(p.key, "environment fields edited")]
    usable, stale = store.load_winners(H100_NEW_TORCH, current_template_hashes())   # what the fields now claim
    assert usable == {} and [why.split(" (")[0] for _, why in stale] == ["environment fields edited"]
    assert store.best(p, H100) is None
    assert store.environments() == [H200]
    assert list(store.to_frame()["fingerprint"]) == [H200.fingerprint]
    assert [w.key for w in store.prune(current_template_hashes())] == [p.key]
    assert [w.fingerprint for w in store.winners()] == [H200.fingerprint]


def test_prune(store):
    now = datetime.now(timezone.utc)
    store.record_winner(winner(gemm(1), template_hash="old", created_at=now - timedelta(days=40)))
    store.record_winner(winner(gemm(2), template_hash="current", created_at=now - timedelta(days=40)))
    store.record_winner(winner(Problem.make("rmsnorm", m=1, n=64), template_hash="x"))   # op not judged
    store.record_winner(winner(gemm(1), env=H200, template_hash="current"))

    def keys(ws):
        return sorted((w.key, w.env.gpu_name) for w in ws)

    with pytest.raises(InputError, match="criterion"):
        store.prune()
    before = store.winners()
    assert keys(store.prune({"gemm": "current"}, dry_run=True)) == [(gemm(1).key, H100.gpu_name)]
    assert store.winners() == before
    assert keys(store.prune(older_than=timedelta(days=30), dry_run=True)) == [(gemm(1).key, H100.gpu_name),
                                                                             (gemm(2).key, H100.gpu_name)]
    # criteria combine: old AND of H200 -> nothing
    assert store.prune(fingerprint=H200.fingerprint, older_than=timedelta(days=30)) == []
    assert keys(store.prune({"gemm": "current"})) == [(gemm(1).key, H100.gpu_name)]
    assert keys(store.prune(fingerprint=H200.fingerprint)) == [(gemm(1).key, H200.gpu_name)]
    assert keys(store.winners()) == [(gemm(2).key, H100.gpu_name),
                                     (Problem.make("rmsnorm", m=1, n=64).key, H100.gpu_name)]
    assert store.environments() == [H100]          # the emptied environment went too


# ------------------------------------------------------------------------------ Optuna

def test_optuna_shares_the_database(store):
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store.record_winner(winner(gemm(16)))
    name = store.study_name(gemm(16), H100)
    study = optuna.create_study(storage=store.optuna_storage(), study_name=name)
    study.optimize(lambda t: (t.suggest_int("BLOCK_M", 16, 128) - 64) ** 2, n_trials=4)
    loaded = optuna.load_study(study_name=name, storage=store.optuna_storage())
    assert len(loaded.trials) == 4 and loaded.best_value == study.best_value
    with Store(store.url) as again:         # Optuna's tables do not make the database look foreign
        assert [w.study_name for w in again.winners()] == [name]


# ------------------------------------------------------------------------------ refusals

def _one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text and len(text) < 300, text
    return text


def _refusal(store_url, *statements: str) -> str:
    """The one-line DatabaseError that opening the store gives once ``statements`` ran on its database."""
    engine = sa.create_engine(normalize_url(store_url))
    with engine.begin() as c:
        for statement in statements:
            c.execute(sa.text(statement))
    engine.dispose()
    with pytest.raises(DatabaseError) as e:
        Store(store_url)
    return _one_line(e)


def test_newer_schema_is_refused(store_url):
    Store(store_url).close()
    newer = f"UPDATE tf_meta SET value = '{SCHEMA_VERSION + 1}' WHERE key = 'schema_version'"
    assert f"schema version {SCHEMA_VERSION + 1}, newer" in _refusal(store_url, newer)


def test_a_version_1_database_is_migrated_and_older_ones_refused(store_url):
    with Store(store_url) as store:
        store.record_winner(winner(gemm(16)))
    engine = sa.create_engine(normalize_url(store_url))
    with engine.begin() as c:     # what tuneforge with schema version 1 wrote: winners without an origin
        c.execute(sa.text("ALTER TABLE tf_winner DROP COLUMN origin"))
        c.execute(sa.text("UPDATE tf_meta SET value = '1' WHERE key = 'schema_version'"))
    with Store(store_url) as store:
        assert [(w.key, w.origin) for w in store.winners()] == [(gemm(16).key, "local")]
    with engine.begin() as c:
        assert c.execute(sa.text("SELECT value FROM tf_meta")).scalar() == str(SCHEMA_VERSION)
    engine.dispose()
    older = "UPDATE tf_meta SET value = '0' WHERE key = 'schema_version'"
    assert "schema version 0, older than any" in _refusal(store_url, older)


def test_foreign_database_is_refused(store_url):
    message = _refusal(store_url, "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    assert "not a tuneforge database" in message and "customers" in message


def test_damaged_tuneforge_database_is_refused(store_url):
    Store(store_url).close()
    assert "damaged" in _refusal(store_url, "DROP TABLE tf_meta")


@pytest.mark.parametrize("content", [b"id,name\n1,alice\n", bytes(range(256)) * 8])
def test_corrupt_sqlite_file_is_refused(tmp_path, content):
    path = tmp_path / "x.db"
    path.write_bytes(content)
    with pytest.raises(DatabaseError) as e:
        Store(str(path))
    assert "not an SQLite database" in _one_line(e)
    assert path.read_bytes() == content                  # and left untouched


def test_bad_urls_are_refused_in_one_line(tmp_path):
    for url, says in [("nosuchdb://host/x", "unknown database kind"),
                      (str(tmp_path), "is a directory"),
                      (str(tmp_path / "missing" / "x.db"), "does not exist")]:
        with pytest.raises(DatabaseError) as e:
            Store(url)
        assert says in _one_line(e)
    with pytest.raises(DatabaseError) as e:
        Store(str(tmp_path / "absent.db"), create=False)
    assert "no tuneforge database" in _one_line(e)


def test_default_url(tmp_path, monkeypatch):
    monkeypatch.delenv("TUNEFORGE_DB", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_url() == f"sqlite:///{tmp_path / 'data' / 'tuneforge' / 'tuneforge.db'}"
    assert (tmp_path / "data" / "tuneforge").is_dir()
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_url() == f"sqlite:///{tmp_path / 'home' / '.local' / 'share' / 'tuneforge' / 'tuneforge.db'}"
    monkeypatch.setenv("TUNEFORGE_DB", "relative/t.db")
    monkeypatch.chdir(tmp_path)
    assert default_url() == f"sqlite:///{tmp_path / 'relative' / 't.db'}"
    monkeypatch.setenv("TUNEFORGE_DB", "postgresql+psycopg2://u@h/db")
    assert default_url() == "postgresql+psycopg2://u@h/db"


def test_sqlite_runs_in_wal_mode(tmp_path):
    Store(tmp_path / "w.db").close()
    with sqlite3.connect(tmp_path / "w.db") as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# ------------------------------------------------------------------------------ concurrency

SHARED_KEYS = 20


def _write_winners(url: str, worker: int, count: int) -> None:
    """One tuner process: ``count`` problems of its own, plus the shared ones both processes race on."""
    store = Store(url)
    for i in range(count):
        store.record_winner(winner(gemm(i + 1, n=1000 + worker), config={"worker": worker, "i": i}))
        if i < SHARED_KEYS:
            store.record_winner(winner(gemm(i + 1, n=7), time_s=(2 + worker + i) * 1e-6, config={"worker": worker}))
    store.close()


def test_two_writer_processes_lose_nothing(store_url):
    count = 200
    ctx = mp.get_context("spawn")
    workers = [ctx.Process(target=_write_winners, args=(store_url, w, count)) for w in (0, 1)]
    for p in workers:       # both open the fresh database at once: the schema is created exactly once
        p.start()
    for p in workers:
        p.join(timeout=240)
        assert p.exitcode == 0, f"writer process failed (exit code {p.exitcode})"
    with Store(store_url) as store:
        got = store.winners()
    own = {(w.problem["n"], w.problem["m"]) for w in got if w.problem["n"] != 7}
    assert own == {(1000 + w, i + 1) for w in (0, 1) for i in range(count)}
    shared = {w.problem["m"]: w for w in got if w.problem["n"] == 7}
    assert sorted(shared) == list(range(1, SHARED_KEYS + 1))
    # the faster record (worker 0's) won every race
    assert all(w.config == {"worker": 0} and w.time_s == (2 + m - 1) * 1e-6 for m, w in shared.items())
