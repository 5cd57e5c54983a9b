"""Dispatch from a real SQLite tuning database: tuned records serve (nearest tuned bucket on m),
missing / stale / predicted-without-permission records fall back to the torch baseline with exactly
one warning line per op, and lookups never touch the database after loading."""
import logging
import os

import pytest
import torch

from tuneforge.db.environment import Environment
from tuneforge.db.store import Store, Winner
from tuneforge.dsl import Problem, get
from tuneforge.engine.dispatch import DispatchTable, Ops, open_ops
from tuneforge.errors import InputError
from tuneforge.dsl.devices import spec

H100 = Environment("NVIDIA H100 80GB HBM3", 132, 79.1, 1, "single-gpu", "2.11.0", "3.6.0", "12.8", False)


def winner(problem: Problem, env: Environment, config: dict, template_hash: str | None = None) -> Winner:
    return Winner(problem, env, config, time_s=1e-5, baseline_s=2e-5, speedup=2.0, pct_sol=80.0,
                  source="predicted" if env.predicted else "measured",
                  template_hash=template_hash or get(problem.op).source_hash,
                  study_name=Store.study_name(problem, env), n_trials=10)


def gemm_problem(m: int, n: int = 128, k: int = 64) -> Problem:
    return Problem.make("gemm", "bf16", m=m, n=n, k=k)


def cfg(group_m: int, **changes) -> dict:
    """A gemm config for the test problems below, told apart by ``group_m``."""
    return dict(dict(block_m=16, block_n=64, block_k=64, group_m=group_m, num_warps=4, num_stages=3, schedule="tiles",
                     split_k=1, programs_per_sm=1, tma=False, flatten=False), **changes)


@pytest.fixture
def store(tmp_path):
    with Store(str(tmp_path / "tf.db")) as s:
        yield s


def warnings_for(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "tuneforge.engine" and r.levelno == logging.WARNING]


def test_tuned_record_serves_exact_and_nearest_bucket(store, caplog):
    for m, g in ((1, 1), (16, 4), (64, 8)):
        store.record_winner(winner(gemm_problem(m), H100, cfg(g)))
    table = DispatchTable.load(store, H100, "Qwen3-32B", 1)
    assert len(table) == 3
    assert table.lookup("gemm", gemm_problem(1))["group_m"] == 1
    assert table.lookup("gemm", gemm_problem(16))["group_m"] == 4
    assert table.lookup("gemm", gemm_problem(5))["group_m"] == 4       # smallest tuned bucket >= 5
    assert table.lookup("gemm", gemm_problem(33))["group_m"] == 8
    assert warnings_for(caplog) == []
    # beyond every tuned bucket: the torch baseline (a 64-row config says nothing about 4096 rows)
    assert table.lookup("gemm", gemm_problem(4096)) is None
    assert warnings_for(caplog) == ["dispatch: gemm runs the torch baseline: tuned up to m=64, not for m=4096 "
                                    f"({gemm_problem(4096).key}; a bucket >= 4096: tuneforge tune --model "
                                    "Qwen3-32B --tp 1 --buckets / --prefill-buckets)"]
    # the same shape in another dtype, or another n, is another problem: not tuned
    assert table.lookup("gemm", Problem.make("gemm", "fp16", m=16, n=128, k=64)) is None
    assert table.lookup("gemm", gemm_problem(16, n=256)) is None


def test_missing_records_fall_back_with_one_warning_per_op(store, caplog):
    store.record_winner(winner(gemm_problem(16), H100, cfg(1)))
    ops = Ops("tuned", DispatchTable.load(store, H100, "Qwen3-32B", 1))
    caplog.set_level(logging.WARNING, "tuneforge.engine")
    for m in (1, 2, 3, 500):
        assert ops.config("gemm", torch.bfloat16, m=m, n=999, k=64) is None
        assert ops.config("rmsnorm", torch.bfloat16, m=m, n=64) == {}      # row ops: their kernels' defaults
        assert ops.config("silu_mul", torch.bfloat16, m=m, n=64) == {}
    assert ops.config("gemm", torch.bfloat16, m=16, n=128, k=64) == cfg(1)
    lines = warnings_for(caplog)
    assert len(lines) == 3, lines
    for op in ("gemm", "rmsnorm", "silu_mul"):
        (line,) = [x for x in lines if x.startswith(f"dispatch: {op} ")]
        assert "no record for" in line and f"{op}|m=1," in line and "tuneforge tune --model Qwen3-32B --tp 1" in line
        assert "\n" not in line


