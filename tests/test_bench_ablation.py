"""benchmarks/bench_ablation.py: a tuned table with one family served at its default (DispatchTable.
served_at_default), and the script on the CPU at a tiny config from a real SQLite database of
predicted winners (times are the interpreter's host clock, not GPU figures)."""
import glob
import json

import pytest

from benchmarks import bench_ablation
from tuneforge.db.environment import Environment
from tuneforge.db.store import Store, Winner
from tuneforge.dsl import get
from tuneforge.dsl.devices import spec
from tuneforge.dsl.template import portable
from tuneforge.engine.dispatch import Ops
from tuneforge.engine.lookup import BASELINE, LAUNCHER_DEFAULT, DispatchTable, environment
from tuneforge.models.configs import load_config
from tuneforge.tune.plan import plan

PREDICTED = Environment.predicted(spec("H100"), world_size=1)


def problems(cfg) -> list:
    return [i.problem for i in plan(cfg, tp=1, decode_buckets=(1,), prefill_buckets=(), dtype="fp32").tunable]


def record(url: str, cfg, ops: set) -> None:
    """Winners of the tiny model's 1-token plan for ``ops``: each at its template's default config."""
    with Store(url) as store:
        for p in problems(cfg):
            if p.op in ops:
                store.record_winner(Winner(p, PREDICTED, get(p.op).default_config(p, spec("H100")), 1e-5, 2e-5,
                                           2.0, 50.0, "predicted", get(p.op).source_hash,
                                           Store.study_name(p, PREDICTED), 4))


def test_served_at_default_takes_away_only_the_named_families(tiny_config, tmp_path):
    cfg = load_config(tiny_config)
    url = f"sqlite:///{tmp_path / 'w.db'}"
    record(url, cfg, {"rmsnorm", "gemm_fused", "gemm"})
    with Store(url, create=False) as store:
        table = DispatchTable.load(store, environment(1, "H100"), cfg.name, 1, allow_predicted=True, quiet=True)
    fams = table.families(1)
    assert {f[0] for f in fams} == {"rmsnorm", "gemm_fused", "gemm"} and table.families(4096) == []
    norm = [f for f in fams if f[0] == "rmsnorm"]
    fused = [f for f in fams if f[0] == "gemm_fused"]
    ablated = table.served_at_default(norm + fused)
    # as default dispatch serves them: the norm's kernel at its launcher default, the fusion unfused; the
    # GEMMs keep their winners, and the original table is untouched
    ablated_ops, tuned_ops = Ops("tuned", ablated), Ops("tuned", table)
    for p in problems(cfg):
        stored = portable(get(p.op).default_config(p, spec("H100")))      # as served on this machine
        if p.op == "rmsnorm":
            assert ablated_ops.choice(p) is LAUNCHER_DEFAULT and tuned_ops.choice(p) == stored != {}
        elif p.op == "gemm_fused":
            assert ablated_ops.choice(p) is BASELINE and tuned_ops.choice(p) == stored
        elif p.op == "gemm":
            assert ablated_ops.choice(p) == tuned_ops.choice(p) == stored


def test_the_script_times_tuned_default_and_each_ablated_family(tiny_config, tmp_path, capsys):
    cfg = load_config(tiny_config)
    url = f"sqlite:///{tmp_path / 'w.db'}"
    record(url, cfg, {"rmsnorm", "rope_qk_norm"})
    assert bench_ablation.main(["--model", str(tiny_config), "--db", url, "--target", "H100", "--allow-predicted",
                                "--ops", "rmsnorm", "--ctx", "4", "--gen", "2", "--rounds", "1",
                                "--out", str(tmp_path)]) == 0
    (path,) = glob.glob(str(tmp_path / "bench_ablation-*.json"))
    out = json.load(open(path))
    variants = [r["variant"] for r in out["rows"]]
    assert variants[:2] == ["tuned", "default"] and len(variants) == 3 and variants[2].startswith("tuned, rmsnorm ")
    assert all(r["decode_ms_per_token"] > 0 for r in out["rows"]) and out["rows"][0]["tuned_vs_this"] == 1.0
    assert out["summary"]["model"] == cfg.name and "winners that cost the step" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [(["--bsz", "0"], "--bsz must be at least 1"),
                                           (["--ops", "no_such_op"], "no winners serve 1 tokens")])
def test_bad_arguments_say_what_is_wrong(tiny_config, tmp_path, argv, message, capsys):
    url = f"sqlite:///{tmp_path / 'w.db'}"
    record(url, load_config(tiny_config), {"rmsnorm"})
    with pytest.raises(SystemExit) as e:
        bench_ablation.main(["--model", str(tiny_config), "--db", url, "--target", "H100", "--allow-predicted", *argv])
    assert message in str(e.value) + capsys.readouterr().err
