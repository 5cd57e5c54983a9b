"""gemm's ``gemv`` family (kernels/_gemm_gemv.py): decode's few rows against the fp64 reference under the
interpreter (ragged n and k, 1..8 rows, every dtype, NaN-poisoned outputs through the checker), its
constraints in one line, the template default choosing it through the cost model; on a GPU, Qwen3
decode shapes."""

import pytest
import torch

from tuneforge.dsl import Problem, check, get
from tuneforge.dsl.devices import SPECS
from tuneforge.errors import ConfigRejected
from tuneforge.kernels import _gemm_gemv as GV
from tuneforge.kernels import gemm as G
from gemm_families import assert_config_checks, assert_one_line_reason

CPU = torch.device("cpu")
GEMM = get("gemm")


def _gemv(bn, bk, warps):
    return dict(kernel="gemv", gemv_block_n=bn, gemv_block_k=bk, gemv_warps=warps)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("m,n,k,config", [
    (1, 48, 130, _gemv(16, 64, 2)),       # k not a multiple of the step, n of the block
    (3, 33, 64, _gemv(8, 64, 1)),         # rows padded to 4, a ragged last column block
    (8, 20, 200, _gemv(4, 128, 4)),       # the most rows the family takes
    (2, 64, 256, _gemv(64, 64, 8)),       # one column block, even k
])
def test_gemv_matches_the_reference(dtype, m, n, k, config):
    assert_config_checks(Problem.make("gemm", dtype, m=m, n=n, k=k), config)


def test_seeds_pass_and_are_checked():
    problem = Problem.make("gemm", "bf16", m=2, n=96, k=1024)
    spec = G.launch_spec(CPU)
    seeds = GV.seeds(problem, spec)
    assert seeds and all(GEMM.reject_reason(c, problem, spec) is None for c in seeds)
    assert check(GEMM, problem, seeds[0]), seeds[0]
    assert GV.seeds(Problem.make("gemm", "bf16", m=9, n=96, k=1024), spec) == []
    small_k = Problem.make("gemm", "bf16", m=1, n=96, k=100)     # K steps clipped to k's next power of 2
    assert {c["gemv_block_k"] for c in GV.seeds(small_k, spec)} == {128}


def test_the_launcher_default_is_the_templates():
    """``gemm(x, w)`` without a config runs the template's default (gemv where the cost model says so)."""
    spec = G.launch_spec(CPU)
    for m, n, k in ((1, 5120, 2048), (2, 96, 1024), (16, 96, 1024)):
        problem = Problem.make("gemm", "bf16", m=m, n=n, k=k)
        assert G._plan(None, m, n, k, torch.bfloat16, CPU).config == GEMM.default_config(problem, spec)


@pytest.mark.parametrize("m,config,reason", [
    (9, _gemv(8, 64, 4), "kernel='gemv' is not one of ['triton', 'gluon_ws', 'skinny']"),     # not past 8 rows
    (8, _gemv(64, 2048, 1), "kernel gemv: 32768 fp32 products per thread per step > 128"),
    (1, _gemv(64, 64, 4), None),
    (1, _gemv(4, 4096, 8), "gemv_block_k=4096 is not one of"),
])
def test_constraints_say_why_in_one_line(m, config, reason):
    assert_one_line_reason(m, config, reason)


def test_fused_gemms_refuse_the_family():
    """gemm_fused (norm / residual / silu_mul epilogues) keeps the Triton kernel: a gemv config there is
    outside its space."""
    x, w = torch.randn(1, 64), torch.randn(32, 64)
    with pytest.raises(ConfigRejected, match="kernel"):
        G.gemm(x, w, residual=torch.zeros(1, 32), config=_gemv(8, 64, 2))


def test_the_default_takes_gemv_where_the_cost_model_prices_it_lower():
    """At 1-2 rows the default is the cheaper of the first gemv seed and the Triton default, by the cost
    model (gemv for Qwen3's decode projections, as the H200 measured at one row); never gemv at 16 rows."""
    spec = SPECS["H200"]
    picks = {}
    for m, n, k in ((1, 5120, 2048), (1, 2048, 4096), (2, 2048, 4096), (1, 51200, 5120), (1, 10240, 5120)):
        problem = Problem.make("gemm", "bf16", m=m, n=n, k=k)
        default = GEMM.default_config(problem, spec)
        assert GEMM.reject_reason(default, problem, spec) is None, (problem, default)
        gemv, tiled = GV.seeds(problem, spec)[0], {"kernel": "triton", **G.default_config(problem, spec)}
        assert GEMM.cost(problem, default, spec) == min(GEMM.cost(problem, gemv, spec), GEMM.cost(problem, tiled, spec))
        picks[(m, n, k)] = default["kernel"]
    assert picks[(1, 5120, 2048)] == picks[(2, 2048, 4096)] == picks[(1, 51200, 5120)] == "gemv"
    assert GEMM.default_config(Problem.make("gemm", "bf16", m=16, n=5120, k=8192), spec)["kernel"] != "gemv"


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 2, 4, 8])
@pytest.mark.parametrize("n,k", [(10240, 5120), (5120, 8192), (2048, 4096), (151936, 2048)])
def test_gpu_qwen3_decode_shapes(device, m, n, k):
    problem = Problem.make("gemm", "bf16", m=m, n=n, k=k)
    for config in GV.seeds(problem, G.launch_spec(device))[:3]:
        result = check(GEMM, problem, config, device=device)
        assert result, f"{config}: {result.reason}"
