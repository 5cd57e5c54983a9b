"""Expert-parallel all-to-all over the symmetric heap: ``dispatch`` tokens to the ranks owning their
experts, ``combine`` the experts' outputs back (op ``moe_alltoall``), in two forms (config ``form``):
``low_latency`` (decode-sized: direct remote stores) and ``staged`` (prefill-sized: each side stages
its rows locally, in the order the peer reads them, and the peer pulls them in chunks of ``signal_rows``
rows, one flag per chunk, so it starts on the first chunks while the rest are still being staged).

Placement: experts are contiguous, rank ``r`` owns ``[r * E / W, (r + 1) * E / W)`` (E divisible by W).
An entry ``(token t, slot j)`` of ``topk_ids`` [T, k] goes to the owner of its expert; ids outside
``[0, E)`` are not sent (EP can pass -1, as for ``moe_pack``) and add nothing in the combine. Every
rank passes the same H, k and dtype and the same ``max_tokens`` >= its T (the heap buffers and program
counts follow from them, collectively); T itself may differ.

dispatch (no host sync):

1. ``_route_kernel`` (one program): each entry's position among this rank's entries for its owner
   (``pos``), the entries in owner order (``order``, the staged send order), and the per-owner counts,
   stored into row ``rank`` of every rank's count matrix ``M`` [W, W] (``M[s, d]``: entries s sends d)
   and signalled (kind ``counts``, one signal per (src, dst) pair).
2. low_latency, ``_dispatch_kernel`` (``comm_sms`` programs): after the peers' counts, entry ``(t, j)``
   with owner d lands in d's receive buffer at row ``sum_{s < rank} M[s, d] + pos`` with its meta (local
   expert id, source rank, token, slot); each program signals every peer once (kind ``rows``, its slot)
   and waits for theirs.
   staged, ``_stage_kernel`` then ``_pull_kernel`` (``comm_sms`` programs each): this rank's entries
   copied, in ``order``, into its own send area (rows and meta), a flag released per chunk of
   ``signal_rows`` rows; each receiver, after the counts, pulls its range of every source's send area
   (rows ``sum_{d < me} M[s, d]`` on) chunk by chunk, each chunk once its flag is up (kind ``chunk``).
   Both forms fill the receive buffer alike: rows grouped by source rank, then in (token, slot) order.

Capacity: ``R_max = W * max_tokens * k``, the worst case (every entry of every rank to one rank), so
nothing is ever dropped. Rows ``[count, R_max)`` of a call get local expert id -1 (dropped by
``moe_pack``); the received count is on the device (``Dispatched.count``).

combine: low_latency, ``_combine_push_kernel`` stores received row i of ``y_recv`` into its source
rank's area [max_tokens * k, H] at ``token * k + slot`` and signals (kind ``rows``), then
``_combine_reduce_kernel`` sums each token's k rows weighted by ``topk_weights`` in fp32. staged,
``_combine_stage_kernel`` copies ``y_recv``'s received rows into this rank's own area (a flag per chunk
of ``signal_rows``, then a signal to every peer, kind ``rows``) and ``_combine_pull_kernel`` reads
each token's k rows straight from their owners' areas (after the owner's chunk flag) into the
weighted fp32 sum.

Buffers and epochs (no clearing between calls, CUDA-graph safe): the receive buffer (rows, meta) is
single, at fixed heap addresses (the returned views stay valid until the next dispatch on the
channel): low_latency senders write it in call e + 1 only after the receiver's ``counts`` signal of
e + 1, sent after everything the receiver queued before (its use of call e's rows); staged, only its
owner writes it. The count matrix, the staged send areas and the combine areas follow the epoch's
parity (``comm.py``): written in call e, next in call e + 2, and in call e + 1 every rank waited for a
signal every peer sent after it was done with call e (the counts; the combine's ``rows``). The forms
share one channel per direction, so a tuner may switch forms between calls.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from tuneforge.dsl import Problem, Space, Template, categorical, pow2, register
from tuneforge.dsl.comm import (MAX_SLOTS, epoch_begin, epoch_end_of, release, remote_load, remote_store,
                                signal_peers, translate, wait_flag, wait_peers)
from tuneforge.dsl.roofline import alpha_beta, comm_efficiency, nccl_time
from tuneforge.errors import InputError
from tuneforge.kernels._common import check_tensor, copy_rows, output_tensor, rank_generator

OP = "moe_alltoall"
FORMS = ("low_latency", "staged")
SIGNAL_ROWS = (16, 64, 256)     # the staged form's rows per chunk flag (its signal granularity)
KINDS = ("counts", "rows", "chunk")      # signal kinds of both channels, as errors name them
CHUNK = tl.constexpr(2)                  # the kind a chunk-flag wait reports (its slot: the chunk)
META = tl.constexpr(4)   # per received row (int32): local expert, source rank, source token, source slot
# messages (rows one rank sends, bytes) up to this size default to low_latency, larger to staged
LOW_LATENCY_MAX_BYTES = 1 << 20
LL_LINK_EFFICIENCY = 0.6   # cost model: link bandwidth row-by-row remote stores reach (bulk pulls: 1)


# --- device code ---------------------------------------------------------------------------------------

@triton.jit
def _owner(ids, experts, local_experts):
    """The rank owning each expert id; -1 for ids outside [0, experts) (not sent)."""
    return tl.where((ids >= 0) & (ids < experts), ids // local_experts, -1)


@triton.jit
def _meta(fields, expert, owner, local_experts, rank, e, top_k):
    """An entry's meta as its receiver stores it: (local expert, source rank, token, slot)."""
    t = e // top_k
    return tl.where(fields == 0, expert - owner * local_experts,
                    tl.where(fields == 1, rank, tl.where(fields == 2, t, e - t * top_k)))


