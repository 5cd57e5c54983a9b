"""The TP blocks (tp_mlp, tp_attn) under both strategies against torch references in real worlds:
2 and 4 CPU ranks under Triton's interpreter (default config, gemm_ar and ag_rs with their sub-space
choices, sampled configs; odd m, a rank without rows), the engine's calling convention (qkv-half,
an attention stand-in, o-half; row-sharded vs replicated layouts), sub-configs that the kernels'
own spaces accept, the cost model at the tuning plan's shapes; on one GPU (``-m gpu``) 2 and 4
processes sharing it at Qwen3-32B TP8 shapes."""
import importlib
import math
import random

import pytest
import torch
import torch.nn.functional as F

from conftest import input_errors
from tuneforge.dsl import Problem, get, poison
from tuneforge.dsl.check import compare, interpreter_scale, split_out
from tuneforge.world import spawn

from test_overlap import sample_config

BLOCKS = {"tp_mlp": dict(hidden=24, inter=40), "tp_attn": dict(hidden=24, qkv=56, o_in=32)}
TILES = dict(block_m=16, block_n=16, block_k=16, group_m=1, num_warps=4, num_stages=2, tma=False)
STRATEGY_CONFIGS = [
    dict(strategy="gemm_ar", comm_sms=2, ar_strategy="two_shot", ar_variant="pull"),
    dict(strategy="gemm_ar", comm_sms=1, ar_strategy="one_shot", ar_variant="push"),
    dict(strategy="ag_rs", comm_sms=1, variant="pull", signal="tile", order="next", gather="side_stream",
         reduce="consumer"),
    dict(strategy="ag_rs", comm_sms=2, variant="push", signal="rank", order="prev", gather="fused", reduce="fused"),
]


def block_configs(op: str, problem: Problem, spec=None, samples: int = 2, tiles: dict = TILES) -> list[dict]:
    template = get(op)
    configs = [template.default_config(problem, spec)] + [dict(tiles, **c) for c in STRATEGY_CONFIGS]
    rng, space = random.Random(problem["m"]), template.space(problem)
    for strategy in ("gemm_ar", "ag_rs")[:samples]:
        for _ in range(200):
            c = sample_config(space, rng)
            c["tma"] = c["tma"] and spec is not None
            if c["strategy"] == strategy and template.reject_reason(c, problem, spec) is None:
                configs.append(c)
                break
    return [c for c in configs if template.reject_reason(c, problem, spec) is None]


def check_block(template, config, ctx, inputs):
    """``dsl.check`` with the interpreter's bf16 widening (``check.interpreter_scale``): a bf16 block
    chains three rounded stages whose truncation errors add up."""
    poison(inputs["out"])
    out = template.launch(**inputs, config=config)
    ctx.synchronize()
    return compare(out, template.reference(**split_out(inputs)), out.dtype, scale=interpreter_scale(out.dtype))


def _check_world(world, ms, dtypes, spec_name=None):
    """Every block, m, dtype and config against the reference (dtypes rotate over the configs on the
    CPU), the torch baselines of both layouts, the gemm_ar output identical on every rank."""
    from tuneforge.dsl.heap import SymmetricHeap
    from tuneforge.kernels.gemm import launch_spec
    heap = SymmetricHeap(world, 64 << 20)
    ctx = heap.context()
    spec = launch_spec(ctx.device) if spec_name else None
    dims_of = GPU_BLOCKS if spec_name else BLOCKS
    failures, covered, replicated, checked = [], set(), [], 0
    for op, dims in dims_of.items():
        template = get(op)
        for i, m in enumerate(ms):
            for j, dtype in enumerate(dtypes):
                problem = Problem.make(op, dtype, world.size, m=m, **dims)
                tiles = dict(TILES, block_m=64, block_n=128, block_k=64, num_stages=3, tma=True) if spec else TILES
                configs = block_configs(op, problem, spec, tiles=tiles)
                if spec is None:
                    cell, cells = i * len(dtypes) + j, len(ms) * len(dtypes)
                    configs = [c for q, c in enumerate(configs) if q % cells == cell]
                for config in configs:
                    inputs = template.make_inputs(problem, ctx.device, 1 + i, ctx)
                    result = check_block(template, config, ctx, inputs)
                    checked += 1
                    covered.add((op, config["strategy"]))
                    if not result:
                        failures.append(f"{problem.key} {config}: {result.reason}")
                    if config["strategy"] == "gemm_ar":
                        replicated.append(inputs["out"].cpu().view(torch.uint8).numpy().tobytes())
                ref = template.reference(**split_out(inputs))
                module = importlib.import_module(template.module)
                row0 = sum(r for r in _rows(m, world.size)[:world.rank])
                rows = _rows(m, world.size)[world.rank]
                weights = [v for key, v in inputs.items() if key not in ("x", "ctx", "out")]
                for name, base in (("baseline", template.baseline(**split_out(inputs))),
                                   ("baseline_ag_rs", module.baseline_ag_rs(inputs["x"][row0:row0 + rows].contiguous(),
                                                                            *weights, ctx, m))):
                    ok = compare(base, ref, base.dtype, scale=2 * world.size)
                    if not ok:
                        failures.append(f"{name} {problem.key}: {ok.reason}")
    heap.close()
    return {"failures": failures, "checked": checked, "covered": covered, "replicated": replicated}


