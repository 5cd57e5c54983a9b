"""Pack routed tokens by expert on the device, for the grouped expert GEMM (op ``moe_pack``).

Input: ``topk_ids`` [T, top_k] (any int dtype) from a router. Each flat slot ``s = t * top_k + j`` of
``topk_ids.flatten()`` goes to expert ``topk_ids[t, j]``. Output (``Packed``, int32 views of one buffer):

- ``sorted_ids`` [max_padded]: the slots sorted by expert, each expert's run padded up to a multiple of
  ``block_m``; padding (and everything past the padded count) holds the sentinel ``T * top_k``. Slots of
  one expert keep their original order (a stable sort), so the result is deterministic.
- ``block_expert`` [max_blocks]: the expert of each block of ``block_m`` sorted slots, -1 for the blocks
  past the padded count (the GEMM's programs there exit at once).
- ``padded_count`` [1]: the padded count, on the device.

Nothing is read back to the host: the shapes come from ``max_padded`` (shapes only), so the pack is
CUDA-graph capturable. Expert ids outside [0, experts) are dropped (not packed), so a rank holding
some of the experts can pass the others as -1. A dropped slot has no sorted slot, so ``moe_gemm`` never
writes its row: whatever sums rows per token must skip it. ``moe_gemm``'s ``combine="atomic"`` does (it
adds only the rows it computes), ``combine="reduce"`` does not (it sums every slot's row, written or
not), so the expert-parallel layer (``moe_block`` ep, which packs received rows with -1 past the received
count) runs its GEMMs without combine and sums in ``moe_alltoall.combine``, which reads only the rows
received and the ids in range.

Three launches: ``_count`` (per chunk of ``block`` slots, its count per expert; it also fills
``sorted_ids`` with the sentinel), ``_offsets`` (one program: each expert's padded start, each chunk's
start in its expert's run, ``block_expert``, ``padded_count``; it reads the counts a
[chunks, experts] tile at a time), ``_scatter`` (each slot's destination:
its chunk's start plus its rank among the chunk's slots of that expert, a cumulative sum of the
one-hot [block, experts] tile). When every slot fits one chunk (decode: a few tokens x top_k), config
``single`` runs the three as one program (``_pack_one``: one launch instead of three, the counts kept in
registers; a barrier orders its sentinel fill before its scatter). The tuned parameters are the chunk
size, the warps and ``single``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from tuneforge.dsl import Problem, Space, Template, categorical, pow2, register
from tuneforge.dsl.roofline import HBM_LATENCY_S, eager_time, roofline
from tuneforge.errors import InputError
from tuneforge.kernels._common import MAX_ELEMENTS_PER_THREAD, MAX_TILE_ELEMENTS, await_previous, chained

OP = "moe_pack"
# The template's problem (m, experts, topk) serves every GEMM block_m: the chunk tiles do not depend on
# it. Its inputs pack at this one.
PROBLEM_BLOCK_M = 64
_FILL = 1024     # sentinel stores per loop step of _count's fill (its share: max_padded / chunks)


class Packed(NamedTuple):
    sorted_ids: torch.Tensor     # int32 [max_padded]: flat slots t*top_k+j by expert; sentinel T*top_k pads
    block_expert: torch.Tensor   # int32 [max_blocks]: expert of each block_m-block of sorted_ids, -1 past the end
    padded_count: torch.Tensor   # int32 [1]: slots in use (a multiple of block_m), on the device
    block_m: int


def max_padded(tokens: int, top_k: int, experts: int, block_m: int) -> int:
    """The most sorted slots a pack can use: every slot, plus up to ``block_m - 1`` padding per expert,
    rounded up to ``block_m``. From shapes only (no device read)."""
    return triton.cdiv(tokens * top_k + experts * (block_m - 1), block_m) * block_m


def buffer_size(tokens: int, top_k: int, experts: int, block_m: int) -> int:
    """int32 elements of the one buffer a ``Packed`` views: sorted_ids, block_expert, padded_count."""
    padded = max_padded(tokens, top_k, experts, block_m)
    return padded + padded // block_m + 1


def _views(buf: torch.Tensor, padded: int, block_m: int) -> Packed:
    blocks = padded // block_m
    return Packed(buf[:padded], buf[padded:padded + blocks], buf[padded + blocks:], block_m)


def _check(topk_ids, num_experts, block_m) -> tuple[int, int]:
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dim() != 2:
        got = tuple(topk_ids.shape) if isinstance(topk_ids, torch.Tensor) else type(topk_ids).__name__
        raise InputError(f"{OP}: topk_ids must be a 2-D [tokens, top_k] tensor, got {got}")
    if topk_ids.dtype.is_floating_point or topk_ids.dtype == torch.bool or topk_ids.is_complex():
        raise InputError(f"{OP}: topk_ids must be an integer tensor, got {topk_ids.dtype}")
    if not isinstance(num_experts, int) or num_experts < 1:
        raise InputError(f"{OP}: num_experts must be an int >= 1, got {num_experts!r}")
    if not isinstance(block_m, int) or block_m < 1 or block_m & (block_m - 1):
        raise InputError(f"{OP}: block_m must be a power of two >= 1, got {block_m!r}")
    return topk_ids.shape


def _buffer(out, topk_ids, num_experts, block_m) -> torch.Tensor:
    t, k = topk_ids.shape
    size = buffer_size(t, k, num_experts, block_m)
    if out is None:
        return torch.empty(size, dtype=torch.int32, device=topk_ids.device)
    if not isinstance(out, torch.Tensor) or out.shape != (size,) or out.dtype != torch.int32 \
            or out.device != topk_ids.device or not out.is_contiguous():
        got = (tuple(out.shape), out.dtype, str(out.device)) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InputError(f"{OP}: out must be a contiguous int32 [{size}] tensor on {topk_ids.device} "
                         f"(buffer_size({t}, {k}, {num_experts}, {block_m})), got {got}")
    return out


# --- the kernels -------------------------------------------------------------------------------------

@triton.jit
def _one_hot(ids_ptr, chunk, slots, BLOCK: tl.constexpr, E_PAD: tl.constexpr):
    """A chunk's slots, their expert ids (-1 past the end) and its one-hot [BLOCK, E_PAD] tile (an id
    outside [0, E_PAD) matches no column; one in [experts, E_PAD) is masked by the caller)."""
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    ids = tl.load(ids_ptr + offs, mask=offs < slots, other=-1).to(tl.int32)
    return offs, ids, (ids[:, None] == tl.arange(0, E_PAD)[None, :]).to(tl.int32)


@triton.jit
def _fill_sentinel(sorted_ptr, start, stop, slots, FILL: tl.constexpr):
    for i in range(start, stop, FILL):
        fill = i + tl.arange(0, FILL)
        tl.store(sorted_ptr + fill, tl.full([FILL], 0, tl.int32) + slots, mask=fill < stop)


@triton.jit
def _store_block_experts(end, e_ok, padded_count, block_expert_ptr, blocks, BLOCK_M: tl.constexpr,
                         BLOCKS_TILE: tl.constexpr):
    """A block's expert: how many experts' padded runs end at or before its first slot (-1 past the
    padded count); ``end``: each expert's padded end (inclusive scan)."""
    end = tl.where(e_ok, end, padded_count + 1)            # padding columns never count
    for b0 in range(0, blocks, BLOCKS_TILE):
        b = b0 + tl.arange(0, BLOCKS_TILE)
        first = b * BLOCK_M
        expert = tl.sum((end[None, :] <= first[:, None]).to(tl.int32), axis=1)
        tl.store(block_expert_ptr + b, tl.where(first < padded_count, expert, -1), mask=b < blocks)


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, sorted_ptr, slots, experts, padded, fill_per_program,
                  BLOCK: tl.constexpr, E_PAD: tl.constexpr, FILL: tl.constexpr, PDL: tl.constexpr):
    await_previous(PDL)
    chunk = tl.program_id(0)
    offs, ids, hot = _one_hot(ids_ptr, chunk, slots, BLOCK, E_PAD)
    experts_range = tl.arange(0, E_PAD)
    tl.store(counts_ptr + chunk * experts + experts_range, tl.sum(hot, axis=0), mask=experts_range < experts)
    # this program's share of the sentinel fill (_scatter, a later launch, overwrites the used slots)
    start = chunk * fill_per_program
    _fill_sentinel(sorted_ptr, start, tl.minimum(start + fill_per_program, padded), slots, FILL)


