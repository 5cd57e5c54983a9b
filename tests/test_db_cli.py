"""`tuneforge db ...` run as a user runs it: the installed command in a subprocess, on real SQLite files."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tuneforge.db.store import Store
from tuneforge.dsl import all_templates
from tuneforge.dsl.problem import Problem

from test_store import H100, H100_PREDICTED, H200, gemm, winner

TUNEFORGE = shutil.which("tuneforge") or str(Path(sys.executable).with_name("tuneforge"))


def tuneforge(*args: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "xdg"), **env}   # never the user's own database
    if "TUNEFORGE_DB" not in env:
        environ.pop("TUNEFORGE_DB", None)
    return subprocess.run([TUNEFORGE, *args], capture_output=True, text=True, env=environ, timeout=120)


def test_list_show_export_import(tmp_path):
    a, b = tmp_path / "a.db", tmp_path / "b.db"
    tp_mlp = Problem.make("tp_mlp", world=8, m=64, hidden=5120, inter=25600)
    with Store(a) as store:
        store.record_winner(winner(gemm(16), config={"BLOCK_M": 64, "num_warps": 4}, template_hash="abc123"))
        store.record_winner(winner(gemm(16), env=H100_PREDICTED, config={"baseline": True}))
        store.record_winner(winner(tp_mlp, config={"strategy": "ag_rs", "BLOCK_M": 128}))
        store.add_plan("Qwen3-32B", 8, [(tp_mlp, "layer.mlp")])

    listed = tuneforge("db", "--db", str(a), "list", tmp_path=tmp_path)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert lines[0] == f"database: sqlite:///{a}"
    assert lines[1].split()[:2] == ["problem", "measured/predicted"]
    rows = {tuple(line.split()[:2]) for line in lines[2:-1]}
    assert rows == {(gemm(16).key, "measured"), (gemm(16).key, "predicted"), (tp_mlp.key, "measured")}
    assert "ag_rs" in listed.stdout and lines[-1] == "3 winner(s)"

    shown = tuneforge("db", "show", gemm(16).key, "--db", str(a), tmp_path=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"database: sqlite:///{a}")
    assert "[measured]" in shown.stdout and "[predicted]" in shown.stdout
    assert '{"BLOCK_M": 64, "num_warps": 4}' in shown.stdout and "abc123" in shown.stdout

    exported = tuneforge("db", "--db", str(a), "export", str(tmp_path / "w.json"), tmp_path=tmp_path)
    assert exported.returncode == 0 and "exported 3 winner(s)" in exported.stdout, exported.stderr
    # the database named by $TUNEFORGE_DB (a bare path), created by the import
    imported = tuneforge("db", "import", str(tmp_path / "w.json"), tmp_path=tmp_path, TUNEFORGE_DB=str(b))
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.splitlines()[0] == f"database: sqlite:///{b}"
    assert "3 winner(s) stored" in imported.stdout
    with Store(a) as sa_, Store(b) as sb:
        assert sb.winners() == sa_.winners()
        assert sb.plan("Qwen3-32B", 8) == [(tp_mlp, "layer.mlp")]


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