def test_stale_record_falls_back_and_says_why(store, caplog):
    store.record_winner(winner(gemm_problem(16), H100, cfg(1), template_hash="0123456789abcdef"))
    table = DispatchTable.load(store, H100, "Qwen3-32B", 1)
    caplog.set_level(logging.WARNING, "tuneforge.engine")
    assert table.lookup("gemm", gemm_problem(16)) is None
    assert table.lookup("gemm", gemm_problem(1)) is None
    summary, line = warnings_for(caplog)
    assert summary.startswith("dispatch: no winners for ") and summary.endswith("; 1 stale one ignored")
    assert "stale record for gemm|m=16,n=128,k=64|bf16|w1" in line and "changed since tuning" in line


@pytest.mark.parametrize("stale", [False, True])
def test_a_record_under_an_older_problem_key_is_named(store, caplog, stale):
    """A database tuned before rope_qk_norm's key gained ``cache=1`` holds its records without that dim:
    the lookup of the cache problem finds none, and its one line says records without ``cache`` exist."""
    old = Problem.make("rope_qk_norm", "bf16", m=16, heads=8, kv_heads=1, head_dim=128)
    config = get("rope_qk_norm").default_config(old, spec("H100"))
    store.record_winner(winner(old, H100, config, template_hash="0123456789abcdef" if stale else None))
    other = Problem.make("rope_qk_norm", "bf16", m=16, heads=8, kv_heads=2, head_dim=128)   # other dims: not named
    store.record_winner(winner(other, H100, config))
    table = DispatchTable.load(store, H100, "Qwen3-32B", 8)
    caplog.set_level(logging.WARNING, "tuneforge.engine")
    assert table.lookup("rope_qk_norm", old.with_dims(cache=1)) is None
    (line,) = [x for x in warnings_for(caplog) if x.startswith("dispatch: rope_qk_norm ")]
    assert f"no record for {old.with_dims(cache=1).key}" in line, line
    assert f"records of rope_qk_norm at the same dims but without cache{' (stale)' if stale else ''} are there: " \
           "tuned under an older problem key?" in line, line
    assert "with" not in line.split("without cache")[1].split("are there")[0]
    assert table.lookup("rope_qk_norm", old) == (None if stale else config)
    # a problem that no record agrees with on its shared dims: only that there is none
    caplog.clear()
    fresh = DispatchTable.load(store, H100, "Qwen3-32B", 8)
    assert fresh.lookup("rope_qk_norm", Problem.make("rope_qk_norm", "bf16", m=16, heads=4, kv_heads=1,
                                                     head_dim=128, cache=1)) is None
    (line,) = [x for x in warnings_for(caplog) if x.startswith("dispatch: rope_qk_norm ")]
    assert "no record for" in line and "older problem key" not in line, line


def test_record_from_other_versions_is_stale(store, caplog):
    older = Environment(**{**H100.to_dict(), "torch_version": "2.9.0"})
    store.record_winner(winner(gemm_problem(16), older, cfg(1)))
    table = DispatchTable.load(store, H100, "Qwen3-32B", 1)
    caplog.set_level(logging.WARNING, "tuneforge.engine")
    assert table.lookup("gemm", gemm_problem(16)) is None
    summary, line = warnings_for(caplog)
    assert "1 stale one ignored" in summary
    assert "stale record" in line and "torch_version 2.9.0" in line


def test_baseline_winner_runs_the_baseline_silently(store, caplog):
    store.record_winner(winner(gemm_problem(16), H100, {"baseline": True}))
    ops = Ops("tuned", DispatchTable.load(store, H100, "Qwen3-32B", 1))
    caplog.set_level(logging.WARNING, "tuneforge.engine")
    assert ops.config("gemm", torch.bfloat16, m=16, n=128, k=64) is None
    assert warnings_for(caplog) == []


