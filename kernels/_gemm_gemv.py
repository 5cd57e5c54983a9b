"""The gemm template's ``gemv`` config family: decode's matrix-vector product, and its device tile.

y[m, n] = x[m, k] @ w[n, k].T for a few token rows (m <= GEMV_MAX_M): one program per ``gemv_block_n``
output columns streams those weight rows in [gemv_block_n, gemv_block_k] tiles and multiplies the m
rows in on the CUDA cores (fp32 products summed along K). No rows are padded to tl.dot's 16, there
is no split-K workspace and no persistent loop: the weight streams once through ``n / gemv_block_n``
programs, which is the whole cost at decode's token counts. It fuses nothing (the fused ops keep the
Triton kernel) and runs everywhere the Triton kernel does, the interpreter included.

``gemv_tile`` is the device building block: moe_gemm's per_slot schedule runs the same tile per routed
slot.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tuneforge.dsl.roofline import HBM_LATENCY_S, roofline
from tuneforge.dsl.space import categorical, pow2
from tuneforge.kernels._common import await_previous, chained, tile_past_problem
from tuneforge.kernels._gemm_space import ELEM_SIZE

GEMV_MAX_M = 8                  # rows a program multiplies in; beyond, the weight is better reused by tl.dot
GEMV_DEFAULT_M = 2              # the template's default runs gemv up to this many rows
MAX_TILE_PER_THREAD = 128       # fp32 products of a [rows, gemv_block_n, gemv_block_k] step per thread
GEMV = {"kernel": ("gemv",)}


@triton.jit
def _weight_tile(w_ptrs, k, ks, K, EVEN_K: tl.constexpr):
    if EVEN_K:
        return tl.load(w_ptrs)
    return tl.load(w_ptrs, mask=(k + ks < K)[None, :], other=0.0)


@triton.jit
def _products(b, x_ptrs, row_ok, k, ks, K, BLOCK_M: tl.constexpr, EVEN_K: tl.constexpr):
    """fp32 elementwise products of the weight tile ``b`` [BLOCK_N, BLOCK_K] at ``k`` with the x rows'
    K tile, not yet summed over K: [BLOCK_N, BLOCK_K] for one row (2-D tiles, the row broadcast, no 3-D
    product), else [BLOCK_M, BLOCK_N, BLOCK_K]."""
    if EVEN_K:
        a = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
    else:
        a = tl.load(x_ptrs, mask=row_ok[:, None] & (k + ks < K)[None, :], other=0.0)
    if BLOCK_M == 1:
        products = b.to(tl.float32) * a.to(tl.float32)
    else:
        products = a.to(tl.float32)[:, None, :] * b.to(tl.float32)[None, :, :]
    return products


@triton.jit
def _summed(products, BLOCK_M: tl.constexpr):
    """[BLOCK_M, BLOCK_N]: ``_products`` summed over K."""
    if BLOCK_M == 1:
        summed = tl.sum(products, 1)[None, :]
    else:
        summed = tl.sum(products, 2)
    return summed


@triton.jit
def gemv_tile(x_rows, row_ok, w_rows, stride_wk, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, ONE_TILE: tl.constexpr, PDL: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N]: x rows (``x_rows`` [BLOCK_M, 1] pointers to their first element, unit
    stride along K; rows not ``row_ok`` read as 0) times weight rows (``w_rows`` [BLOCK_N, 1] pointers,
    ``stride_wk`` along K) over all of K, after ``await_previous(PDL)`` (callers whose weight rows
    depend on the producer await it themselves and pass False). ``ONE_TILE`` (K <= BLOCK_K): one step
    and no loop, so a caller's tiles side by side (per_slot's top-k slots) have their loads in flight
    together, and the weight tile's load is issued before the wait (the weights are not the
    producer's): it streams while the kernel before finishes. A K loop sums its steps' products
    elementwise and reduces once at the end: a reduction per step (shuffles and a barrier) held each
    step's loads back behind the last one's sum (the H200, 2026-12-03: 2-10 % on Qwen3's 1-token
    linears, ``decode-gemv-sweep-...json``'s gemv rows)."""
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_rows + ks[None, :]
    w_ptrs = w_rows + ks[None, :] * stride_wk
    if ONE_TILE:
        b = _weight_tile(w_ptrs, 0, ks, K, EVEN_K)
        await_previous(PDL)
        acc = _products(b, x_ptrs, row_ok, 0, ks, K, BLOCK_M, EVEN_K)
    else:
        # awaited first: a tile loaded ahead of the loop would hold back the loop's pipelined loads
        await_previous(PDL)
        acc = tl.zeros((BLOCK_N, BLOCK_K) if BLOCK_M == 1 else (BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k in tl.range(0, K, BLOCK_K):
            acc += _products(_weight_tile(w_ptrs, k, ks, K, EVEN_K), x_ptrs, row_ok, k, ks, K, BLOCK_M, EVEN_K)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K * stride_wk
    return _summed(acc, BLOCK_M)


@triton.jit
def _gemv_kernel(x, w, y, M, N, K, stride_xm, stride_wn, stride_wk, stride_ym, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, ONE_TILE: tl.constexpr, PDL: tl.constexpr):
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    w_rows = w + (cols % N).to(tl.int64)[:, None] * stride_wn       # wrapped: valid addresses, masked at the store
    acc = gemv_tile(x + rows.to(tl.int64)[:, None] * stride_xm, row_ok, w_rows, stride_wk, K, BLOCK_M, BLOCK_N,
                    BLOCK_K, EVEN_K, ONE_TILE, PDL)
    tl.store(y + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :], acc.to(y.dtype.element_ty),
             mask=row_ok[:, None] & (cols < N)[None, :])


def gemv(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, config: dict) -> torch.Tensor:
    """``out = x @ w.T`` (operands checked by gemm's launcher; m <= GEMV_MAX_M, m, n, k > 0; ``config``
    passed this family's constraints)."""
    m, k = x.shape
    n, bn, bk = w.shape[0], config["gemv_block_n"], config["gemv_block_k"]
    _gemv_kernel[(triton.cdiv(n, bn),)](x, w, out, m, n, k, x.stride(0), w.stride(0), w.stride(1), out.stride(0),
                                        BLOCK_M=triton.next_power_of_2(m), BLOCK_N=bn, BLOCK_K=bk,
                                        EVEN_K=k % bk == 0, ONE_TILE=k <= bk, num_warps=config["gemv_warps"],
                                        **chained(x))
    return out


# --- the family in the template's space, constraints, seeds and cost ---------------------------------

def params() -> list:
    return [pow2("gemv_block_n", 4, 64, when=GEMV), pow2("gemv_block_k", 64, 2048, when=GEMV),
            categorical("gemv_warps", [1, 2, 4, 8], when=GEMV)]


def gemv_unfit(config: dict, problem, spec) -> str | None:
    """A matrix-vector product of at most GEMV_MAX_M rows whose step fits the registers."""
    m = problem["m"]
    if m > GEMV_MAX_M:
        return f"kernel gemv: m={m} rows > {GEMV_MAX_M} (each program re-reads x per column block; tl.dot reuses w)"
    step = triton.next_power_of_2(m) * config["gemv_block_n"] * config["gemv_block_k"] // (32 * config["gemv_warps"])
    if step > MAX_TILE_PER_THREAD:
        return f"kernel gemv: {step} fp32 products per thread per step > {MAX_TILE_PER_THREAD} (register spills)"
    return None


def gemv_wasteful(config: dict, problem, spec) -> str | None:
    return tile_past_problem(config, (("gemv_block_n", "n", problem["n"], 4), ("gemv_block_k", "k", problem["k"], 64)),
                             prefix="kernel gemv: ")


GEMV_LAUNCH_CONSTRAINTS = (gemv_unfit,)
GEMV_CONSTRAINTS = GEMV_LAUNCH_CONSTRAINTS + (gemv_wasteful,)


def seeds(problem, spec) -> list[dict]:
    """Configs worth trying first at decode's token counts: column blocks that give every SM two or more
    programs first, narrowest first (4 rows won every 1-token linear of Qwen3-32B and Qwen3-30B-A3B on the
    H200, 2026-12-03, 2-15 % ahead of cuBLAS, where the tune had kept cuBLAS at 32B's qkv: the 16-row
    seeds came first), the whole K in one step where it fits (its load is issued before the chained wait,
    and a K loop's steps do not overlap their loads: at 128 x 2048 one 1024-deep step pair ran in 2.7 us
    on the H200, four 512-deep ones in 4.9), then steps of 256-1024 (at most k's next power of 2), 4 and
    8 warps (those the constraints pass)."""
    if problem["m"] > GEMV_MAX_M:
        return []
    steps = dict.fromkeys(min(bk, max(64, triton.next_power_of_2(problem["k"]))) for bk in (2048, 512, 1024, 256))
    configs = [dict(kernel="gemv", gemv_block_n=bn, gemv_block_k=bk, gemv_warps=warps)
               for bn in (4, 8, 16, 32) for bk in steps for warps in (4, 8)]
    ok = [c for c in configs if gemv_unfit(c, problem, spec) is None and gemv_wasteful(c, problem, spec) is None]
    return sorted(ok, key=lambda c: triton.cdiv(problem["n"], c["gemv_block_n"]) < 2 * spec.sms)[:6]


def cost(problem, config: dict, spec) -> float:
    """The weight (and x, y) streamed once at a measured copy's rate times the share of the SMs the
    programs fill, plus one launch and two dependent round trips (the first tiles, the store); the
    products on the CUDA cores (about a tenth of the tensor cores' rate). The H200 at one row
    (bench_gemm, 2026-12-02): 10240 x 5120 in 29.6 us, 51200 x 5120 in 122.6, 151936 x 5120 in 348.3
    (reads overlap better than a copy's read + write: up to 1.05x its rate)."""
    m, n, k = problem["m"], problem["n"], problem["k"]
    programs = triton.cdiv(n, config["gemv_block_n"])
    return roofline(2.0 * m * n * k, float((n * k + m * k + m * n) * ELEM_SIZE[problem.dtype]), spec, problem.dtype,
                    efficiency=0.1, mem_efficiency=1.05 * min(1.0, programs / spec.sms), launches=1) \
        + 2 * HBM_LATENCY_S