@triton.jit(do_not_specialize=["rank", "max_spins"])
def _route_kernel(ids, pos, order, matrix, entries, experts, local_experts, total_programs,
                  bases, flags, state, rank, world, max_spins, BLOCK_E: tl.constexpr):
    epoch = epoch_begin(state)
    mat = matrix + (epoch % 2) * world * world
    offs = tl.arange(0, BLOCK_E)
    sent = 0
    for dst in range(0, world):
        running = 0
        for e0 in range(0, entries, BLOCK_E):
            e = e0 + offs
            owner = _owner(tl.load(ids + e, mask=e < entries, other=-1), experts, local_experts)
            mine = (owner == dst).to(tl.int32)
            at = running + tl.cumsum(mine, 0) - 1
            tl.store(pos + e, at, mask=mine != 0)
            tl.store(order + sent + at, e, mask=mine != 0)
            running += tl.sum(mine, 0)
        for q in range(0, world):         # my row of every rank's count matrix (mine too)
            remote_store(mat, rank * world + dst, running, rank, q, bases, True)
        sent += running
    signal_peers(flags, 0, 0, epoch, rank, world, bases)
    epoch_end_of(state, epoch, total_programs)


@triton.jit
def _received(matrix, meta, count, counts, capacity, epoch, flags, state, rank, world, max_spins):
    """After every peer's counts: the rows this rank receives (program 0 stores them and copies the count
    matrix to ``counts``); rows no sender writes this call get expert -1."""
    pid = tl.program_id(0)
    wait_peers(flags, 0, 0, epoch, rank, world, state, max_spins)
    mat = matrix + (epoch % 2) * world * world
    received = 0
    for s in range(0, world):
        received += tl.load(mat + s * world + rank)
    if pid == 0:
        tl.store(count, received)
        for i in range(0, world * world):
            tl.store(counts + i, tl.load(mat + i))
    for r in range(received + pid, capacity, tl.num_programs(0)):
        tl.store(meta + r * META, -1)
    return mat, received