@triton.jit
def _offsets_kernel(counts_ptr, offsets_ptr, block_expert_ptr, padded_count_ptr, chunks, experts, blocks,
                    BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, CHUNKS_TILE: tl.constexpr,
                    BLOCKS_TILE: tl.constexpr, PDL: tl.constexpr):
    await_previous(PDL)
    experts_range = tl.arange(0, E_PAD)
    e_ok = experts_range < experts
    total = tl.zeros([E_PAD], dtype=tl.int32)
    for c0 in range(0, chunks, CHUNKS_TILE):                # [CHUNKS_TILE, experts] counts per step
        c = c0 + tl.arange(0, CHUNKS_TILE)
        tile_mask = (c < chunks)[:, None] & e_ok[None, :]
        total += tl.sum(tl.load(counts_ptr + c[:, None] * experts + experts_range[None, :], mask=tile_mask,
                                other=0), axis=0)
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(padded, axis=0)                        # each expert's padded end (inclusive scan)
    running = end - padded                                 # the next free slot of each expert's run
    for c0 in range(0, chunks, CHUNKS_TILE):               # chunks in order: the sort is stable
        c = c0 + tl.arange(0, CHUNKS_TILE)
        tile_mask = (c < chunks)[:, None] & e_ok[None, :]
        where = c[:, None] * experts + experts_range[None, :]
        counts = tl.load(counts_ptr + where, mask=tile_mask, other=0)
        before = tl.cumsum(counts, axis=0) - counts        # earlier chunks of this tile, per expert
        tl.store(offsets_ptr + where, running[None, :] + before, mask=tile_mask)
        running += tl.sum(counts, axis=0)
    padded_count = tl.sum(padded, axis=0)
    tl.store(padded_count_ptr, padded_count)
    _store_block_experts(end, e_ok, padded_count, block_expert_ptr, blocks, BLOCK_M, BLOCKS_TILE)


