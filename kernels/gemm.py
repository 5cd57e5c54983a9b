"""GEMM: y[m, n] = x[m, k] @ w[n, k].T (w in nn.Linear layout), one persistent Triton kernel.

Search space: tile sizes BLOCK_M/N/K (BLOCK_N also a power of two plus a smaller one: 96, 160, 192,
... as two accumulators, whole tiles only), grouped tile order (GROUP_M), warps, pipeline stages, the
schedule of the persistent grid (``tiles``: whole tiles, optionally split-K; ``stream``: stream-K, the
K iterations cut into even shares per program so no wave runs part-empty; ``hybrid``: whole tiles
for the full waves, the last wave's tiles split-K'd), programs per SM, a tile loop flattened so the
compiler pipelines across tiles, and on Hopper-class devices TMA loads through host-side tensor
descriptors. Split tiles are summed in the same launch: the last program to finish a slice adds the
others' fp32 slices (``finish_tile``). The search space, constraints, default config and portfolio are
``kernels/_gemm_space.py``'s (re-exported here); this file holds the kernel and its launcher. Three more
config families of the template: ``kernel: gluon_ws`` (``_gemm_gluon.py``, Hopper), ``kernel: gemv``
(``_gemm_gemv.py``, decode's few rows) and ``kernel: skinny`` (up to 64 rows in one block, a plain grid
of column tiles x K slices, optionally A/B swapped: its policy is ``_gemm_skinny.py``, its kernel here).

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
from tuneforge.dsl.template import Template, register
from tuneforge.errors import InputError
from tuneforge.kernels._common import (await_previous, chained, check_linear, check_tensor, checked_config,
                                       first_rejection, launch_spec)
from tuneforge.kernels import _gemm_gemv as GV
from tuneforge.kernels import _gemm_gluon as GW
from tuneforge.kernels import _gemm_skinny as SK
from tuneforge.kernels._gemm_space import (  # noqa: F401  (the policy fused kernels and tests use as gemm's)
    CONSTRAINTS, ELEM_SIZE, LAUNCH_CONSTRAINTS, SPLIT_K_MAX_M, default_config, fusion_of, out_width, output_tiles,
    portfolio, register_pressure, smem_overflow, space, split_width, tile_exceeds_problem, tma_unavailable, whole_tiles_config)
from tuneforge.dsl.roofline import gemm_config_time, hybrid_split
from tuneforge.models.problems import GEMM_EPILOGUES as EPILOGUES
from tuneforge.dsl.devices import DeviceSpec

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
def normed_block(a, norm_w, k, ks, k_end):
    """(the x block ``a`` [rows, BLOCK_K] at k scaled by the RMSNorm weight ``norm_w[k + ks]``, in a's dtype;
    its rows' sums of squares, fp32): the fused norm prologue's step."""
    a32 = a.to(tl.float32)
    scale = tl.load(norm_w + k + ks, mask=k + ks < k_end, other=0.0).to(tl.float32)
    return (a32 * scale[None, :]).to(a.dtype), tl.sum(a32 * a32, axis=1)


@triton.jit
def gemm_tile_wide(x, w, w_lo, g, off_m, off_n, off_lo, M, N, k_begin, k_end, stride_xm, stride_xk, stride_wn,
                   stride_wk,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_N_LO: tl.constexpr, BLOCK_K: tl.constexpr,
                   USE_TMA: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                   LO: tl.constexpr, NORM: tl.constexpr):
    """A whole-K tile as an accumulator [BLOCK_M, BLOCK_N] at w row ``off_n`` and, with ``LO``, a second one
    [BLOCK_M, BLOCK_N_LO] at w row ``off_lo``, sharing each k step's x block: a tile BLOCK_N + BLOCK_N_LO
    wide (``off_lo = off_n + BLOCK_N``: 128 + 64, 128 + 32, ...: widths a power of two cannot express,
    which fill the SMs where power-of-two tiles leave a wave part-empty), or gate column j with its up
    column (``off_lo = off_n + inter``: the fused SiLU-mul). ``NORM``: each x block is scaled by the
    RMSNorm weight ``g[k]`` as it loads, and the third result is its rows' sum of squares (the fused
    RMSNorm prologue; the caller scales by the rows' rsqrt). Over K's range [k_begin, k_end). TMA: ``w``
    and ``w_lo`` are descriptors of w with block rows BLOCK_N and BLOCK_N_LO; pointers: both are w (N: its
    rows). Edges as in ``gemm_tile`` / ``gemm_tile_tma``."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_lo = tl.zeros((BLOCK_M, BLOCK_N_LO), dtype=tl.float32)
    sum_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K)
    if not USE_TMA:
        rows = ((off_m + tl.arange(0, BLOCK_M)) % M).to(tl.int64)
        cols = ((off_n + tl.arange(0, BLOCK_N)) % N).to(tl.int64)
        cols_lo = ((off_lo + tl.arange(0, BLOCK_N_LO)) % N).to(tl.int64)
        x_ptrs = x + rows[:, None] * stride_xm + (k_begin + ks)[None, :] * stride_xk
        w_ptrs = w + cols[None, :] * stride_wn + (k_begin + ks)[:, None] * stride_wk
        w_lo_ptrs = w_lo + cols_lo[None, :] * stride_wn + (k_begin + ks)[:, None] * stride_wk
    for k in tl.range(k_begin, k_end, BLOCK_K):
        if USE_TMA:
            a = x.load([off_m, k])
        else:
            a = _k_block(x_ptrs, k, ks, k_end, 1, EVEN_K, UPCAST)
        if NORM:
            a, squares = normed_block(a, g, k, ks, k_end)
            sum_sq += squares
        if USE_TMA:
            acc = tl.dot(a, w.load([off_n, k]).T, acc, input_precision=INPUT_PRECISION)
            if LO:
                acc_lo = tl.dot(a, w_lo.load([off_lo, k]).T, acc_lo, input_precision=INPUT_PRECISION)
        else:
            acc = tl.dot(a, _k_block(w_ptrs, k, ks, k_end, 0, EVEN_K, UPCAST), acc, input_precision=INPUT_PRECISION)
            if LO:
                acc_lo = tl.dot(a, _k_block(w_lo_ptrs, k, ks, k_end, 0, EVEN_K, UPCAST), acc_lo,
                                input_precision=INPUT_PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk
            w_lo_ptrs += BLOCK_K * stride_wk
    return acc, acc_lo, sum_sq


@triton.jit
def row_rstd(x_ptr, off_m, M, K, stride_xm, stride_xk, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """rsqrt(mean(x^2) + eps) of rows off_m .. off_m + BLOCK_M over the whole K (a pass over the rows
    before a K slice's loop: a slice alone sees part of each row; rows past M wrap, as the tile's do)."""
    rows = ((off_m + tl.arange(0, BLOCK_M)) % M).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    ptrs = x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk
    sum_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k in tl.range(0, K, BLOCK_K):
        a = tl.load(ptrs, mask=(k + ks < K)[None, :], other=0.0).to(tl.float32)
        sum_sq += tl.sum(a * a, axis=1)
        ptrs += BLOCK_K * stride_xk
    return tl.math.rsqrt(sum_sq / K + eps)


@triton.jit
def store_tile(y_ptr, acc, off_m, off_n, M, N, stride_ym,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Store ``acc`` (cast to y's dtype) into y[off_m:off_m+BLOCK_M, off_n:off_n+BLOCK_N], masked to [M, N]."""
    rows = off_m + tl.arange(0, BLOCK_M)
    cols = off_n + tl.arange(0, BLOCK_N)
    ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :]
    tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rows < M)[:, None] & (cols < N)[None, :])


@triton.jit
def epilogue_store(y_ptr, acc, off_m, off_n, M, N, stride_ym, res_ptr, stride_res,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RESIDUAL: tl.constexpr):
    """``store_tile``, plus the residual's tile first with ``RESIDUAL`` (y = x @ w.T + residual, the fused
    residual add; y may be the residual itself: each element is read before it is overwritten)."""
    if RESIDUAL:
        rows = off_m + tl.arange(0, BLOCK_M)
        cols = off_n + tl.arange(0, BLOCK_N)
        ptrs = res_ptr + rows.to(tl.int64)[:, None] * stride_res + cols[None, :]
        acc += tl.load(ptrs, mask=(rows < M)[:, None] & (cols < N)[None, :], other=0.0).to(tl.float32)
    store_tile(y_ptr, acc, off_m, off_n, M, N, stride_ym, BLOCK_M, BLOCK_N)


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
def finish_store(y_ptr, acc, off_m, off_n, M, N, stride_ym, res_ptr, stride_res,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RESIDUAL: tl.constexpr, SILU: tl.constexpr):
    """``epilogue_store`` of a summed tile; ``SILU``: its columns interleave gate and up (``off_n``, ``N``
    and ``BLOCK_N`` count both), split and multiplied here, after the K slices were summed."""
    if SILU:
        gate, up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N // 2, 2)))
        epilogue_store(y_ptr, gate * tl.sigmoid(gate) * up, off_m, off_n // 2, M, N // 2, stride_ym, res_ptr,
                       stride_res, BLOCK_M, BLOCK_N // 2, RESIDUAL)
    else:
        epilogue_store(y_ptr, acc, off_m, off_n, M, N, stride_ym, res_ptr, stride_res, BLOCK_M, BLOCK_N, RESIDUAL)


@triton.jit
def finish_tile(acc, y, counts, tile, mine, first, rest, rest_stride, contributors, off_m, off_n, M, N,
                stride_ym, stride_ws, res, stride_res, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                RESIDUAL: tl.constexpr, SILU: tl.constexpr):
    """Store a tile that ``contributors`` programs computed in K slices, in one launch: each stores its
    fp32 slice at ``mine`` and counts itself in at ``counts[tile]``; the last to arrive sums the slices
    (``first``, then ``rest + j * rest_stride``; row stride ``stride_ws``) and stores y (``finish_store``:
    the residual added once, the SiLU-mul applied once, by whoever stores)."""
    if contributors == 1:
        finish_store(y, acc, off_m, off_n, M, N, stride_ym, res, stride_res, BLOCK_M, BLOCK_N, RESIDUAL, SILU)
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
            finish_store(y, total, off_m, off_n, M, N, stride_ym, res, stride_res, BLOCK_M, BLOCK_N, RESIDUAL, SILU)


@triton.jit
def _stream_owner(it, per, extra):
    """The program whose even share of the K iterations holds iteration ``it`` (shares: ``per`` + 1
    iterations for the first ``extra`` programs, ``per`` for the rest)."""
    edge = extra * (per + 1)
    return tl.where(it < edge, it // (per + 1), extra + (it - edge) // tl.maximum(per, 1))


@triton.jit
def _mn_tile(x, w, pid_m, pid_n, M, N, K, k_begin, k_end, stride_xm, stride_xk, stride_wn, stride_wk,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
             USE_TMA: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
             x_rows, norm_w, eps, NORM: tl.constexpr):
    """(accumulator over [k_begin, k_end), off_m, off_n) of output tile (pid_m, pid_n). ``NORM``: of
    rmsnorm(x) * norm_w (``x_rows``: x's pointer, for the rows' rsqrt over the whole K): each K slice
    scaled by its rows' rsqrt, so the slices sum to the normed product."""
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    if NORM:
        acc, _, _ = gemm_tile_wide(x, w, w, norm_w, off_m, off_n, off_n, M, N, k_begin, k_end, stride_xm, stride_xk,
                                   stride_wn, stride_wk, BLOCK_M, BLOCK_N, BLOCK_N, BLOCK_K, USE_TMA, EVEN_K, UPCAST,
                                   INPUT_PRECISION, False, True)
        acc *= row_rstd(x_rows, off_m, M, K, stride_xm, stride_xk, eps, BLOCK_M, BLOCK_K)[:, None]
    elif USE_TMA:
        acc = gemm_tile_tma(x, w, off_m, off_n, k_begin, k_end, BLOCK_M, BLOCK_N, BLOCK_K, INPUT_PRECISION)
    else:
        acc = gemm_tile(x, w, off_m, off_n, M, N, k_begin, k_end, stride_xm, stride_xk, stride_wn, stride_wk,
                        BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, UPCAST, INPUT_PRECISION)
    return acc, off_m, off_n


@triton.jit
def _mn_slice(x, w, pid_m, pid_n, M, N, K, k_begin, k_end, stride_xm, stride_xk, stride_wn, stride_wk,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              USE_TMA: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
              x_rows, norm_w, eps, NORM: tl.constexpr, SILU: tl.constexpr):
    """``_mn_tile``'s K slice; ``SILU``: the gate and up slices interleaved column by column ([BLOCK_M,
    2 BLOCK_N], off_n doubled: ``finish_tile`` sums them as one and splits them at the store)."""
    if SILU:
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        gate, up, _ = gemm_tile_wide(x, w, w, norm_w, off_m, off_n, off_n + N, M, 2 * N, k_begin, k_end, stride_xm,
                                     stride_xk, stride_wn, stride_wk, BLOCK_M, BLOCK_N, BLOCK_N, BLOCK_K, USE_TMA,
                                     EVEN_K, UPCAST, INPUT_PRECISION, True, NORM)
        if NORM:
            rstd = row_rstd(x_rows, off_m, M, K, stride_xm, stride_xk, eps, BLOCK_M, BLOCK_K)[:, None]
            gate *= rstd
            up *= rstd
        acc = tl.reshape(tl.join(gate, up), (BLOCK_M, 2 * BLOCK_N))
        off_n = 2 * off_n
    else:
        acc, off_m, off_n = _mn_tile(x, w, pid_m, pid_n, M, N, K, k_begin, k_end, stride_xm, stride_xk, stride_wn,
                                     stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, USE_TMA, EVEN_K, UPCAST, INPUT_PRECISION,
                                     x_rows, norm_w, eps, NORM)
    return acc, off_m, off_n


# M changes with every batch: not specialized, so one compile serves all token counts. N stays
# specialized: its divisibility lets the masked epilogue store vectors instead of scalars.
@triton.jit(do_not_specialize=["M"])
def _gemm_kernel(x, w, w_lo, y, partial, counts, res, norm_w, x_rows, M, N, K, stride_xm, stride_xk, stride_wn,
                 stride_wk,
                 stride_ym, stride_res, eps, split_k, num_programs, whole_tiles,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_N_LO: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr,
                 STREAM: tl.constexpr, FLATTEN: tl.constexpr, USE_TMA: tl.constexpr, EVEN_K: tl.constexpr,
                 UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                 NORM: tl.constexpr, SILU: tl.constexpr, RESIDUAL: tl.constexpr, PDL: tl.constexpr):
    """Persistent. The first ``whole_tiles`` tiles go whole, program p taking tiles p, p + num_programs,
    ...; the rest are computed in K slices that meet in the fp32 workspace ``partial``. ``STREAM``
    (stream-K, no whole tiles): the K iterations of the weight's columns, laid end to end, are cut
    into even shares, one per set of programs that computes a column's row tiles side by side, so no
    wave is left part-empty (slices: [programs, 2, BLOCK_M, BLOCK_N], slot 0 a program's first
    tile's, slot 1 its last one's). Else each tile left is cut into ``split_k`` even K ranges (slices:
    [split_k, tiles left, BLOCK_M, BLOCK_N]). Schedules: ``tiles`` (all whole, or all split),
    ``stream`` (none whole), ``hybrid`` (the full waves whole, the last wave's tiles split to fill it).
    ``BLOCK_N_LO`` > 0: tiles BLOCK_N + BLOCK_N_LO wide (``gemm_tile_wide``; the tiles schedule unsplit only).

    Fusions (``gemm_fused``): ``NORM`` y = rmsnorm(x) * norm_w @ w.T (a whole tile's rows' rsqrt from the
    sum of squares it accumulates over K; a K slice's from a pass over its rows, ``x_rows``: x's pointer,
    before its loop); ``SILU`` y[:, j] = silu(g_j) * u_j with
    g_j, u_j the columns j and N + j of x @ w.T (w has 2N rows, gate then up: two accumulators; a K
    slice's stored interleaved, summed, split at the store); ``RESIDUAL`` y = x @ w.T + res, in any schedule (whoever stores the tile adds it)."""
    await_previous(PDL)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N + BLOCK_N_LO)
    tiles_mn = num_pid_m * num_pid_n
    pid = tl.program_id(0)
    # whole tiles (the tiles schedule unsplit; hybrid: the full waves), one per program per wave
    # FLATTEN: the compiler pipelines across tiles, so a tile's loads start under the last one's epilogue
    for tile in tl.range(pid, whole_tiles, num_programs, flatten=FLATTEN):
        pid_m, pid_n = grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M)
        if NORM or SILU:
            off_m = pid_m * BLOCK_M
            off_n = pid_n * BLOCK_N
            acc, up, sum_sq = gemm_tile_wide(x, w, w, norm_w, off_m, off_n, off_n + N, M, 2 * N if SILU else N, 0, K,
                                             stride_xm, stride_xk, stride_wn, stride_wk, BLOCK_M, BLOCK_N, BLOCK_N,
                                             BLOCK_K, USE_TMA, EVEN_K, UPCAST, INPUT_PRECISION, SILU, NORM)
            if NORM:    # x * rstd * norm_w @ w.T = (x * norm_w @ w.T) * rstd: each row's scale after the K loop
                rstd = tl.math.rsqrt(sum_sq / K + eps)[:, None]
                acc *= rstd
                up *= rstd
            if SILU:
                acc = acc * tl.sigmoid(acc) * up
            epilogue_store(y, acc, off_m, off_n, M, N, stride_ym, res, stride_res, BLOCK_M, BLOCK_N, RESIDUAL)
        elif BLOCK_N_LO == 0:
            acc, off_m, off_n = _mn_tile(x, w, pid_m, pid_n, M, N, K, 0, K, stride_xm, stride_xk, stride_wn,
                                         stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, USE_TMA, EVEN_K, UPCAST, INPUT_PRECISION,
                                         x_rows, norm_w, eps, False)
            epilogue_store(y, acc, off_m, off_n, M, N, stride_ym, res, stride_res, BLOCK_M, BLOCK_N, RESIDUAL)
        else:
            off_m = pid_m * BLOCK_M
            off_n = pid_n * (BLOCK_N + BLOCK_N_LO)
            acc, acc_lo, _ = gemm_tile_wide(x, w, w_lo, norm_w, off_m, off_n, off_n + BLOCK_N, M, N, 0, K, stride_xm,
                                            stride_xk, stride_wn, stride_wk, BLOCK_M, BLOCK_N, BLOCK_N_LO, BLOCK_K,
                                            USE_TMA, EVEN_K, UPCAST, INPUT_PRECISION, True, False)
            epilogue_store(y, acc, off_m, off_n, M, N, stride_ym, res, stride_res, BLOCK_M, BLOCK_N, RESIDUAL)
            epilogue_store(y, acc_lo, off_m, off_n + BLOCK_N, M, N, stride_ym, res, stride_res, BLOCK_M, BLOCK_N_LO,
                           RESIDUAL)
    rest = tiles_mn - whole_tiles      # the tiles left are computed in K slices
    # one fp32 slice in the workspace (row stride SLICE_N): the SiLU-mul pair's gate and up interleaved
    SLICE_N: tl.constexpr = 2 * BLOCK_N if SILU else BLOCK_N
    slab = BLOCK_M * SLICE_N
    slice_cols = 2 * N if SILU else N
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
            acc, off_m, off_n = _mn_slice(x, w, pid_m, pid_n, M, N, K, k0 * BLOCK_K, tl.minimum(k1 * BLOCK_K, K),
                                          stride_xm, stride_xk, stride_wn, stride_wk, BLOCK_M, BLOCK_N, BLOCK_K,
                                          USE_TMA, EVEN_K, UPCAST, INPUT_PRECISION, x_rows, norm_w, eps, NORM, SILU)
            first = _stream_owner(col * k_iters, per, extra)
            last = _stream_owner(col * k_iters + k_iters - 1, per, extra)
            # a set's slots in this lane: 0 the slice of its first column, 1 that of its last; the first
            # contributor's slice of this tile is its last column's, the others start inside the tile
            mine = partial + (2 * pid + (set_id == first).to(tl.int32)).to(tl.int64) * slab
            finish_tile(acc, y, counts, col * lanes + lane, mine,
                        partial + (2 * (first * lanes + lane) + 1).to(tl.int64) * slab,
                        partial + (2 * ((first + 1) * lanes + lane)).to(tl.int64) * slab, 2 * lanes * slab,
                        last - first + 1, off_m, off_n, M, slice_cols, stride_ym, SLICE_N, res, stride_res, BLOCK_M,
                        SLICE_N, RESIDUAL, SILU)
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
            acc, off_m, off_n = _mn_slice(x, w, pid_m, pid_n, M, N, K, k_begin,
                                          tl.minimum(k_begin + k_per_split, K), stride_xm, stride_xk, stride_wn,
                                          stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, USE_TMA, EVEN_K, UPCAST,
                                          INPUT_PRECISION, x_rows, norm_w, eps, NORM, SILU)
            at = partial + r.to(tl.int64) * slab
            plane = rest.to(tl.int64) * slab
            finish_tile(acc, y, counts, whole_tiles + r, at + split * plane, at, at + plane, plane, split_k,
                        off_m, off_n, M, slice_cols, stride_ym, SLICE_N, res, stride_res, BLOCK_M, SLICE_N, RESIDUAL,
                        SILU)


# --- the skinny family's kernel (its policy: kernels/_gemm_skinny.py) -------------------------------

@triton.jit
def _skinny_tile(x, w, norm_w, off_n, off_up, M, N, k_begin, k_end, stride_xm, stride_wn,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWAP: tl.constexpr,
                 SILU: tl.constexpr, NORM: tl.constexpr, USE_TMA: tl.constexpr, EVEN_K: tl.constexpr,
                 UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """(fp32 [BLOCK_M, BLOCK_N] = x[:M, k_begin:k_end] @ w[off_n:, k_begin:k_end].T, the same at w row
    ``off_up`` with ``SILU``: the up half's tile, sharing each x block; the rows' sums of squares),
    every row of x in one block. ``NORM``: each x block scaled by the RMSNorm weight ``norm_w[k]`` as
    it loads, its squares summed (the caller scales the product by the rows' rsqrt).
    ``SWAP``: computed as w_tile @ x.T ([BLOCK_N, BLOCK_M]) and transposed: the weight's rows fill the
    MMA's M side (64 rows a warpgroup on Hopper), so 16-32 token rows pad nothing. TMA: x and w are
    descriptors with blocks [BLOCK_M, BLOCK_K] / [BLOCK_N, BLOCK_K]; pointers: rows and columns (of the
    N output columns) wrap (the store masks them), K masked unless ``EVEN_K``."""
    acc = tl.zeros((BLOCK_N, BLOCK_M) if SWAP else (BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_N, BLOCK_M) if SWAP else (BLOCK_M, BLOCK_N), dtype=tl.float32)
    sum_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K)
    if not USE_TMA:
        rows = (tl.arange(0, BLOCK_M) % M).to(tl.int64)
        cols = ((off_n + tl.arange(0, BLOCK_N)) % N).to(tl.int64)
        x_ptrs = x + rows[:, None] * stride_xm + (k_begin + ks)[None, :]
        w_ptrs = w + cols[:, None] * stride_wn + (k_begin + ks)[None, :]
        up_ptrs = w_ptrs + (off_up - off_n) * stride_wn
    for k in tl.range(k_begin, k_end, BLOCK_K):
        if USE_TMA:
            a = x.load([0, k])
            b = w.load([off_n, k])
        else:
            a = _k_block(x_ptrs, k, ks, k_end, 1, EVEN_K, UPCAST)
            b = _k_block(w_ptrs, k, ks, k_end, 1, EVEN_K, UPCAST)
        if NORM:
            a, squares = normed_block(a, norm_w, k, ks, k_end)
            sum_sq += squares
        if SWAP:
            acc = tl.dot(b, a.T, acc, input_precision=INPUT_PRECISION)
        else:
            acc = tl.dot(a, b.T, acc, input_precision=INPUT_PRECISION)
        if SILU:
            if USE_TMA:
                b_up = w.load([off_up, k])
            else:
                b_up = _k_block(up_ptrs, k, ks, k_end, 1, EVEN_K, UPCAST)
                up_ptrs += BLOCK_K
            if SWAP:
                up = tl.dot(b_up, a.T, up, input_precision=INPUT_PRECISION)
            else:
                up = tl.dot(a, b_up.T, up, input_precision=INPUT_PRECISION)
        if not USE_TMA:
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
    if SWAP:
        acc = acc.T
        up = up.T
    return acc, up, sum_sq


# M changes with every batch (not specialized); N stays specialized for the store's vectors.
@triton.jit(do_not_specialize=["M"])
def _skinny_kernel(x, w, y, slices, counts, res, norm_w, M, N, K, k_per_split, stride_xm, stride_wn, stride_ym,
                   stride_res, eps,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                   SWAP: tl.constexpr, USE_TMA: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
                   INPUT_PRECISION: tl.constexpr, RESIDUAL: tl.constexpr, SILU: tl.constexpr, NORM: tl.constexpr,
                   PDL: tl.constexpr):
    """Program (t, s): output columns t * BLOCK_N.. (of N) over K slice s of ``SPLIT_K`` (``k_per_split``
    each); the slices of a tile meet in the fp32 workspace ``slices`` ([SPLIT_K, tiles, BLOCK_M, SLICE_N])
    and its last program to arrive sums them and stores (``finish_tile``). Not persistent: the hardware
    hands each SM the next program as one finishes. Fusions as the persistent kernel's: ``RESIDUAL``
    y = x @ w.T + res (added by whoever stores); ``SILU`` y[:, j] = silu(g_j) * u_j, g and u w's rows j
    and N + j (a slice holds them interleaved, split at the store); ``NORM`` y = rmsnorm(x) * norm_w @ w.T
    (unsplit only: the rows' rsqrt from the squares the K loop sums)."""
    await_previous(PDL)
    tile = tl.program_id(0)
    split = tl.program_id(1)
    k_begin = split * k_per_split
    off_n = tile * BLOCK_N
    acc, up, sum_sq = _skinny_tile(x, w, norm_w, off_n, N + off_n, M, N, k_begin, tl.minimum(k_begin + k_per_split, K),
                                   stride_xm, stride_wn, BLOCK_M, BLOCK_N, BLOCK_K, SWAP, SILU, NORM, USE_TMA, EVEN_K,
                                   UPCAST, INPUT_PRECISION)
    if NORM:        # x * rstd * norm_w @ w.T = (x * norm_w @ w.T) * rstd
        rstd = tl.math.rsqrt(sum_sq / K + eps)[:, None]
        acc *= rstd
        up *= rstd
    SLICE_N: tl.constexpr = 2 * BLOCK_N if SILU else BLOCK_N
    if SILU:        # as finish_tile sums and splits a pair: gate and up interleaved, columns doubled
        acc = tl.reshape(tl.join(acc, up), (BLOCK_M, SLICE_N))
    slab = BLOCK_M * SLICE_N
    plane = tl.num_programs(0).to(tl.int64) * slab
    at = slices + tile.to(tl.int64) * slab
    finish_tile(acc, y, counts, tile, at + split * plane, at, at + plane, plane, SPLIT_K, 0,
                2 * off_n if SILU else off_n, M, 2 * N if SILU else N, stride_ym, SLICE_N, res, stride_res, BLOCK_M,
                SLICE_N, RESIDUAL, SILU)


def skinny(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, config: dict, residual: torch.Tensor | None = None,
           silu: bool = False, norm_weight: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """``out = x @ w.T`` (x RMSNorm'd by ``norm_weight`` first; + ``residual``; or with ``silu`` the SiLU-mul
    of w's gate and up halves) through
    ``_skinny_kernel`` (operands checked by ``gemm``; m <= SK.SKINNY_MAX_M, m, n, k > 0; ``config``
    passed the family's constraints). TMA where the device has it and the rows are 16-byte aligned,
    else pointer loads."""
    m, k = x.shape
    n = out.shape[1]
    bm, bn, bk = SK.block_m(m), config["skinny_block_n"], config["skinny_block_k"]
    k_per_split = SK.k_per_split(k, bk, config["skinny_split"])
    splits, tiles = triton.cdiv(k, k_per_split), triton.cdiv(n, bn)
    slab = bm * bn * (2 if silu else 1)
    slices, counts = workspace(x.device, splits * tiles * slab, tiles) if splits > 1 else (out, out)
    use_tma = "tma" in launch_spec(x.device).features and _tma_ready(x) and _tma_ready(w)   # none interpreted
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor
        xa = TensorDescriptor(x, [m, k], [x.stride(0), 1], [bm, bk])
        wa = TensorDescriptor(w, [w.shape[0], k], [w.stride(0), 1], [bn, bk])
    else:
        xa, wa = x, w
    res = out if residual is None else residual          # unused pointer when not fused
    interpreted = tuneforge.INTERPRETED
    _skinny_kernel[(tiles, splits)](
        xa, wa, out, slices, counts, res, x if norm_weight is None else norm_weight, m, n, k, k_per_split, x.stride(0),
        w.stride(0), out.stride(0), res.stride(0), float(eps),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=splits, SWAP=bool(config["skinny_swap"]), USE_TMA=use_tma,
        EVEN_K=k % bk == 0, UPCAST=interpreted and x.dtype != torch.float32,
        INPUT_PRECISION="ieee" if x.dtype == torch.float32 or interpreted else "tf32",
        RESIDUAL=residual is not None, SILU=silu, NORM=norm_weight is not None,
        num_warps=config["skinny_warps"], num_stages=config["skinny_stages"], **chained(x))
    return out


# --- fusions (the gemm_fused op's kernel paths) ---------------------------------------------------



def _pair(config: dict, problem: Problem) -> dict:
    """The SiLU-mul pair holds two B tiles per stage and two accumulators: as wide a config."""
    return {**config, "block_n": 2 * config["block_n"]} if fusion_of(problem)[1] == "silu_mul" else config


def fusion_unsupported(config: dict, problem: Problem, spec: DeviceSpec) -> str | None:
    """The norm prologue and the SiLU-mul pair run power-of-two wide tiles; the pair's two B tiles must fit
    the pipeline."""
    norm, epi = fusion_of(problem)
    what = "+".join(f for f, on in (("norm", norm), ("silu_mul", epi == "silu_mul")) if on)
    if not what:
        return None
    if split_width(config["block_n"])[1]:
        return f"{what}: block_n={config['block_n']} is not a power of two (one tile per column block)"
    return smem_overflow(_pair(config, problem), problem, spec)


def fusion_pressure(config: dict, problem: Problem, spec: DeviceSpec) -> str | None:
    return register_pressure(_pair(config, problem), problem, spec)


FUSED_LAUNCH_CONSTRAINTS = LAUNCH_CONSTRAINTS + (fusion_unsupported,)
FUSED_CONSTRAINTS = CONSTRAINTS + (fusion_unsupported, fusion_pressure)


def fused_default_config(problem: Problem, spec: DeviceSpec) -> dict:
    """gemm's default for the output's shape; the SiLU-mul pair's halves each half as wide (as wide in all
    as gemm's tile), shrinking stages, then BLOCK_K, then BLOCK_N until the pair fits."""
    shape = Problem.make("gemm", problem.dtype, m=problem["m"], n=out_width(problem), k=problem["k"])
    cfg = default_config(shape, spec)
    if fusion_of(problem)[1] != "silu_mul":
        return cfg
    cfg["block_n"] = max(16, split_width(cfg["block_n"])[0] // 2)
    for shrink, floor in (("num_stages", 2), ("block_k", 16), ("block_n", 16)):
        while first_rejection(cfg, problem, spec, FUSED_CONSTRAINTS) is not None and cfg[shrink] > floor:
            cfg[shrink] = cfg[shrink] - 1 if shrink == "num_stages" else cfg[shrink] // 2
    return cfg


# --- launcher ------------------------------------------------------------------------------------

class LaunchPlan(NamedTuple):
    config: dict
    programs: int        # persistent programs launched
    whole_tiles: int     # tiles computed whole before the sliced ones
    split_k: int         # K slices per sliced tile (split schedules)
    floats: int          # fp32 workspace elements for the slices
    tiles: int           # output tiles (one arrival counter each)


@functools.lru_cache(maxsize=4096)
def _plan(config_items: tuple | None, m: int, n: int, k: int, dtype: torch.dtype, device: torch.device,
          norm: bool = False, epi: int = 0):
    """The ``LaunchPlan`` of one launch (``norm`` / ``epi``: a gemm_fused launch, n the weight's rows): the
    default config, or the given one checked against the space and the launch constraints (a config from
    before schedules existed is an unflattened ``tiles`` one). Cached, so the hot path pays one lookup."""
    fused = norm or epi
    problem = (Problem.make("gemm_fused", DTYPE_NAMES[dtype], m=m, n=n, k=k, norm=int(norm), epi=epi) if fused
               else Problem.make("gemm", DTYPE_NAMES[dtype], m=m, n=n, k=k))
    spec = launch_spec(device)
    if config_items is None and not fused:      # the template's default: gemv at 1-2 rows where it is cheaper
        config_items = tuple(sorted(TEMPLATE.default_config(problem, spec).items()))
    if config_items is None:
        config = fused_default_config(problem, spec)
    elif not fused and GW.kernel_of(dict(config_items)) == "gluon_ws":   # its persistent programs
        config = checked_config(template_space(problem), dict(config_items), problem, spec, FAMILY_LAUNCH_CONSTRAINTS)
        tiles = triton.cdiv(m, config["block_m"]) * triton.cdiv(n, config["block_n"])
        return LaunchPlan(config, min(spec.sms, tiles), tiles, 1, 0, tiles)
    elif GW.kernel_of(dict(config_items)) in ("gemv", "skinny"):   # a plain grid: its own launcher
        config = checked_config(fused_space(problem) if fused else template_space(problem), dict(config_items),
                                problem, spec, FUSED_FAMILY_LAUNCH_CONSTRAINTS if fused else FAMILY_LAUNCH_CONSTRAINTS)
        return LaunchPlan(config, 0, 0, 1, 0, 0)
    else:
        config = dict(config_items)
        config.setdefault("schedule", "tiles")
        config.setdefault("flatten", False)
        checked_config(fused_space(problem) if fused else template_space(problem), config, problem, spec,
                       FUSED_LAUNCH_CONSTRAINTS if fused else LAUNCH_CONSTRAINTS)
    n = out_width(problem)
    bm, bn, slots = config["block_m"], config["block_n"], spec.sms * config["programs_per_sm"]
    slab = bm * bn * (2 if epi == EPILOGUES.index("silu_mul") else 1)    # the pair's slices: gate and up
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    k_iters = triton.cdiv(k, config["block_k"])
    if config["schedule"] == "stream":
        programs = min(tiles * k_iters, slots)
        return LaunchPlan(config, programs, 0, 1, 2 * programs * slab, tiles)
    if config["schedule"] == "hybrid":
        whole = tiles // slots * slots
        split = hybrid_split(tiles - whole, slots, k_iters)
    else:
        split = config["split_k"]
        whole = tiles if split == 1 else 0
    programs = min(whole + (tiles - whole) * split, slots)
    return LaunchPlan(config, programs, whole, split, (split * (tiles - whole) * slab if split > 1 else 0), tiles)


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


def _check_inputs(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None, norm_weight, residual,
                  silu: bool) -> int:
    """The output width; one-line InputError naming the operand that does not fit."""
    check_linear("gemm", x, w)
    n_out = _check_fusion(x, w, norm_weight, residual, silu)
    if out is not None:
        want = (x.shape[0], n_out)
        if tuple(out.shape) != want:
            raise InputError(f"gemm: out has shape {tuple(out.shape)}, expected {want}")
        if out.dtype != x.dtype:
            raise InputError(f"gemm: out dtype {out.dtype} differs from x dtype {x.dtype}")
        if out.device != x.device:
            raise InputError(f"gemm: out is on {out.device} but x is on {x.device}")
        if out.shape[1] > 1 and out.stride(1) != 1:
            raise InputError(f"gemm: out needs unit stride along n, got strides {tuple(out.stride())}")
    return n_out


def _check_fusion(x, w, norm_weight, residual, silu: bool) -> int:
    if silu and residual is not None:
        raise InputError("gemm: silu_mul and a residual add are not fused together")
    if silu and w.shape[0] % 2:
        raise InputError(f"gemm: silu_mul needs w's rows as gate | up halves, got {w.shape[0]} rows")
    n_out = w.shape[0] // 2 if silu else w.shape[0]
    if norm_weight is not None:
        check_tensor("gemm", "norm_weight", norm_weight, (x.shape[1],), None, x.device)
    if residual is not None:
        check_tensor("gemm", "residual", residual, (x.shape[0], n_out), x.dtype, x.device)
    return n_out


def _tma_ready(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0 and (t.shape[0] <= 1 or t.stride(0) * t.element_size() % 16 == 0)


def gemm(x: torch.Tensor, w: torch.Tensor, *, out: torch.Tensor | None = None, config: dict | None = None,
         norm_weight: torch.Tensor | None = None, eps: float = 1e-6, residual: torch.Tensor | None = None,
         silu: bool = False):
    """y = x @ w.T for x [m, k] and w [n, k] (nn.Linear weight), fp16/bf16/fp32 (fp32: IEEE dot).

    x and out may have any row stride (unit stride along the last dim). ``config`` None: the
    default for this shape and device. A config asking for TMA falls back to pointer loads (same
    tiles) when x's rows are not 16-byte aligned; a ``kernel: gluon_ws`` one (all TMA) to the
    default config when x's or out's are not.

    Fusions (the ``gemm_fused`` op): ``norm_weight`` [k]: x replaced by rmsnorm(x) * norm_weight (``eps``);
    ``silu``: w is [gate | up] (2 inter rows) and y [m, inter] = silu(x @ gate.T) * (x @ up.T);
    ``residual`` [m, n]: y = x @ w.T + residual (``out`` may be ``residual``: the add in place).
    """
    n_out = _check_inputs(x, w, out, norm_weight, residual, silu)
    m, k = x.shape
    n = w.shape[0]
    if out is None:
        out = torch.empty((m, n_out), dtype=x.dtype, device=x.device)
    if m == 0 or n_out == 0:
        return out
    if k == 0:
        return out.zero_() if residual is None else out.copy_(residual)
    norm = norm_weight is not None
    epi = EPILOGUES.index("silu_mul" if silu else "residual" if residual is not None else "none")
    plan = _plan(None if config is None else tuple(sorted(config.items())), m, n, k, x.dtype, x.device, norm, epi)
    if GW.kernel_of(plan.config) == "gemv":
        return GV.gemv(x, w, out, plan.config)
    if GW.kernel_of(plan.config) == "skinny":
        return skinny(x, w, out, plan.config, residual, silu, norm_weight, eps)
    if GW.kernel_of(plan.config) == "gluon_ws":
        if _tma_ready(x) and _tma_ready(w) and _tma_ready(out):
            return GW.gemm_ws(x, w, out, plan.config, plan.programs)
        plan = _plan(None, m, n, k, x.dtype, x.device)
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
    res = out if residual is None else residual          # unused pointers when not fused
    interpreted = tuneforge.INTERPRETED
    _gemm_kernel[(plan.programs,)](
        xa, wa, wa_lo, out, slices, counts, res, x if norm_weight is None else norm_weight, x, m, n_out, k,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), out.stride(0), res.stride(0), float(eps),
        plan.split_k, plan.programs, plan.whole_tiles,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_N_LO=bn_lo, BLOCK_K=bk, GROUP_M=config["group_m"], STREAM=config["schedule"] == "stream",
        FLATTEN=config["flatten"],
        USE_TMA=use_tma, EVEN_K=k % bk == 0, UPCAST=interpreted and x.dtype != torch.float32,
        INPUT_PRECISION="ieee" if x.dtype == torch.float32 or interpreted else "tf32",
        NORM=norm, SILU=silu, RESIDUAL=residual is not None,
        num_warps=config["num_warps"], num_stages=config["num_stages"], **chained(x))
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
    """The cost model's tile estimate (waves, padding, small-M bandwidth); None: cuBLAS-like baseline;
    gemv / skinny: their streaming estimates."""
    if config is not None and GW.kernel_of(config) == "gemv":
        return GV.cost(problem, config, spec)
    if config is not None and GW.kernel_of(config) == "skinny":
        return SK.cost(problem, config, spec)
    return gemm_config_time(problem["m"], problem["n"], problem["k"], config, spec, problem.dtype)


@functools.lru_cache(maxsize=1024)
def template_space(problem: Problem):
    """gemm's space: the Triton kernel's (``space``) and the Gluon family's (``kernels/_gemm_gluon.py``).
    Cached: the tuner and the tests check many configs per problem."""
    return GW.family_space(space(problem), gemv=problem["m"] <= GV.GEMV_MAX_M, skinny=problem["m"] <= SK.SKINNY_MAX_M)


FAMILY_LAUNCH_CONSTRAINTS = GW.family_constraints(LAUNCH_CONSTRAINTS, GW.GLUON_LAUNCH_CONSTRAINTS,
                                                   GV.GEMV_LAUNCH_CONSTRAINTS, SK.SKINNY_LAUNCH_CONSTRAINTS)


@functools.lru_cache(maxsize=1024)
def fused_space(problem: Problem):
    """gemm_fused's space: the Triton kernel's, and where the problem has at most SKINNY_MAX_M rows the
    skinny family's (its norm prologue and residual and SiLU-mul epilogues)."""
    return GW.family_space(space(problem), gemv=False, gluon=False, skinny=problem["m"] <= SK.SKINNY_MAX_M)


# gemm_fused's constraints by family (the Gluon and gemv ones are outside its space)
FUSED_FAMILY_LAUNCH_CONSTRAINTS = GW.family_constraints(FUSED_LAUNCH_CONSTRAINTS, (), (), SK.SKINNY_LAUNCH_CONSTRAINTS)
FUSED_FAMILY_CONSTRAINTS = GW.family_constraints(FUSED_CONSTRAINTS, (), (), SK.SKINNY_CONSTRAINTS)

TEMPLATE = register(Template(
    op="gemm", space=template_space, make_inputs=make_inputs, launch=gemm, reference=reference, baseline=baseline,
    default_config=GW.family_default(default_config), work=work, cost=cost,
    constraints=GW.family_constraints(CONSTRAINTS, GW.GLUON_CONSTRAINTS, GV.GEMV_CONSTRAINTS, SK.SKINNY_CONSTRAINTS),
    seeds=GW.family_seeds(portfolio, GW.family_default(default_config)),
    doc="y = x @ w.T (nn.Linear): persistent grouped tiles, split-K or stream-K, optional TMA loads; "
        "on Hopper also a warp-specialized Gluon kernel (kernel: gluon_ws); at a few rows a matrix-vector "
        "product (kernel: gemv); up to 64 rows one row block over column tiles x K slices (kernel: skinny)"))
