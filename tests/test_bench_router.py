"""`tuneforge bench router` (issue 15's router benchmark) on the CPU: the real CLI, the real router, pack
and gather in Triton's interpreter, at sizes small enough for it. Times are host-clock figures, so the
tests check what is reported and marked, never how fast."""
import csv
import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_collection import BLOCKER   # makes a package unimportable, as on a machine without it
from tuneforge.cli import main
from tuneforge.kernels.moe_router import route, router_metrics, synthetic_logits
from tuneforge.results import NOT_A_GPU_FIGURE

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--tokens", "16", "--d-model", "32", "--experts", "8", "--top-k", "2"]
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (interpreter) figures")


def _bench(tmp_path, *extra) -> dict:
    assert main(["bench", "router", *SMALL, "--out-dir", str(tmp_path), *extra]) == 0
    (path,) = glob.glob(str(tmp_path / "bench_router*.json"))
    with open(path) as f:
        return json.load(f)


@pytest.mark.parametrize("strategy", ["naive", "fused", "masked", "sinkhorn"])
def test_every_strategy_reports_the_breakdown_and_metrics_marked_not_a_gpu_figure(tmp_path, capsys, strategy):
    result = _bench(tmp_path, "--strategy", strategy)
    (row,) = result["rows"]
    assert row["strategy"] == strategy and row["timing"] == "host-clock"
    for step in ("logit", "select", "route") + (() if strategy == "masked" else ("pack",)):
        assert row[f"T_{step}_us"] > 0, step
    assert row["T_pack_us"] is None if strategy == "masked" else row["T_pack_us"] > 0   # masked: no permutation
    assert result["summary"]["gpu_figure"] is False and "not a GPU figure" in result["summary"]["note"]
    assert result["meta"]["device"] == NOT_A_GPU_FIGURE
    assert result["meta"]["command"].endswith(f"--strategy {strategy}")
    # the router matmul produced synthetic_logits exactly: the metrics are that routing's
    logits = synthetic_logits(16, 8, dtype=torch.bfloat16)
    expected = router_metrics(route(logits, 2, norm_topk_prob=True, strategy=strategy)[1], 8)
    assert row["metrics"] == expected
    out = capsys.readouterr().out
    assert "T_select_us" in out and "not a GPU figure" in out and "max/mean" in out


def test_skew_raises_max_over_mean(tmp_path):
    plain = _bench(tmp_path / "plain", "--strategy", "naive")["rows"][0]["metrics"]
    result = _bench(tmp_path / "skewed", "--strategy", "naive", "--skew-experts", "2", "--skew-bias", "4")
    skewed = result["rows"][0]["metrics"]
    assert skewed["max_over_mean"] > plain["max_over_mean"] and skewed["cv"] > plain["cv"]
    assert sum(skewed["load"][:2]) > sum(plain["load"][:2])     # the biased experts take the load
    assert (result["summary"]["skew_experts"], result["summary"]["skew_bias"]) == (2, 4.0)


def test_perm_sweep_writes_csv_json_and_plot(tmp_path):
    has_plot = True
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        has_plot = False
    csv_path, png_path = tmp_path / "perm.csv", tmp_path / "perm.png"
    argv = ["bench", "router", "--d-model", "32", "--experts", "8", "--top-k", "2", "--perm-sweep",
            "--batch-sizes", "1", "2", "--seq-len", "4", "--csv-out", str(csv_path), "--out-dir", str(tmp_path)]
    assert main(argv + (["--plot-out", str(png_path)] if has_plot else [])) == 0
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["batch_size"]) for r in rows] == [1, 2] and [int(r["tokens"]) for r in rows] == [4, 8]
    for r in rows:
        # counted: tokens * top_k rows of d_model (bf16) read and written
        assert int(r["rows"]) == 2 * int(r["tokens"]) and int(r["bytes"]) == 2 * int(r["rows"]) * 32 * 2
        assert float(r["gbs"]) > 0 and r["hbm_peak_gbs"] == "" and r["figure"].startswith("not a GPU figure")
    (path,) = glob.glob(str(tmp_path / "bench_router-perm*.json"))
    with open(path) as f:
        result = json.load(f)
    assert result["summary"]["gpu_figure"] is False and len(result["rows"]) == 2
    assert not glob.glob(str(tmp_path / "*.tmp"))
    if has_plot:
        assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("extra, says", [
    (["--top-k", "9"], "--top-k 9 exceeds --experts 8"),
    (["--strategy", "masked", "--experts", "32"], "refused above 16 experts"),
    (["--strategy", "bogus"], "unknown --strategy 'bogus'"),
    (["--perm-sweep", "--strategy", "masked"], "masked strategy has no permutation"),
    (["--csv-out", "x.csv"], "add --perm-sweep"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, extra, says):
    assert main(["bench", "router", *SMALL, "--out-dir", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tuneforge: error: ") and err.count("\n") == 1 and says in err, err
    assert not os.listdir(tmp_path)


def test_plot_without_matplotlib_fails_with_one_line_naming_the_extra_before_any_work(tmp_path):
    (tmp_path / "absent_packages.py").write_text(BLOCKER.format(absent=("matplotlib",)))
    code = ("import sys, absent_packages; from tuneforge.cli import main; sys.exit(main(sys.argv[1:]))")
    run = subprocess.run([sys.executable, "-c", code, "bench", "router", *SMALL, "--perm-sweep",
                          "--plot-out", str(tmp_path / "p.png"), "--csv-out", str(tmp_path / "p.csv"),
                          "--out-dir", str(tmp_path / "out")],
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(tmp_path)},
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stdout + run.stderr
    assert run.stderr.count("\n") == 1 and 'pip install -e ".[plot]"' in run.stderr, run.stderr
    assert run.stdout == "" and sorted(os.listdir(tmp_path)) == ["absent_packages.py"]   # nothing ran