def test_predicted_winners_serve_only_when_allowed_and_are_counted(store, caplog):
    """Refused predictions are counted in the one line the table says, and every op then stays silent."""
    predicted = Environment.predicted(spec("H100"), 1)
    store.record_winner(winner(gemm_problem(16), predicted, cfg(4)))
    store.record_winner(winner(Problem.make("rmsnorm", "bf16", m=16, n=64), predicted, {"baseline": True}))
    caplog.set_level(logging.WARNING, "tuneforge.engine")
    refused = DispatchTable.load(store, predicted, "Qwen3-32B", 1)
    assert refused.lookup("gemm", gemm_problem(16)) is None
    assert refused.lookup("rmsnorm", Problem.make("rmsnorm", "bf16", m=16, n=64)) is None
    (line,) = warnings_for(caplog)
    assert line == (f"dispatch: no winners for H100 x1 (predicted) (fingerprint {predicted.fingerprint}) in "
                    f"{store.url}, model Qwen3-32B, TP 1: every op runs the torch baseline; 2 predicted ones "
                    f"ignored (use --allow-predicted)")
    caplog.clear()
    allowed = DispatchTable.load(store, predicted, "Qwen3-32B", 1, allow_predicted=True)
    assert allowed.lookup("gemm", gemm_problem(16)) == cfg(4)
    assert warnings_for(caplog) == []


def test_an_empty_database_says_so_once_and_claims_no_predictions(store, caplog):
    caplog.set_level(logging.WARNING, "tuneforge.engine")
    predicted = Environment.predicted(spec("H100"), 1)
    ops = Ops("tuned", DispatchTable.load(store, predicted, "Qwen3-32B", 1))
    for op, dims in (("gemm", dict(n=128, k=64)), ("rmsnorm", dict(n=64)), ("silu_mul", dict(n=64))):
        for m in (1, 16):
            assert ops.config(op, torch.bfloat16, m=m, **dims) is None
    (line,) = warnings_for(caplog)
    assert line == (f"dispatch: no winners for H100 x1 (predicted) (fingerprint {predicted.fingerprint}) in "
                    f"{store.url}, model Qwen3-32B, TP 1: every op runs the torch baseline (run `tuneforge tune "
                    f"--model Qwen3-32B --tp 1`)")


def test_winners_of_another_dtype_say_so_once(store, caplog):
    store.record_winner(winner(gemm_problem(16), H100, cfg(1)))
    store.record_winner(winner(Problem.make("rmsnorm", "bf16", m=16, n=64), H100, {"baseline": True}))
    ops = Ops("tuned", DispatchTable.load(store, H100, "Qwen3-32B", 1))
    caplog.set_level(logging.WARNING, "tuneforge.engine")
    for m in (1, 16):
        assert ops.config("gemm", torch.float32, m=m, n=128, k=64) is None
        assert ops.config("rmsnorm", torch.float32, m=m, n=64) is None
    (line,) = warnings_for(caplog)
    assert line.startswith("dispatch: the winners are for bf16; this run is fp32: ")
    assert ops.table.fallbacks == ["gemm", "rmsnorm"]


def test_a_config_that_needs_tma_serves_its_portable_variant_here(store, caplog):
    """Predicted H100 winners choose TMA; without a GPU they run the same tiles on pointer loads, said
    once for the op; one whose tiles cannot run either way runs the baseline, said once."""
    predicted = Environment.predicted(spec("H100"), 1)
    for m in (1, 16):
        store.record_winner(winner(gemm_problem(m), predicted, cfg(4, tma=True)))
    big = Problem.make("gemm", "bf16", m=256, n=256, k=64)     # 5 x (256 + 256) x 64 bf16: too much shared memory
    store.record_winner(winner(big, predicted, cfg(4, tma=True, block_m=256, block_n=256, num_stages=5, num_warps=8)))
    caplog.set_level(logging.WARNING, "tuneforge.engine")
    ops = Ops("tuned", DispatchTable.load(store, predicted, "Qwen3-32B", 1, allow_predicted=True))
    assert ops.config("gemm", torch.bfloat16, m=16, n=128, k=64) == cfg(4)
    assert ops.config("gemm", torch.bfloat16, m=256, n=256, k=64) is None
    ported, dropped = warnings_for(caplog)
    assert ported.startswith("dispatch: 2 stored gemm config(s) need tma, which interpreter lacks (e.g. gemm|m=1,")
    assert ported.endswith("tma: interpreter has no TMA): they run the same tiles without it")
    assert dropped.startswith(f"dispatch: gemm runs the torch baseline for {big.key}: the stored config cannot run on "
                              f"interpreter: tma: interpreter has no TMA; without tma: shared memory: ")
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(16, 64, generator=g).bfloat16(), torch.randn(128, 64, generator=g).bfloat16()
    torch.testing.assert_close(ops.gemm(x, w).float(), x.float() @ w.float().T, rtol=2e-2, atol=5e-2)


