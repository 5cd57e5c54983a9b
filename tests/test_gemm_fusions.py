"""GEMM fusions (kernels/gemm_fused.py, gemm's kernel paths): the RMSNorm prologue, the SiLU-mul pair and
the residual add, each checked under the interpreter against the chain of the unfused ops' references
(rmsnorm, gemm, silu_mul: fp32/fp64, outputs NaN-poisoned), in fp32 and bf16, at the default config and
at sampled ones (the residual add in every schedule); their constraints and input errors; the sm_90
compile of the fused paths; and the engine, whose forward fuses exactly where the table says so and
matches the unfused forward, also from a database tuned before the fusions existed."""
import pytest
import torch

from conftest import compile_for_sm90, input_errors
from tuneforge.db.environment import Environment
from tuneforge.db.store import Winner
from tuneforge.dsl import check, compare, get
from tuneforge.dsl.check import TOLERANCE, interpreter_scale, split_out
from tuneforge.engine.dispatch import Ops
from tuneforge.engine.lookup import DispatchTable
from tuneforge.kernels import gemm as G
from tuneforge.kernels import gemm_fused as GF
from tuneforge.kernels import rmsnorm as RMS
from tuneforge.kernels import silu_mul as SILU
from tuneforge.models import problems as P

CPU = torch.device("cpu")
SPEC = G.launch_spec(CPU)
# (norm, epilogue): every fusion the engine runs
FUSIONS = [(True, "none"), (False, "silu_mul"), (True, "silu_mul"), (False, "residual")]


def unfused_reference(x, w, norm_weight=None, eps=RMS.QWEN3_EPS, residual=None, silu=False) -> torch.Tensor:
    """The unfused ops' references one after the other, unrounded: rmsnorm, gemm, then silu_mul or the add.
    (Rounding the norm's output to x's dtype models the unfused rmsnorm, not the prologue, which rounds
    x * norm_weight and scales by the rows' rsqrt after the GEMM: the two roundings differ, and on the H200
    2026-12-04 that reference failed 61 of 13.1M correct elements at m=512.)"""
    h = x if norm_weight is None else RMS.reference(x, norm_weight, eps)
    y = G.reference(h, w)
    if silu:
        y = SILU.reference(y)
    return y if residual is None else y + residual.double()


def checked(problem, config, seed=0):
    inputs = GF.make_inputs(problem, CPU, seed)
    ref = unfused_reference(**{k: v for k, v in inputs.items() if k != "out"})
    return check(GF.TEMPLATE, problem, config, inputs=inputs, reference=ref,
                 scale=interpreter_scale(problem.torch_dtype))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("norm,epilogue", FUSIONS)
def test_default_config_matches_the_unfused_ops(dtype, norm, epilogue):
    # odd m, k not a multiple of any BLOCK_K, n not a multiple of the tile: every edge masked
    problem = P.gemm_fused(dtype, 5, (96, 72), norm=norm, epilogue=epilogue)
    config = G.fused_default_config(problem, SPEC)
    assert GF.TEMPLATE.reject_reason(config, problem, SPEC) is None
    result = checked(problem, config)
    assert result, f"{config}: {result.reason}"


# Tiles, warps, grouping and persistence other than the default's (hand-picked: enumerating gemm's space
# takes minutes); every fusion also where K slices meet (split-K, stream-K, hybrid: the norm's rows' rsqrt
# from a pass over them, the pair summed interleaved, the add by the last slice), the add on wide tiles.
VARIANTS = [dict(block_m=32, block_n=16, block_k=32, group_m=4, num_warps=8, programs_per_sm=2, schedule="tiles",
                 split_k=1),
            dict(block_m=16, block_n=32, block_k=16, group_m=8, num_stages=2, flatten=True, programs_per_sm=1,
                 schedule="tiles", split_k=1)]
SPLIT_VARIANTS = [dict(block_m=16, block_n=16, block_k=16, schedule="tiles", split_k=2),
                  dict(block_m=16, block_n=16, block_k=16, schedule="stream"),
                  dict(block_m=16, block_n=16, block_k=16, schedule="hybrid", programs_per_sm=1)]
