"""GEMM (kernels/gemm.py): the kernel against its fp64 reference under the interpreter (odd tiny
shapes, default + sampled configs incl. split-K, every dtype, NaN-poisoned outputs), the tile
helpers fused kernels reuse, constraints, input errors; on a GPU, Qwen3-32B shapes incl. TMA."""
import random

import pytest
import torch
import triton
import triton.language as tl

from tuneforge.dsl import Problem, check, compare, get
from tuneforge.errors import ConfigRejected, InputError
from tuneforge.kernels import gemm as G
from tuneforge.dsl.devices import SPECS

DTYPES = ["fp32", "fp16", "bf16"]
CPU = torch.device("cpu")


# Each path of the persistent kernel for the sampled-configs test: whole tiles a power of two wide (the
# flattened tile loop), whole tiles a power of two plus a smaller one wide (two accumulators; the loop
# unflattened), split-K slices, stream-K, hybrid.
PATHS = {
    "tiles": lambda c: (c["schedule"] == "tiles" and c["split_k"] == 1 and not G.split_width(c["block_n"])[1]
                        and c["flatten"]),
    "wide": lambda c: (c["schedule"] == "tiles" and c["split_k"] == 1 and bool(G.split_width(c["block_n"])[1])
                       and not c["flatten"]),
    "split_k": lambda c: c["schedule"] == "tiles" and c["split_k"] > 1,
    "stream": lambda c: c["schedule"] == "stream",
    "hybrid": lambda c: c["schedule"] == "hybrid",
}


def _sampled_configs(problem: Problem, seed: int = 0) -> list[dict]:
    """One config per kernel path (``PATHS``), each drawn at random (seeded: the same configs every run)
    from the configs of the whole space on that path that pass every constraint for the interpreter's
    spec; drawn by rejection, not by enumerating the space (~10^6 configs, seconds per problem)."""
    spec, space, rng = G.launch_spec(CPU), G.space(problem), random.Random(seed)
    picked = []
    for path, on_path in PATHS.items():
        for _ in range(100_000):
            c = {}
            for p in space.params:
                if p.active(c):
                    c[p.name] = rng.choice(p.choices)
            if on_path(c) and G.TEMPLATE.reject_reason(c, problem, spec) is None:
                picked.append(c)
                break
        else:
            raise AssertionError(f"no valid {path} config drawn for {problem.key}")
    return picked


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k", [(5, 33, 40), (37, 70, 96), (1, 48, 130)])
def test_default_config_matches_reference(dtype, m, n, k):
    problem = Problem.make("gemm", dtype, m=m, n=n, k=k)
    config = G.default_config(problem, G.launch_spec(CPU))
    result = check(G.TEMPLATE, problem, config, seed=m)
    assert result, result.reason


