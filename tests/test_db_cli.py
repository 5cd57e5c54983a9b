"""`tuneforge db ...` run as a user runs it, on real SQLite files: the installed command in a subprocess,
or (``run_main``, to keep the suite fast) the same entry point in this process."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import json
from dataclasses import replace

import pytest
import sqlalchemy as sa

from tuneforge.db.store import Store
from tuneforge.dsl import all_templates, get
from tuneforge.dsl.problem import Problem
from tuneforge.dsl.devices import spec

from test_store import H100, H100_PREDICTED, H200, gemm, real_config, winner

TUNEFORGE = shutil.which("tuneforge") or str(Path(sys.executable).with_name("tuneforge"))


def tuneforge(*args: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "xdg"), **env}   # never the user's own database
    if "TUNEFORGE_DB" not in env:
        environ.pop("TUNEFORGE_DB", None)
    return subprocess.run([TUNEFORGE, *args], capture_output=True, text=True, env=environ, timeout=120)


@pytest.fixture
def run_main(tmp_path, monkeypatch, capsys):
    """``tuneforge ARGS`` in this process (fast: no interpreter start-up), never the user's own
    database: -> (exit status, stdout, stderr)."""
    from tuneforge.cli import main
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("TUNEFORGE_DB", raising=False)

    def run(*args: str):
        code = main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err
    return run


def test_list_show_export_import(tmp_path, run_main, monkeypatch):
    a, b = tmp_path / "a.db", tmp_path / "b.db"
    tp_mlp = Problem.make("tp_mlp", world=8, m=64, hidden=5120, inter=25600)
    config = real_config(gemm(16))
    with Store(a) as store:
        store.record_winner(winner(gemm(16), config=config, template_hash="abc123"))
        store.record_winner(winner(gemm(16), env=H100_PREDICTED, config={"baseline": True}))
        ag_rs = next(c for c in get("tp_mlp").space(tp_mlp).enumerate()     # the first valid ag_rs config
                     if c["strategy"] == "ag_rs" and get("tp_mlp").reject_reason(c, tp_mlp, spec("H100")) is None)
        store.record_winner(winner(tp_mlp, config=ag_rs))
        store.add_plan("Qwen3-32B", 8, [(tp_mlp, "layer.mlp")])

    listed = tuneforge("db", "--db", str(a), "list", "--wide", tmp_path=tmp_path)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0] == f"database: sqlite:///{a}"
    assert lines[1].split()[:3] == ["problem", "source", "origin"]
    rows = {tuple(line.split()[:3]) for line in lines[2:-1]}
    assert rows == {(gemm(16).key, "measured", "local"), (gemm(16).key, "predicted", "local"),
                    (tp_mlp.key, "measured", "local")}
    assert "ag_rs" in listed.stdout and lines[-1].startswith("3 winner(s) in 2 environment(s)")

    code, shown, err = run_main("db", "show", gemm(16).key, "--db", str(a))
    assert code == 0, err
    assert shown.startswith(f"database: sqlite:///{a}")
    assert "[measured, local]" in shown and "[predicted, local]" in shown
    assert json.dumps(config, sort_keys=True) in shown and "abc123" in shown

    exported = tuneforge("db", "--db", str(a), "export", str(tmp_path / "w.json"), tmp_path=tmp_path)
    assert exported.returncode == 0 and "exported 3 winner(s)" in exported.stdout, exported.stderr
    # the database named by $TUNEFORGE_DB (a bare path), created by the import
    imported = tuneforge("db", "import", str(tmp_path / "w.json"), tmp_path=tmp_path, TUNEFORGE_DB=str(b))
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.splitlines()[0] == f"database: sqlite:///{b}"
    assert "3 winner(s) stored as imported, 0 kept out" in imported.stdout and "0 refused" in imported.stdout
    with Store(a) as sa_, Store(b) as sb:
        assert sb.winners() == [replace(w, origin="imported") for w in sa_.winners()]
        assert sb.plan("Qwen3-32B", 8) == [(tp_mlp, "layer.mlp")]
    monkeypatch.setenv("COLUMNS", "120")
    code, out, err = run_main("db", "--db", str(b), "list")
    assert code == 0, err
    header = out.splitlines()[2].split()
    assert header[header.index("origin") + 1:] == ["stale", "config"] and "  imported  " in out


def test_list_fits_the_terminal_sorts_by_shape_and_marks_stale_winners(tmp_path, run_main, monkeypatch):
    path = tmp_path / "l.db"
    current = get("gemm").source_hash
    fresh = [gemm(m, n=n) for n in (1024, 256) for m in (16, 2)]
    with Store(path) as store:
        for p in fresh:
            store.record_winner(winner(p, config=real_config(p), template_hash=current))
        store.record_winner(winner(gemm(4, n=256), config=real_config(gemm(4)), template_hash="0ld50urce"))
        store.record_winner(winner(gemm(8), env=H200, config=real_config(gemm(8)), template_hash=current))
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.begin() as c:     # an edited environment row: its fields no longer hash to its fingerprint
        c.execute(sa.text("UPDATE tf_environment SET sm_count = 144 WHERE fingerprint = :f"), {"f": H200.fingerprint})
    engine.dispose()

    monkeypatch.setenv("COLUMNS", "100")
    code, out, err = run_main("db", "--db", str(path), "list")
    assert code == 0, err
    lines = out.splitlines()
    assert all(len(line) <= 100 for line in lines[:-1]), out
    h100 = lines.index(next(line for line in lines if line.startswith(H100.gpu_name)))
    assert lines[h100] == f"{H100.gpu_name} x8 (measured), fingerprint {H100.fingerprint}: 5 winner(s)"
    assert lines[h100 + 1].split() == ["problem", "time_us", "speedup", "trials", "stale", "config"]
    rows = [line.split() for line in lines[h100 + 2:h100 + 7]]
    # by op, then the other dims as numbers (n=256 before n=1024), then the token count
    assert [r[0] for r in rows] == [gemm(2, n=256).key, gemm(4, n=256).key, gemm(16, n=256).key,
                                    gemm(2).key, gemm(16).key]
    assert [r[4] for r in rows] == ["-", "stale", "-", "-", "-"]
    h200 = next(line for line in lines if line.startswith(H200.gpu_name))
    assert lines[lines.index(h200) + 2].split()[4] == "stale"
    assert lines[-1].startswith("6 winner(s) in 2 environment(s); 2 stale (never used for dispatch")

    code, wide, err = run_main("db", "--db", str(path), "list", "--wide")
    assert code == 0, err
    assert "template gemm changed since tuning (hash 0ld50urce" in wide
    assert f"environment fields edited (recorded as {H200.fingerprint}" in wide
    assert json.dumps(real_config(gemm(16)), sort_keys=True) in wide        # configs in full

    code, pruned, err = run_main("db", "--db", str(path), "prune")
    assert code == 0 and pruned.rstrip().endswith("deleted 2 winner(s)"), pruned
    with Store(path) as store:
        assert sorted(w.key for w in store.winners()) == sorted(p.key for p in fresh)


def test_import_refuses_configs_outside_the_space_one_line_each(tmp_path, run_main):
    source, target = tmp_path / "s.db", tmp_path / "t.db"
    with Store(source) as store:
        for m in (1, 2):
            store.record_winner(winner(gemm(m), config=real_config(gemm(m))))
        store.export(tmp_path / "w.json")
    with Store(target) as store:         # tuned here, and slower than the file claims
        store.record_winner(winner(gemm(2), time_s=5e-5, config=real_config(gemm(2))))
    records = json.loads((tmp_path / "w.json").read_text())
    records[0]["config"]["block_m"] = 3
    records[1]["time_s"] = 1e-9
    (tmp_path / "w.json").write_text(json.dumps(records))

    code, out, err = run_main("db", "--db", str(target), "import", str(tmp_path / "w.json"))
    assert code == 1, err
    lines = out.splitlines()
    assert lines[1].startswith(f"refused record 1 ({gemm(1).key}): gemm config {{")
    assert lines[1].endswith("block_m=3 is not one of [16, 32, 64, 128, 256]")
    assert lines[2] == (f"imported {tmp_path / 'w.json'}: 0 winner(s) stored as imported, 1 kept out "
                        f"(the stored record is local, faster or newer), 1 refused")
    with Store(target) as store:
        assert [(w.key, w.origin, w.time_s) for w in store.winners()] == [(gemm(2).key, "local", 5e-5)]


def test_reading_commands_create_no_database(tmp_path, run_main):
    code, out, err = run_main("db", "list")
    default = tmp_path / "xdg" / "tuneforge" / "tuneforge.db"
    assert (code, out, err) == (2, f"database: sqlite:///{default}\n",
                                f"tuneforge: error: no tuneforge database at {default}\n")
    for action in (["list"], ["show", gemm(1).key], ["export", str(tmp_path / "w.json")], ["prune"]):
        code, _, err = run_main("db", "--db", str(tmp_path / "none.db"), *action)
        assert code == 2 and err.count("\n") == 1 and "no tuneforge database" in err
    assert list(tmp_path.iterdir()) == []          # neither the files nor the default folder


@pytest.mark.parametrize("args,says", [
    (["--target", "TPU9"], "unknown target device 'TPU9'"),
    (["--backend", "measure"], "--backend measure needs a GPU"),
    (["--summary-json", "/nonexistent/s.json"], "cannot write /nonexistent/s.json"),
    (["--seed", "-1"], "--seed must be in"),
])
def test_bad_tune_arguments_are_refused_before_the_database_is_touched(tmp_path, run_main, args, says):
    if "measure" in args:
        import torch
        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU: --backend measure is valid here")
    for db in (["--db", str(tmp_path / "t.db")], []):        # a named file, and the default location
        code, out, err = run_main("tune", "--model", "Qwen3-32B", *db, *args)
        assert code == 2 and out == "", out                  # not even the plan was printed
        assert err.startswith("tuneforge: error: ") and says in err and err.count("\n") == 1
        assert list(tmp_path.iterdir()) == []


def test_prune(tmp_path):
    path = tmp_path / "p.db"
    op, template = sorted(all_templates().items())[0]
    current = Problem(op, (("m", 16), ("n", 256)), "bf16", 1)
    stale = current.with_dims(m=32)
    with Store(path) as store:
        store.record_winner(winner(current, template_hash=template.source_hash))
        store.record_winner(winner(stale, template_hash="0ld50urce"))
        store.record_winner(winner(current, env=H200, template_hash=template.source_hash))

    dry = tuneforge("db", "--db", str(path), "prune", "--dry-run", tmp_path=tmp_path)
    assert dry.returncode == 0, dry.stderr
    assert stale.key in dry.stdout and current.key not in dry.stdout
    assert dry.stdout.rstrip().endswith("would delete 1 winner(s)")
    with Store(path) as store:
        assert len(store.winners()) == 3

    pruned = tuneforge("db", "--db", str(path), "prune", "--fingerprint", H200.fingerprint, tmp_path=tmp_path)
    assert pruned.returncode == 0 and pruned.stdout.rstrip().endswith("deleted 1 winner(s)"), pruned.stderr
    with Store(path) as store:
        assert sorted((w.key, w.fingerprint) for w in store.winners()) == sorted(
            [(current.key, H100.fingerprint), (stale.key, H100.fingerprint)])


@pytest.mark.parametrize("case", ["unknown-url", "corrupt-file", "unknown-key"])
def test_errors_are_one_line_without_traceback(tmp_path, case):
    corrupt = tmp_path / "x.db"
    corrupt.write_text("this is a text file, not a database\n")
    known = tmp_path / "known.db"
    Store(known).close()
    args, says = {
        "unknown-url": (["--db", "nosuchdb://host/x", "list"], "unknown database kind"),
        "corrupt-file": (["--db", str(corrupt), "list"], "not an SQLite database"),
        "unknown-key": (["--db", str(known), "show", "gemm|m=1|bf16|w1"], "no winner stored"),
    }[case]
    result = tuneforge("db", *args, tmp_path=tmp_path)
    assert result.returncode == 2
    assert result.stdout.startswith("database: ")
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("tuneforge: error: "), result.stderr
    assert says in result.stderr and "Traceback" not in result.stderr