@triton.jit
def _scatter_kernel(ids_ptr, offsets_ptr, sorted_ptr, slots, experts,
                    BLOCK: tl.constexpr, E_PAD: tl.constexpr, PDL: tl.constexpr):
    await_previous(PDL)
    chunk = tl.program_id(0)
    offs, ids, hot = _one_hot(ids_ptr, chunk, slots, BLOCK, E_PAD)
    rank = tl.sum(tl.cumsum(hot, axis=0) * hot, axis=1) - 1          # earlier slots of the same expert
    valid = (ids >= 0) & (ids < experts)
    start = tl.load(offsets_ptr + chunk * experts + ids, mask=valid, other=0)
    tl.store(sorted_ptr + start + rank, offs, mask=valid)


@triton.jit
def _pack_one_kernel(ids_ptr, sorted_ptr, block_expert_ptr, padded_count_ptr, slots, experts, padded, blocks,
                     BLOCK_M: tl.constexpr, BLOCK: tl.constexpr, E_PAD: tl.constexpr, FILL: tl.constexpr,
                     BLOCKS_TILE: tl.constexpr, PDL: tl.constexpr):
    """All three launches' work in one program, for ``slots <= BLOCK``: the counts stay in registers."""
    await_previous(PDL)
    offs, ids, hot = _one_hot(ids_ptr, 0, slots, BLOCK, E_PAD)
    e_ok = tl.arange(0, E_PAD) < experts
    runs = (tl.where(e_ok, tl.sum(hot, axis=0), 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    end = tl.cumsum(runs, axis=0)
    rank = tl.sum(tl.cumsum(hot, axis=0) * hot, axis=1) - 1
    dest = tl.sum(hot * (end - runs)[None, :], axis=1) + rank           # its expert's start + its rank
    _fill_sentinel(sorted_ptr, 0, padded, slots, FILL)
    tl.debug_barrier()                                     # the fill's stores land before the scatter's
    tl.store(sorted_ptr + dest, offs, mask=(ids >= 0) & (ids < experts))
    padded_count = tl.sum(runs, axis=0)
    tl.store(padded_count_ptr, padded_count)
    _store_block_experts(end, e_ok, padded_count, block_expert_ptr, blocks, BLOCK_M, BLOCKS_TILE)


def pack(topk_ids: torch.Tensor, num_experts: int, block_m: int, *, out: Optional[torch.Tensor] = None,
         config: Optional[dict] = None) -> Packed:
    """``topk_ids`` [T, top_k] packed by expert into runs padded to ``block_m`` (see the module doc);
    ``out``: an int32 [buffer_size(...)] buffer the result views (allocated when None)."""
    t, k = _check(topk_ids, num_experts, block_m)
    buf = _buffer(out, topk_ids, num_experts, block_m)
    padded = max_padded(t, k, num_experts, block_m)
    packed = _views(buf, padded, block_m)
    slots = t * k
    cfg = config or default(slots, num_experts)
    e_pad = triton.next_power_of_2(num_experts)
    chunks = max(1, triton.cdiv(slots, cfg["block"]))
    ids = topk_ids.contiguous().view(-1)       # the kernels index it densely (a strided column would not be)
    blocks = padded // block_m
    tile = lambda n: max(1, min(triton.next_power_of_2(n), MAX_TILE_ELEMENTS // e_pad))  # noqa: E731
    if cfg.get("single"):       # (a config stored before ``single`` existed ran three launches)
        if chunks > 1:
            raise InputError(f"{OP}: config single=1 packs in one program: {slots} slots > block {cfg['block']}")
        _pack_one_kernel[(1,)](ids, packed.sorted_ids, packed.block_expert, packed.padded_count, slots,
                               num_experts, padded, blocks, BLOCK_M=block_m, BLOCK=cfg["block"], E_PAD=e_pad,
                               FILL=_FILL, BLOCKS_TILE=tile(blocks), num_warps=cfg["num_warps"], **chained(ids))
        return packed
    counts = torch.empty(chunks, num_experts, dtype=torch.int32, device=buf.device)
    offsets = torch.empty_like(counts)
    fill = triton.cdiv(padded, chunks)
    _count_kernel[(chunks,)](ids, counts, packed.sorted_ids, slots, num_experts, padded, fill,
                             BLOCK=cfg["block"], E_PAD=e_pad, FILL=_FILL, num_warps=cfg["num_warps"], **chained(ids))
    _offsets_kernel[(1,)](counts, offsets, packed.block_expert, packed.padded_count, chunks, num_experts, blocks,
                          BLOCK_M=block_m, E_PAD=e_pad, CHUNKS_TILE=tile(chunks), BLOCKS_TILE=tile(blocks),
                          num_warps=4, **chained(ids))
    _scatter_kernel[(chunks,)](ids, offsets, packed.sorted_ids, slots, num_experts,
                               BLOCK=cfg["block"], E_PAD=e_pad, num_warps=cfg["num_warps"], **chained(ids))
    return packed


def reference(topk_ids: torch.Tensor, num_experts: int, block_m: int, *, out: Optional[torch.Tensor] = None
              ) -> Packed:
    """torch, no host sync: a stable argsort of the slots by expert, each expert's run padded to block_m.
    Also the baseline (what a torch user runs)."""
    t, k = _check(topk_ids, num_experts, block_m)
    buf = _buffer(out, topk_ids, num_experts, block_m)
    padded = max_padded(t, k, num_experts, block_m)
    packed = _views(buf, padded, block_m)
    flat = topk_ids.reshape(-1).long()
    key = torch.where((flat >= 0) & (flat < num_experts), flat, num_experts)   # dropped ids sort last
    order = torch.argsort(key, stable=True)
    # scatter_add, not bincount (which reads the largest id back on CUDA)
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=flat.device).scatter_add_(
        0, key, torch.ones_like(key))[:num_experts]
    runs = (counts + block_m - 1) // block_m * block_m
    end, count_end = torch.cumsum(runs, 0), torch.cumsum(counts, 0)
    e = key[order]
    kept = e < num_experts
    e_kept = e.clamp(max=num_experts - 1)
    dest = (end - runs)[e_kept] + torch.arange(t * k, device=flat.device) - (count_end - counts)[e_kept]
    # dropped slots go to one spare slot past the end (a boolean index would read a count back)
    sorted_ids = torch.full((padded + 1,), t * k, dtype=torch.int32, device=flat.device)
    sorted_ids.scatter_(0, torch.where(kept, dest, padded), order.int())
    packed.sorted_ids.copy_(sorted_ids[:padded])
    first = torch.arange(padded // block_m, device=flat.device) * block_m
    expert = torch.searchsorted(end, first, right=True).int()
    packed.block_expert.copy_(torch.where(first < end[-1], expert, -1))
    packed.padded_count.copy_(end[-1:])
    return packed


# --- the template -------------------------------------------------------------------------------------

def default(slots: int, experts: int) -> dict:
    """Chunks of up to 256 slots (fewer when the one-hot tile of many experts would spill); one program
    (``single``) where they all fit one chunk."""
    e_pad = triton.next_power_of_2(experts)
    block = max(16, min(256, triton.next_power_of_2(max(1, slots)), MAX_TILE_ELEMENTS // e_pad))
    return {"block": block, "num_warps": max(1, min(8, block * e_pad // 2048)), "single": int(slots <= block)}


def space(problem: Problem) -> Space:
    slots = problem["m"] * problem["topk"]
    return Space(pow2("block", 16, max(16, min(1024, triton.next_power_of_2(slots)))),
                 categorical("num_warps", (1, 2, 4, 8)), categorical("single", (0, 1)))


def tile_fits(config: dict, problem: Problem, spec) -> Optional[str]:
    if problem["topk"] > problem["experts"]:       # a router picks distinct experts
        return f"topk {problem['topk']} > {problem['experts']} experts"
    slots = problem["m"] * problem["topk"]
    if config["single"] and slots > config["block"]:
        return f"single packs in one program: {slots} slots > block {config['block']}"
    elements = config["block"] * triton.next_power_of_2(problem["experts"])
    if elements > 2 * MAX_TILE_ELEMENTS:
        return f"one-hot tile {config['block']}x{problem['experts']} experts > {2 * MAX_TILE_ELEMENTS} elements"
    if elements / (config["num_warps"] * 32) > 4 * MAX_ELEMENTS_PER_THREAD:
        return f"{elements // (config['num_warps'] * 32)} one-hot elements per thread (register spills)"
    return None


def make_inputs(problem: Problem, device, seed: int = 0, ctx=None) -> dict:
    """A router's ids: each token's top_k distinct experts, skewed toward the first experts (ragged counts)."""
    m, e, k, bm = problem["m"], problem["experts"], problem["topk"], PROBLEM_BLOCK_M
    g = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(m, e, generator=g, device=device) - torch.linspace(0, 2, e, device=device)
    ids = torch.topk(logits, k, dim=-1).indices.int()
    return {"topk_ids": ids, "num_experts": e, "block_m": bm,
            "out": torch.empty(buffer_size(m, k, e, bm), dtype=torch.int32, device=device)}


def _launch(topk_ids, num_experts, block_m, out=None, config=None) -> torch.Tensor:
    buf = _buffer(out, topk_ids, num_experts, block_m)
    pack(topk_ids, num_experts, block_m, out=buf, config=config)
    return buf


def _reference(topk_ids, num_experts, block_m) -> torch.Tensor:
    return torch.cat(reference(topk_ids, num_experts, block_m)[:3])


def work(problem: Problem) -> tuple[float, float]:
    """Read the ids twice, write the sorted slots and the block experts."""
    m, e, k, bm = problem["m"], problem["experts"], problem["topk"], PROBLEM_BLOCK_M
    return 0.0, float(4 * (2 * m * k + buffer_size(m, k, e, bm)))


# The torch pack (``reference``): about 40 eager kernels (argsort's, the counts' scatter, cumsums, the
# index arithmetic, the scatters and copies; the H200 tune of 2026-12-02: 65 us at 1 token)
BASELINE_LAUNCHES = 36
# one program's dependent round trips: the ids, the fill before the barrier, the scatter, the block experts
SINGLE_ROUND_TRIPS = 5


def cost(problem: Problem, config: Optional[dict], spec) -> float:
    """``single``: one launch whose program makes SINGLE_ROUND_TRIPS dependent trips to memory; else the
    three launches (count, offsets, scatter), the offsets' one program a trip more; the baseline:
    BASELINE_LAUNCHES eager kernels."""
    _, nbytes = work(problem)
    if config is None:
        return eager_time(0.0, 4 * nbytes, spec, BASELINE_LAUNCHES)
    if config["single"]:
        return roofline(0.0, nbytes, spec, mem_efficiency=0.1, launches=1) + SINGLE_ROUND_TRIPS * HBM_LATENCY_S
    return roofline(0.0, nbytes, spec, mem_efficiency=0.5, launches=3) + HBM_LATENCY_S


TEMPLATE = register(Template(
    op=OP,
    space=space,
    make_inputs=make_inputs,
    launch=_launch,
    reference=_reference,
    baseline=_reference,
    default_config=lambda problem, spec: default(problem["m"] * problem["topk"], problem["experts"]),
    work=work,
    cost=cost,
    constraints=(tile_fits,),
    doc=__doc__.split("\n")[0],
))