WIDE = dict(block_m=16, block_n=48, block_k=16, group_m=4, schedule="tiles", split_k=1)


@pytest.mark.parametrize("norm,epilogue", FUSIONS)
def test_other_configs_match_the_unfused_ops(norm, epilogue):
    # 37 x 40 outputs over 4 interpreted programs: several tiles per program, grouping exercised
    problem = P.gemm_fused("bf16", 37, (80 if epilogue == "silu_mul" else 40, 48), norm=norm, epilogue=epilogue)
    base = G.fused_default_config(problem, SPEC)
    extra = SPLIT_VARIANTS + ([WIDE] if epilogue == "residual" else [])
    for change in VARIANTS + extra:
        config = {**base, **change}
        if config["schedule"] != "tiles":
            config.pop("split_k", None)
        assert GF.TEMPLATE.reject_reason(config, problem, SPEC) is None, config
        result = checked(problem, config, seed=3)
        assert result, f"{config}: {result.reason}"


def test_residual_add_in_place_and_norm_weight_applied():
    problem = P.gemm_fused("fp32", 3, (32, 40), epilogue="residual")
    inputs = GF.make_inputs(problem, CPU, 1)
    x, w, residual = inputs["x"], inputs["w"], inputs["residual"]
    want = unfused_reference(x, w, residual=residual)
    assert GF.gemm_fused(x, w, residual=residual, out=residual) is residual
    assert compare(residual, want)
    # a norm weight far from 1: the fused prologue must scale x by it, not only by the rows' rsqrt
    g = torch.linspace(0.2, 3.0, 40)
    got = GF.gemm_fused(x, w, norm_weight=g)
    assert compare(got, unfused_reference(x, w, norm_weight=g))
    assert not compare(got, unfused_reference(x, w, norm_weight=torch.ones(40)))


def test_the_norm_and_the_pair_refuse_wide_tiles_and_the_pair_counts_both_b_tiles():
    pair = P.gemm_fused("bf16", 1, (2048, 4096), epilogue="silu_mul")
    norm = P.gemm_fused("bf16", 1, (1024, 4096), norm=True)
    residual = P.gemm_fused("bf16", 1, (1024, 4096), epilogue="residual")
    cfg = G.fused_default_config(residual, SPEC)
    for change in ({"schedule": "stream"}, {"split_k": 4}, {"block_n": 96}):
        bad = {**cfg, "schedule": "tiles", "split_k": 1, "block_n": 32, **change}
        if change.get("schedule") == "stream":
            bad.pop("split_k")
        for problem in (pair, norm, residual):
            why = G.fusion_unsupported(bad, problem, SPEC)
            assert (why is not None) == ("block_n" in change and problem is not residual), (change, problem.key)
    assert "power of two" in G.fusion_unsupported({**cfg, "block_n": 96}, pair, SPEC)
    # the pair's two B tiles count against shared memory
    pair = P.gemm_fused("bf16", 512, (1024, 4096), epilogue="silu_mul")
    big = dict(G.fused_default_config(pair, SPEC), block_n=256, block_k=128, num_stages=4)
    assert "shared memory" in G.fusion_unsupported(big, pair, SPEC)
    for problem in (norm, residual, pair):
        seeds = GF.seeds(problem, SPEC)
        assert seeds[0] == {"kernel": "triton", **G.fused_default_config(problem, SPEC)} and len(seeds) > 3
        assert all(GF.TEMPLATE.reject_reason(c, problem, SPEC) is None for c in seeds)


def test_bad_fusion_inputs_are_one_line_errors():
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    assert input_errors([
        lambda: GF.gemm_fused(x, torch.randn(5, 8), silu=True),
        lambda: GF.gemm_fused(x, w, norm_weight=torch.ones(6)),
        lambda: GF.gemm_fused(x, w, residual=torch.randn(4, 3)),
        lambda: GF.gemm_fused(x, w, silu=True, residual=torch.randn(4, 3)),
        lambda: GF.gemm_fused(x, w, silu=True, out=torch.empty(4, 6)),
    ]) == ["gemm: silu_mul needs w's rows as gate | up halves, got 5 rows",
           "gemm: norm_weight has shape (6,), expected (8,)",
           "gemm: residual has shape (4, 3), expected (4, 6)",
           "gemm: silu_mul and a residual add are not fused together",
           "gemm: out has shape (4, 6), expected (4, 3)"]