def _rows(m, world):
    return [m // world + (1 if r < m % world else 0) for r in range(world)]


def _assert_world(results):
    for rank, r in enumerate(results):
        assert not r["failures"], f"rank {rank}:\n" + "\n".join(r["failures"])
        assert r["checked"] > 0
        assert r["replicated"] == results[0]["replicated"]        # gemm_ar: bit-identical replicas
    assert results[0]["covered"] == {(op, s) for op in BLOCKS for s in ("gemm_ar", "ag_rs")}


def test_tp_blocks_two_cpu_ranks():
    results = spawn(_check_world, 2, [7], ("fp32", "bf16"), timeout=900)
    _assert_world(results)


def test_tp_blocks_four_cpu_ranks():
    # m=6: shares 2, 2, 1, 1 (not a multiple of world x tile); m=3: a rank without rows
    results = spawn(_check_world, 4, [6, 3], ("fp16",), timeout=900)
    _assert_world(results)


def _engine_calls(world):
    """The engine's calling convention, both strategies: qkv_half -> attention stand-in -> o_half,
    then tp_mlp; the layouts (replicated vs this rank's rows) and the results against torch."""
    from tuneforge.dsl.heap import SymmetricHeap
    from tuneforge.kernels.tp_attn import o_half, qkv_half
    from tuneforge.kernels.tp_mlp import own_rows, tp_mlp
    heap = SymmetricHeap(world, 16 << 20)
    ctx = heap.context()
    m, hidden, heads, head_dim = 5, 32, 2, 16
    g = torch.Generator().manual_seed(world.rank + 5)
    x = torch.randn(m, hidden, generator=torch.Generator().manual_seed(0))
    qkv_w = torch.randn(3 * heads * head_dim, hidden, generator=g) / hidden ** 0.5
    o_w = torch.randn(hidden, heads * head_dim, generator=g) / (heads * head_dim * world.size) ** 0.5
    gate_up = torch.randn(2 * 24, hidden, generator=g) / hidden ** 0.5
    down = torch.randn(hidden, 24, generator=g) / (12 * world.size) ** 0.5

    def attention(qkv):    # a stand-in for the engine's core: causal SDPA over the m tokens
        q, k, v = (t.view(m, heads, head_dim).transpose(0, 1) for t in qkv.split(heads * head_dim, dim=1))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1).reshape(m, -1)

    def summed(partial):
        return torch.stack(ctx.world.all_gather(partial)).sum(0)

    expect_attn = summed(F.linear(attention(F.linear(x, qkv_w)), o_w))
    expect_mlp = summed(F.linear(F.silu(F.linear(x, gate_up[:24])) * F.linear(x, gate_up[24:]), down))
    failures, errors = [], []
    for config in (None, dict(TILES, **STRATEGY_CONFIGS[0]), dict(TILES, **STRATEGY_CONFIGS[2]),
                   dict(TILES, **STRATEGY_CONFIGS[3])):
        sharded = config is not None and config["strategy"] == "ag_rs"
        inp = own_rows(x, ctx).contiguous() if sharded else x
        qkv = qkv_half(inp, qkv_w, ctx=ctx, config=config, m=m)
        if qkv.shape != (m, qkv_w.shape[0]):
            failures.append(f"{config}: qkv_half gave {tuple(qkv.shape)}")
        attn_out = o_half(attention(qkv), o_w, ctx=ctx, config=config)
        mlp_out = tp_mlp(inp, gate_up, down, ctx=ctx, config=config, m=m)
        for name, got, want in (("attn", attn_out, expect_attn), ("mlp", mlp_out, expect_mlp)):
            want = own_rows(want, ctx) if sharded else want
            res = compare(got, want.double(), got.dtype, scale=2.0)    # torch's own roundings differ
            if not res:
                failures.append(f"{name} {config}: {res.reason}")
    errors += input_errors((lambda: qkv_half(own_rows(x, ctx).contiguous(), qkv_w, ctx=ctx, config=dict(TILES, **STRATEGY_CONFIGS[2])),
                            lambda: qkv_half(x, qkv_w, ctx=ctx, m=m + 1),
                            lambda: tp_mlp(x, gate_up, down.T, ctx=ctx)))
    heap.close()
    return failures, errors


