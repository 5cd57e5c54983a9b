"""The shared cost primitives templates price their configs with (closed-form, deterministic).

- ``roofline``: compute at peak x efficiency vs. memory at the achievable HBM bandwidth, plus launch.
- ``alpha_beta``: latency + bytes / bandwidth for the collective algorithms, by topology
  (``nvswitch``: one GPU pushes ``link_gbs`` in total to all peers; ``mesh``: one link per peer).
- ``overlap``: a fused compute+communication op hides the shorter part except an exposed fraction.
- ``gemm_time`` / ``gemm_config_time``: GEMM tiles (wave quantization over ``spec.sms``, tile
  padding, small-M memory parallelism by Little's law); ``config=None`` is the cuBLAS-like baseline.
- ``elementwise_time``: a memory-bound row op by its tile; ``nccl_time``: the NCCL baseline of a collective.

They sit below the kernels (``spec`` is a ``tuneforge.dsl.devices.DeviceSpec``): each op's cost
lives in its template (``Template.cost``); ``tuneforge.tune.costmodel.predict`` dispatches to it.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

# Bytes one SM must keep in flight to saturate HBM is bandwidth x latency (Little's law).
HBM_LATENCY_S = 0.8e-6
# Host-to-kernel and kernel tail overhead that NCCL adds per collective call (proxy, channel setup).
NCCL_EXTRA_LATENCY_S = 6e-6
# Fraction of a link's datasheet bandwidth that copy/reduce kernels reach.
LINK_EFFICIENCY = 0.80
# SMs a communication kernel needs to saturate NVLink / xGMI (fewer SMs give proportionally less).
SMS_TO_SATURATE_LINKS = 16
# Fraction of peak a well-shaped tensor-core tile reaches (cuBLAS-class kernels on large shapes).
TILE_PEAK_FRACTION = 0.75
# Tile arithmetic intensity (BM*BN/(BM+BN)) beyond which operand feeding stops limiting the tile.
TILE_INTENSITY_SATURATION = 80.0
# Gain of TMA descriptor loads on a tile's rate, and of a second co-resident program (TMA-fed: few
# registers for loads) whose main loop overlaps the other's epilogue and pipeline refill.
TMA_TILE_GAIN = 1.08
CO_RESIDENT_GAIN = 1.2


def _itemsize(dtype: str) -> int:
    return {"bf16": 2, "fp16": 2, "fp32": 4}[dtype]


def _get(config: Optional[Mapping[str, Any]], default, name: str):
    """``config[name]`` (every template spells its keys in lower snake case), else ``default``."""
    return config.get(name, default) if config else default


def roofline(flops: float, nbytes: float, spec, dtype: str = "bf16", efficiency: float = 1.0,
             mem_efficiency: float = 1.0, launches: int = 1) -> float:
    """Seconds for ``flops`` and ``nbytes`` of HBM traffic: the slower of compute and memory, plus
    ``launches`` kernel floors.

    ``efficiency`` scales the peak FLOP rate, ``mem_efficiency`` the achievable HBM bandwidth
    (itself ``spec.measured_hbm_fraction`` of the datasheet figure).
    """
    compute = flops / (spec.peak_flops(dtype) * max(efficiency, 1e-6)) if flops else 0.0
    memory = nbytes / (spec.hbm_bytes_per_s * spec.measured_hbm_fraction * max(mem_efficiency, 1e-6))
    return max(compute, memory) + launches * kernel_floor(spec)


def kernel_floor(spec) -> float:
    """Seconds the smallest kernel takes inside a CUDA graph: its launch gap plus one dependent HBM
    round trip (load, then store). An eager torch op of n kernels pays it n times."""
    return spec.launch_us * 1e-6 + HBM_LATENCY_S


def _link_bytes_per_s(spec, world: int, all_peers: bool) -> float:
    """Bandwidth one GPU gets: to all peers at once (``all_peers``) or along one ring neighbour."""
    if all_peers:
        return spec.peer_bytes_per_s(world) * LINK_EFFICIENCY
    return spec.link_gbs * 1e9 * LINK_EFFICIENCY


ALGOS = ("one_shot", "two_shot", "ring", "allgather", "reducescatter")


def alpha_beta(nbytes_per_rank: float, world: int, spec, algo: str = "one_shot",
               link_efficiency: float = 1.0) -> float:
    """Seconds for a collective; ``nbytes_per_rank`` is the buffer each rank holds at the start
    (all-reduce / reduce-scatter: the full tensor; all-gather: the rank's shard).

    - one_shot: every rank reads the (w-1) peers' full buffers and reduces locally: 1 step.
    - two_shot: reduce-scatter then all-gather, each (w-1)/w of the buffer: 2 steps.
    - ring: 2(w-1) steps of n/w bytes each along one link (bandwidth-optimal, latency-heavy).
    - allgather: one step receiving (w-1) shards; reducescatter: one step of (w-1)/w of the buffer.
    ``link_efficiency`` scales bandwidth further (e.g. too few SMs given to communication).
    """
    if world <= 1 or nbytes_per_rank <= 0:
        return 0.0
    alpha = spec.link_latency_us * 1e-6
    w, n = world, float(nbytes_per_rank)
    bw_all = _link_bytes_per_s(spec, w, True) * link_efficiency
    hbm = spec.hbm_bytes_per_s * spec.measured_hbm_fraction
    if algo == "one_shot":
        return alpha + (w - 1) * n / bw_all + w * n / hbm          # local reduce reads w buffers
    if algo == "two_shot":
        return 2 * alpha + 2 * (w - 1) / w * n / bw_all + 2 * n / hbm
    if algo == "ring":
        bw_one = _link_bytes_per_s(spec, w, False) * link_efficiency
        return 2 * (w - 1) * alpha + 2 * (w - 1) / w * n / bw_one + 2 * n / hbm
    if algo == "allgather":
        return alpha + (w - 1) * n / bw_all
    if algo == "reducescatter":
        return alpha + (w - 1) / w * n / bw_all + n / hbm
    raise ValueError(f"unknown collective algorithm {algo!r}; expected one of {ALGOS}")


def overlap(compute_s: float, comm_s: float, spec, overlap_fraction: float = 0.9) -> float:
    """A fused compute+communication op: the longer part runs in full, the shorter is hidden except
    ``1 - overlap_fraction`` of it; one signal round-trip is paid to hand off between the two."""
    f = min(max(overlap_fraction, 0.0), 1.0)
    sync = spec.link_latency_us * 1e-6 if compute_s > 0 and comm_s > 0 else 0.0
    return max(compute_s, comm_s) + (1.0 - f) * min(compute_s, comm_s) + sync


# Fractions of a copy's bandwidth eager torch's elementwise kernels reach (bench_gate on an H100 at
# 65536 tokens: add + rms_norm 0.84, contiguous; silu on the gate half and the multiply by the up half 0.59,
# rope_qk_norm's 16 passes over head views 0.52, both strided).
EAGER_BANDWIDTH = 0.83
EAGER_STRIDED_BANDWIDTH = 0.55


# --- GEMM tiles -------------------------------------------------------------------------------

# Tile shapes a cuBLAS-like heuristic picks from (BM, BN, BK, split_k); the baseline takes the best.
_LIBRARY_TILES = ((128, 256, 64, 1), (256, 128, 64, 1), (128, 128, 64, 1), (64, 128, 64, 1),
                  (64, 64, 64, 1), (64, 128, 128, 2), (64, 64, 128, 4), (64, 128, 64, 8))
# The hand-tuned library beats a generic Triton config at the same tile by a little (better
# epilogues, scheduling); a tuned Triton config wins by finding a better tile/split for the shape.
_LIBRARY_EFFICIENCY = 1.0
# cuBLAS's kernels for up to 32 rows stream the weight at 0.88 of the bandwidth Triton's stream-K /
# split-K programs reach, after a shorter ramp (_LIBRARY_RAMP_S): fit to bench_gemm's and the tunes'
# 1-32-token GEMMs on an H100 (cuBLAS ahead below ~100 MB of weight, Triton 3-6 % ahead above)
_LIBRARY_STREAM_EFFICIENCY = 0.88
_LIBRARY_SCHEDULES = ("tiles", "hybrid", "stream")
# One GEMM launch's pipeline ramp and drain: the first tiles wait a full HBM round trip per stage before
# their first MMA, the last wave's epilogue stores nothing else overlaps (the intercept of time vs bytes
# of decode GEMMs: ~5 us on an H100 and an H200, launch included).
GEMM_RAMP_S = 5.0e-6
# Fraction of HBM bandwidth Triton's fp32 split-K / stream-K slices move at (stored, then read back by
# one program per tile: few bytes in flight).
SLICE_EFFICIENCY = 0.7
_LIBRARY_RAMP_S = 2.0e-6


def hybrid_split(rest: int, slots: int, k_iters: int) -> int:
    """The hybrid schedule's split of the ``rest`` tiles past the full waves: as many as fill one
    wave of ``slots`` programs, keeping >= 2 K blocks per split (the gemm launcher's rule)."""
    return max(1, min(slots // rest, k_iters // 2)) if rest else 1


def gemm_time(m: int, n: int, k: int, spec, dtype: str = "bf16", *, block_m: int = 128, block_n: int = 128,
              block_k: int = 64, split_k: int = 1, num_stages: int = 3, num_warps: int = 8,
              group_m: int = 8, tma: bool = False, schedule: str = "tiles", programs_per_sm: int = 1,
              efficiency: float = 1.0, library: bool = False) -> float:
    """Seconds for y[m,n] = x[m,k] @ w[n,k].T with one tile configuration.

    Compute: programs run in waves over the SMs (wave quantization); each tile does its padded
    BM x BN x ceil(K/BK)*BK work (padding waste) at a rate set by the tile's arithmetic intensity,
    pipelining depth and warp count. Memory: operands re-read per tile row/column (L2 reuse with
    grouped order), and the bytes in flight by Little's law limit bandwidth when few programs run
    (small M: few tiles, little parallelism unless split-K adds some). ``schedule`` "stream"
    (stream-K): the tiles' K iterations are shared evenly by the persistent programs (no wave
    quantization), and the slices of the tiles programs share go through an fp32 workspace;
    "hybrid": whole tiles for the full waves, the rest split-K'd to fill one more wave. Every launch
    pays ``spec.launch_us`` and one pipeline ramp (GEMM_RAMP_S). ``library``: cuBLAS's kernels, whose
    warp-specialized epilogue overlaps the split fixup with the next tile's main loop.
    """
    size = _itemsize(dtype)
    sms = spec.sms
    tiles_m, tiles_n = math.ceil(m / block_m), math.ceil(n / block_n)
    k_per_split = math.ceil(k / split_k)
    k_padded = math.ceil(k_per_split / block_k) * block_k
    programs = tiles_m * tiles_n * split_k
    smem = num_stages * (block_m + block_n) * block_k * size
    per_sm = max(1, min(4, spec.smem_per_block // max(smem, 1)))   # co-resident programs per SM
    resident = min(per_sm, max(1, programs_per_sm))
    slots = sms * resident

    intensity = block_m * block_n / (block_m + block_n)
    tile_eff = TILE_PEAK_FRACTION * min(1.0, intensity / TILE_INTENSITY_SATURATION)
    tile_eff *= {1: 0.55, 2: 0.8}.get(num_stages, 1.0)
    ideal_warps = min(8, max(4, block_m * block_n // 4096))
    tile_eff *= max(0.5, 1.0 - 0.12 * abs(math.log2(max(num_warps, 1) / ideal_warps)))
    if tma and "tma" in spec.features:
        tile_eff *= TMA_TILE_GAIN                          # descriptor loads free registers/issue slots
        live = sms * programs_per_sm if schedule == "stream" else programs
        if resident > 1 and live > sms:     # ... so a co-resident program's main loop hides the other's epilogue
            tile_eff *= CO_RESIDENT_GAIN
    tile_eff = min(tile_eff * efficiency, 0.95)
    per_program_flops = 2.0 * block_m * block_n * k_padded
    # programs sharing an SM share its peak, so an SM's busy time is its program count x tile time
    per_sm_rate = spec.peak_flops(dtype) / sms * tile_eff
    sliced_bytes = 2 * split_k * m * n * 4 if split_k > 1 else 0       # fp32 partials written + reduced
    k_iters = math.ceil(k / block_k)
    if schedule == "stream":
        workers = min(sms * max(1, programs_per_sm), tiles_m * tiles_n * k_iters)
        busy = min(workers, sms)
        compute = tiles_m * tiles_n * k_iters * 2.0 * block_m * block_n * block_k / (busy * per_sm_rate)
        # each program's first and last tile are shared: one slice written and one read per program
        sliced_bytes = 2 * 2 * workers * min(m, block_m) * block_n * 4
    elif schedule == "hybrid":      # full waves whole, the rest split to fill one more wave
        tiles = tiles_m * tiles_n
        rest = tiles % sms
        split = hybrid_split(rest, sms, k_iters)
        compute = (tiles // sms + (math.ceil(rest * split / sms) / split if rest else 0)) \
            * 2.0 * block_m * block_n * k_iters * block_k / per_sm_rate
        sliced_bytes = 2 * split * rest * block_m * block_n * 4 if split > 1 else 0
    else:
        compute = math.ceil(programs / sms) * per_program_flops / per_sm_rate

    # HBM traffic: grouped order keeps GROUP_M row tiles of A hot in L2 while the weight streams, so
    # the weight is read once per group; A is re-read only when a group's rows overflow half the L2.
    # (stream-K runs the row tiles of a weight column in lockstep, so it reuses the weight as tiles do)
    group = tiles_m if schedule == "stream" else max(1, min(group_m, tiles_m))
    a_reads = 1 if group * block_m * k * size <= spec.l2_mb * 2**20 / 2 else math.ceil(tiles_n / 8)
    b_reads = math.ceil(tiles_m / group)
    nbytes = (m * k * a_reads + n * k * b_reads) * size + m * n * size
    in_flight = min(programs, slots) * num_stages * (block_m + block_n) * block_k * size
    need = spec.hbm_bytes_per_s * HBM_LATENCY_S
    mem_eff = min(1.0, in_flight / need)
    hbm = spec.hbm_bytes_per_s * spec.measured_hbm_fraction * (_LIBRARY_STREAM_EFFICIENCY if library and m <= 32 else 1.0)
    # Triton's slices are stored after a program's K loop and summed by the tile's last program: not
    # overlapped with the streaming, and at a fraction of HBM (bench_split_cost: 1-36 % of a split
    # GEMM's time on an H100); the library's stream-K epilogue overlaps them with the next tile's main loop
    if not library:
        fixup = sliced_bytes / (hbm * SLICE_EFFICIENCY)
    elif split_k > 1:       # cuBLAS's split-K sums its slices in a second kernel
        fixup = sliced_bytes / hbm + kernel_floor(spec)
    else:
        fixup = 0.0
    ramp = _LIBRARY_RAMP_S if library else GEMM_RAMP_S
    return max(compute, nbytes / (hbm * mem_eff)) + fixup + ramp + spec.launch_us * 1e-6


def gemm_config_time(m: int, n: int, k: int, config: Optional[Mapping], spec, dtype: str = "bf16") -> float:
    """``gemm_time`` for a template config (None: the cuBLAS-like baseline's best library tile)."""
    if config is None or config.get("baseline"):
        # the library's kernels include stream-K decompositions of a part-empty last wave
        return min(gemm_time(m, n, k, spec, dtype, block_m=bm, block_n=bn, block_k=bk, split_k=s,
                             num_stages=3 if bk == 64 else 2, num_warps=8 if bm * bn >= 128 * 128 else 4,
                             tma="tma" in spec.features, efficiency=_LIBRARY_EFFICIENCY, schedule=schedule,
                             library=True)
                   for bm, bn, bk, s in _LIBRARY_TILES for schedule in _LIBRARY_SCHEDULES
                   if s == 1 or schedule == "tiles")
    return gemm_time(
        m, n, k, spec, dtype,
        block_m=int(_get(config, 128, "block_m")),
        block_n=int(_get(config, 128, "block_n")),
        block_k=int(_get(config, 64, "block_k")),
        split_k=int(_get(config, 1, "split_k")),
        num_stages=int(_get(config, 3, "num_stages")),
        num_warps=int(_get(config, 8, "num_warps")),
        group_m=int(_get(config, 8, "group_m")),
        tma=bool(_get(config, False, "tma")),
        schedule=_get(config, "tiles", "schedule"),
        programs_per_sm=int(_get(config, 1, "programs_per_sm")))


# --- elementwise / row ops ------------------------------------------------------------------------

def elementwise_time(rows: int, cols: int, nbytes: float, spec, config: Optional[Mapping] = None,
                     flops: float = 0.0, dtype: str = "bf16") -> float:
    """A memory-bound row op over [rows, cols]: ``nbytes`` of minimum traffic moved by programs of
    ``rows`` rows x ``block_n`` columns. Masked lanes (block_n past ``cols``) waste issue slots, and
    few/small programs leave HBM under-fed (Little's law)."""
    block_n = int(_get(config, 1 << max(0, (cols - 1).bit_length()), "block_n"))
    block_m = int(_get(config, 1, "rows"))
    num_warps = int(_get(config, 4, "num_warps"))
    col_tiles = math.ceil(cols / block_n)
    lane_use = cols / (col_tiles * block_n)
    programs = math.ceil(rows / block_m) * col_tiles
    # one pass: a program issues its whole tile's loads at once, so its share of the bytes is in flight
    in_flight = min(programs, spec.sms * 8) * nbytes / programs
    mem_eff = min(1.0, in_flight / (spec.hbm_bytes_per_s * HBM_LATENCY_S)) * (0.6 + 0.4 * lane_use)
    # a program with too few elements per thread under-issues loads; too many spill registers
    per_thread = block_m * block_n / (32 * max(num_warps, 1))
    mem_eff *= 1.0 if 4 <= per_thread <= 64 else 0.85
    # the first bytes arrive a round trip after the loads issue, then stream at what is kept in flight
    memory = HBM_LATENCY_S + nbytes / (spec.hbm_bytes_per_s * spec.measured_hbm_fraction * mem_eff)
    compute = flops / (spec.peak_flops(dtype) * 0.5) if flops else 0.0
    return max(compute, memory) + spec.launch_us * 1e-6


def eager_time(flops: float, nbytes: float, spec, launches: int, strided: bool = False,
               dtype: str = "bf16") -> float:
    """An eager torch sequence of ``launches`` elementwise kernels moving ``nbytes``: its kernels reach
    EAGER_BANDWIDTH of a copy's bandwidth on contiguous operands, EAGER_STRIDED_BANDWIDTH where an
    operand is a strided or broadcast view (``strided``: TensorIterator then loads element by element)."""
    return roofline(flops, nbytes, spec, dtype, mem_efficiency=EAGER_STRIDED_BANDWIDTH if strided else EAGER_BANDWIDTH,
                    launches=launches)


# --- communication -----------------------------------------------------------------------------------

def comm_efficiency(config: Optional[Mapping]) -> float:
    """Bandwidth fraction a communication kernel reaches with the SMs (CTAs) it was given."""
    sms = _get(config, None, "comm_sms")
    if sms is None:
        return 1.0
    return min(1.0, int(sms) / SMS_TO_SATURATE_LINKS)


def nccl_allreduce_time(nbytes: float, world: int, spec) -> float:
    """NCCL-like: ring for large messages, a tree/low-latency protocol for small, plus its call overhead."""
    if world <= 1:
        return 0.0
    small = alpha_beta(nbytes, world, spec, "two_shot") * 1.3      # LL protocol: half the bandwidth-ish
    large = alpha_beta(nbytes, world, spec, "ring")
    return min(small, large) + NCCL_EXTRA_LATENCY_S + spec.launch_us * 1e-6


def nccl_time(op: str, nbytes_per_rank: float, world: int, spec) -> float:
    if world <= 1:
        return 0.0
    if op == "allreduce":
        return nccl_allreduce_time(nbytes_per_rank, world, spec)
    algo = {"allgather": "allgather", "reducescatter": "reducescatter"}[op]
    return alpha_beta(nbytes_per_rank, world, spec, algo) + NCCL_EXTRA_LATENCY_S + spec.launch_us * 1e-6


def allreduce_time(nbytes: float, world: int, spec, config: Mapping) -> float:
    """The all-reduce term of a TP block under an all-reduce config: the link time of its algorithm
    (``strategy``: one_shot | two_shot) at the SMs it was given, plus a launch. (The allreduce
    template's own cost adds the pull variant's local staging; the block's term does not.)"""
    return alpha_beta(nbytes, world, spec, config["strategy"], comm_efficiency(config)) + spec.launch_us * 1e-6
