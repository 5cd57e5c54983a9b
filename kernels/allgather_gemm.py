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
an area a peer is still reading (also when a rank owns no rows). ``epoch_flags`` and ``launch_comm``
are shared with ``gemm_reducescatter``; the flag verbs (``release``, ``wait_flag``, ``epoch_end_of``)
are ``tuneforge.dsl.comm``'s.
"""
from __future__ import annotations

import contextlib
import dataclasses
import weakref

import torch
import triton
import triton.language as tl

import tuneforge
from tuneforge.dsl import Problem, Space, Template, categorical, pow2, register
from tuneforge.dsl.comm import (epoch_begin, epoch_end_of, release, row_split, rows_of, signal_peers,
                                translate, wait_flag, wait_peers)
from tuneforge.dsl.problem import DTYPE_NAMES
from tuneforge.errors import ConfigRejected, InputError
from tuneforge.kernels import gemm as G
from tuneforge.kernels._common import check_tensor, launch_spec
from tuneforge.tune import costmodel

COPY_BLOCK = 1024          # elements one communication program moves per step
STARTED = tl.constexpr(3)  # channel signal kind: "this rank started the launch" (the 'barrier' kind)
SIGNALS = ("rank", "chunk", "tile")
# Signal round-trips a fused kernel pays per flag it waits on (the model's per-step overhead).
FLAG_OVERHEAD_S = 0.3e-6


# --- device helpers shared with gemm_reducescatter -------------------------------------------------

@triton.jit
def copy_rows(src, dst, length, BLOCK: tl.constexpr):
    """dst[:length] = src[:length] (flat elements)."""
    offs = tl.arange(0, BLOCK)
    for o in range(0, length, BLOCK):
        mask = o + offs < length
        tl.store(dst + o + offs, tl.load(src + o + offs, mask=mask), mask=mask)


@triton.jit
def chunk_source(c, rank, world, PREV: tl.constexpr):
    """The rank whose chunk is the ``c``-th one processed (``c == 0``: this rank)."""
    if PREV:
        q = (rank - c + world) % world
    else:
        q = (rank + c) % world
    return q


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
                release(translate(arrived + rank * max_segs + s, rank, peer, bases), epoch)
        else:
            copy_rows(src, area + dst, length, BLOCK)
            for i in range(1, world):
                peer = (rank + i) % world
                release(translate(published + rank * max_segs + s, rank, peer, bases), epoch)
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


# --- host helpers shared with gemm_reducescatter ------------------------------------------------------

_ZEROED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def epoch_flags(ctx, name: str, count: int) -> torch.Tensor:
    """``count`` int64 epoch flags on the symmetric heap (the staging of channel ``name``), zeroed
    when first carved or grown (collective: every rank calls it alike)."""
    ch = ctx.channel(name, count * 8)
    if _ZEROED.get(ch) is not ch.data:
        ch.data.zero_()
        if ctx.device.type == "cuda":
            torch.cuda.synchronize(ctx.device)
        ctx.heap.barrier()
        _ZEROED[ch] = ch.data
    return ch.staging(torch.int64)[:count]


def _warm_key(a):
    if isinstance(a, torch.Tensor):
        return a.dtype
    if hasattr(a, "block_shape"):                    # a TMA tensor descriptor (unhashable dataclass)
        return ("desc", a.base.dtype, tuple(a.block_shape))
    return a


def launch_comm(ch, kernel, grid, *args, **meta) -> None:
    """``Channel.launch`` for kernels that may take TMA descriptors: the first launch of each variant
    is compiled and loaded, then the ranks meet at a host barrier (no rank spins on a peer that is
    still compiling, no module loads lazily while another kernel spins)."""
    if not tuneforge.INTERPRETED:
        key = (kernel, tuple(grid), tuple(sorted(meta.items())), tuple(_warm_key(a) for a in args[:-6]))
        warm = _WARM.setdefault(ch, set())
        if key not in warm:
            kernel.warmup(*args, grid=grid, **meta)._init_handles()
            warm.add(key)
            ch.heap.barrier()
    kernel[grid](*args, **meta)
    if ch.check_each_call:
        ch.check()


_WARM: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def seg_rows_of(config: dict, rows: int) -> int:
    """Rows per signal: the whole share, ``chunk_tiles`` row blocks, or one row block."""
    bm = config["block_m"]
    if config["signal"] == "rank":
        return max(bm, -(-max(rows, 1) // bm) * bm)
    if config["signal"] == "chunk":
        return bm * config["chunk_tiles"]
    return bm


def tile_space(problem_m: int, n: int, k: int) -> list:
    """The GEMM tile parameters of the fused kernels (the gemm template's, without split-K)."""
    def cap(v):
        return max(16, min(256, triton.next_power_of_2(max(1, v))))
    return [pow2("block_m", 16, cap(problem_m)), pow2("block_n", 16, cap(n)), pow2("block_k", 16, cap(k)),
            categorical("group_m", [1, 4, 8]), categorical("num_warps", [4, 8]),
            categorical("num_stages", [2, 3, 4]), categorical("tma", [False, True])]


def comm_space(when: dict | None = None) -> list:
    """The communication parameters of the fused kernels (``when``: the condition they live under)."""
    when = dict(when or {})
    return [categorical("variant", ["push", "pull"], when=when), categorical("signal", list(SIGNALS), when=when),
            categorical("chunk_tiles", [2, 4, 8], when={**when, "signal": ["chunk"]}),
            categorical("order", ["next", "prev"], when=when)]


COMM_SMS = categorical("comm_sms", [1, 2, 4, 8, 16, 32])
# who gathers: the kernel's first comm_sms programs, or a copy kernel of comm_sms programs on a side stream
GATHERS = ("fused", "side_stream")
GATHER = categorical("gather", GATHERS)


# The fused AG-GEMM kernel compiles two pipelined K loops (the local chunk read from x, the gathered
# chunks read from staging) and Triton gives each its own shared-memory buffers, so each may use half
# (measured on an H100: tiles that fit gemm's budget once failed to launch here, 262208 > 232448 bytes).
AG_PIPELINES = 2
SMEM_RESERVE = 1024     # barriers and scratch beside the pipeline buffers


def pipeline_spec(spec, pipelines: int):
    """The device as each of ``pipelines`` pipelined loops of one kernel sees it (its share of shared memory)."""
    if spec is None or pipelines == 1:
        return spec
    return dataclasses.replace(spec, smem_per_block=(spec.smem_per_block - SMEM_RESERVE) // pipelines)


def tile_defaults(m: int, n: int, k: int, dtype: str, spec, pipelines: int = 1) -> dict:
    """The gemm template's default tiles for one chunk-sized GEMM (no split-K, one program per SM)."""
    gemm_cfg = G.default_config(Problem.make("gemm", dtype, m=max(1, m), n=n, k=k),
                                pipeline_spec(spec, pipelines) if spec is not None
                                else launch_spec(torch.device("cpu")), programs_per_sm=1)
    return {key: gemm_cfg[key] for key in ("block_m", "block_n", "block_k", "group_m", "num_warps",
                                           "num_stages", "tma")}


def comm_sms_fit(config: dict, problem: Problem, spec) -> str | None:
    if spec is not None and config["comm_sms"] > spec.sms // 2:
        return f"comm_sms={config['comm_sms']} > half of the {spec.sms} SMs of {spec.name}"
    return None


def chunk_covers_share(config: dict, problem: Problem, spec) -> str | None:
    if config["signal"] == "chunk" and config["chunk_tiles"] * config["block_m"] >= -(-problem["m"] // problem.world):
        return f"signal=chunk with {config['chunk_tiles']} x {config['block_m']} rows covers a whole rank share"
    return None


TILE_KEYS = ("block_m", "block_n", "block_k", "group_m", "num_warps", "num_stages", "tma")
GEMM_FIT = (G.register_pressure, G.tile_exceeds_problem)


def gemm_rejection(config: dict, dtype: str, m: int, n: int, k: int, spec, constraints,
                   pipelines: int = 1) -> str | None:
    """The first of gemm's ``constraints`` the tiles of ``config`` violate on an m x n x k GEMM inside
    a kernel with ``pipelines`` pipelined K loops (spec None: no device to fit, the interpreter's rules)."""
    cfg = G.whole_tiles_config({key: config[key] for key in TILE_KEYS})
    spec = pipeline_spec(spec, pipelines)
    problem = Problem.make("gemm", dtype, m=max(1, m), n=n, k=k)
    for c in constraints:
        if spec is None and c is G.smem_overflow:
            continue
        why = c(cfg, problem, spec if spec is not None else launch_spec(torch.device("cpu")))
        if why:
            return why
    return None


def tile_constraints(k_dim: str, pipelines: int = 1):
    """(launchable, fits): gemm's launch constraints and its fit constraints on one chunk's GEMM."""
    def launchable(config, problem, spec):
        return gemm_rejection(config, problem.dtype, cdiv(problem["m"], problem.world), problem["n"],
                              problem[k_dim], spec, G.LAUNCH_CONSTRAINTS, pipelines)

    def fits(config, problem, spec):
        return gemm_rejection(config, problem.dtype, cdiv(problem["m"], problem.world), problem["n"],
                              problem[k_dim], spec, GEMM_FIT)
    return launchable, fits


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


_PLANS: dict = {}


def plan_config(template: Template, problem: Problem, config: dict | None, device: torch.device,
                launch_constraints) -> dict:
    """The config for one launch: the default, or ``config`` checked against the space and the
    constraints that make a launch impossible (one-line ConfigRejected). Under the interpreter
    there is no device to fit (spec None). Cached: the hot path pays one dict lookup."""
    key = (template.op, problem, None if config is None else tuple(sorted(config.items())), device)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _plan(template, problem, config, device, launch_constraints)
    return plan


def _plan(template, problem, config, device, launch_constraints) -> dict:
    spec = None if tuneforge.INTERPRETED else launch_spec(device)
    if config is None:
        return template.default_config(problem, spec)
    try:
        config = template.space(problem).validate(config)
    except ValueError as e:
        raise ConfigRejected(f"{problem.op} config {config}: {e}") from None
    for c in launch_constraints:
        why = c(config, problem, spec)
        if why:
            raise ConfigRejected(f"{problem.op} config {config} cannot run {problem.key}: {why}")
    return config


def compute_programs(tiles: int, comm_sms: int, device: torch.device) -> int:
    """Persistent compute programs: the SMs the communication programs leave (all co-resident)."""
    return max(1, min(tiles, launch_spec(device).sms - comm_sms))


def check_operands(name: str, x, w, k_dim: int, ctx) -> None:
    for label, t in (("x", x), ("w", w)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise InputError(f"{name}: {label} must be a 2-D tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dtype not in DTYPE_NAMES:
            raise InputError(f"{name}: {label} dtype {t.dtype} is not one of float16, bfloat16, float32")
        if t.device != ctx.device:
            raise InputError(f"{name}: {label} is on {t.device}, but this rank's device is {ctx.device}")
        if t.shape[1] > 1 and t.stride(1) != 1:
            raise InputError(f"{name}: {label} needs unit stride along k, got strides {tuple(t.stride())}")
    if w.dtype != x.dtype:
        raise InputError(f"{name}: w dtype {w.dtype} differs from x dtype {x.dtype}")
    if x.shape[1] != w.shape[1] or x.shape[1] != k_dim:
        raise InputError(f"{name}: x is {tuple(x.shape)} but w is [n, k]={tuple(w.shape)} (nn.Linear layout): "
                         f"k differs")


def descriptor(t: torch.Tensor, rows: int, block: list):
    from triton.tools.tensor_descriptor import TensorDescriptor
    return TensorDescriptor(t, [rows, t.shape[1]], [t.stride(0), 1], block)


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
    k = w.shape[1] if isinstance(w, torch.Tensor) and w.dim() == 2 else -1
    check_operands("allgather_gemm", x, w, k, ctx)
    rows = row_split(m, ctx.size)[ctx.rank][1]
    check_tensor("allgather_gemm", "x", x, (rows, k), None, ctx.device, "contiguous")
    n = w.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    check_tensor("allgather_gemm", "out", out, (m, n), x.dtype, ctx.device, "contiguous")
    problem = Problem.make("ag_gemm", DTYPE_NAMES[x.dtype], ctx.size, m=m, n=n, k=k)
    config = plan_config(TEMPLATE, problem, config, x.device, LAUNCH_CONSTRAINTS)
    bm, bn, bk = config["block_m"], config["block_n"], config["block_k"]
    world = ctx.size
    share = cdiv(m, world)
    seg_rows = seg_rows_of(config, share)
    max_segs = max(1, cdiv(share, seg_rows))
    size = x.element_size()
    ch = ctx.channel("ag_gemm", m * k * size)
    seg_flags = epoch_flags(ctx, "ag_gemm.flags", 2 * world * max_segs)
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
    tiles = cdiv(share, bm) * cdiv(n, bn) * world
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
            launch_comm(ch, _gather_kernel, (comm,), x, stage, parity_rows, seg_flags, max_segs, m, k, seg_rows,
                        comm + compute, *ch.args(), PUSH=push, PREV=prev, COPY=COPY_BLOCK, num_warps=4)
    launch_comm(ch, _ag_gemm_kernel, (compute if side else comm + compute,),
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
    if ctx is None or ctx.size != problem.world:
        raise InputError(f"ag_gemm {problem.key} needs a world of {problem.world} ranks (ctx)")
    m, n, k = problem["m"], problem["n"], problem["k"]
    rows = row_split(m, ctx.size)[ctx.rank][1]
    g = torch.Generator().manual_seed(seed * 7919 + ctx.rank)
    x = torch.randn(rows, k, generator=g).to(problem.torch_dtype).to(device)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(problem.torch_dtype).to(device)
    return {"x": x, "w": w, "ctx": ctx, "m": m, "out": torch.empty((m, n), dtype=problem.torch_dtype, device=device)}


def space(problem: Problem) -> Space:
    return Space(*tile_space(cdiv(problem["m"], problem.world), problem["n"], problem["k"]), *comm_space(), COMM_SMS,
                 GATHER)


def default_config(problem: Problem, spec=None) -> dict:
    """gemm's tiles for one chunk; push; a signal per row block once chunks hold several blocks;
    4 programs (an eighth of the SMs at most) move the data."""
    m, w = problem["m"], problem.world
    cfg = tile_defaults(-(-m // w), problem["n"], problem["k"], problem.dtype, spec, AG_PIPELINES)
    cfg.update(variant="push", signal="tile" if cdiv(m, w) > cfg["block_m"] else "rank", order="prev",
               comm_sms=default_comm_sms(m * problem["k"] * problem.torch_dtype.itemsize // w, spec), gather="fused")
    return cfg


def default_comm_sms(shard_bytes: int, spec) -> int:
    """A program per 256 KiB moved, at most an eighth of the SMs (16 at most; 1 under the interpreter)."""
    sms = spec.sms if spec is not None else 8
    want = triton.next_power_of_2(max(1, shard_bytes >> 18))
    return max(1, min(16, sms // 8, want))


def work(problem: Problem) -> tuple[float, float]:
    m, n, k = problem["m"], problem["n"], problem["k"]
    return 2.0 * m * n * k, float((m * k + n * k + m * n) * problem.torch_dtype.itemsize)


def signal_steps(config: dict, rows: int, world: int) -> int:
    """Signals a chunk-by-chunk pipeline waits on (its number of overlap steps)."""
    return world * max(1, -(-max(rows, 1) // seg_rows_of(config, rows)))


def fused_gemm_time(problem: Problem, k: int, config: dict, spec, reserved_sms: int) -> float:
    """The compute part: gemm's tile model for the whole m x n, on the SMs the comm programs leave."""
    g = costmodel.gemm_config_time(problem["m"], problem["n"], k, {**config, "split_k": 1}, spec, problem.dtype)
    return g * spec.sms / max(1, spec.sms - reserved_sms)


def cost(problem: Problem, config: dict | None, spec) -> float:
    """Baseline: cuBLAS GEMM after an NCCL all-gather. Fused: overlap of the GEMM with the gather,
    hiding (steps-1)/steps of it (the local chunk runs while the first remote chunk travels), plus
    the flag waits; pull also copies the local rows into the heap first."""
    m, n, k, w = problem["m"], problem["n"], problem["k"], problem.world
    size = problem.torch_dtype.itemsize
    shard = m * k * size / w
    if config is None:
        return costmodel.gemm_config_time(m, n, k, None, spec, problem.dtype) + costmodel.nccl_time(
            "allgather", shard, w, spec)
    g = fused_gemm_time(problem, k, config, spec, config["comm_sms"])
    comm = costmodel.alpha_beta(shard, w, spec, "allgather", costmodel.comm_efficiency(config))
    if config["variant"] == "pull":
        comm += 2 * shard / spec.hbm_bytes_per_s
    steps = signal_steps(config, -(-m // w), w)
    return costmodel.overlap(g, comm, spec, 0.9 * (1 - 1 / steps)) + steps * FLAG_OVERHEAD_S / config["comm_sms"]


_gemm_launchable, _tiles_fit = tile_constraints("k", AG_PIPELINES)
LAUNCH_CONSTRAINTS = (_gemm_launchable, comm_sms_fit)
CONSTRAINTS = LAUNCH_CONSTRAINTS + (chunk_covers_share, _tiles_fit)

TEMPLATE = register(Template(
    op="ag_gemm", space=space, make_inputs=make_inputs, launch=allgather_gemm, reference=reference,
    baseline=baseline, default_config=default_config, work=work, cost=cost, constraints=CONSTRAINTS,
    multi_rank=True,
    doc="all-gather of row shards overlapped with the GEMM that consumes them (comm programs push/pull, "
        "per-rank/chunk/tile signals)"))