@pytest.mark.parametrize("dtype", DTYPES)
def test_sampled_configs_match_reference(dtype):
    # 37 rows and 70 columns span several tiles for 16/32-wide blocks, so grouping and the
    # persistent loop (4 programs under the interpreter) are exercised; k=40 is not a block multiple.
    problem = Problem.make("gemm", dtype, m=37, n=70, k=40)
    configs = _sampled_configs(problem, seed=DTYPES.index(dtype))
    inputs = G.make_inputs(problem, CPU, seed=1)
    for config in configs:
        result = check(G.TEMPLATE, problem, config, inputs=inputs)
        assert result, f"{config}: {result.reason}"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("schedule,m,n,k,block_n,block_k,programs_per_sm", [
    ("stream", 1, 48, 200, 16, 16, 1),    # 3 tiles x 13 K blocks over 4 programs: every tile is shared
    ("stream", 37, 70, 96, 32, 32, 2),    # 3 row tiles in lockstep x 2 sets sharing 3 columns x 3 K blocks
    ("stream", 3, 20, 40, 32, 16, 1),     # 1 tile of 3 K blocks (the last one short): 3 programs share it
    ("stream", 90, 40, 64, 32, 16, 1),    # 6 row tiles > 4 programs: no lockstep, tiles in grouped order
    ("hybrid", 33, 70, 200, 32, 16, 1),   # 9 tiles over 4 programs: 8 whole, 1 split 4 ways (k 64/64/64/8)
    ("hybrid", 50, 70, 200, 16, 16, 2),   # 20 tiles over 8 programs: 16 whole, 4 split 2 ways (k 112/88)
    ("hybrid", 37, 70, 40, 16, 16, 1),    # 15 tiles over 4 programs: 12 whole, 3 left whole (too few to split)
])
def test_stream_k_matches_reference_over_repeated_launches(dtype, schedule, m, n, k, block_n, block_k,
                                                           programs_per_sm):
    """Stream-K: programs' even shares of the K iterations cut tiles anywhere; hybrid: whole tiles for
    the full waves, the last wave's tiles split-K'd. The last program to finish a tile sums the
    slices and re-arms its counter, so back-to-back launches (sharing the workspace) stay right."""
    problem = Problem.make("gemm", dtype, m=m, n=n, k=k)
    config = dict(block_m=16, block_n=block_n, block_k=block_k, group_m=4, num_warps=4, num_stages=2,
                  schedule=schedule, programs_per_sm=programs_per_sm, tma=False,
                  flatten=schedule == "hybrid" and programs_per_sm == 1)
    assert G.TEMPLATE.reject_reason(config, problem, G.launch_spec(CPU)) is None
    for seed in range(3):
        result = check(G.TEMPLATE, problem, config, seed=seed)
        assert result, f"launch {seed}: {result.reason}"
    _, counts = G.workspace(CPU, 0, 0)
    assert int(counts.abs().sum()) == 0, "a tile counter was left armed"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,block_n,block_k", [
    (37, 200, 96, 48, 32),     # 32 + 16 wide, 5 columns (the last cut at n), 3 row tiles
    (16, 100, 40, 80, 16),     # 64 + 16, k not a block multiple
    (33, 400, 130, 160, 32),   # 128 + 32, the high part of the last column only partly inside n
    (20, 300, 64, 192, 64),    # 128 + 64: the last column's high part cut at n, its low part entirely outside
])
def test_wide_tiles_match_reference(dtype, m, n, k, block_n, block_k):
    """Tiles a power of two plus a smaller one wide (two accumulators sharing each x block)."""
    problem = Problem.make("gemm", dtype, m=m, n=n, k=k)
    config = {**BASE, "block_m": 16, "block_n": block_n, "block_k": block_k, "num_stages": 2, "group_m": 4}
    assert G.TEMPLATE.reject_reason(config, problem, G.launch_spec(CPU)) is None
    result = check(G.TEMPLATE, problem, config, seed=m)
    assert result, result.reason


@pytest.mark.parametrize("split_k,block_k", [(2, 16), (3, 16), (4, 16), (2, 32)])
def test_split_k_covers_uneven_k(split_k, block_k):
    # k=40: the last split is short (masked) or, for 2 x 32, [0, 32) + [32, 40)
    problem = Problem.make("gemm", "fp32", m=5, n=33, k=40)
    config = dict(block_m=16, block_n=32, block_k=block_k, group_m=4, num_warps=4, num_stages=2,
                  schedule="tiles", split_k=split_k, programs_per_sm=1, tma=False, flatten=False)
    result = check(G.TEMPLATE, problem, config)
    assert result, result.reason


def test_empty_m_n_and_k():
    x, w = torch.randn(0, 40), torch.randn(33, 40)
    assert G.gemm(x, w).shape == (0, 33)
    out = torch.full((4, 6), float("nan"))
    y = G.gemm(torch.randn(4, 0), torch.randn(6, 0), out=out)
    assert y is out and torch.equal(y, torch.zeros(4, 6))
    assert G.gemm(torch.randn(4, 8), torch.randn(0, 8)).shape == (4, 0)


def test_strided_x_and_out():
    # x: a column slice of a wider activation (row stride 64); out: a slice of a wider buffer
    big = torch.randn(7, 64)
    x = big[:, 8:48]
    w = torch.randn(33, 40) / 40 ** 0.5
    out_buf = torch.full((7, 50), float("nan"))
    y = G.gemm(x, w, out=out_buf[:, 10:43])
    assert compare(y, G.reference(x, w), torch.float32)
    assert torch.isnan(out_buf[:, :10]).all() and torch.isnan(out_buf[:, 43:]).all()


def test_template_registered_with_work_and_cost():
    t = get("gemm")
    assert t is G.TEMPLATE
    p = Problem.make("gemm", "bf16", m=128, n=5120, k=1024)
    flops, nbytes = t.work(p)
    assert flops == 2 * 128 * 5120 * 1024
    assert nbytes == 2 * (128 * 1024 + 5120 * 1024 + 128 * 5120)
    h100 = SPECS["H100"]
    small, large = t.cost(p, t.default_config(p, h100), h100), t.cost(p.with_dims(m=4096), None, h100)
    assert 0 < small < large
    # the estimate never beats the speed of light
    assert small >= max(flops / h100.peak_flops("bf16"), nbytes / h100.hbm_bytes_per_s)