def test_a_stored_config_outside_the_space_runs_the_baseline_said_once(store, caplog):
    store.record_winner(winner(gemm_problem(16), H100, cfg(1, block_m=3)))
    caplog.set_level(logging.WARNING, "tuneforge.engine")
    ops = Ops("tuned", DispatchTable.load(store, H100, "Qwen3-32B", 1))
    for m in (16, 8, 1):
        assert ops.config("gemm", torch.bfloat16, m=m, n=128, k=64) is None
    summary, line = warnings_for(caplog)
    assert summary.startswith("dispatch: no winners for ")
    assert line == ("dispatch: gemm runs the torch baseline for gemm|m=16,n=128,k=64|bf16|w1: the stored config "
                    "cannot run on interpreter: block_m=3 is not one of [16, 32, 64, 128, 256]")


def test_a_config_the_launcher_rejects_switches_its_problem_to_the_baseline(caplog):
    """A table built in memory (no load-time check) holding a config gemm's launcher rejects: the first
    call runs the baseline and says so in one line; later calls run the baseline silently."""
    bad = winner(Problem.make("gemm", "fp32", m=16, n=128, k=64), H100, cfg(1, block_m=3))
    ops = Ops("tuned", DispatchTable({bad.key: bad}, {}, where="memory", model="Qwen3-32B", tp=1))
    caplog.set_level(logging.WARNING, "tuneforge.engine")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(128, 64, generator=g)
    for m in (16, 16, 9):
        x = torch.randn(m, 64, generator=g)
        torch.testing.assert_close(ops.gemm(x, w), x @ w.T, rtol=1e-4, atol=1e-4)
    (line,) = warnings_for(caplog)
    assert line.startswith("dispatch: gemm runs the torch baseline for gemm|m=16,n=128,k=64|fp32|w1 (and any shape "
                           "its stored config serves): the launcher rejected that config: gemm config {")
    assert line.endswith("block_m=3 is not one of [16, 32, 64, 128, 256]")
    assert ops.config("gemm", torch.float32, m=16, n=128, k=64) is None


def test_lookups_never_touch_the_database(tmp_path):
    path = tmp_path / "tf.db"
    with Store(str(path)) as s:
        s.record_winner(winner(gemm_problem(16), H100, cfg(1)))
        table = DispatchTable.load(s, H100, "Qwen3-32B", 1)
    for f in os.listdir(tmp_path):
        os.remove(tmp_path / f)
    assert table.lookup("gemm", gemm_problem(8)) == cfg(1)


def test_open_ops_without_a_gpu_uses_the_target_prediction(tmp_path, caplog):
    url = f"sqlite:///{tmp_path / 'tf.db'}"
    with Store(url) as s:
        s.record_winner(winner(gemm_problem(16), Environment.predicted(spec("H100"), 1), cfg(4)))
    if torch.cuda.is_available():
        pytest.skip("with a GPU the local measured environment is used")
    assert open_ops("tuned", db=url, model="m", tp=1, allow_predicted=True).config(
        "gemm", torch.bfloat16, m=16, n=128, k=64) == cfg(4)
    caplog.set_level(logging.WARNING, "tuneforge.engine")
    assert open_ops("tuned", db=url, model="m", tp=1).config("gemm", torch.bfloat16, m=16, n=128, k=64) is None
    assert len(warnings_for(caplog)) == 1


def test_bad_modes_and_mismatched_lookups_are_one_line_errors(store):
    with pytest.raises(InputError, match="unknown dispatch mode 'fast'"):
        Ops("fast")
    with pytest.raises(InputError, match="needs a DispatchTable"):
        Ops("tuned")
    table = DispatchTable.load(store, H100, "Qwen3-32B", 1)
    with pytest.raises(InputError, match="got a 'gemm' problem"):
        table.lookup("rmsnorm", gemm_problem(1))


