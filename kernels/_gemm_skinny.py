"""The gemm template's ``skinny`` config family: 16-64 token rows against a streamed weight.

y[m, n] = x[m, k] @ w[n, k].T for m <= SKINNY_MAX_M: every row of x in one tile of
``block_m(m)`` rows, one program per (``skinny_block_n`` output columns, K slice of ``skinny_split``),
a plain grid (not persistent), TMA loads where the device has them, the slices of a tile summed by its
last program (gemm's ``finish_tile``, no zeroing pass). ``skinny_swap`` computes each tile as
w_tile @ x.T: the weight's rows take the MMA's M side, which Hopper's wgmma builds from 64-row
warpgroups, so 16-32 token rows are not padded to 64 (the persistent kernel at those rows runs
BLOCK_M 16-32 tiles on the older, register-fed MMA).

Measured on the H200 (2026-12-04, a scratch kernel of this design against cuBLAS in the same run,
``skinny-gemm-scratch-NVIDIA_H200-2026-12-04.json``, % of the weight's read at 4.24 TB/s), Qwen3-32B's
linears at 32 tokens: qkv 88.8 % swapped / 83.0 % not / 85.2 % cuBLAS, o_proj 86.5 / 80.3 / 72.9,
gate_up 95.9 / 90.0 / 90.7, down 95.5 / 93.7 / 88.4; at 64 tokens swapping gained nothing.

The kernel and launcher are ``kernels/gemm.py``'s (``_skinny_kernel``, ``skinny``: it shares gemm's
split-K finish); this module is the family's policy: parameters, constraints, seeds and cost. The
family is also in gemm_fused's space (``gemm.fused_space``) with its RMSNorm prologue (unsplit) and its
residual and SiLU-mul epilogues.
"""
from __future__ import annotations

import triton

from tuneforge.dsl.roofline import HBM_LATENCY_S
from tuneforge.dsl.space import categorical
from tuneforge.kernels._common import tile_past_problem
from tuneforge.kernels._gemm_space import ELEM_SIZE, MAX_ACC_REGISTERS, fusion_of, out_width

SKINNY_MAX_M = 64               # one row block; past it the persistent kernel's 2-D tiles reuse w as well
SKINNY_MIN_SEED_M = 9           # seeded from here (gemv's range ends at 8 rows); offered from 1 row
SKINNY_DEFAULT_M = 32           # the template's default may take it up to here (at 64 rows it won 1 of 5)
SKINNY = {"kernel": ("skinny",)}
SPLITS = (1, 2, 3, 4, 6, 8)


def block_m(m: int) -> int:
    """The one row block: m's next power of two, at least tl.dot's 16."""
    return max(16, triton.next_power_of_2(m))


def k_per_split(k: int, bk: int, split: int) -> int:
    """K elements per slice: whole BLOCK_K blocks, so only the last slice meets K's edge."""
    return triton.cdiv(triton.cdiv(k, split), bk) * bk


def params() -> list:
    return [categorical("skinny_block_n", (64, 128), when=SKINNY), categorical("skinny_block_k", (64, 128, 256), when=SKINNY),
            categorical("skinny_stages", (3, 4, 5), when=SKINNY), categorical("skinny_warps", (4, 8), when=SKINNY),
            categorical("skinny_split", SPLITS, when=SKINNY), categorical("skinny_swap", (False, True), when=SKINNY)]


def skinny_unfit(config: dict, problem, spec) -> str | None:
    """At most SKINNY_MAX_M rows; the pipeline in shared memory; the accumulator in registers; every
    K slice non-empty."""
    m, k = problem["m"], problem["k"]
    if m > SKINNY_MAX_M:
        return f"kernel skinny: m={m} rows > {SKINNY_MAX_M} (one row block)"
    if fusion_of(problem)[0] and config["skinny_split"] > 1:
        return "kernel skinny: the RMSNorm prologue runs unsplit (a K slice sees part of each row's squares)"
    pairs = 2 if fusion_of(problem)[1] == "silu_mul" else 1
    bm, bn, bk = block_m(m), config["skinny_block_n"], config["skinny_block_k"]
    need = config["skinny_stages"] * (bm + pairs * bn) * bk * ELEM_SIZE[problem.dtype]
    if need > spec.smem_per_block:
        return f"kernel skinny: shared memory: {need} bytes for the pipeline > {spec.smem_per_block} on {spec.name}"
    regs = pairs * bm * bn // (32 * config["skinny_warps"])
    if regs > MAX_ACC_REGISTERS:
        return f"kernel skinny: registers: {regs} accumulator registers per thread > {MAX_ACC_REGISTERS}"
    split = config["skinny_split"]
    if split > 1 and (split - 1) * k_per_split(k, bk, split) >= k:
        return f"kernel skinny: {split} splits of k={k} in blocks of {bk} leave a split empty"
    return None


