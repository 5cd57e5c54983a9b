"""benchmarks/bench_router.py on the CPU at tiny sizes: the fused router and its torch baseline per
(experts, top-k, tokens), each fused config checked against the fp64 reference, the ratio and the
floor's % in the JSON (host-clock figures, labelled as not GPU ones)."""
import glob
import json

import pytest

from benchmarks import bench_router
from tuneforge.dsl import get
from tuneforge.models import problems as P
from tuneforge.results import NOT_A_GPU_FIGURE


def test_rows_ratios_and_checks(tmp_path):
    assert bench_router.main(["--tokens", "1", "3", "--experts", "8", "--top-k", "2", "--copy-mib", "1",
                              "--out-dir", str(tmp_path)]) == 0
    (path,) = glob.glob(str(tmp_path / "bench_router-sweep-*.json"))
    out = json.load(open(path))
    rows, summary = out["rows"], out["summary"]
    assert [(r["experts"], r["top_k"], r["tokens"]) for r in rows] == [(8, 2, 1), (8, 2, 3)]
    for r in rows:
        assert r["check"] == "ok" and r["fused_us"] > 0 and r["baseline_us"] > 0
        assert r["speedup"] == pytest.approx(r["baseline_us"] / r["fused_us"])
        nbytes = get("moe_router").work(P.moe_router("bf16", r["tokens"], 8, 2))[1]
        assert r["pct_floor"] == pytest.approx(100 * nbytes / (summary["copy_gbs"] * 1e9) / (r["fused_us"] * 1e-6))
    assert summary["wrong"] == [] and summary["figures"] == NOT_A_GPU_FIGURE


@pytest.mark.parametrize("argv", [["--top-k", "9", "--experts", "8"], ["--tokens", "0"]])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        bench_router.main(argv)
    assert e.value.code == 2 and capsys.readouterr().err.count("error:") == 1