def test_the_silu_mul_check_carries_its_factors_error_and_still_rejects_a_wrong_element():
    """Norm + gate_up with Qwen3-scale norm weights (x4): the unfused bf16 chain a torch user runs fails the
    table alone on many elements (an absolute error in gate, times up); with the SiLU-mul's propagated
    error it passes, and one element off by 5 % of the output's range still fails."""
    problem = P.gemm_fused("bf16", 16, (512, 512), norm=True, epilogue="silu_mul")
    inputs = split_out(GF.make_inputs(problem, CPU, 0))
    inputs["norm_weight"] = (4.0 * inputs["norm_weight"].float()).bfloat16()
    ref, unfused = GF.reference(**inputs), GF.baseline(**inputs)
    slack = GF.TEMPLATE.propagated_error(TOLERANCE[torch.bfloat16][0], **inputs)
    assert not compare(unfused, ref)
    assert compare(unfused, ref, slack=slack)
    wrong = unfused.clone()
    wrong[3, 5] += 0.05 * ref.abs().max()
    result = compare(wrong, ref, slack=slack)
    assert not result and result.reason.startswith("1/4096 elements off, first at (3, 5)")
    assert GF.TEMPLATE.propagated_error(0.016, **{**inputs, "silu": False}) is None


def test_the_fused_paths_compile_for_sm90():
    types = dict(x="*bf16", w="*bf16", w_lo="*bf16", y="*bf16", partial="*fp32", counts="*i32", res="*bf16",
                 norm_w="*bf16", x_rows="*bf16", eps="fp32")
    base = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_N_LO=0, BLOCK_K=128, GROUP_M=1, STREAM=False, FLATTEN=False,
                USE_TMA=False, EVEN_K=True, UPCAST=False, INPUT_PRECISION="tf32")
    # one compile holds every fused path: the norm prologue and the pair in whole tiles, the norm's rows'
    # pass and the residual add where stream-K's slices meet (the host never asks for the pair and the add
    # together)
    compile_for_sm90("tuneforge.kernels.gemm", [
        ("_gemm_kernel", dict(base, STREAM=True, NORM=True, SILU=True, RESIDUAL=True))], types)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 32, 512])
@pytest.mark.parametrize("norm,epilogue", FUSIONS)
def test_gpu_qwen3_32b_shapes(device, m, norm, epilogue):
    """Each fusion at Qwen3-32B's TP 1 shapes: the default, its pointer / TMA twin and the seeds' first few,
    against the unfused ops' references (compiled by the GPU's Triton, TMA included)."""
    weight = {(True, "none"): (10240, 5120), (False, "residual"): (5120, 8192)}.get((norm, epilogue), (51200, 5120))
    problem = P.gemm_fused("bf16", m, weight, norm=norm, epilogue=epilogue)
    spec = G.launch_spec(device)
    default = G.fused_default_config(problem, spec)
    configs = [default, {**default, "tma": not default["tma"]}] + GF.seeds(problem, spec)[1:4]
    inputs = GF.make_inputs(problem, device, 0)
    ref = unfused_reference(**{k: v for k, v in inputs.items() if k != "out"})
    for config in configs:
        if GF.TEMPLATE.reject_reason(config, problem, spec) is None:
            result = check(GF.TEMPLATE, problem, config, device=device, inputs=inputs, reference=ref)
            assert result, f"{config}: {result.reason}"


# --- the engine -------------------------------------------------------------------------------------------

ENV = Environment("interpreter", 4, 0.0, 1, "single-gpu", torch.__version__, "3", "none", False)