@triton.jit(do_not_specialize=["rank", "max_spins"])
def _dispatch_kernel(x, ids, pos, matrix, meta, rows, count, counts, entries, hidden, top_k, experts,
                     local_experts, capacity, stride_x, total_programs, bases, flags, state, rank, world, max_spins,
                     BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    epoch = epoch_begin(state)
    mat, received = _received(matrix, meta, count, counts, capacity, epoch, flags, state, rank, world, max_spins)
    offs = tl.arange(0, BLOCK)
    fields = tl.arange(0, META)
    for e in range(pid, entries, programs):
        expert = tl.load(ids + e)
        dst = _owner(expert, experts, local_experts)
        if dst >= 0:
            row = tl.load(pos + e)
            for s in range(0, rank):
                row += tl.load(mat + s * world + dst)
            info = _meta(fields, expert, dst, local_experts, rank, e, top_k)
            remote_store(meta, row * META + fields, info, rank, dst, bases, True)
            t = e // top_k
            for h0 in range(0, hidden, BLOCK):
                h = h0 + offs
                mask = h < hidden
                v = tl.load(x + tl.cast(t, tl.int64) * stride_x + h, mask=mask)
                remote_store(rows, tl.cast(row, tl.int64) * hidden + h, v, rank, dst, bases, mask)
    signal_peers(flags, 1, pid, epoch, rank, world, bases)
    wait_peers(flags, 1, pid, epoch, rank, world, state, max_spins)
    epoch_end_of(state, epoch, total_programs)


@triton.jit(do_not_specialize=["rank", "max_spins"])
def _stage_kernel(x, ids, order, matrix, send_meta, send_rows, chunk_flags, area_elems, hidden, top_k, experts,
                  local_experts, stride_x, total_programs, bases, flags, state, rank, world, max_spins,
                  SIGNAL_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """This rank's sent entries (ids in range; my row of the count matrix) into its own send area in
    owner order, a flag per chunk of SIGNAL_ROWS rows."""
    pid = tl.program_id(0)
    epoch = epoch_begin(state)
    parity = epoch % 2
    entries = 0
    for d in range(0, world):
        entries += tl.load(matrix + parity * world * world + rank * world + d)
    smeta = send_meta + parity * area_elems * META
    srows = send_rows + tl.cast(parity * area_elems, tl.int64) * hidden
    fields = tl.arange(0, META)
    for c in range(pid, tl.cdiv(entries, SIGNAL_ROWS), tl.num_programs(0)):
        for r in range(c * SIGNAL_ROWS, tl.minimum(entries, (c + 1) * SIGNAL_ROWS)):
            e = tl.load(order + r)
            expert = tl.load(ids + e)
            tl.store(smeta + r * META + fields, _meta(fields, expert, _owner(expert, experts, local_experts),
                                                      local_experts, rank, e, top_k))
            copy_rows(x + tl.cast(e // top_k, tl.int64) * stride_x, srows + tl.cast(r, tl.int64) * hidden, hidden,
                      BLOCK)
        release(chunk_flags + c, epoch)
    epoch_end_of(state, epoch, total_programs)


@triton.jit(do_not_specialize=["rank", "max_spins"])
def _pull_kernel(matrix, meta, rows, count, counts, send_meta, send_rows, chunk_flags, area_elems, hidden,
                 capacity, total_programs, bases, flags, state, rank, world, max_spins,
                 SIGNAL_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Every source's rows for this rank, pulled from its send area chunk by chunk."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    epoch = epoch_begin(state)
    parity = epoch % 2
    smeta = send_meta + parity * area_elems * META
    srows = send_rows + tl.cast(parity * area_elems, tl.int64) * hidden
    mat, received = _received(matrix, meta, count, counts, capacity, epoch, flags, state, rank, world, max_spins)
    offs = tl.arange(0, BLOCK)
    fields = tl.arange(0, META)
    base = 0                                       # where source s's rows land here
    for s in range(0, world):
        first = 0                                  # s's first send row for me
        for d in range(0, rank):
            first += tl.load(mat + s * world + d)
        n = tl.load(mat + s * world + rank)
        for c in range(first // SIGNAL_ROWS + pid, tl.cdiv(first + n, SIGNAL_ROWS), programs):
            wait_flag(translate(chunk_flags + c, rank, s, bases), epoch, state, max_spins, s, CHUNK, c)
            for r in range(tl.maximum(first, c * SIGNAL_ROWS), tl.minimum(first + n, (c + 1) * SIGNAL_ROWS)):
                dest = base + r - first
                tl.store(meta + dest * META + fields, remote_load(smeta, r * META + fields, rank, s, bases, True))
                for h0 in range(0, hidden, BLOCK):
                    h = h0 + offs
                    mask = h < hidden
                    v = remote_load(srows, tl.cast(r, tl.int64) * hidden + h, rank, s, bases, mask)
                    tl.store(rows + tl.cast(dest, tl.int64) * hidden + h, v, mask=mask)
        base += n
    epoch_end_of(state, epoch, total_programs)


@triton.jit(do_not_specialize=["rank", "max_spins"])
def _combine_push_kernel(y, meta, count, stage, slot_elems, hidden, top_k, stride_y, total_programs,
                         bases, flags, state, rank, world, max_spins, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    epoch = epoch_begin(state)
    area = stage + (epoch % 2) * slot_elems
    offs = tl.arange(0, BLOCK)
    received = tl.load(count)
    for r in range(pid, received, programs):
        src = tl.load(meta + r * META + 1)
        dest = tl.cast(tl.load(meta + r * META + 2) * top_k + tl.load(meta + r * META + 3), tl.int64) * hidden
        for h0 in range(0, hidden, BLOCK):
            h = h0 + offs
            mask = h < hidden
            v = tl.load(y + tl.cast(r, tl.int64) * stride_y + h, mask=mask)
            remote_store(area, dest + h, v, rank, src, bases, mask)
    signal_peers(flags, 1, pid, epoch, rank, world, bases)
    wait_peers(flags, 1, pid, epoch, rank, world, state, max_spins)
    epoch_end_of(state, epoch, total_programs)


@triton.jit(do_not_specialize=["rank", "max_spins"])
def _combine_reduce_kernel(ids, weights, out, stage, slot_elems, hidden, top_k, experts, stride_w, stride_o,
                           total_programs, bases, flags, state, rank, world, max_spins, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    epoch = epoch_begin(state)
    area = stage + (epoch % 2) * slot_elems
    h = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = h < hidden
    acc = tl.zeros((BLOCK,), tl.float32)
    for j in range(0, top_k):
        expert = tl.load(ids + t * top_k + j)
        if (expert >= 0) & (expert < experts):
            w = tl.load(weights + t * stride_w + j).to(tl.float32)
            v = tl.load(area + tl.cast(t * top_k + j, tl.int64) * hidden + h, mask=mask, other=0.0)
            acc += w * v.to(tl.float32)
    tl.store(out + tl.cast(t, tl.int64) * stride_o + h, acc.to(out.dtype.element_ty), mask=mask)
    epoch_end_of(state, epoch, total_programs)


@triton.jit(do_not_specialize=["rank", "max_spins"])
def _combine_stage_kernel(y, count, stage, slot_elems, chunk_flags, hidden, stride_y, total_programs,
                          bases, flags, state, rank, world, max_spins, SIGNAL_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """The received rows' outputs into this rank's own area, a flag per chunk; then every peer told."""
    pid = tl.program_id(0)
    epoch = epoch_begin(state)
    area = stage + (epoch % 2) * slot_elems
    received = tl.load(count)
    for c in range(pid, tl.cdiv(received, SIGNAL_ROWS), tl.num_programs(0)):
        for r in range(c * SIGNAL_ROWS, tl.minimum(received, (c + 1) * SIGNAL_ROWS)):
            copy_rows(y + tl.cast(r, tl.int64) * stride_y, area + tl.cast(r, tl.int64) * hidden, hidden, BLOCK)
        release(chunk_flags + c, epoch)
    signal_peers(flags, 1, pid, epoch, rank, world, bases)
    epoch_end_of(state, epoch, total_programs)


@triton.jit(do_not_specialize=["rank", "max_spins"])
def _combine_pull_kernel(ids, weights, pos, counts, out, stage, slot_elems, chunk_flags, tokens, hidden, top_k,
                         experts, local_experts, stage_programs, stride_w, stride_o, total_programs,
                         bases, flags, state, rank, world, max_spins, SIGNAL_ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """Each token's rows read from their owners' areas (after the chunk's flag), weighted, summed in fp32.
    Every program first waits for one ``rows`` signal of every peer (sent after the peer's reads of the
    previous call with this parity: what lets the areas be reused)."""
    t = tl.program_id(0)
    epoch = epoch_begin(state)
    area = stage + (epoch % 2) * slot_elems
    wait_peers(flags, 1, (t * tl.num_programs(1) + tl.program_id(1)) % stage_programs, epoch, rank, world, state,
               max_spins)
    h = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = h < hidden
    acc = tl.zeros((BLOCK,), tl.float32)
    if t < tokens:
        for j in range(0, top_k):
            expert = tl.load(ids + t * top_k + j)
            owner = _owner(expert, experts, local_experts)
            if owner >= 0:
                row = tl.load(pos + t * top_k + j)
                for s in range(0, rank):
                    row += tl.load(counts + s * world + owner)
                wait_flag(translate(chunk_flags + row // SIGNAL_ROWS, rank, owner, bases), epoch, state, max_spins,
                          owner, CHUNK, row // SIGNAL_ROWS)
                w = tl.load(weights + t * stride_w + j).to(tl.float32)
                v = remote_load(area, tl.cast(row, tl.int64) * hidden + h, rank, owner, bases, mask)
                acc += w * v.to(tl.float32)
        tl.store(out + tl.cast(t, tl.int64) * stride_o + h, acc.to(out.dtype.element_ty), mask=mask)
    epoch_end_of(state, epoch, total_programs)


# --- host side -----------------------------------------------------------------------------------------

@dataclass
class Dispatched:
    """What ``dispatch`` returns on each rank: the rows routed to its experts and how to send them back.
    ``x``, ``expert``, ``source``, ``meta``: views of heap buffers, overwritten by the next ``dispatch`` on
    this context and channel."""
    x: torch.Tensor            # [R_max, H] received rows; rows [count, R_max) stale
    expert: torch.Tensor       # [R_max] int32 local expert ids; -1 from row count on
    source: torch.Tensor       # [R_max, 3] int32 (source rank, token, slot)
    count: torch.Tensor        # [1] int32 received rows (on the device; no host sync)
    counts: torch.Tensor       # [W, W] int32: entries rank s sent rank d
    meta: torch.Tensor         # [R_max, 4] int32 (expert, source rank, token, slot)
    topk_ids: torch.Tensor     # this rank's [T, k] ids (the combine skips ids outside [0, E))
    pos: torch.Tensor          # [T * k] int32: each entry's row among this rank's rows for its owner
    experts: int


def _round(nbytes: int) -> int:
    return (nbytes + 255) // 256 * 256


def _check_routing(x, topk_ids, experts: int, ctx) -> tuple[int, int, int]:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise InputError(f"{OP}: x must be a 2-D tensor [tokens, hidden], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    tokens, hidden = x.shape
    check_tensor(OP, "x", x, (tokens, hidden), None, ctx.device, "rows")
    if not isinstance(topk_ids, torch.Tensor) or topk_ids.dim() != 2 or topk_ids.shape[0] != tokens:
        raise InputError(f"{OP}: topk_ids must be [tokens={tokens}, top_k], got "
                         f"{tuple(topk_ids.shape) if isinstance(topk_ids, torch.Tensor) else type(topk_ids).__name__}")
    if topk_ids.dtype != torch.int32 or not topk_ids.is_contiguous() or topk_ids.device != ctx.device:
        raise InputError(f"{OP}: topk_ids must be a contiguous int32 tensor on {ctx.device}, got "
                         f"{topk_ids.dtype} on {topk_ids.device}")
    if isinstance(experts, bool) or not isinstance(experts, int) or experts < 1 or experts % ctx.size:
        raise InputError(f"{OP}: experts={experts!r} must be a positive multiple of the world size {ctx.size}")
    return tokens, hidden, topk_ids.shape[1]


def _form(cfg: dict) -> str:
    form = cfg.get("form", "low_latency")
    if form not in FORMS:
        raise InputError(f"{OP}: form must be one of {FORMS}, got {form!r}")
    if form == "staged" and cfg.get("signal_rows") not in SIGNAL_ROWS:
        raise InputError(f"{OP}: the staged form needs signal_rows in {SIGNAL_ROWS}, got {cfg.get('signal_rows')!r}")
    return form


def _programs(config: dict, work: int) -> int:
    return max(1, min(int(config["comm_sms"]), MAX_SLOTS.value, work))


def dispatch(x: torch.Tensor, topk_ids: torch.Tensor, *, ctx, experts: int, max_tokens: Optional[int] = None,
             channel: str = "", config: Optional[dict] = None) -> Dispatched:
    """Send each row of ``x`` [T, H] to the ranks owning its ``topk_ids`` [T, k] (int32) experts out of
    ``experts``. ``max_tokens`` (default T): the most tokens any rank passes, the same on every rank (it
    sizes the heap buffers, carved collectively). ``channel``: a suffix naming a separate set of
    buffers (several dispatches in flight at once). Collective."""
    tokens, hidden, top_k = _check_routing(x, topk_ids, experts, ctx)
    max_tokens = tokens if max_tokens is None else max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < tokens:
        raise InputError(f"{OP}: max_tokens={max_tokens!r} must be an int >= the {tokens} tokens passed")
    world, entries = ctx.size, tokens * top_k
    cfg = config or default_config(_problem(x, hidden, max_tokens, experts, top_k, world))
    form = _form(cfg)
    area = max(1, max_tokens * top_k)               # the most entries a rank sends
    capacity = world * max_tokens * top_k
    size = x.element_size()
    # [count matrix x 2 parities | meta | rows | staged send meta x 2 | staged send rows x 2]
    layout = [_round(2 * world * world * 4), _round(max(1, capacity) * META.value * 4),
              _round(capacity * hidden * size), _round(2 * area * META.value * 4), _round(2 * area * hidden * size)]
    ch = ctx.channel(OP + ".dispatch" + channel, (sum(layout) + 1) // 2)
    ch.kinds = KINDS
    i32 = ch.staging(torch.int32)
    starts = [sum(layout[:i]) for i in range(len(layout))]
    matrix = i32[: 2 * world * world]
    meta = i32[starts[1] // 4: starts[1] // 4 + capacity * META.value].view(capacity, META.value)
    rows = ch.staging(x.dtype)[starts[2] // size:][: capacity * hidden].view(capacity, hidden)
    pos = torch.empty(max(1, entries), dtype=torch.int32, device=x.device)
    order = torch.empty(max(1, entries), dtype=torch.int32, device=x.device)
    count = torch.empty(1, dtype=torch.int32, device=x.device)
    counts = torch.empty((world, world), dtype=torch.int32, device=x.device)
    programs = _programs(cfg, area)           # the same on every rank: slots pair up
    block_e = max(16, min(1024, triton.next_power_of_2(max(1, entries))))
    local = experts // world
    block = _block(cfg, hidden)
    stages = 2 if form == "staged" else 1
    ch.launch(_route_kernel, (1,), topk_ids, pos, order, matrix, entries, experts, local, 1 + stages * programs,
              *ch.args(), BLOCK_E=block_e)
    if form == "low_latency":
        ch.launch(_dispatch_kernel, (programs,), x, topk_ids, pos, matrix, meta, rows, count, counts, entries, hidden,
                  top_k, experts, local, capacity, x.stride(0), 1 + programs, *ch.args(), BLOCK=block,
                  num_warps=cfg["num_warps"])
    else:
        send_meta = i32[starts[3] // 4:][: 2 * area * META.value]
        send_rows = ch.staging(x.dtype)[starts[4] // size:][: 2 * area * hidden]
        chunk_flags = ch.tile_flags(triton.cdiv(area, min(SIGNAL_ROWS)))
        ch.launch(_stage_kernel, (programs,), x, topk_ids, order, matrix, send_meta, send_rows, chunk_flags, area,
                  hidden, top_k, experts, local, x.stride(0), 1 + 2 * programs, *ch.args(),
                  SIGNAL_ROWS=cfg["signal_rows"], BLOCK=block, num_warps=cfg["num_warps"])
        ch.launch(_pull_kernel, (programs,), matrix, meta, rows, count, counts, send_meta, send_rows, chunk_flags, area,
                  hidden, capacity, 1 + 2 * programs, *ch.args(), SIGNAL_ROWS=cfg["signal_rows"], BLOCK=block,
                  num_warps=cfg["num_warps"])
    return Dispatched(rows, meta[:, 0], meta[:, 1:], count, counts, meta, topk_ids, pos, experts)


def combine(y_recv: torch.Tensor, topk_weights: torch.Tensor, dispatched: Dispatched, *, ctx,
            out: Optional[torch.Tensor] = None, channel: str = "", config: Optional[dict] = None) -> torch.Tensor:
    """Send the experts' outputs ``y_recv`` [R_max, H] of ``dispatched``'s rows back to their tokens and
    return ``out`` [T, H] = sum over each token's valid slots j of ``topk_weights[t, j] * y`` (fp32
    accumulate); rows past the received count and ids outside [0, E) are never read. ``channel``: as
    for ``dispatch``. Collective."""
    ids = dispatched.topk_ids
    tokens, top_k = ids.shape
    capacity = dispatched.x.shape[0]
    if not isinstance(y_recv, torch.Tensor) or y_recv.dim() != 2 or y_recv.shape[0] != capacity:
        raise InputError(f"{OP}: y_recv must be [R_max={capacity}, hidden], got "
                         f"{tuple(y_recv.shape) if isinstance(y_recv, torch.Tensor) else type(y_recv).__name__}")
    hidden = y_recv.shape[1]
    check_tensor(OP, "y_recv", y_recv, (capacity, hidden), None, ctx.device, "rows")
    check_tensor(OP, "topk_weights", topk_weights, (tokens, top_k), None, ctx.device, "rows")
    out = output_tensor(OP, out, (tokens, hidden), y_recv)
    world = ctx.size
    area = max(1, capacity // world)        # the most entries a rank sent (sizes every rank's area alike)
    cfg = config or default_config(_problem(y_recv, hidden, area // top_k, dispatched.experts, top_k, world))
    form = _form(cfg)
    # per parity: low_latency's area for the entries this rank sent, or staged's for the rows it received
    ch = ctx.channel(OP + ".combine" + channel, max(1, capacity) * hidden * y_recv.element_size())
    ch.kinds = KINDS
    stage = ch.staging(y_recv.dtype)
    slot_elems = ch.nbytes // y_recv.element_size()
    programs = _programs(cfg, area)
    block = _block(cfg, hidden)
    reduce_grid = (tokens, triton.cdiv(hidden, block))
    if form == "low_latency":
        total = programs + tokens * reduce_grid[1]      # no reduce launch without tokens
        ch.launch(_combine_push_kernel, (programs,), y_recv, dispatched.meta, dispatched.count, stage, slot_elems,
                  hidden, top_k, y_recv.stride(0), total, *ch.args(), BLOCK=block, num_warps=cfg["num_warps"])
        if tokens:
            ch.launch(_combine_reduce_kernel, reduce_grid, ids, topk_weights, out, stage, slot_elems, hidden, top_k,
                      dispatched.experts, topk_weights.stride(0), out.stride(0), total, *ch.args(), BLOCK=block,
                      num_warps=cfg["num_warps"])
        return out
    # staged: the pull launch always runs (one program without tokens), as its waits make the areas reusable
    pull_grid = (max(1, tokens), reduce_grid[1])
    total = programs + pull_grid[0] * pull_grid[1]
    chunk_flags = ch.tile_flags(triton.cdiv(max(1, capacity), min(SIGNAL_ROWS)))
    ch.launch(_combine_stage_kernel, (programs,), y_recv, dispatched.count, stage, slot_elems, chunk_flags, hidden,
              y_recv.stride(0), total, *ch.args(), SIGNAL_ROWS=cfg["signal_rows"], BLOCK=block,
              num_warps=cfg["num_warps"])
    ch.launch(_combine_pull_kernel, pull_grid, ids, topk_weights, dispatched.pos, dispatched.counts, out, stage,
              slot_elems, chunk_flags, tokens, hidden, top_k, dispatched.experts, dispatched.experts // world, programs,
              topk_weights.stride(0), out.stride(0), total, *ch.args(), SIGNAL_ROWS=cfg["signal_rows"], BLOCK=block,
              num_warps=cfg["num_warps"])
    return out


def _block(cfg: dict, hidden: int) -> int:
    return max(16, min(int(cfg["block"]), triton.next_power_of_2(max(1, hidden))))


# --- the template: dispatch -> a stand-in expert (row times global expert id + 1) -> combine -------------

def _problem(x, hidden, tokens, experts, top_k, world) -> Problem:
    dtype = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[x.dtype]
    return Problem.make(OP, dtype, world, m=tokens, hidden=hidden, experts=experts, topk=top_k)


def expert_stand_in(dispatched: Dispatched, rank: int) -> torch.Tensor:
    """The template's experts: received row times (its global expert id + 1); one torch op."""
    local = dispatched.experts // dispatched.counts.shape[0]
    scale = (dispatched.expert + 1 + rank * local).to(dispatched.x.dtype)
    return dispatched.x * scale[:, None]


def round_trip(x, topk_ids, topk_weights, *, ctx, experts: int, out=None, config=None) -> torch.Tensor:
    """dispatch, the stand-in experts, combine: what the template times and checks."""
    d = dispatch(x, topk_ids, ctx=ctx, experts=experts, config=config)
    return combine(expert_stand_in(d, ctx.rank), topk_weights, d, ctx=ctx, out=out, config=config)


def reference(x, topk_ids, topk_weights, ctx, experts: int) -> torch.Tensor:
    """fp64: sum over valid slots of weight * (expert + 1) * x."""
    ids = topk_ids.cpu().long()
    valid = (ids >= 0) & (ids < experts)
    scale = (topk_weights.cpu().double() * (ids + 1).double() * valid).sum(1)
    return x.cpu().double() * scale[:, None]


def baseline(x, topk_ids, topk_weights, ctx, experts: int) -> torch.Tensor:
    """torch.distributed's all-to-all round trip (``torch_all_to_all``) around the stand-in experts."""
    return torch_all_to_all(x, topk_ids, topk_weights, ctx, experts,
                            lambda rows, ids: rows * (ids + 1).to(rows.dtype)[:, None])


def torch_all_to_all(x, topk_ids, topk_weights, ctx, experts: int, expert_fn) -> torch.Tensor:
    """What a torch user runs for EP: the counts through all_to_all_single, the split sizes to the host,
    the rows and their global expert ids through all_to_all_single, ``expert_fn(rows, ids)`` (int64
    global ids), the rows back, the weighted sum (gloo copies host tensors when ranks share a GPU)."""
    import torch.distributed as dist
    device = x.device
    if x.is_cuda and ctx.world.backend == "gloo":
        x, topk_ids, topk_weights = x.cpu(), topk_ids.cpu(), topk_weights.cpu()
    group, world = ctx.world.group, ctx.size
    tokens, top_k = topk_ids.shape
    local = experts // world
    ids = topk_ids.reshape(-1).long()
    valid = ((ids >= 0) & (ids < experts)).nonzero().squeeze(1)
    order = valid[torch.argsort(ids[valid] // local, stable=True)]
    send_counts = torch.bincount(ids[order] // local, minlength=world)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send, recv = send_counts.tolist(), recv_counts.tolist()
    rows = torch.empty((sum(recv), x.shape[1]), dtype=x.dtype, device=x.device)
    dist.all_to_all_single(rows, x[order // top_k].contiguous(), recv, send, group=group)
    got_ids = torch.empty(sum(recv), dtype=torch.int64, device=x.device)
    dist.all_to_all_single(got_ids, ids[order].contiguous(), recv, send, group=group)
    y = expert_fn(rows, got_ids).to(x.dtype).contiguous()
    back = torch.empty((len(order), x.shape[1]), dtype=x.dtype, device=x.device)
    dist.all_to_all_single(back, y, send, recv, group=group)
    full = torch.zeros((tokens * top_k, x.shape[1]), dtype=torch.float32, device=x.device)
    full[order] = back.float() * topk_weights.reshape(-1)[order].float()[:, None]
    return full.view(tokens, top_k, x.shape[1]).sum(1).to(x.dtype).to(device)


def routing(tokens: int, experts: int, top_k: int, g: torch.Generator, skew: float = 0.0):
    """Random distinct top-k experts per token (the first experts favoured by ``skew``) and weights summing
    to 1: ([T, k] int32, [T, k] fp32)."""
    scores = torch.rand(tokens, experts, generator=g) - skew * torch.arange(experts) / max(1, experts)
    ids = scores.topk(top_k, dim=1).indices.to(torch.int32)
    weights = torch.softmax(torch.randn(tokens, top_k, generator=g), dim=1)
    return ids, weights


def make_inputs(problem: Problem, device, seed: int, ctx) -> dict:
    g = rank_generator(problem, seed, ctx)
    tokens, hidden = problem["m"], problem["hidden"]
    ids, weights = routing(tokens, problem["experts"], problem["topk"], g)
    x = torch.randn(tokens, hidden, generator=g).to(problem.torch_dtype)
    return {"x": x.to(device), "topk_ids": ids.to(device), "topk_weights": weights.to(device), "ctx": ctx,
            "experts": problem["experts"], "out": torch.empty((tokens, hidden), dtype=problem.torch_dtype,
                                                              device=device)}


def space(problem: Problem) -> Space:
    entries = problem["m"] * problem["topk"]
    return Space(categorical("form", FORMS),
                 pow2("block", 128, max(128, min(4096, triton.next_power_of_2(problem["hidden"])))),
                 categorical("num_warps", [4, 8]),
                 pow2("comm_sms", 1, max(1, min(MAX_SLOTS.value // 2, triton.next_power_of_2(entries)))),
                 categorical("signal_rows", SIGNAL_ROWS, when={"form": ["staged"]}))


def default_config(problem: Problem, spec=None) -> dict:
    """low_latency up to LOW_LATENCY_MAX_BYTES of rows per rank, staged (64 rows per flag) beyond."""
    entries = problem["m"] * problem["topk"]
    block = max(128, min(2048, triton.next_power_of_2(problem["hidden"])))
    sms = spec.sms if spec is not None else 32
    cfg = {"form": "low_latency", "block": block, "num_warps": 8 if block >= 1024 else 4,
           "comm_sms": min(triton.next_power_of_2(max(1, min(entries, sms // 4))), MAX_SLOTS.value // 2)}
    if entries * problem["hidden"] * problem.torch_dtype.itemsize > LOW_LATENCY_MAX_BYTES:
        cfg.update(form="staged", signal_rows=64)
    return cfg


def _sent_bytes(problem: Problem) -> float:
    """Bytes of rows one rank sends each way, on average uniform routing: (W - 1) / W of its entries."""
    w = problem.world
    return problem["m"] * problem["topk"] * problem["hidden"] * problem.torch_dtype.itemsize * (w - 1) / w


def work(problem: Problem) -> tuple[float, float]:
    rows = problem["m"] * problem["topk"] * problem["hidden"] * problem.torch_dtype.itemsize
    return 2.0 * problem["m"] * problem["topk"] * problem["hidden"], 4.0 * rows


def cost(problem: Problem, config: Optional[dict], spec) -> float:
    """Each direction: one step to every peer of its share (alpha-beta, as an all-gather of a share) at
    the form's link efficiency, and dispatch's counts round. low_latency's row-by-row remote stores reach
    LL_LINK_EFFICIENCY of the bandwidth; staged's chunked pulls all of it, but copy the rows locally first
    (hidden behind the pull except its first chunk of signal_rows) and pay a flag round. The baseline:
    NCCL's, four all_to_all_single plus a host sync."""
    w = problem.world
    share = _sent_bytes(problem) / max(1, w - 1)
    if config is None:
        return 4 * nccl_time("allgather", share, w, spec) + 20e-6
    latency = spec.link_latency_us * 1e-6
    if config.get("form", "low_latency") == "low_latency":
        one_way = alpha_beta(share, w, spec, "allgather", comm_efficiency(config) * LL_LINK_EFFICIENCY)
        return 2 * one_way + latency + 4 * spec.launch_us * 1e-6
    entries = max(1, problem["m"] * problem["topk"])
    rows = entries * problem["hidden"] * problem.torch_dtype.itemsize
    first_chunk = 2 * rows * min(1.0, config["signal_rows"] / entries) / spec.hbm_bytes_per_s
    one_way = alpha_beta(share, w, spec, "allgather", comm_efficiency(config)) + first_chunk + latency
    return 2 * one_way + latency + 5 * spec.launch_us * 1e-6


TEMPLATE = register(Template(
    op=OP, space=space, make_inputs=make_inputs, launch=round_trip, reference=reference, baseline=baseline,
    default_config=default_config, work=work, cost=cost,
    multi_rank=True, doc="expert-parallel all-to-all dispatch + combine over the symmetric heap (low-latency "
                         "direct stores or staged chunked pulls, counts exchanged on the device)"))