@pytest.mark.parametrize("mode", ["baseline", "default"])
def test_ops_agree_with_torch(mode):
    """Each op through Ops matches plain torch, by the baseline or by the Triton kernel."""
    ops = Ops(mode)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 32, generator=g)
    w = torch.randn(48, 32, generator=g)
    torch.testing.assert_close(ops.gemm(x, w), x @ w.T, rtol=1e-4, atol=1e-4)
    gu = torch.randn(5, 64, generator=g)
    torch.testing.assert_close(ops.silu_mul(gu), torch.nn.functional.silu(gu[:, :32]) * gu[:, 32:])
    weight = torch.rand(32, generator=g) + 0.5
    norm = lambda h: h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
    torch.testing.assert_close(ops.rmsnorm(x, weight, 1e-6), norm(x), rtol=1e-5, atol=1e-5)
    residual = torch.randn(5, 32, generator=g)
    expect_sum = x + residual
    y, summed = ops.add_rmsnorm(x, residual, weight, 1e-6)
    assert summed is residual
    torch.testing.assert_close(summed, expect_sum)
    torch.testing.assert_close(y, norm(expect_sum), rtol=1e-5, atol=1e-5)


def test_decode_attention_is_served_by_the_bucket_of_its_cache_length(store):
    """Records tuned at the planned KV lengths serve a decode step by the bucket of its cache view's
    length (256 serves up to 256 slots, 4096 serves 1025-4096); the kernel then runs with that
    config and matches the baseline (SDPA with the engine's mask)."""
    from tuneforge.kernels import decode_attention as DA
    short, long = dict(splits=4, block_n=16, num_warps=4, num_stages=1), dict(splits=8, block_n=32, num_warps=4,
                                                                             num_stages=2)
    for ctx, config in ((256, short), (4096, long)):
        problem = Problem.make("decode_attention", "fp32", m=2, heads=4, kv_heads=2, head_dim=16, ctx=ctx)
        store.record_winner(winner(problem, H100, config))
    ops = Ops("tuned", DispatchTable.load(store, H100, "Qwen3-32B", 1))
    g = torch.Generator().manual_seed(0)
    for length, config in ((200, short), (256, short), (1100, long)):
        q = torch.randn(2, 4, 16, generator=g)
        k, v = torch.randn(2, 2, 2, length, 16, generator=g)
        positions = torch.tensor([length // 3, length - 1])
        # stored without the tma flag (a config from before it existed): served with it off
        assert ops.config("decode_attention", q.dtype, m=2, heads=4, kv_heads=2, head_dim=16,
                          ctx=256 if length <= 256 else 4096) == {**config, "tma": False}
        mask = DA.valid_slots_mask(positions, length, q.dtype)
        torch.testing.assert_close(ops.decode_attention(q, k, v, positions, mask), DA.sdpa(q, k, v, mask),
                                   atol=1e-5, rtol=1e-5)


def test_an_untuned_moe_gemm_runs_its_kernel_default_not_the_host_syncing_loop(store, caplog, tmp_path):
    """moe_gemm's baseline (transformers' per-expert loop) reads the routing back to the host: a tuned
    table without its winner serves the kernel's default config; other ops keep the torch baseline."""
    store.record_winner(winner(gemm_problem(1), H100, cfg(1)))
    ops = Ops("tuned", DispatchTable.load(store, H100, "Qwen3-30B-A3B", 1))
    moe = Problem.make("moe_gemm", "bf16", m=32, n=1536, k=2048, experts=128, topk=8, act=1)
    assert ops.choice(moe) == {}                                   # LAUNCHER_DEFAULT
    assert ops.choice(Problem.make("rmsnorm", "bf16", m=4, n=2048)) == {}     # a row op: its default too
    assert ops.choice(gemm_problem(64)) is None                    # above m=1: the baseline (cuBLAS)
    assert ops.table.fallbacks == ["gemm"]                         # what ran the baseline, said by bench_e2e
    assert Ops("tuned", DispatchTable.load(Store(f"sqlite:///{tmp_path / 'empty.db'}"), H100, "m", 1)).choice(moe) \
        is None                                                    # nothing tuned: every op the baseline, as said
    said = [w for w in warnings_for(caplog) if w.startswith("dispatch: moe_gemm")]
    assert said and said[0].startswith("dispatch: moe_gemm runs its Triton kernel at the default config, not the "
                                       "torch baseline (its baseline (transformers' per-expert loop) reads the routing")


def test_default_dispatch_runs_every_kernel_at_its_default_but_no_fusion():
    ops = Ops("default")
    assert ops.choice(gemm_problem(1)) == {}
    assert ops.choice(Problem.make("gemm_fused", "bf16", m=1, n=128, k=64, norm=1, epi=0)) is None   # unfused
