"""The tuner on CPU: a real tuning loop over a tiny Qwen3 (cost-model times, winners verified by the
real kernels under the interpreter) into a real SQLite database; FAIL and PRUNED trials; winners
that fail verification are dropped; a run killed with SIGKILL resumes without losing a trial."""
import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from tuneforge.db.store import Store
from tuneforge.dsl import Problem, canonical_config, get
from tuneforge.tune.plan import PlanItem, plan
from tuneforge.tune.report import Report, Row, describe_config, format_table
from tuneforge.tune.study import REJECT_CAP
from tuneforge.tune.tuner import BASELINE, Tuner, TuneOptions, choose

def _study_trials(store, name):
    return optuna.load_study(study_name=name, storage=store.optuna_storage()).get_trials(deepcopy=False)


def test_choose_prefers_the_baseline_in_a_tie_then_the_canonically_smallest_config():
    a, b = {"block": 128, "w": 4}, {"block": 16, "w": 8}
    assert choose([(a, 1.00), (b, 1.01), (dict(BASELINE), 1.5)], 0.02) == (b, 1.01)     # 16 < 128 numerically
    assert choose([(a, 1.00), (dict(BASELINE), 1.015)], 0.02) == (dict(BASELINE), 1.015)
    assert choose([(a, 1.00), (dict(BASELINE), 1.03)], 0.02) == (a, 1.00)
    assert describe_config({"strategy": "two_shot", "block_m": 64, "tma": True, "num_warps": 4}) == \
        "two_shot bm64 w4 tma"


TRIALS = 24     # past the GEMM portfolio (its seeds come first), so the sampler runs and gets pruned too


def test_cost_model_tuning_of_a_tiny_model_stores_verified_winners(tiny_config, tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'tune.db'}")
    p = plan(tiny_config, 1, decode_buckets=[8], prefill_buckets=[32])     # two buckets: CI time
    tuner = Tuner(store, TuneOptions(target="H100", trials=TRIALS, progress=None))
    assert tuner.backend == "costmodel" and tuner.spec.name == "H100"
    report = tuner.tune(p)
    assert {r.status for r in report.rows} <= {"tuned", "baseline-only"}
    tuned = [r for r in report.rows if r.status == "tuned"]
    assert len(tuned) == len(p.tunable)
    # gate_up_proj and lm_head are the same GEMM: one problem, one study, both roles
    shared = next(r for r in tuned if r.problem == "gemm|m=8,n=256,k=64|bf16|w1")
    assert shared.roles == ["layer.mlp.gate_up_proj", "lm_head"]
    # a GEMM study starts with the default, then the template's portfolio, before the sampler
    gemm = get("gemm")
    problem = next(i.problem for i in p if i.key == shared.problem)
    seeds = gemm.seeds(problem, tuner.spec)
    assert seeds[0] == gemm.default_config(problem, tuner.spec) and len(seeds) > 6
    first = [t.params for t in sorted(_study_trials(store, shared.study_name), key=lambda t: t.number)[:6]]
    assert first == seeds[:6]

    stored = {w.key: w for w in store.winners(model="tiny-qwen3", tp=1)}
    assert set(stored) == {r.problem for r in tuned}
    kernel_wins = 0
    for r in tuned:
        w = stored[r.problem]
        assert w.source == "predicted" and w.env.predicted and w.env.gpu_name == "H100"
        assert w.time_s <= w.baseline_s and w.config == r.config
        assert w.template_hash == get(w.problem.op).source_hash
        trials = _study_trials(store, w.study_name)
        evaluated = sum(t.state != TrialState.PRUNED for t in trials)
        # a trial is an evaluated config, rejected ones are counted apart: in the row and the stored winner
        assert w.n_trials == r.n_trials == evaluated and r.rejected == len(trials) - evaluated
        assert all(t.state.is_finished() for t in trials)
        assert evaluated >= TRIALS or len(trials) >= REJECT_CAP * TRIALS    # trials reached, or too many rejected
        assert evaluated >= 1
        for t in trials:
            if t.state == TrialState.PRUNED:
                assert t.user_attrs["reason"]
        if not w.config.get("baseline"):
            kernel_wins += 1
            # verified by running the real kernel under the interpreter
            assert tuner.verifier.cache[(w.problem.op, canonical_config(w.config))] == ""
    assert kernel_wins >= 3
    assert any(t.state == TrialState.PRUNED for r in tuned if r.op == "gemm" for t in _study_trials(store, r.study_name))
    table = format_table(report, wide=True)
    assert table.splitlines()[0].split() == ["problem", "roles", "winner", "time", "baseline", "speedup", "%SOL",
                                             "source", "trials", "rejected"]
    assert ("baseline (no template)" in table) == bool(p.baseline_only)
    verified = {(w.problem.op, canonical_config(w.config)) for w in stored.values() if not w.config.get("baseline")}
    assert report.verifications_run >= len(verified)      # once per distinct (op, config), failures on top

    # a rerun finds every study complete: no new trial, the same winners, and every verdict in the
    # database: nothing runs under the interpreter again
    again = Tuner(store, TuneOptions(target="H100", trials=TRIALS, progress=None)).tune(p)
    assert [r.new_trials for r in again.rows if r.status == "tuned"] == [0] * len(tuned)
    assert [r.config for r in again.rows] == [r.config for r in report.rows]
    assert again.verifications_run == 0
    with sqlite3.connect(tmp_path / "tune.db") as c:
        records = c.execute("SELECT op, config_key, template_hash, result FROM tf_verification").fetchall()
    assert len(records) == report.verifications_run and all(h == get(op).source_hash for op, _, h, _ in records)
    assert verified <= {(op, key) for op, key, _, result in records if result == ""}
    store.close()


