"""The gemm template's ``gluon_ws`` config family: a persistent, warp-specialized Hopper GEMM in Gluon.

y[m, n] = x[m, k] @ w[n, k].T, bf16/fp16 in, fp32 accumulate, through TMA and wgmma. Each program
(one per SM, at most one per tile) walks its output tiles in grouped order, split into partitions:

- a loader (1 warp) streams x and w tiles through TMA into a ring of ``num_stages`` SMEM slots,
  each with a ``ready`` mbarrier (the TMA bytes landed) and an ``empty`` one (the MMA is done with it);
  it runs ahead across tiles, so the next tile's loads are in flight during this tile's epilogue;
- ``consumers`` MMA partitions (``num_warps`` warps each) take the program's tiles in turn: async
  wgmma over the ring (one MMA in flight, a slot released once the MMA after it is issued), then
  the epilogue -- the fp32 accumulator cast into this partition's SMEM tile and stored by TMA, which
  runs on while the next tile's MMAs start. With two consumers one's epilogue also overlaps the
  other's MMAs (ping-pong: the loader serves their tiles in turn, and a consumer starts waiting on
  the ring for its tile only once the other has waited for all of its previous tile's slots, through
  a pair of ``turn`` mbarriers; see ``_consumer``).

Edges: TMA reads past x's / w's rows and k zero-filled and clips the stores to [m, n], so any m, n, k
runs without masks; row strides must be 16-byte multiples (k and n of 8 two-byte elements).

The family's constraints (``GLUON_CONSTRAINTS``) keep it off GPUs without wgmma and warp
specialization (Hopper only), off fp32, off shapes TMA cannot address and off the interpreter; there
the Triton kernel of ``kernels/gemm.py`` is the path. ``family_space`` / ``family_constraints`` /
``family_default`` / ``family_seeds`` add the family to that kernel's space, constraints, default and
portfolio for the template. The mbarrier waits are intra-CTA (TMA bytes, a partition's release):
unbounded, as the hardware completes them; no cross-rank signal is waited on here.
"""
from __future__ import annotations

import functools

import torch
import triton

import tuneforge
from tuneforge.dsl.roofline import gemm_config_time
from tuneforge.dsl.space import Space, categorical
from tuneforge.kernels import _gemm_gemv as GV
from tuneforge.kernels import _gemm_skinny as SK
from tuneforge.kernels._common import tile_past_problem
from tuneforge.kernels._gemm_space import ELEM_SIZE, register_pressure

try:   # triton >= 3.5 (the GPU image: 3.6)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    GLUON = True
except ImportError:    # no Gluon: the family is rejected by its constraints
    GLUON = False

KERNELS = ("triton", "gluon_ws", "gemv", "skinny")     # gemv: kernels/_gemm_gemv.py; skinny: _gemm_skinny.py
# parameters both kernels read; the rest of the Triton space only applies to kernel=triton
SHARED = ("block_m", "block_n", "block_k", "group_m", "num_warps", "num_stages")
BLOCK_MS, BLOCK_NS, BLOCK_KS = (64, 128, 256), (64, 128, 256), (32, 64, 128)
LOADER_WARPS, LOADER_REGS = 1, 40
REGISTER_FILE = 65536          # 32-bit registers per SM (Hopper)
BARRIER_BYTES = 1024           # mbarriers and the partitions' bookkeeping (~200 bytes measured by triton 3.6)


# --- device code ---------------------------------------------------------------------------------