def test_engine_calling_convention_both_strategies():
    for failures, errors in spawn(_engine_calls, 2, timeout=600):
        assert not failures, failures
        assert all(e != "no error" and "\n" not in e for e in errors), errors


def test_block_sub_configs_fit_the_kernels_spaces():
    """Any config the tuner may draw for a TP block (accepted by its constraints) maps to configs
    that gemm / allreduce / ag_gemm / gemm_rs accept at the shapes they run at; both strategies and
    their conditional parameters are in the space."""
    from tuneforge.kernels.tp_mlp import sub_configs
    from tuneforge.dsl.devices import DEFAULT_TARGET, SPECS
    spec = SPECS[DEFAULT_TARGET]
    rng = random.Random(0)
    for op, dims in BLOCKS.items():
        for m, world in ((7, 2), (3, 4), (256, 8)):
            template = get(op)
            problem = Problem.make(op, "bf16", world, m=m, **dims)
            space = template.space(problem)
            assert {"strategy", "ar_strategy", "variant", "signal", "reduce"} <= set(space.names)
            seen = set()
            for _ in range(300):
                c = sample_config(space, rng)
                if template.reject_reason(c, problem, spec) is not None:
                    continue
                seen.add(c["strategy"])
                sub = sub_configs(c, world, m, dims["hidden"], torch.bfloat16)
                n1, k1 = (2 * dims["inter"], dims["hidden"]) if op == "tp_mlp" else (dims["qkv"], dims["hidden"])
                n2, k2 = (dims["hidden"], dims["inter"]) if op == "tp_mlp" else (dims["hidden"], dims["o_in"])
                if c["strategy"] == "gemm_ar":
                    get("gemm").space(Problem.make("gemm", "bf16", m=m, n=n1, k=k1)).validate(sub["gemm"])
                    assert sub["allreduce"]["strategy"] == c["ar_strategy"]
                else:
                    for kop, n, k in (("ag_gemm", n1, k1), ("gemm_rs", n2, k2)):
                        kp = Problem.make(kop, "bf16", world, m=m, n=n, k=k)
                        get(kop).space(kp).validate(sub[kop])
                        assert get(kop).reject_reason(sub[kop], kp, spec) is None, (kop, sub[kop])
            assert seen == {"gemm_ar", "ag_rs"}


def test_block_costs_at_the_tuning_plan_shapes():
    """The tp_mlp / tp_attn problems the tuning plan makes for Qwen3-32B at TP 2 and 8: default
    configs pass on an H100, both strategies have finite positive costs, and at TP 8 (where the
    communication is large next to each rank's GEMMs) ag_rs is predicted to win a long prefill."""
    from tuneforge.dsl.devices import DEFAULT_TARGET, SPECS
    from tuneforge.tune.plan import plan
    spec = SPECS[DEFAULT_TARGET]
    for tp in (2, 8):
        items = [i for i in plan("Qwen3-32B", tp, registered={"tp_mlp": "", "tp_attn": ""})
                 if i.problem.op in BLOCKS]
        assert {i.problem.op for i in items} == set(BLOCKS)
        for item in items:
            template, problem = get(item.problem.op), item.problem
            config = template.default_config(problem, spec)
            assert template.reject_reason(config, problem, spec) is None, (problem.key, config)
            costs = {}
            for strategy in ("gemm_ar", "ag_rs"):
                c = template.default_config(problem, spec, strategy)
                assert template.reject_reason(c, problem, spec) is None, (problem.key, c)
                costs[strategy] = template.cost(problem, c, spec)
                assert 0 < costs[strategy] < 1 and math.isfinite(costs[strategy])
            assert 0 < template.cost(problem, None, spec) < 1
            if problem["m"] == 8192 and tp == 8:
                assert costs["ag_rs"] < costs["gemm_ar"], (problem.key, costs)


# --- one GPU shared by several processes --------------------------------------------------------------

# Qwen3-32B at TP 8 (per-rank shards)
GPU_BLOCKS = {"tp_mlp": dict(hidden=5120, inter=3200), "tp_attn": dict(hidden=5120, qkv=1280, o_in=1024)}


@pytest.mark.gpu
@pytest.mark.parametrize("ranks", [2, 4])
def test_tp_blocks_processes_sharing_one_gpu(ranks):
    results = spawn(_check_world, ranks, [129, 3], ("bf16",), "gpu", device="cuda", share_gpu=True, timeout=600)
    _assert_world(results)