@pytest.mark.parametrize("spec_name", sorted(SPECS))
def test_default_config_passes_constraints_everywhere(spec_name):
    spec = SPECS[spec_name]
    for dtype in DTYPES:
        for m in (1, 16, 128, 512, 4096):
            for n, k in ((10240, 5120), (5120, 1024), (151936, 5120), (33, 40)):
                p = Problem.make("gemm", dtype, m=m, n=n, k=k)
                config = G.default_config(p, spec)
                assert G.TEMPLATE.reject_reason(config, p, spec) is None, (p.key, spec_name, config)


BASE = dict(block_m=64, block_n=64, block_k=64, group_m=8, num_warps=4, num_stages=3, schedule="tiles", split_k=1,
            programs_per_sm=1, tma=False, flatten=False)


@pytest.mark.parametrize("change,problem_dims,spec_name,reason", [
    (dict(block_m=256, block_n=256, block_k=128, num_stages=4, num_warps=8), dict(m=4096, n=4096, k=4096),
     "H100", "shared memory"),
    (dict(block_k=128, num_stages=3), dict(m=4096, n=4096, k=4096), "MI300X", "shared memory"),
    (dict(block_m=256, block_n=128, num_warps=4, num_stages=2), dict(m=4096, n=4096, k=4096), "H100", "registers"),
    (dict(tma=True), dict(m=64, n=64, k=64), "A100", "tma"),
    (dict(tma=True), dict(m=64, n=64, k=63), "H100", "tma"),
    (dict(split_k=4), dict(m=64, n=64, k=128), "H100", "empty"),
    (dict(split_k=2), dict(m=1024, n=64, k=4096), "H100", "split_k"),
    (dict(block_m=128), dict(m=16, n=4096, k=4096), "H100", "exceeds"),
    (dict(block_m=48), dict(m=64, n=64, k=64), "H100", "not one of"),
    (dict(block_n=112), dict(m=64, n=256, k=64), "H100", "not one of"),
    (dict(block_n=96, split_k=2), dict(m=64, n=256, k=4096), "H100", "run whole"),
])
def test_constraints_reject_before_compiling(change, problem_dims, spec_name, reason):
    p = Problem.make("gemm", "bf16", **problem_dims)
    why = G.TEMPLATE.reject_reason({**BASE, **change}, p, SPECS[spec_name])
    assert why is not None and reason in why, why
    assert G.TEMPLATE.reject_reason(BASE, p.with_dims(m=max(64, p["m"]), k=max(64, p["k"])),
                                    SPECS[spec_name]) is None


def test_launcher_rejects_unlaunchable_config_and_interpreter_tma():
    x, w = torch.randn(5, 64), torch.randn(33, 64)
    with pytest.raises(ConfigRejected, match="interpreter"):
        G.gemm(x, w, config={**BASE, "tma": True})
    with pytest.raises(ConfigRejected, match="missing parameter"):
        G.gemm(x, w, config={"block_m": 16})


@pytest.mark.parametrize("args,match", [
    (lambda: (torch.randn(40), torch.randn(33, 40)), "x must be 2-D"),
    (lambda: (torch.randn(5, 40), torch.randn(33, 41)), "k differs"),
    (lambda: (torch.randn(5, 40).int(), torch.randn(33, 40).int()), "dtype"),
    (lambda: (torch.randn(5, 40), torch.randn(33, 40).half()), "differs from x dtype"),
    (lambda: (torch.randn(40, 5).T, torch.randn(33, 40)), "unit stride"),
    (lambda: (torch.randn(5, 40), torch.randn(40, 33).T), "w needs unit stride"),
    (lambda: (torch.randn(5, 40), torch.randn(33, 40, device="meta")), "meta"),
])
def test_bad_inputs_raise_one_line_errors(args, match):
    x, w = args()
    with pytest.raises(InputError, match=match) as e:
        G.gemm(x, w)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("out,match", [
    (torch.empty(5, 34), "shape"),
    (torch.empty(5, 33, dtype=torch.float16), "out dtype"),
    (torch.empty(33, 5).T, "out needs unit stride"),
])
def test_bad_out_raises(out, match):
    with pytest.raises(InputError, match=match):
        G.gemm(torch.randn(5, 40), torch.randn(33, 40), out=out)


# --- the helpers fused kernels reuse --------------------------------------------------------------

