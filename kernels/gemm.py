"""GEMM: y[m, n] = x[m, k] @ w[n, k].T (w in nn.Linear layout), one persistent Triton kernel.

Search space: tile sizes BLOCK_M/N/K (BLOCK_N also a power of two plus a smaller one: 96, 160, 192,
... as two accumulators, whole tiles only), grouped tile order (GROUP_M), warps, pipeline stages, the
schedule of the persistent grid (``tiles``: whole tiles, optionally split-K; ``stream``: stream-K, the
K iterations cut into even shares per program so no wave runs part-empty; ``hybrid``: whole tiles
for the full waves, the last wave's tiles split-K'd), programs per SM, a tile loop flattened so the
compiler pipelines across tiles, and on Hopper-class devices TMA loads through host-side tensor
descriptors. Split tiles are summed in the same launch: the last program to finish a slice adds the
others' fp32 slices (``finish_tile``).

Building blocks for fused kernels (AllGather-GEMM, GEMM-ReduceScatter) -- call these instead of
copying the loop:

- ``grouped_tile(tile_id, num_pid_m, num_pid_n, GROUP_M)`` -> ``(pid_m, pid_n)``: grouped order.
- ``gemm_tile(...)``: one fp32 ``[BLOCK_M, BLOCK_N]`` accumulator of ``x @ w.T`` over ``[k_begin, k_end)``
  through pointer loads (any strides, masks on K, interpreter fp32 upcast).
- ``gemm_tile_tma(...)``: the same through tensor descriptors (out-of-range rows/cols/k read as 0).
- ``gemm_tile_wide(...)``: a whole tile BLOCK_N + BLOCK_N_LO wide, either way.
- ``store_tile(...)``: masked store of an accumulator into a row-major ``[M, N]`` output.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

import tuneforge
from tuneforge.dsl.problem import DTYPE_NAMES, Problem
from tuneforge.dsl.space import Space, categorical, pow2
from tuneforge.dsl.template import Template, register
from tuneforge.errors import InputError
from tuneforge.kernels._common import check_linear, checked_config, first_rejection, launch_spec
from tuneforge.tune.costmodel import gemm_config_time, hybrid_split
from tuneforge.tune.devices import DeviceSpec

ELEM_SIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
# fp32 accumulator registers per thread a config may need (BM*BN / threads); beyond it ptxas spills.
MAX_ACC_REGISTERS = 128
# Split-K only pays where the M x N tiles cannot fill the device; past this many rows it only adds traffic.
SPLIT_K_MAX_M = 512
# tiles: whole tiles (optionally split-K); stream: stream-K over all tiles; hybrid: whole tiles for
# the full waves, the tiles of the last, part-empty one split-K'd to fill it.
SCHEDULES = ("tiles", "stream", "hybrid")
SPLITS = (1, 2, 3, 4, 6, 8, 16)
# Tile widths: powers of two, and a power of two plus a smaller one (two accumulators, whole tiles
# only) -- 512 x 5120 makes 80 tiles of 128 x 256 (61 % of an H100's 132 SMs) but 128 of 128 x 160.
BLOCK_NS = (16, 32, 48, 64, 80, 96, 128, 160, 192, 256)


# --- device building blocks ---------------------------------------------------------------------

@triton.jit
def grouped_tile(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Linear tile index -> (pid_m, pid_n) in grouped order: GROUP_M row blocks walk the column
    blocks together, so a weight tile fetched once serves GROUP_M row blocks from L2."""
    tiles_per_group = GROUP_M * num_pid_n
    first_m = (tile_id // tiles_per_group) * GROUP_M
    rows_in_group = tl.minimum(num_pid_m - first_m, GROUP_M)
    in_group = tile_id % tiles_per_group
    return first_m + in_group % rows_in_group, in_group // rows_in_group


@triton.jit
def _k_block(ptrs, k, ks, k_end, K_AXIS: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr):
    """The operand block at ``ptrs`` whose axis ``K_AXIS`` runs over k + ks: zero at k >= k_end (no
    mask when ``EVEN_K``), fp32 when ``UPCAST``."""
    if EVEN_K:
        block = tl.load(ptrs)
    elif K_AXIS == 1:
        block = tl.load(ptrs, mask=(k + ks < k_end)[None, :], other=0.0)
    else:
        block = tl.load(ptrs, mask=(k + ks < k_end)[:, None], other=0.0)
    if UPCAST:
        block = block.to(tl.float32)
    return block


@triton.jit
def gemm_tile(x_ptr, w_ptr, off_m, off_n, M, N, k_begin, k_end,
              stride_xm, stride_xk, stride_wn, stride_wk,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              EVEN_K: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """fp32 accumulator [BLOCK_M, BLOCK_N] = x[off_m:, k_begin:k_end] @ w[off_n:, k_begin:k_end].T.

    Rows >= M and columns >= N wrap around (valid addresses, meaningless values): the caller masks
    them at the store. ``EVEN_K``: ``k_end - k_begin`` is a multiple of BLOCK_K (no K mask).
    ``UPCAST``: compute the dot in fp32 (the interpreter's bf16 dot is wrong).
    """
    rows = ((off_m + tl.arange(0, BLOCK_M)) % M).to(tl.int64)
    cols = ((off_n + tl.arange(0, BLOCK_N)) % N).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + (k_begin + ks)[None, :] * stride_xk
    w_ptrs = w_ptr + cols[None, :] * stride_wn + (k_begin + ks)[:, None] * stride_wk   # [BLOCK_K, BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in tl.range(k_begin, k_end, BLOCK_K):
        a = _k_block(x_ptrs, k, ks, k_end, 1, EVEN_K, UPCAST)
        b = _k_block(w_ptrs, k, ks, k_end, 0, EVEN_K, UPCAST)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    return acc


@triton.jit
def gemm_tile_tma(x_desc, w_desc, off_m, off_n, k_begin, k_end,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr):
    """``gemm_tile`` through tensor descriptors with block shapes [BLOCK_M, BLOCK_K] (x) and
    [BLOCK_N, BLOCK_K] (w). Reads past the tensors' edges return 0; ``k_end`` must be K or a
    multiple of BLOCK_K past ``k_begin``."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in tl.range(k_begin, k_end, BLOCK_K):
        a = x_desc.load([off_m, k])
        b = w_desc.load([off_n, k])
        acc = tl.dot(a, b.T, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def gemm_tile_wide(x, w, w_lo, off_m, off_n, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_N_LO: tl.constexpr, BLOCK_K: tl.constexpr,
                   USE_TMA: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """A whole tile BLOCK_N + BLOCK_N_LO wide (128 + 64, 128 + 32, ...: widths a power of two cannot
    express, which fill the SMs where power-of-two tiles leave a wave part-empty), as two
    accumulators [BLOCK_M, BLOCK_N] at ``off_n`` and [BLOCK_M, BLOCK_N_LO] at ``off_n + BLOCK_N``
    that share each k step's x block. TMA: ``w`` and ``w_lo`` are descriptors of w with block rows
    BLOCK_N and BLOCK_N_LO; pointers: both are w. Edges as in ``gemm_tile`` / ``gemm_tile_tma``."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_lo = tl.zeros((BLOCK_M, BLOCK_N_LO), dtype=tl.float32)
    if USE_TMA:
        for k in tl.range(0, K, BLOCK_K):
            a = x.load([off_m, k])
            acc = tl.dot(a, w.load([off_n, k]).T, acc, input_precision=INPUT_PRECISION)
            acc_lo = tl.dot(a, w_lo.load([off_n + BLOCK_N, k]).T, acc_lo, input_precision=INPUT_PRECISION)
    else:
        rows = ((off_m + tl.arange(0, BLOCK_M)) % M).to(tl.int64)
        cols = ((off_n + tl.arange(0, BLOCK_N)) % N).to(tl.int64)
        cols_lo = ((off_n + BLOCK_N + tl.arange(0, BLOCK_N_LO)) % N).to(tl.int64)
        ks = tl.arange(0, BLOCK_K)
        x_ptrs = x + rows[:, None] * stride_xm + ks[None, :] * stride_xk
        w_ptrs = w + cols[None, :] * stride_wn + ks[:, None] * stride_wk
        w_lo_ptrs = w_lo + cols_lo[None, :] * stride_wn + ks[:, None] * stride_wk
        for k in tl.range(0, K, BLOCK_K):
            a = _k_block(x_ptrs, k, ks, K, 1, EVEN_K, UPCAST)
            acc = tl.dot(a, _k_block(w_ptrs, k, ks, K, 0, EVEN_K, UPCAST), acc, input_precision=INPUT_PRECISION)
            acc_lo = tl.dot(a, _k_block(w_lo_ptrs, k, ks, K, 0, EVEN_K, UPCAST), acc_lo,
                            input_precision=INPUT_PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
            w_lo_ptrs += BLOCK_K * stride_wk
    return acc, acc_lo


@triton.jit
def store_tile(y_ptr, acc, off_m, off_n, M, N, stride_ym,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Store ``acc`` (cast to y's dtype) into y[off_m:off_m+BLOCK_M, off_n:off_n+BLOCK_N], masked to [M, N]."""
    rows = off_m + tl.arange(0, BLOCK_M)
    cols = off_n + tl.arange(0, BLOCK_N)
    ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :]
    tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rows < M)[:, None] & (cols < N)[None, :])


@triton.jit
def last_to_arrive(counts, index, contributors):
    """Call after this program's stores: count it in at ``counts[index]``. True for the last of
    ``contributors`` (it sees every earlier program's stores), which re-arms the counter for the next
    launch. Nothing waits, so the programs need not be co-resident."""
    tl.debug_barrier()          # every thread's stores are issued before the release below
    last = tl.atomic_add(counts + index, 1, sem="acq_rel", scope="gpu") == contributors - 1
    if last:
        tl.atomic_xchg(counts + index, 0, sem="relaxed", scope="gpu")
    return last


@triton.jit
def finish_tile(acc, y, counts, tile, mine, first, rest, rest_stride, contributors, off_m, off_n, M, N,
                stride_ym, stride_ws, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Store a tile that ``contributors`` programs computed in K slices, in one launch: each stores its
    fp32 slice at ``mine`` and counts itself in at ``counts[tile]``; the last to arrive sums the slices
    (``first``, then ``rest + j * rest_stride``; row stride ``stride_ws``) and stores y."""
    if contributors == 1:
        store_tile(y, acc, off_m, off_n, M, N, stride_ym, BLOCK_M, BLOCK_N)
    else:
        rows = off_m + tl.arange(0, BLOCK_M)
        cols = off_n + tl.arange(0, BLOCK_N)
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        offs = tl.arange(0, BLOCK_M)[:, None] * stride_ws + tl.arange(0, BLOCK_N)[None, :]
        tl.store(mine + offs, acc, mask=mask)
        if last_to_arrive(counts, tile, contributors):
            total = tl.load(first + offs, mask=mask, other=0.0, cache_modifier=".cg")   # L2: peers' writes
            for j in range(0, contributors - 1):
                total += tl.load(rest + j * rest_stride + offs, mask=mask, other=0.0, cache_modifier=".cg")
            store_tile(y, total, off_m, off_n, M, N, stride_ym, BLOCK_M, BLOCK_N)


@triton.jit
def _stream_owner(it, per, extra):
    """The program whose even share of the K iterations holds iteration ``it`` (shares: ``per`` + 1
    iterations for the first ``extra`` programs, ``per`` for the rest)."""
    edge = extra * (per + 1)
    return tl.where(it < edge, it // (per + 1), extra + (it - edge) // tl.maximum(per, 1))


@triton.jit
def _mn_tile(x, w, pid_m, pid_n, M, N, K, k_begin, k_end, stride_xm, stride_xk, stride_wn, stride_wk,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             USE_TMA: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """(accumulator over [k_begin, k_end), off_m, off_n) of output tile (pid_m, pid_n)."""
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    if USE_TMA:
        acc = gemm_tile_tma(x, w, off_m, off_n, k_begin, k_end, BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION)
    else:
        acc = gemm_tile(x, w, off_m, off_n, M, N, k_begin, k_end, stride_xm, stride_xk, stride_wn, stride_wk,
                        BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, UPCAST, INPUT_PRECISION)
    return acc, off_m, off_n


# M changes with every batch: not specialized, so one compile serves all token counts. N stays
# specialized: its divisibility lets the masked epilogue store vectors instead of scalars.
@triton.jit(do_not_specialize=["M"])
def _gemm_kernel(x, w, w_lo, y, partial, counts, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, stride_ym,
                 split_k, num_programs, whole_tiles,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_N_LO: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr,
                 STREAM: tl.constexpr, FLATTEN: tl.constexpr, USE_TMA: tl.constexpr, EVEN_K: tl.constexpr,
                 UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Persistent. The first ``whole_tiles`` tiles go whole, program p taking tiles p, p + num_programs,
    ...; the rest are computed in K slices that meet in the fp32 workspace ``partial``. ``STREAM``
    (stream-K, no whole tiles): the K iterations of the weight's columns, laid end to end, are cut
    into even shares, one per set of programs that computes a column's row tiles side by side, so no
    wave is left part-empty (slices: [programs, 2, BLOCK_M, BLOCK_N], slot 0 a program's first
    tile's, slot 1 its last one's). Else each tile left is cut into ``split_k`` even K ranges (slices:
    [split_k, tiles left, BLOCK_M, BLOCK_N]). Schedules: ``tiles`` (all whole, or all split),
    ``stream`` (none whole), ``hybrid`` (the full waves whole, the last wave's tiles split to fill it).
    ``BLOCK_N_LO`` > 0: tiles BLOCK_N + BLOCK_N_LO wide (``gemm_tile_wide``; the tiles schedule unsplit only)."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N + BLOCK_N_LO)
    tiles_mn = num_pid_m * num_pid_n
    pid = tl.program_id(0)
    # whole tiles (the tiles schedule unsplit; hybrid: the full waves), one per program per wave
    # FLATTEN: the compiler pipelines across tiles, so a tile's loads start under the last one's epilogue
    for tile in tl.range(pid, whole_tiles, num_programs, flatten=FLATTEN):
        pid_m, pid_n = grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M)
        if BLOCK_N_LO == 0:
            acc, off_m, off_n = _mn_tile(x, w, pid_m, pid_n, M, N, K, 0, K, stride_xm, stride_xk, stride_wn,
                                         stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, USE_TMA, EVEN_K, UPCAST, INPUT_PRECISION)
            store_tile(y, acc, off_m, off_n, M, N, stride_ym, BLOCK_M, BLOCK_N)
        else:
            off_m = pid_m * BLOCK_M
            off_n = pid_n * (BLOCK_N + BLOCK_N_LO)
            acc, acc_lo = gemm_tile_wide(x, w, w_lo, off_m, off_n, M, N, K, stride_xm, stride_xk, stride_wn,
                                         stride_wk, BLOCK_M, BLOCK_N, BLOCK_N_LO, BLOCK_K, USE_TMA, EVEN_K, UPCAST,
                                         INPUT_PRECISION)
            store_tile(y, acc, off_m, off_n, M, N, stride_ym, BLOCK_M, BLOCK_N)
            store_tile(y, acc_lo, off_m, off_n + BLOCK_N, M, N, stride_ym, BLOCK_M, BLOCK_N_LO)
    rest = tiles_mn - whole_tiles      # the tiles left are computed in K slices
    slab = BLOCK_M * BLOCK_N           # one fp32 slice in the workspace (row stride BLOCK_N)
    if STREAM:
        # The row tiles of a weight column run in lockstep: program p is lane p % lanes (a row tile)
        # of set p // lanes, and the sets share the columns' K iterations evenly, so the row tiles of
        # a column read its weight at the same k, once from HBM. (Fewer programs than row tiles: one
        # lane, the tiles in grouped order.)
        lanes = tl.where(num_pid_m <= num_programs, num_pid_m, 1)
        lane = pid % lanes
        set_id = pid // lanes
        sets = num_programs // lanes
        k_iters = tl.cdiv(K, BLOCK_K)
        total = tiles_mn // lanes * k_iters
        per = total // sets
        extra = total % sets
        start = set_id * per + tl.minimum(set_id, extra)
        end = tl.where(set_id < sets, start + per + (set_id < extra).to(tl.int32), start)
        it = start
        while it < end:
            col = it // k_iters
            k0 = it - col * k_iters
            k1 = tl.minimum(k_iters, k0 + end - it)
            if lanes == 1:
                pid_m, pid_n = grouped_tile(col, num_pid_m, num_pid_n, GROUP_M)
            else:
                pid_m, pid_n = lane, col
            acc, off_m, off_n = _mn_tile(x, w, pid_m, pid_n, M, N, K, k0 * BLOCK_K, tl.minimum(k1 * BLOCK_K, K),
                                         stride_xm, stride_xk, stride_wn, stride_wk, BLOCK_M, BLOCK_N, BLOCK_K,
                                         USE_TMA, EVEN_K, UPCAST, INPUT_PRECISION)
            first = _stream_owner(col * k_iters, per, extra)
            last = _stream_owner(col * k_iters + k_iters - 1, per, extra)
            # a set's slots in this lane: 0 the slice of its first column, 1 that of its last; the first
            # contributor's slice of this tile is its last column's, the others start inside the tile
            mine = partial + (2 * pid + (set_id == first).to(tl.int32)).to(tl.int64) * slab
            finish_tile(acc, y, counts, col * lanes + lane, mine,
                        partial + (2 * (first * lanes + lane) + 1).to(tl.int64) * slab,
                        partial + (2 * ((first + 1) * lanes + lane)).to(tl.int64) * slab, 2 * lanes * slab,
                        last - first + 1, off_m, off_n, M, N, stride_ym, BLOCK_N, BLOCK_M, BLOCK_N)
            it += k1 - k0
    else:
        # split-major units: the slices of one split run side by side at the same k, so tiles that
        # share a weight column read it from L2 once
        k_per_split = tl.cdiv(tl.cdiv(K, split_k), BLOCK_K) * BLOCK_K
        for unit in tl.range(pid, rest * split_k, num_programs):
            split = unit // rest
            r = unit - split * rest
            k_begin = tl.multiple_of(split * k_per_split, BLOCK_K)
            pid_m, pid_n = grouped_tile(whole_tiles + r, num_pid_m, num_pid_n, GROUP_M)
            acc, off_m, off_n = _mn_tile(x, w, pid_m, pid_n, M, N, K, k_begin, tl.minimum(k_begin + k_per_split, K),
                                         stride_xm, stride_xk, stride_wn, stride_wk, BLOCK_M, BLOCK_N, BLOCK_K,
                                         USE_TMA, EVEN_K, UPCAST, INPUT_PRECISION)
            at = partial + r.to(tl.int64) * slab
            plane = rest.to(tl.int64) * slab
            finish_tile(acc, y, counts, whole_tiles + r, at + split * plane, at, at + plane, plane, split_k,
                        off_m, off_n, M, N, stride_ym, BLOCK_N, BLOCK_M, BLOCK_N)


# --- space, constraints, default config ----------------------------------------------------------

def space(problem: Problem) -> Space:
    return Space(
        pow2("block_m", 16, 256), categorical("block_n", BLOCK_NS), pow2("block_k", 16, 256),
        categorical("group_m", [1, 4, 8, 16]),
        categorical("num_warps", [4, 8]),
        categorical("num_stages", [2, 3, 4, 5]),
        categorical("schedule", SCHEDULES),
        categorical("split_k", SPLITS, when={"schedule": ("tiles",)}),
        categorical("programs_per_sm", [1, 2, 4]),
        categorical("tma", [False, True]),
        categorical("flatten", [False, True]),
    )


def whole_tiles_config(tiles: dict) -> dict:
    """A full config for tiles a fused kernel's config chose: whole tiles, one program per SM, no
    flattening (what the fused kernels' own persistent loops run)."""
    return {**tiles, "schedule": "tiles", "split_k": 1, "programs_per_sm": 1, "flatten": False}


def split_width(block_n: int) -> tuple[int, int]:
    """A tile width as (power of two, the rest): 192 -> (128, 64), 128 -> (128, 0)."""
    high = 1 << (block_n.bit_length() - 1)
    return high, block_n - high


def output_tiles(problem: Problem, block_m: int, block_n: int) -> int:
    return -(-problem["m"] // block_m) * -(-problem["n"] // block_n)


def tma_unavailable(config: dict, problem: Problem, spec: DeviceSpec) -> str | None:
    if not config["tma"]:
        return None
    if "tma" not in spec.features:   # the launcher's interpreter spec has none either
        return f"tma: {spec.name} has no TMA"
    if problem["k"] * ELEM_SIZE[problem.dtype] % 16:
        return f"tma: rows of k={problem['k']} {problem.dtype} elements are not 16-byte aligned"
    return None


def smem_overflow(config: dict, problem: Problem, spec: DeviceSpec) -> str | None:
    need = config["num_stages"] * (config["block_m"] + config["block_n"]) * config["block_k"] * ELEM_SIZE[problem.dtype]
    if need > spec.smem_per_block:
        return f"shared memory: {need} bytes for the pipeline > {spec.smem_per_block} on {spec.name}"
    return None


def register_pressure(config: dict, problem: Problem, spec: DeviceSpec) -> str | None:
    regs = config["block_m"] * config["block_n"] // (32 * config["num_warps"])
    if regs > MAX_ACC_REGISTERS:
        return f"registers: {regs} accumulator registers per thread > {MAX_ACC_REGISTERS}"
    return None


def split_k_insane(config: dict, problem: Problem, spec: DeviceSpec) -> str | None:
    if config.get("schedule") == "stream":
        if problem["m"] > SPLIT_K_MAX_M:
            return f"schedule: m={problem['m']} > {SPLIT_K_MAX_M} fills the device in whole tiles (stream-K only adds slices)"
        return None
    if config.get("schedule") == "hybrid":
        tiles = output_tiles(problem, config["block_m"], config["block_n"])
        slots = spec.sms * config.get("programs_per_sm", 1)
        if tiles <= slots:
            return f"schedule: hybrid with {tiles} tiles <= {slots} programs has no whole wave (that is stream)"
        if tiles % slots == 0:
            return f"schedule: hybrid with {tiles} tiles fills {tiles // slots} waves exactly (that is tiles)"
        return None
    split, bk, k = config.get("split_k", 1), config["block_k"], problem["k"]
    if split == 1:
        return None
    if problem["m"] > SPLIT_K_MAX_M:
        return f"split_k: m={problem['m']} > {SPLIT_K_MAX_M} fills the device without splitting k"
    k_per_split = -(-(-(-k // split)) // bk) * bk
    if (split - 1) * k_per_split >= k:
        return f"split_k: {split} splits of k={k} in blocks of {bk} leave a split empty"
    return None


def wide_tile_split(config: dict, problem: Problem, spec: DeviceSpec) -> str | None:
    if split_width(config["block_n"])[1] and (config.get("schedule", "tiles") != "tiles" or config.get("split_k", 1) > 1):
        return (f"block_n={config['block_n']}: tiles that are not a power of two wide run whole "
                f"(schedule tiles, split_k 1)")
    return None


def flatten_crowds_sm(config: dict, problem: Problem, spec: DeviceSpec) -> str | None:
    # measured on an H100: the flattened loop's extra buffers stop two programs sharing an SM (1.5x slower)
    if config.get("flatten") and config.get("programs_per_sm", 1) > 1:
        return f"flatten: the flattened loop's buffers leave room for one program per SM, not {config['programs_per_sm']}"
    return None


def tile_exceeds_problem(config: dict, problem: Problem, spec: DeviceSpec) -> str | None:
    for name, dim in (("block_m", "m"), ("block_n", "n"), ("block_k", "k")):
        limit = max(16, triton.next_power_of_2(problem[dim]))
        if config[name] > limit:
            return f"{name}={config[name]} exceeds {dim}={problem[dim]} (at most {limit} is useful)"
    return None


# Constraints a launch must pass (the kernel could not run otherwise) ...
LAUNCH_CONSTRAINTS = (tma_unavailable, smem_overflow, wide_tile_split)
# ... and those that only keep the search away from configs that waste time.
CONSTRAINTS = LAUNCH_CONSTRAINTS + (register_pressure, split_k_insane, flatten_crowds_sm, tile_exceeds_problem)


# A split fills the waves well enough at this fraction; more slices only add fp32 traffic.
SPLIT_FILL_ENOUGH = 0.85


def split_k_to_fill(config: dict, problem: Problem, spec: DeviceSpec) -> int:
    """The smallest split whose (tile, split) units fill the persistent grid's waves to
    SPLIT_FILL_ENOUGH, else the one that fills them best, keeping >= 4 K blocks per split; 1 when
    the tiles alone fill a wave."""
    tiles = output_tiles(problem, config["block_m"], config["block_n"])
    slots = spec.sms * config.get("programs_per_sm", 1)
    if tiles >= slots:
        return 1

    def fill(split: int) -> float:
        units = tiles * split
        return units / (-(-units // slots) * slots)

    usable = [s for s in SPLITS
              if s == 1 or (split_k_insane({**config, "schedule": "tiles", "split_k": s}, problem, spec) is None
                            and problem["k"] // s >= 4 * config["block_k"])]
    enough = [s for s in usable if fill(s) >= SPLIT_FILL_ENOUGH]
    return min(enough) if enough else max(usable, key=lambda s: (round(fill(s), 2), -s))


def default_config(problem: Problem, spec: DeviceSpec, programs_per_sm: int | None = None) -> dict:
    """Heuristic config (from bench_gemm's searches on an H100, bf16). Decode-sized M streams the
    weight with 16x64x256 tiles, stream-K where the tiles cannot fill the SMs twice over and each
    program still gets several K iterations (pointer loads: TMA gained nothing there), else whole
    tiles split-K'd to fill the waves. Up to 256 rows: 64x64x128 tiles, two programs per SM, split-K'd
    when they fill less than half the slots. Up to 1024 rows: 128x128x64, two per SM. Beyond:
    128x256x64, 3 stages, 8 warps, hybrid (the last wave's tiles split) when the tiles make more
    than one but fewer than four waves. Grouped order and TMA where available. Where a constraint
    rejects it (fp32, small shared memory, fused kernels' share of it) shrinks stages to 3, BLOCK_K
    to 32, stages to 2, then BLOCK_N, BLOCK_K, BLOCK_M until every constraint passes.
    ``programs_per_sm=1`` (fused kernels' persistent GEMMs): tiles for one program per SM, 64x128x128
    up to 256 rows and 128x256x64 beyond."""
    one_per_sm = programs_per_sm == 1
    m, k = problem["m"], problem["k"]
    if m <= 16:
        cfg = dict(block_m=16, block_n=64, block_k=256, group_m=1, num_warps=4, num_stages=3, programs_per_sm=1)
    elif m <= 256 and one_per_sm:
        cfg = dict(block_m=64, block_n=128, block_k=128, group_m=8, num_warps=4, num_stages=3, programs_per_sm=1)
    elif m <= 256:
        cfg = dict(block_m=64, block_n=64, block_k=128, group_m=8, num_warps=4, num_stages=3, programs_per_sm=2)
    elif m <= 1024 and not one_per_sm:
        cfg = dict(block_m=128, block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=3, programs_per_sm=2)
    else:
        cfg = dict(block_m=128, block_n=256, block_k=64, group_m=8, num_warps=8, num_stages=3, programs_per_sm=1)
    # clamp tiles to the problem
    for name, dim in (("block_m", "m"), ("block_n", "n"), ("block_k", "k")):
        cfg[name] = min(cfg[name], max(16, triton.next_power_of_2(problem[dim])))
    tiles = output_tiles(problem, cfg["block_m"], cfg["block_n"])
    slots = spec.sms * cfg["programs_per_sm"]
    iterations = tiles * -(-k // cfg["block_k"])
    tma = tma_unavailable({**cfg, "tma": True}, problem, spec) is None
    # flattening pipelines across a program's tiles: it pays where each program has several
    cfg.update(schedule="tiles", split_k=1, tma=tma, flatten=m > 1024)
    if m <= 16 and tiles < 2 * spec.sms and iterations >= 6 * spec.sms:
        del cfg["split_k"]
        cfg.update(schedule="stream", tma=False)
    elif m <= 16 or (m <= 256 and 2 * tiles < slots):
        cfg["split_k"] = split_k_to_fill(cfg, problem, spec)
    elif m > 1024 and slots < tiles < 4 * slots and tiles % slots:
        del cfg["split_k"]
        cfg["schedule"] = "hybrid"
    # keep 3 stages (the pipeline depth that hides HBM latency) before giving up BLOCK_K
    for shrink, floor in (("num_stages", 3), ("block_k", 32), ("num_stages", 2), ("block_n", 16),
                          ("block_k", 16), ("block_m", 16)):
        while first_rejection(cfg, problem, spec, CONSTRAINTS) is not None and cfg[shrink] > floor:
            cfg[shrink] = cfg[shrink] - 1 if shrink == "num_stages" else cfg[shrink] // 2
    return cfg


def portfolio(problem: Problem, spec: DeviceSpec) -> list[dict]:
    """Configs worth trying first for this shape (the default first), per token class: whole tiles,
    unsplit and split-K to fill the waves, with and without TMA (flattened, past 512 tokens), and past
    decode sizes the hybrid (whole waves, the last split); up to 512 tokens also stream-K on the same tiles (1 program
    per SM; up to 256 tokens 2 too, and 4 for decode), listed first for decode; from 257 to 1024 tokens
    also 128 x 96 / 160 / 192 whole tiles. The tuner enqueues them before its sampler explores;
    bench_gemm's short search is exactly this list."""
    m = problem["m"]
    base = dict(group_m=1 if m <= 16 else 8, tma=True)
    # (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps, programs per SM)
    if m <= 16:
        tiles = [(16, 64, 128, 4, 4, 1), (16, 128, 128, 4, 4, 1), (16, 64, 256, 3, 4, 1), (16, 32, 256, 4, 4, 1)]
    elif m <= 256:
        tiles = [(64, 64, 128, 3, 4, 2), (128, 64, 64, 4, 4, 2), (64, 128, 128, 3, 4, 1), (128, 128, 64, 4, 8, 1),
                 (64, 128, 64, 4, 4, 1), (64, 256, 64, 3, 8, 1), (128, 64, 64, 4, 4, 1), (128, 256, 64, 3, 8, 1)]
    else:   # more, smaller tiles (two programs per SM) where 128 x 256 tiles leave a wave part-empty
        tiles = [(128, 128, 64, 3, 8, 2), (128, 256, 64, 3, 8, 1), (128, 128, 64, 4, 8, 1), (256, 128, 64, 3, 8, 1),
                 (64, 256, 64, 3, 8, 1), (64, 128, 64, 4, 4, 2)]
    whole, stream = [], []
    if 256 < m <= 1024:   # tiles a power of two plus a smaller one wide: the only sizes where they won (by 3-5 %)
        for bn, stages, pps in ((96, 4, 2), (160, 3, 1), (192, 3, 1)):
            whole.append(dict(base, block_m=128, block_n=bn, block_k=64, num_stages=stages, num_warps=8,
                              programs_per_sm=pps, schedule="tiles", split_k=1, flatten=m > SPLIT_K_MAX_M and pps == 1))
    for bm, bn, bk, stages, warps, pps in tiles:
        bm, bn, bk = (min(b, max(16, triton.next_power_of_2(problem[d]))) for b, d in ((bm, "m"), (bn, "n"), (bk, "k")))
        shape = dict(base, block_m=bm, block_n=bn, block_k=bk, num_stages=stages, num_warps=warps, programs_per_sm=pps)
        for tma in (True, False):
            cfg = dict(shape, schedule="tiles", split_k=1, tma=tma, flatten=False)
            whole.append(cfg)
            if m > SPLIT_K_MAX_M and pps == 1:
                whole.append(dict(cfg, flatten=True))
            if m <= SPLIT_K_MAX_M:          # the split that fills the waves best, if any
                whole.append(dict(cfg, split_k=split_k_to_fill(cfg, problem, spec)))
        if m <= SPLIT_K_MAX_M:
            for stream_pps in (1, 2, 4) if m <= 16 else (1, 2) if m <= 256 else (1,):
                stream.append(dict(shape, schedule="stream", programs_per_sm=stream_pps, tma=m > 16, flatten=False))
        if m > 16:                          # whole waves, then the part-empty last one split
            whole.append(dict(shape, schedule="hybrid", tma=True, flatten=m > SPLIT_K_MAX_M and pps == 1))
    # the family that won most often on the H100 first (a short tuning budget reaches only the head)
    configs = [default_config(problem, spec)] + (stream + whole if m <= 16 else whole + stream)
    unique = []
    for c in configs:
        if c not in unique and TEMPLATE.reject_reason(c, problem, spec) is None:
            unique.append(c)
    return unique


# --- launcher ------------------------------------------------------------------------------------

class LaunchPlan(NamedTuple):
    config: dict
    programs: int        # persistent programs launched
    whole_tiles: int     # tiles computed whole before the sliced ones
    split_k: int         # K slices per sliced tile (split schedules)
    floats: int          # fp32 workspace elements for the slices
    tiles: int           # output tiles (one arrival counter each)


@functools.lru_cache(maxsize=4096)
def _plan(config_items: tuple | None, m: int, n: int, k: int, dtype: torch.dtype, device: torch.device):
    """The ``LaunchPlan`` of one launch: the default config, or the given one checked against the
    space and the launch constraints (a config from before schedules existed is an unflattened
    ``tiles`` one). Cached, so the hot path pays one lookup."""
    problem = Problem.make("gemm", DTYPE_NAMES[dtype], m=m, n=n, k=k)
    spec = launch_spec(device)
    if config_items is None:
        config = default_config(problem, spec)
    else:
        config = dict(config_items)
        config.setdefault("schedule", "tiles")
        config.setdefault("flatten", False)
        checked_config(space(problem), config, problem, spec, LAUNCH_CONSTRAINTS)
    bm, bn, slots = config["block_m"], config["block_n"], spec.sms * config["programs_per_sm"]
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    k_iters = triton.cdiv(k, config["block_k"])
    if config["schedule"] == "stream":
        programs = min(tiles * k_iters, slots)
        return LaunchPlan(config, programs, 0, 1, 2 * programs * bm * bn, tiles)
    if config["schedule"] == "hybrid":
        whole = tiles // slots * slots
        split = hybrid_split(tiles - whole, slots, k_iters)
    else:
        split = config["split_k"]
        whole = tiles if split == 1 else 0
    programs = min(whole + (tiles - whole) * split, slots)
    return LaunchPlan(config, programs, whole, split, (split * (tiles - whole) * bm * bn if split > 1 else 0), tiles)


_WORKSPACES: dict = {}
# Workspaces replaced by larger ones stay allocated: a captured CUDA graph may still point at them.
_RETIRED: list = []


def workspace(device: torch.device, floats: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 slices, int32 per-tile arrival counters, zero between launches) for split tiles, one
    pair per device and stream (launches on one stream run in order, so they can share it)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    slices, counts = _WORKSPACES.get(key, (None, None))
    if slices is None or slices.numel() < floats or counts.numel() < tiles:
        if slices is not None:
            _RETIRED.append((slices, counts))
        floats = max(floats, 0 if slices is None else slices.numel())
        tiles = max(tiles, 0 if counts is None else counts.numel())
        slices = torch.empty(max(floats, 1), dtype=torch.float32, device=device)
        counts = torch.zeros(max(tiles, 1), dtype=torch.int32, device=device)
        _WORKSPACES[key] = (slices, counts)
    return slices, counts


def _check_inputs(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None) -> None:
    check_linear("gemm", x, w)
    if out is not None:
        want = (x.shape[0], w.shape[0])
        if tuple(out.shape) != want:
            raise InputError(f"gemm: out has shape {tuple(out.shape)}, expected {want}")
        if out.dtype != x.dtype:
            raise InputError(f"gemm: out dtype {out.dtype} differs from x dtype {x.dtype}")
        if out.device != x.device:
            raise InputError(f"gemm: out is on {out.device} but x is on {x.device}")
        if out.shape[1] > 1 and out.stride(1) != 1:
            raise InputError(f"gemm: out needs unit stride along n, got strides {tuple(out.stride())}")


def _tma_ready(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0 and (t.shape[0] <= 1 or t.stride(0) * t.element_size() % 16 == 0)


def gemm(x: torch.Tensor, w: torch.Tensor, *, out: torch.Tensor | None = None, config: dict | None = None):
    """y = x @ w.T for x [m, k] and w [n, k] (nn.Linear weight), fp16/bf16/fp32 (fp32: IEEE dot).

    x and out may have any row stride (unit stride along the last dim). ``config`` None: the
    default for this shape and device. A config asking for TMA falls back to pointer loads (same
    tiles) when x's rows are not 16-byte aligned.
    """
    _check_inputs(x, w, out)
    m, k = x.shape
    n = w.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    plan = _plan(None if config is None else tuple(sorted(config.items())), m, n, k, x.dtype, x.device)
    config = plan.config
    bm, bk = config["block_m"], config["block_k"]
    bn, bn_lo = split_width(config["block_n"])
    use_tma = bool(config["tma"]) and _tma_ready(x) and _tma_ready(w)
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor
        xa = TensorDescriptor(x, [m, k], [x.stride(0), 1], [bm, bk])
        wa = TensorDescriptor(w, [n, k], [w.stride(0), 1], [bn, bk])
        wa_lo = TensorDescriptor(w, [n, k], [w.stride(0), 1], [bn_lo, bk]) if bn_lo else wa
    else:
        xa, wa, wa_lo = x, w, w
    slices, counts = workspace(x.device, plan.floats, plan.tiles) if plan.floats else (out, out)
    interpreted = tuneforge.INTERPRETED
    _gemm_kernel[(plan.programs,)](
        xa, wa, wa_lo, out, slices, counts, m, n, k, x.stride(0), x.stride(1), w.stride(0), w.stride(1), out.stride(0),
        plan.split_k, plan.programs, plan.whole_tiles,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_N_LO=bn_lo, BLOCK_K=bk, GROUP_M=config["group_m"], STREAM=config["schedule"] == "stream",
        FLATTEN=config["flatten"],
        USE_TMA=use_tma, EVEN_K=k % bk == 0, UPCAST=interpreted and x.dtype != torch.float32,
        INPUT_PRECISION="ieee" if x.dtype == torch.float32 or interpreted else "tf32",
        num_warps=config["num_warps"], num_stages=config["num_stages"])
    return out


def reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T in fp64."""
    return x.double() @ w.double().T


def baseline(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What a torch user runs: cuBLAS through nn.functional.linear."""
    return torch.nn.functional.linear(x, w)


def make_inputs(problem: Problem, device, seed: int = 0, ctx=None) -> dict:
    """x ~ N(0, 1), w ~ N(0, 1/k) so y ~ N(0, 1) at every k; ``out`` uninitialised."""
    m, n, k = problem["m"], problem["n"], problem["k"]
    dtype = problem.torch_dtype
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn((m, k), generator=g, device=device, dtype=torch.float32).to(dtype)
    w = (torch.randn((n, k), generator=g, device=device, dtype=torch.float32) / max(k, 1) ** 0.5).to(dtype)
    return {"x": x, "w": w, "out": torch.empty((m, n), dtype=dtype, device=device)}


def work(problem: Problem) -> tuple[float, float]:
    """2mnk flops; x, w read once and y written once."""
    m, n, k = problem["m"], problem["n"], problem["k"]
    return 2.0 * m * n * k, float((m * k + n * k + m * n) * ELEM_SIZE[problem.dtype])


def cost(problem: Problem, config: dict | None, spec: DeviceSpec) -> float:
    """The cost model's tile estimate (waves, padding, small-M bandwidth); None: cuBLAS-like baseline."""
    return gemm_config_time(problem["m"], problem["n"], problem["k"], config, spec, problem.dtype)


TEMPLATE = register(Template(
    op="gemm", space=space, make_inputs=make_inputs, launch=gemm, reference=reference, baseline=baseline,
    default_config=default_config, work=work, cost=cost, constraints=CONSTRAINTS, seeds=portfolio,
    doc="y = x @ w.T (nn.Linear): persistent grouped tiles, split-K or stream-K, optional TMA loads"))