def _broken_launch(x, *, out=None, config=None):
    """The real silu_mul, except that configs with rows == 1 write one wrong element."""
    y = get("silu_mul").launch(x, out=out, config=config)
    if config is not None and config["rows"] == 1:
        y[0, 0] += 1.0
    return y


def _lying_cost(problem, config, spec):
    """Predicts the broken configs fastest (so only verification can stop them) and fails num_warps=8."""
    if config is not None and config["num_warps"] == 8:
        raise RuntimeError("simulated compile error")
    t = get("silu_mul").cost(problem, config, spec)
    return t * 0.25 if config is not None and config["rows"] == 1 else t


def test_fail_trials_never_stop_the_run_and_unverifiable_winners_are_dropped(tmp_path):
    real = get("silu_mul")
    broken = dataclasses.replace(real, launch=_broken_launch, cost=_lying_cost, module=real.module)
    problem = Problem.make("silu_mul", m=8, n=48)
    size = real.space(problem).size()
    store = Store(f"sqlite:///{tmp_path / 'fail.db'}")
    tuner = Tuner(store, TuneOptions(target="H100", trials=size, progress=None))
    row = tuner.tune_problem(PlanItem(problem, ["test"]), broken, 1)
    assert row.status == "tuned"
    assert not row.config.get("baseline") and row.config["rows"] != 1 and row.config["num_warps"] != 8
    assert "failed verification: wrong result" in row.note
    trials = _study_trials(store, row.study_name)
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert failed and all(t.user_attrs["error"] == "RuntimeError: simulated compile error" for t in failed)
    assert all(t.params["num_warps"] == 8 for t in failed)
    assert any(t.state == TrialState.COMPLETE and t.params["rows"] == 1 for t in trials)
    assert store.winners(key=problem.key)[0].config == row.config
    store.close()


def _snapshot(db):
    with sqlite3.connect(db) as c:
        rows = c.execute("SELECT t.trial_id, t.study_id, t.number, t.state, v.value FROM trials t "
                         "LEFT JOIN trial_values v ON v.trial_id = t.trial_id").fetchall()
    return {r[0]: r[1:] for r in rows}


def _trial_count(db):
    try:
        with sqlite3.connect(db, timeout=1) as c:
            return c.execute("SELECT count(*) FROM trials").fetchone()[0]
    except sqlite3.OperationalError:      # not created yet
        return 0


RESUME_TRIALS = 8     # the kill lands ~50 ms after the first trial, seconds before the run could end


