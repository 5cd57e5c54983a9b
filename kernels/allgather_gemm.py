"""AllGather-GEMM: ``out[m, n] = allgather(x)[m, k] @ w[n, k].T`` with the gather overlapped.

Each rank holds the rows ``row_split(m, world)[rank]`` of the input (uneven splits allowed) and a
column shard ``w`` of the weight (column-parallel linear). One persistent kernel, two kinds of
programs (the communication programs come first in grid order, so under the interpreter, where the
programs of a launch run one after another, nothing ever waits for a later program of its launch):

- programs ``pid < comm_sms`` move row segments of the input: ``push`` writes this rank's segments
  into every peer's gather area (remote stores) and flags each segment there; ``pull`` copies this
  rank's rows into its own area, flags the peers, then reads the peers' segments from their areas
  (remote loads) into its own and flags them locally.
- the other programs compute the GEMM tiles chunk by chunk (a chunk = one source rank's rows),
  starting with the local chunk (read straight from ``x``), then the peers' chunks in ``order``
  (``next``: rank+1, rank+2, ...; ``prev``: rank-1, ...); a tile waits only for the segment
  that holds its rows.

Signal granularity (``signal``): one flag per source rank (``rank``), per ``chunk_tiles`` row
blocks (``chunk``) or per row block of BLOCK_M rows (``tile``). The tile math is
``kernels/gemm.py``'s (``grouped_tile`` / ``gemm_tile`` / ``gemm_tile_tma`` / ``store_tile``).

Flags hold epochs (never cleared); the gather area is double-buffered by the epoch's parity and
every rank's last program waits for every peer to have started this launch, so no rank can rewrite
an area a peer is still reading (also when a rank owns no rows). The segment flags are the channel's
``tile_flags``; the flag verbs (``signal_flag``, ``wait_flag``, ``epoch_end_of``) are
``tuneforge.dsl.comm``'s; what this op shares with ``gemm_reducescatter`` is ``kernels/_fused.py``.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

import tuneforge
from tuneforge.dsl import Problem, Space, Template, categorical, register
from tuneforge.dsl.comm import (epoch_begin, epoch_end_of, release, row_split, rows_of, signal_flag, signal_peers,
                                translate, wait_flag, wait_peers)
from tuneforge.errors import InputError
from tuneforge.kernels import gemm as G
from tuneforge.kernels._common import check_linear, check_tensor, copy_rows, output_tensor, rank_generator
from tuneforge.kernels._fused import (COMM_SMS, FLAG_OVERHEAD_S, STARTED, chunk_source, comm_sms_fit,
                                      comm_space, compute_programs, default_comm_sms, descriptor, fused_gemm_time,
                                      fused_constraints, fused_plan, signal_steps, tile_defaults, tile_space)
from tuneforge.dsl.roofline import alpha_beta, comm_efficiency, gemm_config_time, nccl_time, overlap

COPY_BLOCK = 1024          # elements one communication program moves per step
# The fused AG-GEMM kernel compiles two pipelined K loops (the local chunk read from x, the gathered
# chunks read from staging) and Triton gives each its own shared-memory buffers, so each may use half
# (measured on an H100: tiles that fit gemm's budget once failed to launch here, 262208 > 232448 bytes).
AG_PIPELINES = 2


# --- the kernels -----------------------------------------------------------------------------------

@triton.jit
def _gather(x, area, seg_flags, max_segs, m, k, seg_rows, num_comm, epoch,
            bases, state, rank, world, max_spins,
            PUSH: tl.constexpr, PREV: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row0, rows = rows_of(rank, m, world)
    nseg = tl.cdiv(rows, seg_rows)
    arrived = seg_flags                          # [world, max_segs]: segment in my area
    published = seg_flags + world * max_segs     # [world, max_segs]: (pull) segment in its owner's area
    for s in range(pid, nseg, num_comm):
        r0 = s * seg_rows
        length = (tl.minimum(rows, r0 + seg_rows) - r0).to(tl.int64) * k
        src = x + r0.to(tl.int64) * k
        dst = (row0 + r0).to(tl.int64) * k
        if PUSH:
            for i in range(1, world):
                peer = (rank + i) % world
                copy_rows(src, translate(area, rank, peer, bases) + dst, length, BLOCK)
                signal_flag(arrived + rank * max_segs + s, epoch, rank, peer, bases)
        else:
            copy_rows(src, area + dst, length, BLOCK)
            for i in range(1, world):
                peer = (rank + i) % world
                signal_flag(published + rank * max_segs + s, epoch, rank, peer, bases)
    if not PUSH:
        for c in range(1, world):
            q = chunk_source(c, rank, world, PREV)
            q0, q_rows = rows_of(q, m, world)
            for s in range(pid, tl.cdiv(q_rows, seg_rows), num_comm):
                wait_flag(published + q * max_segs + s, epoch, state, max_spins, q, 0, s)
                r0 = s * seg_rows
                length = (tl.minimum(q_rows, r0 + seg_rows) - r0).to(tl.int64) * k
                at = (q0 + r0).to(tl.int64) * k
                copy_rows(translate(area, rank, q, bases) + at, area + at, length, BLOCK)
                release(arrived + q * max_segs + s, epoch)


@triton.jit
def _compute(x, x_desc, w, w_desc, out, area, area_desc, area_row0, seg_flags, max_segs, m, n, k,
             stride_xm, stride_wn, stride_om, seg_rows, num_comm, epoch, state, rank, world, max_spins,
             PREV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             GROUP_M: tl.constexpr, USE_TMA: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
             INPUT_PRECISION: tl.constexpr):
    cid = tl.program_id(0) - num_comm
    programs = tl.num_programs(0) - num_comm
    num_pid_n = tl.cdiv(n, BLOCK_N)
    base = 0
    for c in range(0, world):
        q = chunk_source(c, rank, world, PREV)
        row0, rows = rows_of(q, m, world)
        tiles_m = tl.cdiv(rows, BLOCK_M)
        tiles = tiles_m * num_pid_n
        first = (cid - base % programs + programs) % programs     # (base + first) % programs == cid
        for t in range(first, tiles, programs):
            pid_m, pid_n = G.grouped_tile(t, tiles_m, num_pid_n, GROUP_M)
            off_m = pid_m * BLOCK_M
            off_n = pid_n * BLOCK_N
            if q == rank:
                if USE_TMA:
                    acc = G.gemm_tile_tma(x_desc, w_desc, off_m, off_n, 0, k, BLOCK_M, BLOCK_N, BLOCK_K,
                                          INPUT_PRECISION)
                else:
                    acc = G.gemm_tile(x, w, off_m, off_n, rows, n, 0, k, stride_xm, 1, stride_wn, 1,
                                      BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, UPCAST, INPUT_PRECISION)
            else:
                seg = off_m // seg_rows
                wait_flag(seg_flags + q * max_segs + seg, epoch, state, max_spins, q, 0, seg)
                if USE_TMA:
                    acc = G.gemm_tile_tma(area_desc, w_desc, area_row0 + row0 + off_m, off_n, 0, k,
                                          BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION)
                else:
                    acc = G.gemm_tile(area + row0.to(tl.int64) * k, w, off_m, off_n, rows, n, 0, k, k, 1,
                                      stride_wn, 1, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, UPCAST, INPUT_PRECISION)
            G.store_tile(out + row0.to(tl.int64) * stride_om, acc, off_m, off_n, rows, n, stride_om,
                         BLOCK_M, BLOCK_N)
        base += tiles


@triton.jit(do_not_specialize=["m", "rank", "max_spins"])
def _ag_gemm_kernel(x, x_desc, w, w_desc, out, stage, stage_desc, parity_rows, seg_flags, max_segs, m, n, k,
                    stride_xm, stride_wn, stride_om, seg_rows, num_comm, total_programs,
                    bases, flags, state, rank, world, max_spins,
                    PUSH: tl.constexpr, PREV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, USE_TMA: tl.constexpr, EVEN_K: tl.constexpr,
                    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr, COPY: tl.constexpr):
    pid = tl.program_id(0)
    epoch = epoch_begin(state)
    area_row0 = ((epoch % 2) * parity_rows).to(tl.int32)    # this launch's gather area: rows of ``stage``
    area = stage + area_row0.to(tl.int64) * k
    if pid == 0:
        signal_peers(flags, STARTED, 0, epoch, rank, world, bases)
    if pid < num_comm:
        _gather(x, area, seg_flags, max_segs, m, k, seg_rows, num_comm, epoch, bases, state, rank, world,
                max_spins, PUSH, PREV, COPY)
    else:
        _compute(x, x_desc, w, w_desc, out, area, stage_desc, area_row0, seg_flags, max_segs, m, n, k,
                 stride_xm, stride_wn, stride_om, seg_rows, num_comm, epoch, state, rank, world, max_spins,
                 PREV, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, USE_TMA, EVEN_K, UPCAST, INPUT_PRECISION)
    if pid == tl.num_programs(0) - 1:
        # no rank starts launch e+2 (rewriting the parity a peer may still read) before every
        # peer has started launch e+1, i.e. finished this one
        wait_peers(flags, STARTED, 0, epoch, rank, world, state, max_spins)
    epoch_end_of(state, epoch, total_programs)


@triton.jit(do_not_specialize=["m", "rank", "max_spins"])
def _gather_kernel(x, stage, parity_rows, seg_flags, max_segs, m, k, seg_rows, total_programs,
                   bases, flags, state, rank, world, max_spins,
                   PUSH: tl.constexpr, PREV: tl.constexpr, COPY: tl.constexpr):
    """The gather alone (``gather="side_stream"``): runs on a side stream next to the GEMM kernel,
    in the same epoch (neither launch publishes it before the other's programs are done)."""
    epoch = epoch_begin(state)
    area = stage + ((epoch % 2) * parity_rows).to(tl.int64) * k
    _gather(x, area, seg_flags, max_segs, m, k, seg_rows, tl.num_programs(0), epoch, bases, state, rank, world,
            max_spins, PUSH, PREV, COPY)
    epoch_end_of(state, epoch, total_programs)


# who gathers: the kernel's first comm_sms programs, or a copy kernel of comm_sms programs on a side stream
GATHERS = ("fused", "side_stream")
GATHER = categorical("gather", GATHERS)


# --- launcher ------------------------------------------------------------------------------------

def allgather_gemm(x: torch.Tensor, w: torch.Tensor, *, ctx, m: int | None = None, out: torch.Tensor | None = None,
                   config: dict | None = None) -> torch.Tensor:
    """``out[m, n] = allgather(x) @ w.T``: ``x`` is this rank's rows ``[rows, k]`` of the ``m`` tokens
    (``row_split``), ``w`` this rank's ``[n, k]`` weight shard; collective (every rank calls it with
    the same m and config). ``m`` defaults to ``out.shape[0]``."""
    if m is None:
        if out is None:
            raise InputError("allgather_gemm needs the total row count: pass m= or out=")
        m = out.shape[0]
    if not isinstance(m, int) or m < 1:
        raise InputError(f"allgather_gemm: m must be a positive int, got {m!r}")
    check_linear("allgather_gemm", x, w, ctx.device)
    k = w.shape[1]
    rows = row_split(m, ctx.size)[ctx.rank][1]
    check_tensor("allgather_gemm", "x", x, (rows, k), None, ctx.device, "contiguous")
    n = w.shape[0]
    out = output_tensor("allgather_gemm", out, (m, n), x, "contiguous")
    config, share, seg_rows = fused_plan(TEMPLATE, x, m, n, k, ctx, config, LAUNCH_CONSTRAINTS)
    bm, bn, bk = config["block_m"], config["block_n"], config["block_k"]
    world = ctx.size
    max_segs = max(1, triton.cdiv(share, seg_rows))
    size = x.element_size()
    ch = ctx.channel("ag_gemm", m * k * size)
    seg_flags = ch.tile_flags(2 * world * max_segs)
    stage = ch.staging(x.dtype)
    parity_rows = ch.nbytes // size // k                 # parity 1 starts at this row of ``stage``
    use_tma = bool(config["tma"]) and G._tma_ready(w) and k * size % 16 == 0 and (rows == 0 or G._tma_ready(x))
    if use_tma:
        stage2d = stage[: 2 * parity_rows * k].view(2 * parity_rows, k)
        stage_desc = descriptor(stage2d, 2 * parity_rows, [bm, bk])
        x_desc = descriptor(x, rows, [bm, bk]) if rows else stage_desc
        w_desc = descriptor(w, n, [bn, bk])
    else:
        stage_desc = x_desc = w_desc = stage
    tiles = triton.cdiv(share, bm) * triton.cdiv(n, bn) * world
    comm = config["comm_sms"]
    compute = compute_programs(tiles, comm, x.device)
    side = config["gather"] == "side_stream"
    push, prev = config["variant"] == "push", config["order"] == "prev"
    interpreted = tuneforge.INTERPRETED
    if side:
        # the copy kernel goes first (under the interpreter launches run one after another, and the
        # GEMM waits for it); on a GPU it runs beside the GEMM on a side stream
        stream = _side_stream(x.device)
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            ch.launch(_gather_kernel, (comm,), x, stage, parity_rows, seg_flags, max_segs, m, k, seg_rows,
                        comm + compute, *ch.args(), PUSH=push, PREV=prev, COPY=COPY_BLOCK, num_warps=4)
    ch.launch(_ag_gemm_kernel, (compute if side else comm + compute,),
                x, x_desc, w, w_desc, out, stage, stage_desc, parity_rows, seg_flags, max_segs, m, n, k,
                x.stride(0), w.stride(0), out.stride(0), seg_rows, 0 if side else comm, comm + compute, *ch.args(),
                PUSH=push, PREV=prev, BLOCK_M=bm, BLOCK_N=bn,
                BLOCK_K=bk, GROUP_M=config["group_m"], USE_TMA=use_tma, EVEN_K=k % bk == 0,
                UPCAST=interpreted and x.dtype != torch.float32,
                INPUT_PRECISION="ieee" if x.dtype == torch.float32 or interpreted else "tf32",
                COPY=COPY_BLOCK, num_warps=config["num_warps"], num_stages=config["num_stages"])
    if side and stream is not None:
        torch.cuda.current_stream(x.device).wait_stream(stream)
    return out


_SIDE_STREAMS: dict = {}


def _side_stream(device: torch.device):
    """This process's side stream for copy kernels on ``device`` (None off the GPU)."""
    if device.type != "cuda" or tuneforge.INTERPRETED:
        return None
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


def gathered_rows(x: torch.Tensor, ctx) -> torch.Tensor:
    """Every rank's rows of x, concatenated (host gather, for references)."""
    return torch.cat([p for p in ctx.world.all_gather(x)]).to(x.device)


def reference(x: torch.Tensor, w: torch.Tensor, ctx, m: int) -> torch.Tensor:
    """allgather(x) @ w.T in fp64."""
    return gathered_rows(x, ctx).double() @ w.double().T


def baseline(x: torch.Tensor, w: torch.Tensor, ctx, m: int) -> torch.Tensor:
    """torch.distributed: all_gather_into_tensor (shares padded when uneven), then F.linear."""
    from tuneforge.kernels.allgather import baseline as gather
    return torch.nn.functional.linear(gather(x, ctx, m), w)


def make_inputs(problem: Problem, device, seed: int, ctx) -> dict:
    m, n, k = problem["m"], problem["n"], problem["k"]
    rows = row_split(m, ctx.size)[ctx.rank][1]
    g = rank_generator(problem, seed, ctx)
    x = torch.randn(rows, k, generator=g).to(problem.torch_dtype).to(device)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(problem.torch_dtype).to(device)
    return {"x": x, "w": w, "ctx": ctx, "m": m, "out": torch.empty((m, n), dtype=problem.torch_dtype, device=device)}


def space(problem: Problem) -> Space:
    return Space(*tile_space(triton.cdiv(problem["m"], problem.world), problem["n"], problem["k"]), *comm_space(), COMM_SMS,
                 GATHER)


def default_config(problem: Problem, spec=None) -> dict:
    """gemm's tiles for one chunk; push; a signal per row block once chunks hold several blocks;
    4 programs (an eighth of the SMs at most) move the data."""
    m, w = problem["m"], problem.world
    cfg = tile_defaults(triton.cdiv(m, w), problem["n"], problem["k"], problem.dtype, spec, AG_PIPELINES)
    cfg.update(variant="push", signal="tile" if triton.cdiv(m, w) > cfg["block_m"] else "rank", order="prev",
               comm_sms=default_comm_sms(m * problem["k"] * problem.torch_dtype.itemsize // w, spec), gather="fused")
    return cfg


def work(problem: Problem) -> tuple[float, float]:
    m, n, k = problem["m"], problem["n"], problem["k"]
    return 2.0 * m * n * k, float((m * k + n * k + m * n) * problem.torch_dtype.itemsize)


def cost(problem: Problem, config: dict | None, spec) -> float:
    """Baseline: cuBLAS GEMM after an NCCL all-gather. Fused: overlap of the GEMM with the gather,
    hiding (steps-1)/steps of it (the local chunk runs while the first remote chunk travels), plus
    the flag waits; pull also copies the local rows into the heap first."""
    m, n, k, w = problem["m"], problem["n"], problem["k"], problem.world
    size = problem.torch_dtype.itemsize
    shard = m * k * size / w
    if config is None:
        return gemm_config_time(m, n, k, None, spec, problem.dtype) + nccl_time(
            "allgather", shard, w, spec)
    g = fused_gemm_time(problem, k, config, spec, config["comm_sms"])
    comm = alpha_beta(shard, w, spec, "allgather", comm_efficiency(config))
    if config["variant"] == "pull":
        comm += 2 * shard / spec.hbm_bytes_per_s
    steps = signal_steps(config, triton.cdiv(m, w), w)
    return overlap(g, comm, spec, 0.9 * (1 - 1 / steps)) + steps * FLAG_OVERHEAD_S / config["comm_sms"]


LAUNCH_CONSTRAINTS, CONSTRAINTS = fused_constraints(comm_sms_fit, AG_PIPELINES)

TEMPLATE = register(Template(
    op="ag_gemm", space=space, make_inputs=make_inputs, launch=allgather_gemm, reference=reference,
    baseline=baseline, default_config=default_config, work=work, cost=cost, constraints=CONSTRAINTS,
    multi_rank=True,
    doc="all-gather of row shards overlapped with the GEMM that consumes them (comm programs push/pull, "
        "per-rank/chunk/tile signals)"))