def skinny_wasteful(config: dict, problem, spec) -> str | None:
    return tile_past_problem(config, (("skinny_block_n", "n", out_width(problem), 64),
                                      ("skinny_block_k", "k", problem["k"], 64)), prefix="kernel skinny: ")


SKINNY_LAUNCH_CONSTRAINTS = (skinny_unfit,)
SKINNY_CONSTRAINTS = SKINNY_LAUNCH_CONSTRAINTS + (skinny_wasteful,)


def split_to_fill(problem, bn: int, bk: int, spec) -> int:
    """The smallest split whose programs make two per SM, keeping >= 2 K blocks a slice; 1 when the
    column tiles alone do."""
    tiles = triton.cdiv(out_width(problem), bn)
    usable = [s for s in SPLITS if s == 1 or problem["k"] // s >= 2 * bk]
    return next((s for s in usable if tiles * s >= 2 * spec.sms), usable[-1])


def seeds(problem, spec) -> list[dict]:
    """Configs worth trying first from 9 to 64 rows: swapped 64-column tiles with 256- then 128-deep steps,
    then unswapped 128- and 64-column ones, 4 warps, unsplit first, then split to fill the SMs (the
    H200's order at 16-64 tokens of Qwen3-32B's linears, ``bench_gemm-...-m16-64-skinny.json``: unsplit
    won 10 of 15, at 80 column tiles too), those the constraints pass."""
    if not SKINNY_MIN_SEED_M <= problem["m"] <= SKINNY_MAX_M:
        return []
    tiles = ((True, 64, 256, 4), (True, 64, 128, 4), (False, 128, 128, 4), (False, 64, 128, 3))
    configs = [dict(kernel="skinny", skinny_block_n=bn, skinny_block_k=bk, skinny_stages=stages, skinny_warps=4,
                    skinny_split=split, skinny_swap=swap)
               for fill in (False, True) for swap, bn, bk, stages in tiles
               for split in [split_to_fill(problem, bn, bk, spec) if fill else 1]]
    ok = [c for c in configs if skinny_unfit(c, problem, spec) is None and skinny_wasteful(c, problem, spec) is None]
    return list({repr(c): c for c in ok}.values())


# Measured on the H200 (``bench_gemm-...-m16-64-skinny.json``): a program's loads in flight, over
# this latency (HBM under load, not idle), bound one SM's read rate; the unswapped tile below 64 rows
# (mma.sync fed through registers) keeps about 0.7 of its pipeline's bytes in flight.
LOADED_LATENCY_S = 1.4e-6
UNSWAPPED_SMALL_M_IN_FLIGHT = 0.7


def cost(problem, config: dict, spec) -> float:
    """The weight (and x, y, the split's fp32 slices) streamed in waves of programs (as many a SM as
    shared memory holds): each wave at the lesser of the HBM rate (a measured copy's) and what its SMs'
    loads in flight sustain (``LOADED_LATENCY_S``: so a part-empty last wave streams slowly); plus a
    launch, the store's round trip and each wave's ramp. The MMAs at half the tensor cores' rate."""
    m, n, k = problem["m"], problem["n"], problem["k"]
    n_out, epi = out_width(problem), fusion_of(problem)[1]
    pairs = 2 if epi == "silu_mul" else 1
    bm, bn, bk, stages = block_m(m), config["skinny_block_n"], config["skinny_block_k"], config["skinny_stages"]
    elem = ELEM_SIZE[problem.dtype]
    splits = triton.cdiv(k, k_per_split(k, bk, config["skinny_split"]))
    programs = triton.cdiv(n_out, bn) * splits
    slices = 2 * splits * bm * n * 4 if splits > 1 else 0
    outputs = m * n_out * (2 if epi == "residual" else 1)      # the residual read, y written
    nbytes = float((n * k + m * k + outputs) * elem + slices)
    per_sm = max(1, spec.smem_per_block // (stages * (bm + pairs * bn) * bk * elem))
    in_flight = (stages - 1) * (bm + pairs * bn) * bk * elem
    if bm < 64 and not config["skinny_swap"]:
        in_flight *= UNSWAPPED_SMALL_M_IN_FLIGHT
    hbm = spec.hbm_bytes_per_s * spec.measured_hbm_fraction
    slots, left, seconds, waves = spec.sms * per_sm, programs, 0.0, 0
    while left > 0:
        wave = min(left, slots)
        sms = min(wave, spec.sms)
        rate = min(hbm, sms * min(per_sm, -(-wave // sms)) * in_flight / LOADED_LATENCY_S)
        seconds += nbytes * wave / programs / rate
        left, waves = left - wave, waves + 1
    compute = 2.0 * bm * n * k / (spec.peak_flops(problem.dtype) * 0.5)
    return max(seconds, compute) + spec.launch_us * 1e-6 + HBM_LATENCY_S + waves * LOADED_LATENCY_S
