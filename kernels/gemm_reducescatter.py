"""GEMM-ReduceScatter: ``out = rows of this rank of sum over ranks of x_r[m, k] @ w_r[n, k].T``.

Row-parallel linear: every rank holds all ``m`` rows of its input shard ``x`` ([m, k], k = this
rank's in-features) and its weight shard ``w`` ([n, k]); rank r gets the summed rows
``row_split(m, world)[r]`` (uneven splits allowed). The GEMM tiles are computed chunk by chunk (a
chunk = one owner's rows), the owners' chunks first in ``order`` (``next``: rank+1, rank+2, ...;
``prev``: rank-1, ...) and this rank's own chunk last, so partial sums leave while the rest
computes. Each finished tile (rounded to the activation dtype, as NCCL's reduce-scatter exchanges
it) goes

- ``push``: straight into its owner's receive area for this rank (remote stores), or
- ``pull``: into this rank's own staging, which the owner reads (remote loads),

and sets its own epoch flag in the owner's heap. The owner sums its rows over ranks in fp32, in
rank order 0..world-1, segment by segment as the flags of a segment's tiles arrive (``signal``:
the whole share, ``chunk_tiles`` row blocks, or one row block at a time). The summing runs
(``reduce``) in ``comm_sms`` programs at the end of the same grid (``fused``: after the compute
programs in grid order, so under the interpreter they never wait for a later program), or in a
consumer kernel launched right after the GEMM (``consumer``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

import tuneforge
from tuneforge.dsl import Problem, Space, Template, categorical, register
from tuneforge.dsl.comm import (EPOCH, epoch_begin, epoch_end, remote_load, row_split, rows_of, signal_flag,
                                signal_peers, translate, wait_flag, wait_peers)
from tuneforge.errors import InputError
from tuneforge.kernels import gemm as G
from tuneforge.kernels._common import check_linear, output_tensor, rank_generator
from tuneforge.kernels._fused import (COMM_SMS, FLAG_OVERHEAD_S, STARTED, chunk_source, comm_sms_fit,
                                      comm_space, compute_programs, default_comm_sms, descriptor, fused_gemm_time,
                                      fused_constraints, fused_plan, signal_steps, tile_defaults, tile_space)
from tuneforge.kernels.reducescatter import staging_elems
from tuneforge.dsl.roofline import alpha_beta, comm_efficiency, gemm_config_time, nccl_time, overlap

REDUCE_BLOCK = 1024        # elements a reducing program sums per step


@triton.jit
def _compute(x, x_desc, w, w_desc, area, tile_flags, max_tiles, m, n, k, stride_xm, stride_wn, epoch,
             bases, rank, world, num_compute,
             PUSH: tl.constexpr, PREV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, USE_TMA: tl.constexpr, EVEN_K: tl.constexpr,
             UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(n, BLOCK_N)
    share = tl.cdiv(m, world).to(tl.int64) * n
    base = 0
    for c in range(1, world + 1):                        # the owners' chunks, this rank's own last
        q = chunk_source(c % world, rank, world, PREV)
        row0, rows = rows_of(q, m, world)
        tiles_m = tl.cdiv(rows, BLOCK_M)
        tiles = tiles_m * num_pid_n
        if PUSH:
            dst = translate(area, rank, q, bases) + rank * share        # q's receive area for my partials
        else:
            dst = area + row0.to(tl.int64) * n                          # my staging, read by q
        first = (pid - base % num_compute + num_compute) % num_compute
        for t in range(first, tiles, num_compute):
            pid_m, pid_n = G.grouped_tile(t, tiles_m, num_pid_n, GROUP_M)
            off_m = pid_m * BLOCK_M
            off_n = pid_n * BLOCK_N
            if USE_TMA:
                acc = G.gemm_tile_tma(x_desc, w_desc, row0 + off_m, off_n, 0, k, BLOCK_M, BLOCK_N, BLOCK_K,
                                      INPUT_PRECISION)
            else:
                acc = G.gemm_tile(x + row0.to(tl.int64) * stride_xm, w, off_m, off_n, rows, n, 0, k, stride_xm, 1,
                                  stride_wn, 1, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, UPCAST, INPUT_PRECISION)
            G.store_tile(dst, acc, off_m, off_n, rows, n, n, BLOCK_M, BLOCK_N)
            signal_flag(tile_flags + rank * max_tiles + pid_m * num_pid_n + pid_n, epoch, rank, q, bases)
        base += tiles


@triton.jit
def _reduce(out, area, tile_flags, max_tiles, m, n, seg_rows, epoch, bases, state, rank, world, max_spins,
            j, programs, PUSH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK: tl.constexpr):
    """Reducing program ``j`` of ``programs``: for each segment of this rank's rows, wait for every
    rank's tiles of it, then sum its share of the segment's elements over ranks into ``out``."""
    row0, rows = rows_of(rank, m, world)
    num_pid_n = tl.cdiv(n, BLOCK_N)
    share = tl.cdiv(m, world).to(tl.int64) * n
    seg_tiles = seg_rows // BLOCK_M
    tiles_m = tl.cdiv(rows, BLOCK_M)
    offs = tl.arange(0, BLOCK)
    for s in range(0, tl.cdiv(rows, seg_rows)):
        pm_end = tl.minimum((s + 1) * seg_tiles, tiles_m)
        for i in range(0, world):
            src = (rank + 1 + i) % world
            for pm in range(s * seg_tiles, pm_end):
                for pn in range(0, num_pid_n):
                    t = pm * num_pid_n + pn
                    wait_flag(tile_flags + src * max_tiles + t, epoch, state, max_spins, src, 0, t)
        start = (s * seg_rows).to(tl.int64) * n
        length = (tl.minimum(rows, (s + 1) * seg_rows) - s * seg_rows).to(tl.int64) * n
        for b in range(j, tl.cdiv(length, BLOCK), programs):
            o = start + b * BLOCK + offs
            mask = b * BLOCK + offs < length
            acc = tl.zeros((BLOCK,), dtype=tl.float32)
            for src in range(0, world):
                if PUSH:
                    v = tl.load(area + src * share + o, mask=mask, other=0.0)
                else:
                    v = remote_load(area, row0.to(tl.int64) * n + o, rank, src, bases, mask)
                acc += v.to(tl.float32)
            tl.store(out + o, acc.to(out.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["m", "rank", "max_spins"])
def _gemm_rs_kernel(x, x_desc, w, w_desc, out, stage, slot_elems, tile_flags, max_tiles, m, n, k,
                    stride_xm, stride_wn, seg_rows, num_reduce,
                    bases, flags, state, rank, world, max_spins,
                    PUSH: tl.constexpr, PREV: tl.constexpr, FUSED: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, USE_TMA: tl.constexpr,
                    EVEN_K: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                    BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    epoch = epoch_begin(state)
    area = stage + (epoch % 2) * slot_elems
    if pid == 0:
        signal_peers(flags, STARTED, 0, epoch, rank, world, bases)
    if FUSED:
        num_compute = programs - num_reduce
    else:
        num_compute = programs
    if pid < num_compute:
        _compute(x, x_desc, w, w_desc, area, tile_flags, max_tiles, m, n, k, stride_xm, stride_wn, epoch,
                 bases, rank, world, num_compute, PUSH, PREV, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, USE_TMA,
                 EVEN_K, UPCAST, INPUT_PRECISION)
    else:
        _reduce(out, area, tile_flags, max_tiles, m, n, seg_rows, epoch, bases, state, rank, world, max_spins,
                pid - num_compute, num_reduce, PUSH, BLOCK_M, BLOCK_N, BLOCK)
    if pid == programs - 1:
        # no rank starts launch e+2 (rewriting a parity a peer may still read) before every peer
        # has started launch e+1 (finished this one, its consumer kernel included)
        wait_peers(flags, STARTED, 0, epoch, rank, world, state, max_spins)
    epoch_end(state, epoch)


@triton.jit(do_not_specialize=["m", "rank", "max_spins"])
def _reduce_kernel(out, stage, slot_elems, tile_flags, max_tiles, m, n, seg_rows,
                   bases, flags, state, rank, world, max_spins,
                   PUSH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK: tl.constexpr):
    """The consumer: runs after the GEMM kernel on the same stream, in its epoch (already published)."""
    epoch = tl.load(state + EPOCH, volatile=True)
    area = stage + (epoch % 2) * slot_elems
    _reduce(out, area, tile_flags, max_tiles, m, n, seg_rows, epoch, bases, state, rank, world, max_spins,
            tl.program_id(0), tl.num_programs(0), PUSH, BLOCK_M, BLOCK_N, BLOCK)


# --- launcher ------------------------------------------------------------------------------------

def gemm_reducescatter(x: torch.Tensor, w: torch.Tensor, *, ctx, out: torch.Tensor | None = None,
                       config: dict | None = None) -> torch.Tensor:
    """This rank's rows (``row_split``) of ``sum over ranks of x @ w.T``: ``x`` [m, k] (any row
    stride, unit column stride), ``w`` [n, k]; returns ``out`` [rows, n]. Collective."""
    check_linear("gemm_reducescatter", x, w, ctx.device)
    m, n, k = x.shape[0], w.shape[0], w.shape[1]
    if m < 1:
        raise InputError("gemm_reducescatter: x has no rows")
    rows = row_split(m, ctx.size)[ctx.rank][1]
    out = output_tensor("gemm_reducescatter", out, (rows, n), x, "contiguous")
    config, share, seg_rows = fused_plan(TEMPLATE, x, m, n, k, ctx, config, LAUNCH_CONSTRAINTS)
    bm, bn, bk = config["block_m"], config["block_n"], config["block_k"]
    world = ctx.size
    max_tiles = triton.cdiv(share, bm) * triton.cdiv(n, bn)
    ch = ctx.channel("gemm_rs", staging_elems(m, n, world) * x.element_size())
    tile_flags = ch.tile_flags(world * max_tiles)
    stage = ch.staging(x.dtype)
    use_tma = bool(config["tma"]) and G._tma_ready(x) and G._tma_ready(w) and k * x.element_size() % 16 == 0
    if use_tma:
        x_desc, w_desc = descriptor(x, m, [bm, bk]), descriptor(w, n, [bn, bk])
    else:
        x_desc, w_desc = x, w
    fused = config["reduce"] == "fused"
    compute = compute_programs(triton.cdiv(share, bm) * triton.cdiv(n, bn) * world, config["comm_sms"] if fused else 0, x.device)
    interpreted = tuneforge.INTERPRETED
    push = config["variant"] == "push"
    ch.launch(_gemm_rs_kernel, (compute + (config["comm_sms"] if fused else 0),),
                x, x_desc, w, w_desc, out, stage, ch.nbytes // x.element_size(), tile_flags, max_tiles, m, n, k,
                x.stride(0), w.stride(0), seg_rows, config["comm_sms"], *ch.args(),
                PUSH=push, PREV=config["order"] == "prev", FUSED=fused, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                GROUP_M=config["group_m"], USE_TMA=use_tma, EVEN_K=k % bk == 0,
                UPCAST=interpreted and x.dtype != torch.float32,
                INPUT_PRECISION="ieee" if x.dtype == torch.float32 or interpreted else "tf32",
                BLOCK=REDUCE_BLOCK, num_warps=config["num_warps"], num_stages=config["num_stages"])
    if not fused:
        ch.launch(_reduce_kernel, (config["comm_sms"],),
                    out, stage, ch.nbytes // x.element_size(), tile_flags, max_tiles, m, n, seg_rows, *ch.args(),
                    PUSH=push, BLOCK_M=bm, BLOCK_N=bn, BLOCK=REDUCE_BLOCK, num_warps=4)
    return out


def reference(x: torch.Tensor, w: torch.Tensor, ctx) -> torch.Tensor:
    """fp64 partial products, each rounded to the activation dtype (what every rank exchanges),
    summed over ranks in fp64; this rank's rows."""
    partial = (x.double() @ w.double().T).to(x.dtype)
    total = torch.stack([p.double() for p in ctx.world.all_gather(partial)]).sum(0)
    row0, rows = row_split(x.shape[0], ctx.size)[ctx.rank]
    return total[row0:row0 + rows]