@triton.jit
def _tile_order_kernel(pid_m_out, pid_n_out, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    tile_id = tl.program_id(0)
    pid_m, pid_n = G.grouped_tile(tile_id, num_pid_m, num_pid_n, GROUP_M)
    tl.store(pid_m_out + tile_id, pid_m)
    tl.store(pid_n_out + tile_id, pid_n)


@pytest.mark.parametrize("num_pid_m,num_pid_n,group_m", [(5, 3, 2), (1, 7, 8), (8, 2, 4)])
def test_grouped_tile_is_a_grouped_bijection(num_pid_m, num_pid_n, group_m):
    tiles = num_pid_m * num_pid_n
    pm, pn = torch.full((tiles,), -1, dtype=torch.int32), torch.full((tiles,), -1, dtype=torch.int32)
    _tile_order_kernel[(tiles,)](pm, pn, num_pid_m, num_pid_n, GROUP_M=group_m)
    pairs = list(zip(pm.tolist(), pn.tolist()))
    assert sorted(pairs) == [(i, j) for i in range(num_pid_m) for j in range(num_pid_n)]
    # within a group, consecutive tiles walk down the rows before moving to the next column
    assert pairs[:2] == ([(0, 0), (1, 0)] if min(group_m, num_pid_m) > 1 else [(0, 0), (0, 1)])


@triton.jit
def _one_tile_kernel(x, w, y, M, N, K, off_m, off_n, k_begin, k_end,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # How a fused kernel uses the helpers: one tile over a K sub-range, then the masked store.
    acc = G.gemm_tile(x, w, off_m, off_n, M, N, k_begin, k_end, K, 1, K, 1,
                      BLOCK_M, BLOCK_N, BLOCK_K, False, True, "ieee")
    G.store_tile(y, acc, off_m, off_n, M, N, N, BLOCK_M, BLOCK_N)


def test_gemm_tile_computes_one_tile_over_a_k_range():
    m, n, k = 20, 40, 50
    x, w = torch.randn(m, k).bfloat16(), torch.randn(n, k).bfloat16()
    y = torch.full((m, n), float("nan"))
    _one_tile_kernel[(1,)](x, w, y, m, n, k, 16, 32, 8, 45, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
    want = x[16:, 8:45].double() @ w[32:, 8:45].double().T
    assert compare(y[16:, 32:], want, torch.float32)
    assert torch.isnan(y[:16]).all() and torch.isnan(y[:, :32]).all()


# --- GPU: Qwen3-32B shapes -------------------------------------------------------------------------

QWEN_SHAPES = [  # (m, n, k): qkv tp8 decode, o tp8, gate_up tp8 prefill, lm_head tp8, down tp4 odd m
    (1, 1280, 5120), (128, 5120, 1024), (4096, 6400, 5120), (16, 18992, 5120), (333, 5120, 6400)]


@pytest.mark.gpu
@pytest.mark.parametrize("m,n,k", QWEN_SHAPES)
@pytest.mark.parametrize("variant", ["default", "pointer", "tma", "split_k", "stream", "hybrid", "flatten", "wide",
                                     "wide_pointer"])
def test_gpu_qwen3_shapes(device, m, n, k, variant):
    problem = Problem.make("gemm", "bf16", m=m, n=n, k=k)
    spec = G.launch_spec(device)
    config = G.default_config(problem, spec)
    if variant == "pointer":
        config["tma"] = False
    elif variant == "tma":
        if "tma" not in spec.features:
            pytest.skip(f"{spec.name} has no TMA")
        config["tma"] = True
    elif variant == "split_k":
        config.update(block_m=min(config["block_m"], 64), schedule="tiles", split_k=4 if m <= G.SPLIT_K_MAX_M else 1)
    elif variant in ("stream", "hybrid"):
        config = {k: v for k, v in config.items() if k != "split_k"}
        config.update(schedule=variant, programs_per_sm=2, flatten=False)
    elif variant == "flatten":
        config.update(programs_per_sm=1, flatten=True)
    elif variant.startswith("wide"):   # 1.5x the default's width, at most 192 (128 + 64): 64 -> 96
        config.update(block_n=min(192, config["block_n"] * 3 // 2), schedule="tiles", split_k=1, programs_per_sm=1,
                      num_stages=min(config["num_stages"], 3), tma=config["tma"] and variant == "wide")
    result = check(G.TEMPLATE, problem, config, device=device)
    assert result, f"{config}: {result.reason}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_gpu_other_dtypes(device, dtype):
    problem = Problem.make("gemm", dtype, m=200, n=1280, k=5120)
    for tma in (False, True):
        config = {**G.default_config(problem, G.launch_spec(device)), "tma": tma}
        if G.TEMPLATE.reject_reason(config, problem, G.launch_spec(device)):
            continue
        result = check(G.TEMPLATE, problem, config, device=device)
        assert result, f"{config}: {result.reason}"