def _table(the_plan, fused: set, fused_s: float = 9e-6) -> DispatchTable:
    """A table whose gemm_fused winners are the kernel (default config) for the ``fused`` (norm, epi)
    kinds and the baseline for the others, every other op the baseline, each winner 10 us but the fused
    kernels' ``fused_s`` (9 us: faster than any unfused ops they replace); ``fused`` None: no gemm_fused record at all (a database tuned before the fusions)."""
    hashes = {op: get(op).source_hash for op in {i.problem.op for i in the_plan.tunable}}
    winners = {}
    for i in the_plan.tunable:
        if i.problem.op == "gemm_fused" and fused is None:
            continue
        kind = (bool(i.problem["norm"]), P.GEMM_EPILOGUES[i.problem["epi"]]) if i.problem.op == "gemm_fused" else None
        config = {} if kind in (fused or ()) else {"baseline": True}
        time_s = fused_s if config == {} else 1e-5
        winners[i.key] = Winner(i.problem, ENV, config, time_s, 1e-5, 1.0, 50.0, "measured", hashes[i.problem.op],
                                "test", 1)
    return DispatchTable(winners, {}, where="test", model=the_plan.model, tp=1, quiet=True)


def test_the_engine_fuses_where_the_table_says_and_matches_the_unfused_forward(tiny_config):
    from tuneforge.engine.generate import Generator
    from tuneforge.models.configs import load_config
    from tuneforge.models.loading import random_weights
    from tuneforge.models.qwen3 import Qwen3
    from tuneforge.tune.plan import plan
    cfg = load_config(tiny_config)
    model = Qwen3(cfg, dtype=torch.float32)
    random_weights(model)
    g = torch.Generator().manual_seed(0)
    for p in [model.norm] + [n for layer in model.layers for n in (layer.input_norm, layer.post_attention_norm)]:
        p.copy_(0.5 + torch.rand(p.shape, generator=g))       # norm weights far from 1 (random_weights: 1)
    the_plan = plan(cfg, tp=1, decode_buckets=(1,), prefill_buckets=(3,), dtype="fp32")

    def run(ops):
        out = Generator(model, ops, max_batch=1, max_len=6, graphs=False).generate([[3, 1, 4]], 2,
                                                                                  return_logits=True)
        ran = {(bool(p["norm"]), P.GEMM_EPILOGUES[p["epi"]]) for p, c in ops._chosen.items()
               if p.op == "gemm_fused" and c is not None}
        return torch.stack(out.logits), ran

    want, ran = run(Ops("baseline"))
    assert ran == set()
    every = set(FUSIONS)
    prologue = every - {(False, "silu_mul")}       # the norm + SiLU-mul kernel leaves SiLU-mul alone unused
    cases = [(every, prologue),
             # o's and down's residual adds not fused: nothing to norm in a prologue but the first layer's qkv
             ({(True, "none"), (True, "silu_mul"), (False, "silu_mul")}, {(True, "none"), (False, "silu_mul")}),
             ({(False, "residual")}, {(False, "residual")}),
             (None, set())]                       # no gemm_fused record: the unfused ops, as before
    for fused, expected in cases:
        got, ran = run(Ops("tuned", _table(the_plan, fused)))
        assert ran == expected, fused
        assert compare(got, want, torch.float32, scale=5.0), fused
    # fusions that beat the torch ops but not the unfused ops' own winners together (40 us >= 1-3 x 10 us)
    # are left unfused, the residual add weighed against its GEMM alone (the next norm adds it)
    got, ran = run(Ops("tuned", _table(the_plan, every, fused_s=4e-5)))
    assert ran == set() and compare(got, want, torch.float32, scale=5.0)
    # 15 us: the norm prologues (against 20-30 us unfused) win, the residual epilogues (10 us) lose, so only
    # the first layer's qkv has its norm to compute in a prologue; gate_up fuses its SiLU-mul alone
    got, ran = run(Ops("tuned", _table(the_plan, every, fused_s=1.5e-5)))
    assert ran == {(True, "none"), (False, "silu_mul")} and compare(got, want, torch.float32, scale=5.0)