def baseline(x: torch.Tensor, w: torch.Tensor, ctx) -> torch.Tensor:
    """torch.distributed: F.linear, then reduce_scatter_tensor (shares padded when uneven)."""
    from tuneforge.kernels.reducescatter import baseline as scatter
    return scatter(torch.nn.functional.linear(x, w), ctx)


def make_inputs(problem: Problem, device, seed: int, ctx) -> dict:
    """x ~ N(0, 1), w ~ N(0, 1/(k world)): the sum over ranks is ~ N(0, 1)."""
    m, n, k = problem["m"], problem["n"], problem["k"]
    g = rank_generator(problem, seed, ctx)
    x = torch.randn(m, k, generator=g).to(problem.torch_dtype).to(device)
    w = (torch.randn(n, k, generator=g) / (k * ctx.size) ** 0.5).to(problem.torch_dtype).to(device)
    rows = row_split(m, ctx.size)[ctx.rank][1]
    return {"x": x, "w": w, "ctx": ctx, "out": torch.empty((rows, n), dtype=problem.torch_dtype, device=device)}


def space(problem: Problem) -> Space:
    return Space(*tile_space(triton.cdiv(problem["m"], problem.world), problem["n"], problem["k"]), *comm_space(), COMM_SMS,
                 categorical("reduce", ["fused", "consumer"]))