def test_a_killed_run_resumes_without_losing_a_trial(tiny_config, tmp_path):
    db = tmp_path / "resume.db"
    summary = tmp_path / "summary.json"
    cmd = [sys.executable, "-m", "tuneforge.cli", "tune", "--model", str(tiny_config), "--db", str(db),
           "--backend", "costmodel", "--trials", str(RESUME_TRIALS), "--buckets", "1", "--prefill-buckets", "32",
           "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while _trial_count(db) == 0 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _snapshot(db)
    assert before, "no trial was written before the kill"
    store = Store(str(db))
    models_before = len(store.winners())
    store.close()

    done = subprocess.run(cmd + ["--summary-json", str(summary)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    after = _snapshot(db)
    # every trial written before the kill survives unchanged; counts per study only grow
    assert all(after.get(tid) == row for tid, row in before.items())
    for study in {r[0] for r in before.values()}:
        assert sum(r[0] == study for r in after.values()) >= sum(r[0] == study for r in before.values())
    assert all(r[2] in ("COMPLETE", "PRUNED", "FAIL") for r in after.values())
    report = json.loads(summary.read_text())
    tuned = [r for r in report["rows"] if r["status"] == "tuned"]
    assert tuned and all(r["status"] in ("tuned", "baseline-only") for r in report["rows"])
    store = Store(str(db))
    assert len(store.winners()) == len(tuned) >= models_before
    for r in tuned:
        trials = _study_trials(store, r["study_name"])
        evaluated = sum(t.state != TrialState.PRUNED for t in trials)
        assert (evaluated >= RESUME_TRIALS or len(trials) >= REJECT_CAP * RESUME_TRIALS) and r["n_trials"] == evaluated
    store.close()


@pytest.mark.gpu
def test_measured_tuning_on_the_gpu(tiny_config, tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'gpu.db'}")
    p = plan(tiny_config, 1, decode_buckets=[8], prefill_buckets=[256])
    tuner = Tuner(store, TuneOptions(trials=4, progress=None))
    assert tuner.backend == "measure"
    report = tuner.tune(p)
    tuned = [r for r in report.rows if r.status == "tuned"]
    assert len(tuned) == len(p.tunable)
    for r in tuned:
        assert r.source == "measured" and 0 < r.time_s <= r.baseline_s
    assert all(w.source == "measured" and not w.env.predicted for w in store.winners())
    store.close()


def test_the_measuring_bench_checks_before_it_times(tmp_path):
    """GpuBench's steps (reference check on poisoned output, timing, baseline, fresh-input verify) run
    here on the CPU under the interpreter; on a GPU the same code times with CUDA events/graphs."""
    from tuneforge.dsl.devices import spec
    from tuneforge.tune.bench import GpuBench, outcome
    real = get("silu_mul")
    broken = dataclasses.replace(real, launch=_broken_launch, module=real.module)
    problem = Problem.make("silu_mul", m=5, n=48)
    h100 = spec("H100")
    good = {"block_n": 64, "rows": 2, "num_warps": 4}
    bad = {"block_n": 64, "rows": 1, "num_warps": 4}
    bench = GpuBench(broken, problem, h100, seed=0, device="cpu")
    assert bench.time_config(good) > 0 and bench.time_baseline() > 0
    assert bench.verify(good, seed=1) == ""
    assert "elements off" in bench.verify(bad, seed=1)
    state, value, attrs = outcome(bench.time_config, bad)
    assert state == TrialState.FAIL and value is None and attrs["error"].startswith("wrong result: 1/")
    # a tile Triton cannot compile (arange of 48) is a FAIL trial with the compiler's reason
    state, _, attrs = outcome(bench.time_config, {"block_n": 48, "rows": 2, "num_warps": 4})
    assert state == TrialState.FAIL and "power of 2" in attrs["error"]
    bench.close()


def test_lockstep_measuring_of_a_multi_rank_problem():
    """Two ranks measure the same all-reduce configs and the baseline in lockstep (here: processes
    under the interpreter); a config that cannot run fails on its own without ending the world."""
    from tuneforge.tune.bench import lockstep
    problem = Problem.make("allreduce", world=2, m=3, n=40)
    good = {"strategy": "two_shot", "variant": "pull", "block": 128, "num_warps": 4, "comm_sms": 2}
    bad = {**good, "block": 96}                          # not a power of 2: does not compile
    results = lockstep(get("allreduce"), problem, [good, bad, None], seed=0, device="cpu")
    (t_good, why_good), (t_bad, why_bad), (t_base, why_base) = results
    assert t_good > 0 and why_good == "" and t_base > 0 and why_base == ""
    assert t_bad is None and why_bad


def test_an_exhausted_budget_still_tries_the_default_config_of_every_problem(tiny_config, tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'budget.db'}")
    p = plan(tiny_config, 1, decode_buckets=[1], prefill_buckets=[])
    tuner = Tuner(store, TuneOptions(target="H100", trials=50, problem_budget_s=1e-9, progress=None))
    report = tuner.tune(p)
    tuned = [r for r in report.rows if r.status == "tuned"]
    assert len(tuned) == len(p.tunable)
    for r in tuned:
        trials = _study_trials(store, r.study_name)
        default = get(r.op).default_config(Problem.from_key(r.problem), tuner.spec)
        assert len(trials) == r.n_trials == 1 and trials[0].params == default
    store.close()


def test_a_spent_total_budget_skips_the_problems_left_and_stores_nothing_for_them(tiny_config, tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'spent.db'}")
    p = plan(tiny_config, 1, decode_buckets=[1], prefill_buckets=[])
    report = Tuner(store, TuneOptions(target="H100", trials=50, budget_s=1e-9, progress=None)).tune(p)
    skipped = [r for r in report.rows if r.status == "skipped"]
    assert len(skipped) == len(p.tunable) and all(r.config is None and r.n_trials == 0 for r in skipped)
    notes = {r.op: r.note for r in skipped}
    assert notes["gemm"] == "budget 0s spent: runs the torch baseline"
    assert notes["rmsnorm"] == ("budget 0s spent: runs its kernel's default config (the torch baseline where no "
                                "bf16 winner is stored)")
    assert report.to_dict()["skipped"] == len(p.tunable) and report.to_dict()["tuned"] == 0
    assert store.winners() == []
    store.close()


def _row(key: str, config: dict, source: str = "predicted") -> Row:
    p = Problem.from_key(key)
    return Row(key, p.op, ["layer.attn.decode", "layer.other_role"], "tuned", config, 1.2e-5, 2.5e-5, 2.08, 51.0,
               source, n_trials=16, new_trials=16, rejected=5)


def test_the_winners_table_fits_the_terminal_and_counts_trials_one_way():
    hybrid = {"block_m": 128, "block_n": 128, "block_k": 64, "group_m": 8, "num_warps": 8, "num_stages": 4,
              "schedule": "hybrid", "programs_per_sm": 1, "tma": True, "flatten": False}
    rows = [_row("gemm|m=256,n=10240,k=5120|bf16|w1", hybrid),
            _row("decode_attention|m=256,heads=64,kv_heads=8,head_dim=128,ctx=4096|bf16|w1",
                 {"block_n": 16, "chunk": 2048, "num_stages": 2, "num_warps": 4}),
            _row("gemm|m=1,n=10240,k=5120|bf16|w1", dict(BASELINE)),
            _row("decode_attention|m=8,heads=64,kv_heads=8,head_dim=128,ctx=256|bf16|w1", dict(BASELINE))]
    report = Report("Qwen3-32B", 1, "H100", "costmodel", "sqlite:///x.db", "fp", rows, 1.0, len(rows))
    for width in (80, 60):
        table = format_table(report, width=width).splitlines()
        assert max(map(len, table)) <= width
        assert table[0].split() == ["problem", "winner", "time", "speedup", "trials"]
        words = iter(" ".join(table).split())
        assert all(w in words for w in describe_config(hybrid).split())    # wrapped in order, never cut
    # sorted by op, then the other dims, then the token count; the trials column counts as the header does
    table = format_table(report, width=80).splitlines()
    firsts = [line.split()[:2] for line in table[1:] if not line.startswith(" ")]
    assert firsts == [["decode_attention", "m=8"], ["decode_attention", "m=256"], ["gemm", "m=1"], ["gemm", "m=256"]]
    assert all(line.split()[-1] == "16" for line in table[1:] if not line.startswith(" "))
    wide = format_table(report, wide=True).splitlines()
    assert len(wide) == 1 + len(rows) and all(r.problem in "\n".join(wide) for r in rows)
    assert wide[1].split()[-2:] == ["16", "5"] and "layer.attn.decode,layer.other_role" in wide[1]
    summary = report.to_dict()
    assert (summary["n_trials"], summary["rejected"]) == (64, 20)
    assert summary["rows"][0]["n_trials"] == 16 and summary["rows"][0]["rejected"] == 5


def test_interpreter_verification_shrinks_a_hybrid_gemm_winner():
    """A hybrid schedule needs more tiles than programs and a partial last wave; on power-of-two dims
    capped alike the tile counts fill the interpreter's 4 SMs exactly, and shrink used to fall back
    to the whole problem (152 s of interpreting in the Qwen3-32B main job)."""
    from tuneforge.dsl.template import portable
    from tuneforge.dsl.devices import spec
    from tuneforge.tune.verify import shrink
    gemm = get("gemm")
    h100 = spec("H100")
    config = {"block_m": 128, "block_n": 256, "block_k": 64, "group_m": 8, "num_warps": 8, "num_stages": 3,
              "schedule": "hybrid", "programs_per_sm": 1, "tma": True, "flatten": False}
    problem = Problem.from_key("gemm|m=512,n=10240,k=5120|bf16|w1")
    assert gemm.reject_reason(config, problem, h100) is None
    small = shrink(gemm, problem, portable(config), h100)
    assert small["m"] * small["n"] * small["k"] <= 256 * 1024 * 64
    tiles = -(-small["m"] // 128) * -(-small["n"] // 256)
    assert tiles > 4 and tiles % 4       # still hybrid on the interpreter's 4 SMs: whole waves and a partial one