if GLUON:
    _LOADER_WARPS, _LOADER_REGS = gl.constexpr(LOADER_WARPS), gl.constexpr(LOADER_REGS)   # as the kernel sees them

    @gluon.constexpr_function
    def mma_layout(block_m, block_n, num_warps):
        """wgmma's accumulator layout: warps down the rows (16 each) while the tile has rows for
        them, then across the columns; the widest instruction (n <= 256) a warp's columns allow."""
        warps = [4, 1]
        while warps[0] * warps[1] < num_warps:
            if block_m > 16 * warps[0]:
                warps[0] *= 2
            else:
                warps[1] *= 2
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=warps,
                                         instr_shape=[16, min(256, block_n // warps[1]), 16])

    @gluon.jit
    def _tile_at(tile, num_pid_m, num_pid_n, GROUP_M: gl.constexpr):
        # gemm.grouped_tile's order (a Gluon kernel cannot call a triton.jit function)
        per_group = GROUP_M * num_pid_n
        first_m = (tile // per_group) * GROUP_M
        rows = gl.minimum(num_pid_m - first_m, GROUP_M)
        return first_m + (tile % per_group) % rows, (tile % per_group) // rows

    @gluon.jit
    def _loader(x_desc, w_desc, a_bufs, b_bufs, ready, empty, M, N, K, GROUP_M: gl.constexpr):
        BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
        STAGES: gl.constexpr = a_bufs.type.shape[0]
        num_pid_m = gl.cdiv(M, BLOCK_M)
        num_pid_n = gl.cdiv(N, BLOCK_N)
        k_iters = gl.cdiv(K, BLOCK_K)
        it = 0     # ring position: the program's k steps over all its tiles, in order
        for tile in range(gl.program_id(0), num_pid_m * num_pid_n, gl.num_programs(0)):
            pid_m, pid_n = _tile_at(tile, num_pid_m, num_pid_n, GROUP_M)
            for kk in range(k_iters):
                s = it % STAGES
                # a fresh barrier counts as completed phase 1: the first pass over the ring waits for nothing
                mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
                mbarrier.expect(ready.index(s), x_desc.block_type.nbytes + w_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(x_desc, [pid_m * BLOCK_M, kk * BLOCK_K], ready.index(s),
                                                a_bufs.index(s))
                tma.async_copy_global_to_shared(w_desc, [pid_n * BLOCK_N, kk * BLOCK_K], ready.index(s),
                                                b_bufs.index(s))
                it += 1

    @gluon.jit
    def _consumer(y_desc, a_bufs, b_bufs, ready, empty, turn, c_smem, M, N, K, GROUP_M: gl.constexpr,
                  CONSUMER: gl.constexpr, CONSUMERS: gl.constexpr):
        """MMA + epilogue of the program's tiles CONSUMER, CONSUMER + CONSUMERS, ...

        A parity wait cannot tell a slot's phase from the one two passes earlier, so no consumer may
        wait on a ring position more than one pass ahead of the slot's last load. One consumer waits
        position by position; of two, each waits on ``turn`` before a tile until the other has passed
        all of its previous tile's ready waits (without it, a consumer could take a slot still holding
        the other's k step, and release it)."""
        BLOCK_M: gl.constexpr = y_desc.block_type.shape[0]
        BLOCK_N: gl.constexpr = y_desc.block_type.shape[1]
        BLOCK_K: gl.constexpr = a_bufs.type.shape[2]
        STAGES: gl.constexpr = a_bufs.type.shape[0]
        layout: gl.constexpr = mma_layout(BLOCK_M, BLOCK_N, gl.num_warps())
        num_pid_m = gl.cdiv(M, BLOCK_M)
        num_pid_n = gl.cdiv(N, BLOCK_N)
        k_iters = gl.cdiv(K, BLOCK_K)
        programs = gl.num_programs(0)
        acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout)
        it = CONSUMER * k_iters     # ring position of this consumer's first k step
        rounds = 0                  # this consumer's tiles so far
        for tile in range(gl.program_id(0) + CONSUMER * programs, num_pid_m * num_pid_n, CONSUMERS * programs):
            pid_m, pid_n = _tile_at(tile, num_pid_m, num_pid_n, GROUP_M)
            if CONSUMERS > 1:       # the other's previous tile has waited for its slots (consumer 0 starts)
                mbarrier.wait(turn.index(CONSUMER), (rounds & 1) ^ (1 - CONSUMER))
            for kk in range(k_iters):
                s = it % STAGES
                mbarrier.wait(ready.index(s), (it // STAGES) & 1)
                acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), acc, use_acc=kk > 0,
                                    is_async=True)
                # one MMA left in flight: the one before it has read its slot, which goes back to the loader
                acc, _, _ = warpgroup_mma_wait(1, deps=(acc, a_bufs.index(s), b_bufs.index(s)))
                mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES), pred=kk > 0)
                it += 1
            if CONSUMERS > 1:
                mbarrier.arrive(turn.index(1 - CONSUMER))
            acc = warpgroup_mma_wait(0, deps=(acc,))
            mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES))
            it += (CONSUMERS - 1) * k_iters     # the other consumers' tiles
            rounds += 1
            tma.store_wait(0)                   # this partition's last tile has left c_smem
            c_smem.store(acc.to(y_desc.dtype))
            fence_async_shared()                # the generic-proxy SMEM writes before the TMA store reads
            tma.async_copy_shared_to_global(y_desc, [pid_m * BLOCK_M, pid_n * BLOCK_N], c_smem)
        tma.store_wait(0)

    @gluon.jit(do_not_specialize=["M"])
    def gemm_ws_kernel(x_desc, w_desc, y_desc, M, N, K, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
                       CONSUMERS: gl.constexpr, CONSUMER_REGS: gl.constexpr):
        """Persistent: program p computes tiles p, p + programs, ... (grouped order)."""
        dtype: gl.constexpr = x_desc.dtype
        a_bufs = gl.allocate_shared_memory(dtype, [STAGES] + x_desc.block_type.shape, x_desc.layout)
        b_bufs = gl.allocate_shared_memory(dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
        c_bufs = gl.allocate_shared_memory(dtype, [CONSUMERS] + y_desc.block_type.shape, y_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [CONSUMERS, 1], mbarrier.MBarrierLayout())   # turn[c]: c may start
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        for i in gl.static_range(CONSUMERS):
            mbarrier.init(turn.index(i), count=1)
        if CONSUMERS == 1:
            gl.warp_specialize([
                (_consumer, (y_desc, a_bufs, b_bufs, ready, empty, turn, c_bufs.index(0), M, N, K, GROUP_M, 0, 1)),
                (_loader, (x_desc, w_desc, a_bufs, b_bufs, ready, empty, M, N, K, GROUP_M)),
            ], [_LOADER_WARPS], [_LOADER_REGS])
        else:
            gl.warp_specialize([
                (_consumer, (y_desc, a_bufs, b_bufs, ready, empty, turn, c_bufs.index(0), M, N, K, GROUP_M, 0, 2)),
                (_loader, (x_desc, w_desc, a_bufs, b_bufs, ready, empty, M, N, K, GROUP_M)),
                (_consumer, (y_desc, a_bufs, b_bufs, ready, empty, turn, c_bufs.index(1), M, N, K, GROUP_M, 1, 2)),
            ], [_LOADER_WARPS, 4], [_LOADER_REGS, CONSUMER_REGS])


# --- host side -----------------------------------------------------------------------------------

def launch_registers(config: dict) -> tuple[int, int]:
    """(maxnreg for the launch, registers per thread of a worker consumer). Warps take registers by
    warpgroup: the consumers' ``num_warps`` each and the loader's warpgroup share one SM's file; the
    loader keeps LOADER_REGS and the consumers split the rest (setmaxnreg: multiples of 8, <= 256)."""
    groups = config["consumers"] * config["num_warps"] // 4 + 1
    maxnreg = min(256, REGISTER_FILE // (128 * groups) // 8 * 8)
    consumer_groups = groups - 1
    consumer = min(256, (maxnreg * groups - LOADER_REGS) // consumer_groups // 8 * 8)
    return maxnreg, consumer


def smem_bytes(config: dict, dtype: str) -> int:
    """The ring's slots, one output tile per consumer, the barriers."""
    bm, bn, bk = config["block_m"], config["block_n"], config["block_k"]
    return ELEM_SIZE[dtype] * (config["num_stages"] * (bm + bn) * bk + config["consumers"] * bm * bn) + BARRIER_BYTES


@functools.lru_cache(maxsize=64)
def _layouts(bm: int, bn: int, bk: int, dtype: torch.dtype):
    g = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[dtype]
    return tuple(gl.NVMMASharedLayout.get_default_for(shape, g) for shape in ([bm, bk], [bn, bk], [bm, bn]))


def gemm_ws(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, config: dict, programs: int) -> torch.Tensor:
    """``out = x @ w.T`` with the Gluon kernel on ``programs`` persistent programs (x, w, out checked
    by gemm's launcher and TMA-ready; m, n, k > 0; ``config`` passed this family's constraints)."""
    m, k = x.shape
    n = w.shape[0]
    bm, bn, bk = config["block_m"], config["block_n"], config["block_k"]
    x_layout, w_layout, y_layout = _layouts(bm, bn, bk, x.dtype)

    def rows(t):     # a single row's stride is never used: the dense one (16-byte aligned, as k and n are)
        return t.stride(0) if t.shape[0] > 1 else t.shape[1]
    x_desc = TensorDescriptor(x, [m, k], [rows(x), 1], [bm, bk], x_layout)
    w_desc = TensorDescriptor(w, [n, k], [rows(w), 1], [bn, bk], w_layout)
    y_desc = TensorDescriptor(out, [m, n], [rows(out), 1], [bm, bn], y_layout)
    maxnreg, consumer_regs = launch_registers(config)
    gemm_ws_kernel[(programs,)](x_desc, w_desc, y_desc, m, n, k, GROUP_M=config["group_m"],
                                STAGES=config["num_stages"], CONSUMERS=config["consumers"],
                                CONSUMER_REGS=consumer_regs, num_warps=config["num_warps"], maxnreg=maxnreg)
    return out


# --- the family in the template's space and constraints ------------------------------------------

def kernel_of(config: dict) -> str:
    """The config's family; configs from before families existed (and every one the Triton policy
    builds: defaults, portfolio, fused kernels' tiles) are the Triton kernel's."""
    return config.get("kernel", "triton")


class FamilySpace(Space):
    """The Triton kernel's space with a leading ``kernel`` choice: its own parameters apply to
    kernel=triton only, the shared tile parameters to it and gluon_ws, ``consumers`` to gluon_ws, the
    ``gemv_*`` ones to gemv, the ``skinny_*`` ones to skinny. A config without ``kernel`` is a Triton one."""

    def validate(self, config):
        return super().validate(config if "kernel" in config else {"kernel": "triton", **config})


def family_space(triton_space: Space, gemv: bool = True, skinny: bool = True, gluon: bool = True) -> FamilySpace:
    """``gemv`` / ``skinny``: the problem has few enough rows for that family (else it is not offered);
    ``gluon``: offer gluon_ws (not to gemm_fused: it fuses nothing)."""
    params = [categorical(p.name, p.choices, {"kernel": ("triton", "gluon_ws") if p.name in SHARED else ("triton",),
                                              **p.when})
              for p in triton_space.params]
    kernels = ("triton",) + ("gluon_ws",) * gluon + ("gemv",) * gemv + ("skinny",) * skinny
    return FamilySpace(categorical("kernel", kernels), *params,
                       *([categorical("consumers", (1, 2), when={"kernel": ("gluon_ws",)})] if gluon else []),
                       *(GV.params() if gemv else ()), *(SK.params() if skinny else ()))


def gluon_unavailable(config: dict, problem, spec) -> str | None:
    """Where the Gluon kernel cannot run at all: a GPU without wgmma / warp specialization, a dtype
    other than bf16/fp16, rows TMA cannot address, a triton without Gluon, the interpreter."""
    missing = {"tma", "wgmma", "warp_specialize"} - set(spec.features)
    if missing:
        return f"kernel gluon_ws: {spec.name} has no {', '.join(sorted(missing))}"
    if problem.dtype not in ("bf16", "fp16"):
        return f"kernel gluon_ws: {problem.dtype} is not bf16/fp16"
    for dim in ("k", "n"):
        if problem[dim] * ELEM_SIZE[problem.dtype] % 16:
            return (f"kernel gluon_ws: rows of {dim}={problem[dim]} {problem.dtype} elements are not 16-byte "
                    f"aligned (TMA)")
    if not GLUON:
        return f"kernel gluon_ws: this triton {triton.__version__} has no Gluon"
    if tuneforge.INTERPRETED:
        return "kernel gluon_ws: the interpreter runs no Gluon kernels"
    return None


def gluon_tiles_unfit(config: dict, problem, spec) -> str | None:
    """Tiles the kernel cannot build: wgmma needs 64-row warpgroups and n <= 256, TMA boxes are
    powers of two; two consumers run 4 warps each; the ring and the output tiles in shared memory;
    the accumulator in registers."""
    for name, allowed in (("block_m", BLOCK_MS), ("block_n", BLOCK_NS), ("block_k", BLOCK_KS)):
        if config[name] not in allowed:
            return f"kernel gluon_ws: {name}={config[name]} is not one of {list(allowed)}"
    if config["consumers"] == 2 and config["num_warps"] != 4:
        return "kernel gluon_ws: two consumers run 4 warps each"
    need = smem_bytes(config, problem.dtype)
    if need > spec.smem_per_block:
        return (f"kernel gluon_ws: shared memory: {need} bytes for the ring and output tiles > "
                f"{spec.smem_per_block} on {spec.name}")
    return register_pressure(config, problem, spec)


def gluon_tiles_wasteful(config: dict, problem, spec) -> str | None:
    """Tiles past the problem's (padded) size only add zero-filled work."""
    return tile_past_problem(config, ((name, dim, problem[dim], floor) for name, dim, floor in
                                      (("block_m", "m", BLOCK_MS[0]), ("block_n", "n", BLOCK_NS[0]),
                                       ("block_k", "k", BLOCK_KS[0]))), prefix="kernel gluon_ws: ")


# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps, consumers) per token class: up to 64 tokens one
# 64-row warpgroup streams the weight; up to 512 tiles small enough that the 129-511-token shapes of
# the smaller models still make about a wave on 132 SMs, and a 128 x 128 ping-pong; beyond, the
# 128 x 256 tile of Triton's Hopper tutorials and two 128 x 128 consumers taking turns.
GLUON_TILES = {
    64: [(64, 64, 128, 4, 4, 1), (64, 128, 128, 4, 4, 1), (64, 128, 64, 5, 4, 1), (64, 64, 128, 4, 4, 2)],
    512: [(64, 128, 64, 5, 4, 1), (128, 64, 64, 5, 4, 1), (64, 64, 128, 4, 4, 2), (64, 128, 64, 4, 4, 2),
          (128, 128, 64, 4, 4, 1), (128, 128, 64, 4, 4, 2), (128, 256, 64, 3, 8, 1)],
    None: [(128, 256, 64, 3, 8, 1), (128, 128, 64, 4, 4, 2), (128, 128, 64, 4, 4, 1), (128, 128, 64, 4, 8, 1),
           (256, 128, 64, 3, 8, 1), (64, 256, 64, 4, 4, 2)],
}


def portfolio(problem, spec) -> list[dict]:
    """This family's configs worth trying first for the shape (those the template passes: none off
    Hopper or under the interpreter)."""
    from tuneforge.kernels.gemm import TEMPLATE      # the template this family is registered in
    m = problem["m"]
    tiles = next(t for limit, t in GLUON_TILES.items() if limit is None or m <= limit)
    configs = [dict(kernel="gluon_ws", block_m=bm, block_n=bn, block_k=bk, group_m=8, num_warps=warps,
                    num_stages=stages, consumers=consumers) for bm, bn, bk, stages, warps, consumers in tiles]
    return [c for c in configs if TEMPLATE.reject_reason(c, problem, spec) is None]


def family_default(triton_default):
    """The template's default config: the Triton kernel's, named as such (an enqueued trial without
    ``kernel`` would have it sampled); at up to ``GV.GEMV_DEFAULT_M`` rows the first gemv seed, and from
    ``SK.SKINNY_MIN_SEED_M`` to ``SK.SKINNY_DEFAULT_M`` rows the skinny seed the cost model prices
    lowest, where the model prices it below that."""
    @functools.wraps(triton_default)
    def default(problem, spec):
        tiled = {"kernel": "triton", **triton_default(problem, spec)}
        m = problem["m"]
        if spec is None:
            return tiled
        if m <= GV.GEMV_DEFAULT_M:
            rivals = [(GV.cost(problem, c, spec), c) for c in GV.seeds(problem, spec)[:1]]
        elif m <= SK.SKINNY_DEFAULT_M:
            rivals = [(SK.cost(problem, c, spec), c) for c in SK.seeds(problem, spec)]
        else:
            rivals = []
        best = min(rivals, key=lambda t: t[0], default=None)
        if best and best[0] < gemm_config_time(m, problem["n"], problem["k"], tiled, spec, problem.dtype):
            return best[1]
        return tiled
    return default


# Triton seeds (the default first) the tuner tries before this family's: a short budget reaches both
TRITON_SEEDS_FIRST = 8


def family_seeds(triton_portfolio, template_default):
    """The template's seeds: its default first; then at decode's token counts two gemv ones, from 9 to 64
    rows the skinny family's, the head of the Triton kernel's portfolio (its default first), this
    family's, the other gemv ones, the rest."""
    def seeds(problem, spec):
        triton_seeds = [{"kernel": "triton", **c} for c in triton_portfolio(problem, spec)]
        head, gemv = TRITON_SEEDS_FIRST, GV.seeds(problem, spec)
        first = template_default(problem, spec)
        ordered = (gemv[:2] + SK.seeds(problem, spec) + triton_seeds[:head] + portfolio(problem, spec) + gemv[2:]
                   + triton_seeds[head:])
        return [first] + [c for c in ordered if c != first]
    return seeds


GLUON_LAUNCH_CONSTRAINTS = (gluon_unavailable, gluon_tiles_unfit)
GLUON_CONSTRAINTS = GLUON_LAUNCH_CONSTRAINTS + (gluon_tiles_wasteful,)


def family_constraints(triton_constraints: tuple, gluon_constraints: tuple, gemv_constraints: tuple,
                       skinny_constraints: tuple) -> tuple:
    """One constraint: the config's own family's (the first reason, or None)."""
    families = {"triton": triton_constraints, "gluon_ws": gluon_constraints, "gemv": gemv_constraints,
                "skinny": skinny_constraints}

    def family_fit(config, problem, spec):
        for check in families[kernel_of(config)]:
            why = check(config, problem, spec)
            if why:
                return why
        return None
    return (family_fit,)