def default_config(problem: Problem, spec=None) -> dict:
    m, w = problem["m"], problem.world
    cfg = tile_defaults(triton.cdiv(m, w), problem["n"], problem["k"], problem.dtype, spec)
    cfg.update(variant="push", signal="tile" if triton.cdiv(m, w) > cfg["block_m"] else "rank", order="next",
               comm_sms=default_comm_sms(m * problem["n"] * problem.torch_dtype.itemsize // w, spec),
               reduce="fused")
    return cfg


def work(problem: Problem) -> tuple[float, float]:
    m, n, k = problem["m"], problem["n"], problem["k"]
    return 2.0 * m * n * k, float((m * k + n * k + m * n / problem.world) * problem.torch_dtype.itemsize)


def cost(problem: Problem, config: dict | None, spec) -> float:
    """Baseline: cuBLAS GEMM, then an NCCL reduce-scatter. Fused: the partial tiles travel while the
    GEMM runs ((steps-1)/steps hidden); a consumer reduction runs after the GEMM (its HBM pass
    over world partials of this rank's rows is exposed), a fused one overlaps but takes SMs."""
    m, n, k, w = problem["m"], problem["n"], problem["k"], problem.world
    size = problem.torch_dtype.itemsize
    nbytes = m * n * size
    if config is None:
        return gemm_config_time(m, n, k, None, spec, problem.dtype) + nccl_time(
            "reducescatter", nbytes, w, spec)
    fused = config["reduce"] == "fused"
    g = fused_gemm_time(problem, k, config, spec, config["comm_sms"] if fused else 0)
    comm = alpha_beta(nbytes, w, spec, "reducescatter", comm_efficiency(config))
    steps = signal_steps(config, triton.cdiv(m, w), w)
    t = overlap(g, comm, spec, 0.9 * (1 - 1 / steps)) + steps * FLAG_OVERHEAD_S / config["comm_sms"]
    if not fused:
        t += nbytes / spec.hbm_bytes_per_s + spec.launch_us * 1e-6
    return t


def reduce_fits(config: dict, problem: Problem, spec) -> str | None:
    if config["reduce"] == "consumer":
        return None
    return comm_sms_fit(config, problem, spec)


LAUNCH_CONSTRAINTS, CONSTRAINTS = fused_constraints(reduce_fits)

TEMPLATE = register(Template(
    op="gemm_rs", space=space, make_inputs=make_inputs, launch=gemm_reducescatter, reference=reference,
    baseline=baseline, default_config=default_config, work=work, cost=cost, constraints=CONSTRAINTS,
    multi_rank=True,
    doc="GEMM whose finished tiles are pushed/pulled to their row owners and summed there (fused reducer "
        "programs or a consumer kernel), per-tile epoch flags"))
