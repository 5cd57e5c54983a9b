"""`tuneforge tune` as a user runs it (a subprocess): the database line, the plan, progress, the
strategy table and the summary JSON; foreign targets at TP>1; one-line errors for a bad model, a
bad or corrupt database and bad arguments."""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest


def _tune(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}      # not a terminal: 80 columns
    return subprocess.run([sys.executable, "-m", "tuneforge.cli", "tune", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_tune_prints_database_plan_progress_table_and_writes_the_summary(tiny_config, tmp_path):
    db, summary = tmp_path / "t.db", tmp_path / "summary.json"
    r = _tune("--model", tiny_config, "--db", db, "--trials", "3", "--buckets", "4", "--prefill-buckets", "",
              "--summary-json", summary)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0] == f"database: sqlite:///{db}"
    assert out[1].startswith("plan: tiny-qwen3 TP1 bf16: ") and "decode m=4" in out[1]
    assert out[2].startswith("target: H100 x1 (predicted by the cost model), 3 trials per problem")
    # the compact table (80 columns: not a terminal), progress and summary count trials the same way
    assert out[3].split() == ["problem", "winner", "time", "speedup", "trials"]
    assert max(len(line) for line in out[3:-2]) <= 80 and out[-2].split()[1:3] == ["problems", "tuned"]
    assert "gemm m=4 n=128 k=64" in r.stdout and "predicted" in r.stdout
    assert re.search(r"\[ *1/", r.stderr) and "trials" in r.stderr      # the index padded to the count's width
    report = json.loads(summary.read_text())
    assert report["model"] == "tiny-qwen3" and report["target"] == "H100" and report["backend"] == "costmodel"
    assert report["tuned"] == len([x for x in report["rows"] if x["status"] == "tuned"]) > 0
    for row in report["rows"]:
        if row["status"] == "tuned":
            assert row["time_s"] <= row["baseline_s"] and row["source"] == "predicted"
            assert f" {row['n_trials']} trials" in r.stderr and row["n_trials"] <= 3
    assert f"{report['n_trials']} trials (+{report['rejected']} rejected)" in out[-2]


def test_foreign_targets_at_tp2_use_the_cost_model(tiny_config, tmp_path):
    summary = tmp_path / "s.json"
    r = _tune("--model", tiny_config, "--db", tmp_path / "t.db", "--tp", "2", "--target", "MI308X", "--trials", "2",
              "--buckets", "1", "--prefill-buckets", "", "--quiet", "--summary-json", summary)
    assert r.returncode == 0, r.stderr
    assert "target: MI308X x2 (predicted by the cost model)" in r.stdout
    rows = {row["problem"]: row for row in json.loads(summary.read_text())["rows"]}
    # searched, and a kernel winner verified in a 2-rank world under the interpreter
    for key in ("allreduce|m=1,n=64|bf16|w2", "tp_mlp|m=1,hidden=64,inter=64|bf16|w2"):
        assert rows[key]["status"] == "tuned" and rows[key]["time_s"] <= rows[key]["baseline_s"]


def _one_line_error(stderr: str, message: str) -> None:
    assert stderr.startswith(message), stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr


def test_bad_model_and_bad_database_are_one_line_errors(tiny_config, tmp_path):
    r = _tune("--model", "Qwen3-33B", "--db", tmp_path / "t.db")
    assert r.returncode == 2
    _one_line_error(r.stderr, "tuneforge: error: unknown model 'Qwen3-33B'; known: Qwen3-0.6B")
    r = _tune("--model", tiny_config, "--db", "nosuchdriver://x/y", "--buckets", "1", "--prefill-buckets", "")
    assert r.returncode == 2
    _one_line_error(r.stderr, "tuneforge: error: cannot open tuneforge database")
    bad = tmp_path / "corrupt.db"
    bad.write_bytes(b"this is not an sqlite file" * 100)
    r = _tune("--model", tiny_config, "--db", bad, "--buckets", "1", "--prefill-buckets", "")
    assert r.returncode == 2
    _one_line_error(r.stderr, "tuneforge: error: ")
    assert "not an SQLite database" in r.stderr or "not a database" in r.stderr


@pytest.mark.parametrize("args,message", [
    (["--model", "Qwen3-32B", "--tp", "3"], "tuneforge: error: tp=3 does not divide num_attention_heads=64"),
    (["--model", "Qwen3-32B", "--target", "TPU9"], "tuneforge: error: unknown target device 'TPU9'"),
    (["--model", "Qwen3-32B", "--trials", "0"], "tuneforge: error: --trials must be >= 1"),
    (["--model", "{tmp}"], "tuneforge: error: {tmp} has no config.json"),
])
def test_other_bad_input_is_one_line(args, message, tmp_path, capsys):
    from tuneforge.cli import main
    args = [a.format(tmp=tmp_path) for a in args] + ["--db", str(tmp_path / "t.db"), "--buckets", "1"]
    assert main(["tune", *args]) == 2
    _one_line_error(capsys.readouterr().err, message.format(tmp=tmp_path))


@pytest.mark.parametrize("flag,value,message", [("--budget", "soon", "bad duration 'soon'"),
                                                ("--buckets", "1,x", "bad bucket list '1,x'")])
def test_bad_budget_or_buckets_is_an_argument_error(flag, value, message, capsys):
    from tuneforge.cli import main
    with pytest.raises(SystemExit) as e:
        main(["tune", "--model", "Qwen3-32B", flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_tune_cut_short_leaves_the_summary_of_the_problems_it_finished(tiny_config, tmp_path, monkeypatch, capsys):
    """The summary is rewritten whole after every problem: a tune interrupted at its third problem
    (Ctrl-C, a killed job) leaves the first two, marked incomplete, and no temporary file."""
    from tuneforge.cli import main
    from tuneforge.tune.tuner import Tuner

    search, calls = Tuner.search_problem, []

    def interrupted(self, *args, **kwargs):
        calls.append(args[0].key)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return search(self, *args, **kwargs)

    monkeypatch.setattr(Tuner, "search_problem", interrupted)
    summary = tmp_path / "s.json"
    args = ["tune", "--model", str(tiny_config), "--db", str(tmp_path / "t.db"), "--trials", "2", "--buckets", "4",
            "--prefill-buckets", "", "--quiet", "--summary-json", str(summary)]
    assert main(args) == 130 and capsys.readouterr().err.endswith("tuneforge: interrupted\n")
    report = json.loads(summary.read_text())
    assert report["complete"] is False and report["model"] == "tiny-qwen3"
    assert report["command"] == shlex.join(["tuneforge", *args])
    assert [row["problem"] for row in report["rows"] if row["status"] == "tuned"] == calls[:2]
    assert list(tmp_path.glob("*.tmp")) == []
    monkeypatch.setattr(Tuner, "search_problem", search)
    assert main(args) == 0
    assert json.loads(summary.read_text())["complete"] is True
