"""Grouped expert GEMM (op ``moe_gemm``): every routed token through its experts' weights, one launch.

``y[s] = x[row(s)] @ w[e(s)].T`` for each routed slot ``s = t * top_k + j`` of ``topk_ids`` [T, top_k],
``w`` [E, N, K] (one nn.Linear weight per expert). The slots come packed by expert (``moe_pack``): one
program per (block of ``block_m`` sorted slots, ``block_n`` output columns); the block's expert is read
from ``block_expert`` and its A rows are gathered through ``sorted_ids`` (``x`` [T, K] with
``gather``: row ``s // top_k``; else ``x`` [T * top_k, K]: row ``s``). The grid is sized by the pack's
most blocks (shapes only): blocks past the device-side ``padded_count`` exit at once, so nothing is read
back to the host and the launch captures in a CUDA graph (nor more programs than there are slots: a
used block holds at least one). Padding slots (the sentinel ``T * top_k``)
read row 0 and are masked at the store.

Epilogues, fused:
- ``activation="silu_mul"``: ``w``'s rows are [gate | up] (N = 2 I); a tile accumulates gate and up
  columns side by side and stores ``silu(gate) * up`` ([T * top_k, I]): the MoE block's gate_up GEMM.
- ``routed_weights`` [T, top_k]: each slot's row times its router weight.
- ``combine``: the top_k rows of a token summed into ``out`` [T, N] (the down GEMM). How is a tuned
  choice (config ``combine``): ``atomic`` adds each tile into an fp32 [T, N] accumulator (``out`` itself
  when fp32), then one pass casts it; ``reduce`` stores [T * top_k, N] rows and one pass sums them.

Schedules (config ``schedule``, tuned): ``packed`` is the above. ``per_slot`` (decode: a few tokens, each
hitting experts no other token hits) takes no pack: one program per (routed slot, ``slot_block_n`` output
columns) reads its expert from ``topk_ids`` and streams that expert's weight rows in [rows, ``slot_block_k``]
tiles as a matrix-vector product (gemm's ``gemv_tile``: no ``tl.dot``, so no rows padded to 16; gate_up's
gate and up rows in one tile); with ``combine`` a program loads all of a token's top_k slots' tiles at
once (one round trip for every expert; taken in turn, each slot paid its own) and stores their weighted
sum, so the down GEMM writes ``out`` directly (no fp32 accumulator to zero, no cast pass). Decode's routing then runs no pack at all: route, gate_up, down.

Problems (``models/problems.moe_gemm``): ``m`` tokens, ``n``/``k`` the expert weight's shape,
``experts``, ``topk`` and ``act``: 1 is the gate_up GEMM (gathered, silu_mul fused, n = 2 I), 0 the down
GEMM (routed-weighted and combined into [T, n]); the outputs differ, so ``act`` is part of the problem.
Slots the pack dropped (expert ids outside [0, E)) are not written without ``combine``; with
``combine="reduce"`` they would be summed unwritten, so every id must be a valid expert (one GPU).
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import tuneforge
from tuneforge.dsl import Problem, Space, Template, categorical, pow2, register
from tuneforge.dsl.problem import DTYPE_NAMES
from tuneforge.dsl.template import flags_off_where_absent
from tuneforge.errors import ConfigRejected, InputError
from tuneforge.kernels._common import (await_previous, chained, check_tensor, checked_config, first_rejection, launch_spec, output_tensor,
                                       refuse_unrunnable, tile_past_problem, tma_rows_fit)
from tuneforge.kernels._gemm_gemv import gemv_tile
from tuneforge.kernels._gemm_space import tma_unavailable
from tuneforge.kernels.gemm import _k_block, grouped_tile
from tuneforge.kernels.moe_pack import Packed, max_padded
from tuneforge.kernels.moe_pack import reference as pack_reference
from tuneforge.kernels import silu_mul as SILU
from tuneforge.dsl.roofline import gemm_config_time, kernel_floor, roofline
from tuneforge.dsl.devices import DeviceSpec

OP = "moe_gemm"
ELEM_SIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
BLOCK_MS = (16, 32, 64, 128)          # the pack's row block; make_inputs packs once for each
ACTIVATIONS = (None, "silu_mul")
SCHEDULES = ("packed", "per_slot")
PACKED, PER_SLOT = {"schedule": ["packed"]}, {"schedule": ["per_slot"]}
# per_slot holds its [slot_block_n, slot_block_k] weight tile(s) in registers: elements per thread at most
MAX_SLOT_TILE_PER_THREAD = 128
PER_SLOT_MAX_M = 16                   # tokens per_slot takes at most (at 2 the packed schedule already won)
MAX_ACC_REGISTERS = 128               # fp32 accumulator registers per thread before ptxas spills (as gemm)
SKEW_EXPERTS, SKEW_BIAS = 8, 1.0      # make_inputs' routing: the first experts favoured, as real routers are


# --- the kernels ---------------------------------------------------------------------------------

# The token count changes with every batch: not specialized, so one compile serves all of them.
@triton.jit(do_not_specialize=["slots"])
def _moe_gemm_kernel(x, w, y, sorted_ids, block_expert, padded_count, routed_weights,
                     slots, N, K, blocks, stride_xm, stride_we, stride_wn, stride_wk, stride_ym,
                     TOP_K: tl.constexpr, GATHER: tl.constexpr, SILU_MUL: tl.constexpr, WEIGHTED: tl.constexpr,
                     ATOMIC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr,
                     INPUT_PRECISION: tl.constexpr, W_TMA: tl.constexpr, PDL: tl.constexpr):
    """One [BLOCK_M sorted slots, BLOCK_N output columns] tile; N is the output's width (the gate
    half's with SILU_MUL: its up column j is weight row N + j). ATOMIC: rows added into y [T, N] at
    the slot's token; else stored at the slot. ``W_TMA``: ``w`` is a tensor descriptor over the
    experts' stacked rows ([BLOCK_N, BLOCK_K] blocks; expert e's rows start at e * stride_we), the
    gathered A rows still pointer loads; a column block past N reads the next rows (or TMA's zeros),
    masked at the store as the wrapped columns are."""
    await_previous(PDL)
    pid_m, pid_n = grouped_tile(tl.program_id(0), blocks, tl.cdiv(N, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M < tl.load(padded_count):
        expert = tl.load(block_expert + pid_m).to(tl.int64)
        s = tl.load(sorted_ids + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        real = s < slots
        row = tl.where(real, s // TOP_K if GATHER else s, 0).to(tl.int64)
        cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N          # wrapped: valid addresses, masked at the store
        ks = tl.arange(0, BLOCK_K)
        x_ptrs = x + row[:, None] * stride_xm + ks[None, :]
        if W_TMA:
            w_row = (expert * stride_we).to(tl.int32) + pid_n * BLOCK_N       # the tile's first weight row
        else:
            w_ptrs = w + expert * stride_we + cols.to(tl.int64)[None, :] * stride_wn + ks[:, None] * stride_wk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in tl.range(0, K, BLOCK_K):
            a = _k_block(x_ptrs, k, ks, K, 1, EVEN_K, UPCAST)
            if W_TMA:
                acc = tl.dot(a, w.load([w_row, k]).T, acc, input_precision=INPUT_PRECISION)
                if SILU_MUL:
                    up = tl.dot(a, w.load([w_row + N, k]).T, up, input_precision=INPUT_PRECISION)
            else:
                acc = tl.dot(a, _k_block(w_ptrs, k, ks, K, 0, EVEN_K, UPCAST), acc, input_precision=INPUT_PRECISION)
                if SILU_MUL:
                    up = tl.dot(a, _k_block(w_ptrs + N * stride_wn, k, ks, K, 0, EVEN_K, UPCAST), up,
                                input_precision=INPUT_PRECISION)
                w_ptrs += BLOCK_K * stride_wk
            x_ptrs += BLOCK_K
        if SILU_MUL:
            acc = acc * tl.sigmoid(acc) * up
        if WEIGHTED:
            acc = acc * tl.load(routed_weights + s, mask=real, other=0.0).to(tl.float32)[:, None]
        out_cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = real[:, None] & (out_cols < N)[None, :]
        if ATOMIC:
            ptrs = y + (row if GATHER else row // TOP_K)[:, None] * stride_ym + out_cols[None, :]
            tl.atomic_add(ptrs, acc, mask=mask, sem="relaxed")
        else:
            ptrs = y + s.to(tl.int64)[:, None] * stride_ym + out_cols[None, :]
            tl.store(ptrs, acc.to(y.dtype.element_ty), mask=mask)


@triton.jit
def _slot_products(w_tiles, x_rows, scale, routed, k, ks, K, stride_wk, EVEN_K: tl.constexpr):
    """fp32 [SLOTS, BLOCK_N, BLOCK_K]: the K step at ``k`` of every slot's weight rows (``w_tiles``
    [SLOTS, BLOCK_N, 1] pointers) times its x row (``x_rows`` [SLOTS, 1]) times ``scale`` [SLOTS],
    elementwise (summed over K by the caller, once). Slots not ``routed`` read nothing."""
    w_ptrs = w_tiles + (k + ks)[None, None, :] * stride_wk
    if EVEN_K:      # a mask constant along K: the loads stay vectorized
        b = tl.load(w_ptrs, mask=routed[:, None, None], other=0.0)
        a = tl.load(x_rows + (k + ks)[None, :], mask=routed[:, None], other=0.0)
    else:
        b = tl.load(w_ptrs, mask=routed[:, None, None] & (k + ks < K)[None, None, :], other=0.0)
        a = tl.load(x_rows + (k + ks)[None, :], mask=routed[:, None] & (k + ks < K)[None, :], other=0.0)
    return b.to(tl.float32) * (a.to(tl.float32) * scale[:, None])[:, None, :]


@triton.jit
def _moe_gemv_kernel(x, w, y, topk_ids, routed_weights, experts, N, K, stride_xm, stride_we, stride_wn, stride_wk,
                     stride_ym, stride_it, stride_ik, TOP_K: tl.constexpr, GATHER: tl.constexpr,
                     SILU_MUL: tl.constexpr, WEIGHTED: tl.constexpr, COMBINE: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_SLOTS: tl.constexpr, EVEN_K: tl.constexpr, ONE_TILE: tl.constexpr,
                     PDL: tl.constexpr):
    """``per_slot``: [BLOCK_N] output columns of routed slot ``program_id(0)``: gemm's ``gemv_tile`` of the
    slot's row and its expert's weight rows (SILU_MUL: the gate and up rows in one tile). COMBINE: of token
    ``program_id(0)``, the weighted sum over its TOP_K slots, all their weight tiles loaded at once
    ([BLOCK_SLOTS, BLOCK_N, BLOCK_K]: one round trip for every expert, where slots taken in turn paid one
    each) and their products summed elementwise, reduced once. A slot whose id is outside [0, experts) is
    not written (COMBINE: adds 0)."""
    r = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    if COMBINE:
        await_previous(PDL)
        j = tl.arange(0, BLOCK_SLOTS)
        expert = tl.load(topk_ids + r * stride_it + j * stride_ik, mask=j < TOP_K, other=-1).to(tl.int64)
        routed = (j < TOP_K) & (expert >= 0) & (expert < experts)
        scale = tl.where(routed, 1.0, 0.0)
        if WEIGHTED:
            scale = scale * tl.load(routed_weights + r * TOP_K + j, mask=routed, other=0.0).to(tl.float32)
        x_rows = x + (r if GATHER else r * TOP_K + j)[:, None] * stride_xm
        w_tiles = w + tl.where(routed, expert, 0)[:, None, None] * stride_we \
            + ((cols % N).to(tl.int64) * stride_wn)[None, :, None]     # wrapped: valid addresses, masked at the store
        ks = tl.arange(0, BLOCK_K)
        if ONE_TILE:
            acc = _slot_products(w_tiles, x_rows, scale, routed, 0, ks, K, stride_wk, EVEN_K)
        else:
            acc = tl.zeros((BLOCK_SLOTS, BLOCK_N, BLOCK_K), dtype=tl.float32)
            for k in tl.range(0, K, BLOCK_K):
                acc += _slot_products(w_tiles, x_rows, scale, routed, k, ks, K, stride_wk, EVEN_K)
        tl.store(y + r * stride_ym + cols, tl.sum(tl.sum(acc, 2), 0).to(y.dtype.element_ty), mask=cols < N)
    else:
        # the weight rows of this column block (SILU_MUL: its gate rows, then its up rows N further on),
        # wrapped past N: valid addresses, masked at the store
        W_ROWS: tl.constexpr = 2 * BLOCK_N if SILU_MUL else BLOCK_N
        row = tl.arange(0, W_ROWS)
        rows_n = ((tl.program_id(1) * BLOCK_N + row % BLOCK_N) % N + (row // BLOCK_N) * N).to(tl.int64) * stride_wn
        await_previous(PDL)
        expert = tl.load(topk_ids + (r // TOP_K) * stride_it + (r % TOP_K) * stride_ik).to(tl.int64)
        routed = (expert >= 0) & (expert < experts)
        x_row = x + (r // TOP_K if GATHER else r) * stride_xm + tl.zeros((1, 1), tl.int64)
        w_rows = w + tl.where(routed, expert, 0) * stride_we + rows_n[:, None]
        acc = tl.sum(gemv_tile(x_row, tl.full((1,), 1, tl.int1), w_rows, stride_wk, K, 1, W_ROWS, BLOCK_K, EVEN_K,
                               ONE_TILE, False), 0)
        if SILU_MUL:
            gate, up = tl.split(tl.trans(tl.reshape(acc, (2, BLOCK_N))))
            acc = gate * tl.sigmoid(gate) * up
        if WEIGHTED:
            acc = acc * tl.load(routed_weights + r).to(tl.float32)
        tl.store(y + r * stride_ym + cols, acc.to(y.dtype.element_ty), mask=cols < tl.where(routed, N, 0))


@triton.jit
def _sum_rows_kernel(src, out, N, stride_src, stride_out, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
    """out[t, :] = sum of src[t * ROWS + j, :] over j < ROWS, in fp32 (ROWS 1: a cast)."""
    await_previous(PDL)
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    total = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in tl.static_range(ROWS):
        total += tl.load(src + (t * ROWS + j) * stride_src + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out + t * stride_out + cols, total.to(out.dtype.element_ty), mask=mask)


def _sum_rows(src: torch.Tensor, out: torch.Tensor, rows: int) -> None:
    block_n = min(1024, triton.next_power_of_2(out.shape[1]))
    grid = (out.shape[0], triton.cdiv(out.shape[1], block_n))
    _sum_rows_kernel[grid](src, out, out.shape[1], src.stride(0), out.stride(0), ROWS=rows, BLOCK_N=block_n,
                           num_warps=max(1, min(8, block_n // 256)), **chained(src))


# --- space, constraints, default config ----------------------------------------------------------

def _out_n(problem: Problem) -> int:
    return problem["n"] // 2 if problem["act"] else problem["n"]


def space(problem: Problem) -> Space:
    """schedule; packed: the tl.dot tiles, group order, stages (down: combine); per_slot: a program's
    output columns, K step and warps."""
    params = [categorical("schedule", SCHEDULES),
              categorical("block_m", BLOCK_MS, when=PACKED), pow2("block_n", 16, 256, when=PACKED),
              pow2("block_k", 16, 256, when=PACKED), categorical("group_m", [1, 4, 8, 16], when=PACKED),
              categorical("num_warps", [4, 8], when=PACKED), categorical("num_stages", [2, 3, 4, 5], when=PACKED),
              categorical("tma", [False, True], when=PACKED)]
    if not problem["act"]:
        params.append(categorical("combine", ["atomic", "reduce"], when=PACKED))
    params += [pow2("slot_block_n", 4, 64, when=PER_SLOT), pow2("slot_block_k", 64, 2048, when=PER_SLOT),
               categorical("slot_warps", [1, 2, 4, 8], when=PER_SLOT)]
    return Space(*params)


def _packed(config: dict) -> bool:
    return config["schedule"] == "packed"


def routing_invalid(config: dict, problem: Problem, spec: DeviceSpec) -> Optional[str]:
    if not _packed(config) and problem["m"] > PER_SLOT_MAX_M:
        return (f"per_slot: m={problem['m']} tokens > {PER_SLOT_MAX_M} (each slot re-streams its expert's weight; "
                f"the packed schedule reads it once)")
    if not 1 <= problem["topk"] <= problem["experts"]:
        return f"topk={problem['topk']} must be in [1, experts={problem['experts']}]"
    if problem["act"] and problem["n"] % 2:
        return f"act: n={problem['n']} must be even (the [gate | up] rows)"
    return None


def smem_overflow(config: dict, problem: Problem, spec: DeviceSpec) -> Optional[str]:
    if not _packed(config):
        return None
    w_rows = config["block_n"] * (2 if problem["act"] else 1)
    need = config["num_stages"] * (config["block_m"] + w_rows) * config["block_k"] * ELEM_SIZE[problem.dtype]
    if need > spec.smem_per_block:
        return f"shared memory: {need} bytes for the pipeline > {spec.smem_per_block} on {spec.name}"
    return None


def register_pressure(config: dict, problem: Problem, spec: DeviceSpec) -> Optional[str]:
    if not _packed(config):
        # gate_up: gate + up rows of one slot; down (combined): every slot's tile at once
        rows = 2 if problem["act"] else triton.next_power_of_2(problem["topk"])
        tile = config["slot_block_n"] * config["slot_block_k"] * rows
        if tile // (32 * config["slot_warps"]) > MAX_SLOT_TILE_PER_THREAD:
            return (f"registers: {tile // (32 * config['slot_warps'])} weight elements per thread > "
                    f"{MAX_SLOT_TILE_PER_THREAD}")
        return None
    regs = config["block_m"] * config["block_n"] * (2 if problem["act"] else 1) // (32 * config["num_warps"])
    if regs > MAX_ACC_REGISTERS:
        return f"registers: {regs} accumulator registers per thread > {MAX_ACC_REGISTERS}"
    return None


def tile_exceeds_problem(config: dict, problem: Problem, spec: DeviceSpec) -> Optional[str]:
    """No tile past the problem's next power of 2 (nor past the smallest tile: tl.dot's 16, per_slot's
    smallest choices)."""
    out_n, k = _out_n(problem), problem["k"]
    tiles = (("block_m", "m*topk", problem["m"] * problem["topk"], 16), ("block_n", "output n", out_n, 16),
             ("block_k", "k", k, 16)) if _packed(config) else \
        (("slot_block_n", "output n", out_n, 4), ("slot_block_k", "k", k, 64))
    return tile_past_problem(config, tiles)


LAUNCH_CONSTRAINTS = (routing_invalid, smem_overflow, tma_unavailable)
CONSTRAINTS = LAUNCH_CONSTRAINTS + (register_pressure, tile_exceeds_problem)


# the per-expert loop's host time per hit expert: its slot lookup (a boolean index: a host sync), the
# gather, linear, activation, weighting and index_add issued from Python, eagerly (the H200 tune of
# 2026-12-02: 1.2-2.3 ms over 8 experts at 1 token, 14-16 ms over 113 at 32)
LOOP_HOST_S = 150e-6


def default_config(problem: Problem, spec: DeviceSpec, block_m: Optional[int] = None,
                   schedule: Optional[str] = None) -> dict:
    """``schedule`` None: per_slot at one token (each of its top_k slots hits its own expert, and no pack
    runs; at 2 tokens the packed GEMMs and their pack took 66.7 us on the H200 against per_slot's 67.7,
    ``bench_moe_gemm-NVIDIA_H200-2026-12-02-schedules-at-3918f36.txt``), else packed; ``block_m`` given (a pack already made): packed at that block.

    packed, by rows per hit expert: decode (<= 16 rows) streams the experts' weights with
    16-row tiles, 64-deep K steps, 8 warps and 5 stages in flight, 128 columns wide where the hit
    experts' tiles still fill every SM and 64 where they would not (one token: 8 experts x 6 tiles
    of 128 leave SMs idle); up to 64 rows 32/64 x 64 x 64; up to 128 rows 64 x 128 x 64, 8 warps, grouped
    order (the H200 sweep, benchmarks/results/bench_moe_gemm-NVIDIA_H200-2026-12-02-sweep24.json,
    picked these at 1..256 tokens); beyond (prefill) 128 x 128 x 64 with 4 stages, the down GEMM 256
    wide (H200, 4096 tokens of Qwen3-30B-A3B, ``moe-gemm-prefill-sweep-NVIDIA_H200-2026-12-05.json``:
    gate_up 462 against 498 us with 3 stages; down 326 against 456 us 128 wide; a persistent grid,
    flattened or not, won nowhere). ``combine``: atomic up to 256 tokens (the fp32 pass is small),
    reduce beyond. Shrunk like gemm's default until every constraint passes.

    per_slot: 4 columns per program (the most programs: 1536 at 1 token for Qwen3-30B-A3B's gate_up), the
    whole K in one step (up to 2048, as the registers allow), 4 warps for gate_up and 8 for the combined
    down (its programs hold top_k tiles). On the H200 at 1 token (2026-12-03, CUDA-graph replays,
    benchmarks/results/decode-gemv-sweep-NVIDIA_H200-2026-12-03.json): gate_up 15.1 us at 4 warps against
    17.4 at 8; down 10.8 us with the slots' tiles loaded at once, where taking them in turn ran 13.7-15.0
    us at its best configs."""
    m, e, topk = problem["m"], problem["experts"], problem["topk"]
    active = e * (1.0 - (1.0 - 1.0 / e) ** (m * topk))
    rows = m * topk / max(active, 1.0)
    if schedule is None:
        schedule = "per_slot" if block_m is None and m == 1 else "packed"
    if schedule == "per_slot":
        cfg = dict(schedule=schedule, slot_block_n=4,
                   slot_block_k=min(2048, max(64, triton.next_power_of_2(problem["k"]))),
                   slot_warps=4 if problem["act"] else 8)
        while first_rejection(cfg, problem, spec, CONSTRAINTS) is not None and cfg["slot_block_k"] > 64:
            cfg["slot_block_k"] //= 2
        return cfg
    if rows <= 16:
        wide = active * math.ceil(_out_n(problem) / 128) >= spec.sms
        cfg = dict(block_m=16, block_n=128 if wide else 64, block_k=64, group_m=1, num_warps=8, num_stages=5)
    elif rows <= 64:
        cfg = dict(block_m=32 if rows <= 32 else 64, block_n=64, block_k=64, group_m=8, num_warps=4, num_stages=4)
    elif rows <= 128:
        cfg = dict(block_m=64, block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=3)
    else:       # prefill: 4 stages; the down GEMM (short K) 256 columns wide, so each tile's loads feed twice the MMAs
        cfg = dict(block_m=128, block_n=128 if problem["act"] else 256, block_k=64, group_m=8, num_warps=8, num_stages=4)
    cfg = dict(schedule=schedule, **cfg, tma=False)
    cfg["block_n"] = min(cfg["block_n"], max(16, triton.next_power_of_2(_out_n(problem))))
    cfg["block_k"] = min(cfg["block_k"], max(16, triton.next_power_of_2(problem["k"])))
    if block_m is not None:
        cfg["block_m"] = block_m
    if not problem["act"]:
        cfg["combine"] = "atomic" if m <= 256 else "reduce"
    for shrink, floor in (("num_stages", 3), ("block_k", 32), ("num_stages", 2), ("block_n", 16), ("block_k", 16)):
        while first_rejection(cfg, problem, spec, CONSTRAINTS) is not None and cfg[shrink] > floor:
            cfg[shrink] = cfg[shrink] - 1 if shrink == "num_stages" else cfg[shrink] // 2
    return cfg


# --- launcher ------------------------------------------------------------------------------------

def _check_packed(packed, tokens: int, top_k: int, experts: int, device) -> None:
    if not isinstance(packed, Packed):
        raise InputError(f"{OP}: packed must be a moe_pack.Packed (moe_pack.pack(topk_ids, experts, block_m)), "
                         f"got {type(packed).__name__}")
    for name in ("sorted_ids", "block_expert", "padded_count"):
        t = getattr(packed, name)
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != 1 or t.device != device \
                or (t.numel() > 1 and t.stride(0) != 1):
            got = (t.dtype, tuple(t.shape), str(t.device)) if isinstance(t, torch.Tensor) else type(t).__name__
            raise InputError(f"{OP}: packed.{name} must be a contiguous 1-D int32 tensor on {device}, got {got}")
    if packed.block_m not in BLOCK_MS:
        raise InputError(f"{OP}: packed.block_m={packed.block_m!r} is not one of {list(BLOCK_MS)}")
    # the pack's sizes follow from the shapes alone: a pack of other tokens or experts shows here
    # (where the sizes happen to agree it cannot be told without reading the device)
    padded = max_padded(tokens, top_k, experts, packed.block_m)
    got = (packed.sorted_ids.numel(), packed.block_expert.numel(), packed.padded_count.numel())
    if got != (padded, padded // packed.block_m, 1):
        raise InputError(f"{OP}: packed has {got[0]} slots, {got[1]} blocks and {got[2]} counts; {tokens} tokens x "
                         f"top_k {top_k} over {experts} experts in blocks of {packed.block_m} pack into {padded}, "
                         f"{padded // packed.block_m} and 1 (packed for other tokens or experts?)")


def _check_ids(topk_ids, tokens: int, top_k: int, device) -> None:
    if topk_ids.dim() != 2 or tuple(topk_ids.shape) != (tokens, top_k) or topk_ids.dtype.is_floating_point \
            or topk_ids.dtype == torch.bool or topk_ids.device != device:
        raise InputError(f"{OP}: per_slot reads the router's topk_ids: an integer [{tokens}, {top_k}] tensor on "
                         f"{device}, got {topk_ids.dtype} {tuple(topk_ids.shape)} on {topk_ids.device}")


def moe_gemm(x: torch.Tensor, w: torch.Tensor, packed: Packed | torch.Tensor, *, top_k: int, gather: bool,
             activation: Optional[str] = None, routed_weights: Optional[torch.Tensor] = None,
             combine: bool = False, out: Optional[torch.Tensor] = None, config: Optional[dict] = None):
    """Grouped expert GEMM over the routed slots (see the module doc); fp16/bf16/fp32.

    ``packed``: the slots packed by expert (``moe_pack.pack``; schedule packed), or the router's
    ``topk_ids`` [T, top_k] themselves (schedule per_slot: no pack).

    ``x``: [T, K] with ``gather`` (row of slot s: s // top_k), else [T * top_k, K]. ``w``: [E, N, K].
    ``activation="silu_mul"``: w rows [gate | up], output N / 2 columns. ``routed_weights`` [T, top_k]:
    rows scaled by their router weight. ``combine``: rows summed per token into [T, N] (not with an
    activation). Output: ``out`` [T, N] with ``combine``, else [T * top_k, N or N / 2].
    ``config`` None: the default of the schedule ``packed`` implies (packed: at ``packed.block_m``); a
    packed config's ``block_m`` must be ``packed.block_m`` (pack with the config's block_m).
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise InputError(f"{OP}: x must be a 2-D tensor, got {tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not isinstance(w, torch.Tensor) or w.dim() != 3:
        raise InputError(f"{OP}: w must be a 3-D [experts, n, k] tensor, got "
                         f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}")
    if not isinstance(top_k, int) or top_k < 1 or top_k > w.shape[0]:
        raise InputError(f"{OP}: top_k must be an int in [1, experts={w.shape[0]}], got {top_k!r}")
    if activation not in ACTIVATIONS:
        raise InputError(f"{OP}: activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    if activation and combine:
        raise InputError(f"{OP}: combine sums the down GEMM's rows per token; with activation={activation!r} "
                         f"use combine=False")
    experts, n, k = w.shape
    if gather:
        tokens = x.shape[0]
    elif x.shape[0] % top_k:
        raise InputError(f"{OP}: without gather x holds T * top_k rows, got {x.shape[0]} for top_k={top_k}")
    else:
        tokens = x.shape[0] // top_k
    check_tensor(OP, "x", x, (x.shape[0], k), None, None)
    check_tensor(OP, "w", w, (experts, n, k), x.dtype, x.device)
    if activation and n % 2:
        raise InputError(f"{OP}: activation {activation!r} needs w's rows [gate | up]: n={n} is odd")
    if routed_weights is not None:
        check_tensor(OP, "routed_weights", routed_weights, (tokens, top_k), None, x.device, layout="contiguous")
    slots = tokens * top_k
    per_slot = isinstance(packed, torch.Tensor)
    if per_slot:
        _check_ids(packed, tokens, top_k, x.device)
    else:
        _check_packed(packed, tokens, top_k, experts, x.device)
    out_n = n // 2 if activation else n
    out = output_tensor(OP, out, (tokens, out_n) if combine else (slots, out_n), x)
    if tokens == 0 or out_n == 0:
        return out
    if k == 0:
        return out.zero_()
    problem = Problem.make(OP, DTYPE_NAMES[x.dtype], m=tokens, n=n, k=k, experts=experts, topk=top_k,
                           act=int(activation is not None))
    spec = launch_spec(x.device, persistent=False)
    schedule = "per_slot" if per_slot else "packed"
    if config is None:
        config = default_config(problem, spec, block_m=None if per_slot else packed.block_m, schedule=schedule)
    else:
        config = flags_off_where_absent(space(problem), config)     # moe_block's tiles carry no tma
        checked_config(space(problem), config, problem, spec, LAUNCH_CONSTRAINTS)
        if config["schedule"] != schedule:
            raise InputError(f"{OP}: config schedule={config['schedule']!r} but given "
                             f"{'topk_ids' if per_slot else 'a pack'} (packed takes a moe_pack.Packed, per_slot the "
                             f"topk_ids)")
        if not per_slot and config["block_m"] != packed.block_m:
            raise InputError(f"{OP}: config block_m={config['block_m']} but the pack's block_m={packed.block_m} "
                             f"(pack with the config's block_m)")
    if per_slot:
        rows, bn = (tokens if combine else slots), config["slot_block_n"]
        _moe_gemv_kernel[(rows, triton.cdiv(out_n, bn))](
            x, w, out, packed, routed_weights if routed_weights is not None else x, experts, out_n, k,
            x.stride(0), w.stride(0), w.stride(1), w.stride(2), out.stride(0), packed.stride(0), packed.stride(1),
            TOP_K=top_k, GATHER=bool(gather), SILU_MUL=activation == "silu_mul",
            WEIGHTED=routed_weights is not None, COMBINE=bool(combine), BLOCK_N=bn, BLOCK_K=config["slot_block_k"],
            BLOCK_SLOTS=triton.next_power_of_2(top_k),
            EVEN_K=k % config["slot_block_k"] == 0, ONE_TILE=k <= config["slot_block_k"], num_warps=config["slot_warps"],
            num_stages=1, **chained(x))
        return out
    atomic = combine and config["combine"] == "atomic"
    if not combine:
        y = out
    elif atomic:
        y = out.zero_() if out.dtype == torch.float32 else torch.zeros((tokens, n), dtype=torch.float32, device=x.device)
    else:
        y = torch.empty((slots, n), dtype=x.dtype, device=x.device)
    bn = config["block_n"]
    w_tma = bool(config.get("tma"))
    if w_tma:     # the launch's own device: the interpreter's spec has no TMA (``spec`` plans for the target)
        refuse_unrunnable(config, problem, launch_spec(x.device), (tma_unavailable,))
        if w.stride(2) != 1 or w.stride(0) != n * w.stride(1):
            raise ConfigRejected(f"{OP}: tma needs w's experts stacked as rows of k contiguous elements, got strides "
                                 f"{w.stride()}")
        tma_rows_fit(OP, (w,), w.stride(1), experts * n)
        from triton.tools.tensor_descriptor import TensorDescriptor
        weights, stride_we = TensorDescriptor(w, [experts * n, k], [w.stride(1), 1], [bn, config["block_k"]]), n
    else:
        weights, stride_we = w, w.stride(0)
    # the used blocks come first and each holds a slot: at most min(blocks, slots) of them (decode:
    # top_k blocks, not the E * (block_m - 1) padding's worth the pack's size allows)
    blocks = min(packed.block_expert.numel(), slots)
    interpreted = tuneforge.INTERPRETED
    _moe_gemm_kernel[(blocks * triton.cdiv(out_n, bn),)](
        x, weights, y, packed.sorted_ids, packed.block_expert, packed.padded_count,
        routed_weights if routed_weights is not None else x,
        slots, out_n, k, blocks, x.stride(0), stride_we, w.stride(1), w.stride(2), y.stride(0),
        TOP_K=top_k, GATHER=bool(gather), SILU_MUL=activation == "silu_mul", WEIGHTED=routed_weights is not None,
        ATOMIC=atomic, BLOCK_M=packed.block_m, BLOCK_N=bn, BLOCK_K=config["block_k"], GROUP_M=config["group_m"],
        EVEN_K=k % config["block_k"] == 0, UPCAST=interpreted and x.dtype != torch.float32,
        INPUT_PRECISION="ieee" if x.dtype == torch.float32 or interpreted else "tf32",
        W_TMA=w_tma, num_warps=config["num_warps"], num_stages=config["num_stages"], **chained(x))
    if combine and y is not out:
        _sum_rows(y, out, 1 if atomic else top_k)
    return out



# --- reference and baseline ----------------------------------------------------------------------

def _per_expert(x, w, topk_ids, gather, activation, routed_weights, combine, dtype):
    """The per-expert loop in ``dtype``: each hit expert's slots through F.linear, the activation,
    the router weights and the combine as torch ops (index_add_, as transformers' MoE blocks do)."""
    tokens, top_k = topk_ids.shape
    flat = topk_ids.reshape(-1)
    rows = torch.arange(tokens * top_k, device=x.device)
    src = rows // top_k if gather else rows
    n_out = w.shape[1] // 2 if activation else w.shape[1]
    y = torch.zeros((tokens, n_out) if combine else (tokens * top_k, n_out), dtype=dtype, device=x.device)
    weights = None if routed_weights is None else routed_weights.reshape(-1).to(dtype)
    for e in flat.unique().tolist():
        slots = rows[flat == e]
        h = F.linear(x[src[slots]].to(dtype), w[e].to(dtype))
        if activation:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        if weights is not None:
            h = h * weights[slots, None]
        if combine:
            y.index_add_(0, slots // top_k, h)
        else:
            y[slots] = h
    return y


def reference(x, w, topk_ids, *, gather: bool, activation=None, routed_weights=None, combine=False):
    """The per-expert loop in fp32 (from ``topk_ids`` [T, top_k], not from a pack)."""
    return _per_expert(x, w, topk_ids, gather, activation, routed_weights, combine, torch.float32)


def baseline(x, w, topk_ids, *, gather: bool, activation=None, routed_weights=None, combine=False):
    """What a torch user runs: transformers' eager loop over the hit experts in x's dtype."""
    return _per_expert(x, w, topk_ids, gather, activation, routed_weights, combine, x.dtype)


# --- the template ----------------------------------------------------------------------------------

def routing(tokens: int, experts: int, top_k: int, generator: torch.Generator):
    """(topk_ids int32 [tokens, top_k], weights fp32 [tokens, top_k]) on the generator's device: a
    softmax router over random logits with the first SKEW_EXPERTS experts biased by SKEW_BIAS (real
    routers are skewed), the weights renormalised over the top_k (norm_topk_prob)."""
    logits = torch.randn((tokens, experts), generator=generator, device=generator.device)
    logits[:, :SKEW_EXPERTS] += SKEW_BIAS
    weights, ids = torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1)
    return ids.int(), weights / weights.sum(-1, keepdim=True)


def make_inputs(problem: Problem, device, seed: int = 0, ctx=None) -> dict:
    """x ~ N(0, 1) (gate_up: [m, k]; down: [m * topk, k]), w ~ N(0, 1/k); a skewed routing, packed
    once per block_m of the space (``packs``: the tuner times the GEMM, not the pack)."""
    m, n, k, e, topk, act = (problem[d] for d in ("m", "n", "k", "experts", "topk", "act"))
    dt = problem.torch_dtype
    g = torch.Generator(device=device).manual_seed(seed)
    ids, weights = routing(m, e, topk, g)
    x = torch.randn((m if act else m * topk, k), generator=g, device=device).to(dt)
    w = (torch.randn((e, n, k), generator=g, device=device) / max(k, 1) ** 0.5).to(dt)
    packs = {bm: pack_reference(ids, e, bm) for bm in BLOCK_MS}
    out = torch.empty((m * topk, n // 2) if act else (m, n), dtype=dt, device=device)
    return {"x": x, "w": w, "packs": packs, "topk_ids": ids, "routed_weights": None if act else weights,
            "act": act, "out": out}


def _launch(x, w, packs: Mapping[int, Packed], topk_ids, routed_weights, act, out=None, config=None):
    """The template's launch: the planned use of each problem (act 1: gate_up; 0: down, combined),
    with the pack of the config's block_m (per_slot: the ids)."""
    top_k = topk_ids.shape[1]
    if config is None:
        problem = Problem.make(OP, DTYPE_NAMES[x.dtype], m=topk_ids.shape[0], n=w.shape[1], k=w.shape[2],
                               experts=w.shape[0], topk=top_k, act=act)
        config = default_config(problem, launch_spec(x.device, persistent=False))
    routing = packs[config["block_m"]] if _packed(config) else topk_ids
    return moe_gemm(x, w, routing, top_k=top_k, gather=bool(act),
                    activation="silu_mul" if act else None, routed_weights=routed_weights, combine=not act,
                    out=out, config=config)


def _reference(x, w, packs, topk_ids, routed_weights, act):
    return reference(x, w, topk_ids, gather=bool(act), activation="silu_mul" if act else None,
                     routed_weights=routed_weights, combine=not act)


def _propagated_error(atol, x, w, packs, topk_ids, routed_weights, act):
    """gate_up's SiLU-mul: ``silu_mul.propagated_error`` from the per-expert loop's fp64 gate and up."""
    if not act:
        return None
    gate_up = _per_expert(x, w, topk_ids, True, None, None, False, torch.float64)
    return SILU.propagated_error(atol, *gate_up.chunk(2, dim=-1))


def _baseline(x, w, packs, topk_ids, routed_weights, act):
    return baseline(x, w, topk_ids, gather=bool(act), activation="silu_mul" if act else None,
                    routed_weights=routed_weights, combine=not act)


def work(problem: Problem) -> tuple[float, float]:
    """2 (m topk) n k flops; the hit experts' weights (uniform routing's expected count), x and the
    output moved once."""
    m, n, k, e, topk, act = (problem[d] for d in ("m", "n", "k", "experts", "topk", "act"))
    active = e * (1.0 - (1.0 - 1.0 / e) ** (m * topk))
    out = m * topk * n // 2 if act else m * n
    return 2.0 * m * topk * n * k, float((active * n * k + (m if act else m * topk) * k + out) * ELEM_SIZE[problem.dtype])


def cost(problem: Problem, config: Optional[dict], spec: DeviceSpec) -> float:
    """m tokens x topk routes spread over the experts (uniform routing: the expected number of
    distinct experts hit). packed: ``grouped_time``, plus the down GEMM's combine passes (atomic: the
    fp32 zeroing and the cast; reduce: the row sums). per_slot: every slot streams its expert's weight
    (on the CUDA cores, about a tenth of the tensor cores' rate) at the HBM share its programs fill.
    The baseline (an eager loop over experts) pays a GEMM and LOOP_HOST_S per hit expert."""
    m, n, k, experts, topk = (problem[d] for d in ("m", "n", "k", "experts", "topk"))
    routes = m * topk
    active = experts * (1.0 - (1.0 - 1.0 / experts) ** routes)
    launch = spec.launch_us * 1e-6
    if config is not None and config.get("schedule") == "per_slot":
        flops, _ = work(problem)
        size = ELEM_SIZE[problem.dtype]
        nbytes = routes * n * k * size + (m if problem["act"] else routes) * k * size + m * _out_n(problem) * size
        programs = (routes if problem["act"] else m) * math.ceil(_out_n(problem) / config["slot_block_n"])
        return roofline(flops, nbytes, spec, problem.dtype, efficiency=0.1,
                        mem_efficiency=0.85 * min(1.0, programs / spec.sms), launches=1)
    if config is None or config.get("baseline"):
        rows = max(1, math.ceil(routes / active))
        per_expert = gemm_config_time(rows, n, k, config, spec, problem.dtype) - launch
        return active * (per_expert + LOOP_HOST_S)
    passes = 0 if problem["act"] else 2 if config.get("combine") == "atomic" else 1
    return grouped_time(problem, config, spec) + passes * kernel_floor(spec)


def grouped_time(problem: Problem, config: dict, spec: DeviceSpec) -> float:
    """One packed grouped GEMM launch: its tiles over all hit experts run side by side in one grid, so it
    is priced as one GEMM of the rows per hit expert by the hit experts' stacked weights (gemm's tile
    model: waves, one ramp, every hit expert's weight streamed once), not as a GEMM per hit expert (a
    ramp and a latency-bound tail each, which overprices many small experts)."""
    m, n, k, experts, topk = (problem[d] for d in ("m", "n", "k", "experts", "topk"))
    routes = m * topk
    active = experts * (1.0 - (1.0 - 1.0 / experts) ** routes)
    rows = max(1, math.ceil(routes / max(active, 1.0)))
    return gemm_config_time(rows, max(1, round(active * n)), k, config, spec, problem.dtype)


TEMPLATE = register(Template(
    op=OP, space=space, make_inputs=make_inputs, launch=_launch, reference=_reference, baseline=_baseline,
    default_config=default_config, work=work, cost=cost, constraints=CONSTRAINTS,
    propagated_error=_propagated_error,
    doc="grouped expert GEMM over moe_pack's blocks or per routed slot: gathered rows, fused silu_mul or "
        "weighted combine"))
