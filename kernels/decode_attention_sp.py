"""Sequence-parallel decode attention: the KV cache sharded across ranks by token, partials combined.

Layout. Every rank holds every query head (``q`` [batch, heads, head_dim], the same on every rank)
and a shard ``k``, ``v`` [batch, kv_heads, capacity, head_dim] of every sequence's tokens, placed
round-robin by blocks of ``shard_block`` positions: position ``p`` lives on rank
``(p // shard_block) % world`` at slot ``(p // (shard_block * world)) * shard_block + p % shard_block``
(``place``). A rank's valid keys of a sequence of length ``L = positions[b] + 1`` are then a prefix of
its shard (``shard_length``); for a sequence shorter than ``rank * shard_block`` it is empty. Every rank
ends with the full attention output [batch, heads, head_dim].

Each rank runs ``decode_attention``'s split kernel parts (``split_attention``, ``store_split``,
``combine_splits``) over its shard and turns its (max, sum, accumulator) of a (sequence, KV head)
into a partial ``(o = acc / sum, lse = max + log2(sum))`` (base-2 log-sum-exp of the scaled scores;
an empty shard gives ``o = 0, lse = -inf``), stored as rows of ``[head_dim + 1]`` fp32 (o, then lse)
in a ``[world, batch, heads, head_dim + 1]`` area. The combine is
``out = sum_r 2^(lse_r - M) o_r / sum_r 2^(lse_r - M)``, ``M = max_r lse_r``. Forms (``form``):

- ``two_step``: the attention kernel writes the rank's partials; ``allgather`` (over the heap) gathers
  them; a combine kernel reduces them. Three launches.
- ``fused``: one kernel; each (sequence, KV head)'s finishing program pushes its partial into every
  peer's area; the rank's last program to finish signals every peer once (coarse), waits for every
  peer's signal and combines every tile.
- ``fused_tiles``: one kernel; each finishing program pushes its partial, releases a per-tile flag in
  every peer, waits for that tile's flag from every peer and combines that tile at once.

The fused forms' areas alternate with the epoch's parity (``tuneforge.dsl.comm``): no clearing, no
host sync in the launch path (CUDA-graph safe once warmed), every wait bounded (``SignalTimeout``
naming rank, peer, signal and slot = the tile). Baseline: the same partials gathered with
torch.distributed (``allgather.baseline``) and combined in torch.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from tuneforge.dsl import Problem, Space, Template, categorical, register
from tuneforge.dsl.comm import (epoch_begin, epoch_end_of, remote_store, signal_flag, signal_peers, wait_flag,
                                wait_peers)
from tuneforge.dsl.problem import DTYPE_NAMES
from tuneforge.dsl.roofline import alpha_beta, nccl_time
from tuneforge.errors import InputError
from tuneforge.kernels import allgather as AG
from tuneforge.kernels import decode_attention as DA
from tuneforge.kernels import gemm as G
from tuneforge.kernels._common import launch_spec

OP = "decode_attention_sp"
FORMS = ("two_step", "fused", "fused_tiles")
SHARD_BLOCK = 16           # positions per placement block (the default of ``place``)
# the kernel's FORM (two_step's first launch is PARTIAL); constexpr globals, readable in jitted code
PARTIAL, FUSED, FUSED_TILES = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


# --- placement -----------------------------------------------------------------------------------------

def place(positions: torch.Tensor, world: int, shard_block: int = SHARD_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(rank, slot) of each position in the sharded cache: blocks of ``shard_block`` positions dealt
    round-robin over the ranks (where the engine writes a new token, and how shards are built)."""
    block = positions // shard_block
    return block % world, (block // world) * shard_block + positions % shard_block


def shard_capacity(ctx: int, world: int, shard_block: int = SHARD_BLOCK) -> int:
    """Slots per rank that hold positions ``[0, ctx)``."""
    return -(-(-(-ctx // shard_block)) // world) * shard_block


@triton.jit
def shard_length(length, rank, world, shard_block):
    """Keys of a ``length``-key sequence on ``rank``: its whole blocks, plus the partial last block if
    it is ``rank``'s (``place``); a prefix of the rank's shard."""
    whole = length // shard_block
    mine = (whole - rank + world - 1) // world * shard_block
    return mine + tl.where(whole % world == rank, length - whole * shard_block, 0)


# --- device side ----------------------------------------------------------------------------------------

@triton.jit
def combine_ranks(area, out, b, h, batch, heads, world, stride_ob, stride_oh,
                  GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """``out`` rows of KV head ``h`` of sequence ``b``: the lse-weighted sum of the ``world`` ranks'
    partials in ``area`` [world, batch, heads, HEAD_DIM + 1]."""
    rows = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < GROUP
    mask = row_ok[:, None] & (dims < HEAD_DIM)[None, :]
    row = (b * heads + h * GROUP + rows) * (HEAD_DIM + 1)
    rank_elems = batch * heads * (HEAD_DIM + 1)
    m_all = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    for r in range(0, world):
        m_all = tl.maximum(m_all, tl.load(area + r * rank_elems + row + HEAD_DIM, mask=row_ok, other=0.0))
    total = tl.zeros((BLOCK_G,), tl.float32)
    result = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    for r in range(0, world):
        # an empty shard's lse is -inf: weight 0 (rank 0 always holds position 0, so m_all is finite)
        weight = tl.exp2(tl.load(area + r * rank_elems + row + HEAD_DIM, mask=row_ok, other=0.0) - m_all)
        total += weight
        result += weight[:, None] * tl.load(area + r * rank_elems + row[:, None] + dims[None, :], mask=mask, other=0.0)
    o_ptrs = out + b.to(tl.int64) * stride_ob + (h * GROUP + rows)[:, None] * stride_oh + dims[None, :]
    tl.store(o_ptrs, (result / total[:, None]).to(out.dtype.element_ty), mask=mask)


@triton.jit
def _publish(m, l, acc, b, h, bh, kv_heads, out, area, tile_flags, counts, epoch, stride_ob, stride_oh,
             bases, flags, state, rank, world, max_spins, FORM: tl.constexpr, GROUP: tl.constexpr,
             BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """The partial of (sequence, KV head) ``bh`` from its combined (max, sum, accumulator) into this
    rank's area (PARTIAL: ``area`` is the rank's own [batch, heads, HEAD_DIM + 1]; fused: row ``rank``
    of every rank's area), then the fused forms' exchange and combine."""
    tiles = tl.num_programs(0)
    batch = tiles // kv_heads
    heads = kv_heads * GROUP
    rows = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < GROUP
    mask = row_ok[:, None] & (dims < HEAD_DIM)[None, :]
    safe = tl.where(l > 0, l, 1.0)           # an empty shard: o = 0, lse = -inf
    o = acc / safe[:, None]
    lse = tl.where(l > 0, m + tl.log2(safe), float("-inf"))
    row = (b * heads + h * GROUP + rows) * (HEAD_DIM + 1)
    o_offs = row[:, None] + dims[None, :]
    if FORM == PARTIAL:
        mine = area
    else:
        mine = area + rank * batch * heads * (HEAD_DIM + 1)
    tl.store(mine + o_offs, o, mask=mask)
    tl.store(mine + row + HEAD_DIM, lse, mask=row_ok)
    if FORM != PARTIAL:
        for i in range(1, world):
            peer = (rank + i) % world
            remote_store(mine, o_offs, o, rank, peer, bases, mask)
            remote_store(mine, row + HEAD_DIM, lse, rank, peer, bases, row_ok)
    if FORM == FUSED_TILES:
        for i in range(1, world):
            signal_flag(tile_flags + rank * tiles + bh, epoch, rank, (rank + i) % world, bases)
        for i in range(1, world):
            peer = (rank + i) % world
            wait_flag(tile_flags + peer * tiles + bh, epoch, state, max_spins, peer, 0, bh)
        combine_ranks(area, out, b, h, batch, heads, world, stride_ob, stride_oh, GROUP, BLOCK_G, HEAD_DIM, BLOCK_D)
    if FORM == FUSED:
        # the rank's last tile: every partial of this rank is pushed (nothing of this launch still
        # runs here, so waiting cannot starve a local program)
        if G.last_to_arrive(counts, tiles, tiles):
            signal_peers(flags, 0, 0, epoch, rank, world, bases)
            wait_peers(flags, 0, 0, epoch, rank, world, state, max_spins)
            for t in range(0, tiles):
                tb = t // kv_heads
                combine_ranks(area, out, tb, t - tb * kv_heads, batch, heads, world, stride_ob, stride_oh,
                              GROUP, BLOCK_G, HEAD_DIM, BLOCK_D)


@triton.jit(do_not_specialize=["rank", "max_spins"])
def _sp_kernel(q, k, v, pos, out, part, counts, stage, slot_elems, tile_flags, kv_heads, splits, shard_block,
               stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
               stride_ob, stride_oh, stride_pos, scale_log2,
               bases, flags, state, rank, world, max_spins,
               FORM: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // kv_heads
    h = bh - b * kv_heads
    if FORM == PARTIAL:
        epoch = 0
        area = stage
    else:
        epoch = epoch_begin(state)
        area = stage + (epoch % 2) * slot_elems
    length = shard_length(tl.load(pos + b * stride_pos).to(tl.int32) + 1, rank, world, shard_block)
    m_i, l_i, acc = DA.split_attention(q, k, v, b, h, length, split, splits, stride_qb, stride_qh, stride_kb,
                                       stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, scale_log2, GROUP,
                                       BLOCK_G, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, INPUT_PRECISION)
    if splits == 1:
        _publish(m_i, l_i, acc, b, h, bh, kv_heads, out, area, tile_flags, counts, epoch, stride_ob, stride_oh,
                 bases, flags, state, rank, world, max_spins, FORM, GROUP, BLOCK_G, HEAD_DIM, BLOCK_D)
    else:
        DA.store_split(part, bh, split, splits, m_i, l_i, acc, GROUP, BLOCK_G, BLOCK_D)
        if G.last_to_arrive(counts, bh, splits):
            m, l, res = DA.combine_splits(part, bh, splits, GROUP, BLOCK_G, BLOCK_D)
            _publish(m, l, res, b, h, bh, kv_heads, out, area, tile_flags, counts, epoch, stride_ob, stride_oh,
                     bases, flags, state, rank, world, max_spins, FORM, GROUP, BLOCK_G, HEAD_DIM, BLOCK_D)
    if FORM != PARTIAL:
        epoch_end_of(state, epoch, tl.num_programs(0) * tl.num_programs(1))


@triton.jit
def _combine_kernel(area, out, kv_heads, world, stride_ob, stride_oh, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // kv_heads
    combine_ranks(area, out, b, bh - b * kv_heads, tl.num_programs(0) // kv_heads, kv_heads * GROUP, world,
                  stride_ob, stride_oh, GROUP, BLOCK_G, HEAD_DIM, BLOCK_D)


# --- host side --------------------------------------------------------------------------------------------

def _local(problem: Problem) -> Problem:
    """The single-rank decode_attention problem of one rank's shard."""
    return Problem.make(DA.OP, problem.dtype, m=problem["m"], heads=problem["heads"], kv_heads=problem["kv_heads"],
                        head_dim=problem["head_dim"], ctx=shard_capacity(problem["ctx"], problem.world))


def _run(q, k, v, positions, ctx, out, cfg, shard_block, form: int, stage, slot_elems, tile_flags, channel):
    """One launch of ``_sp_kernel`` over this rank's shard (``channel`` None: PARTIAL, no signals)."""
    b, heads, d = q.shape
    kv_heads, capacity = k.shape[1], k.shape[2]
    meta = DA.kernel_meta(q, heads // kv_heads, d, cfg)
    splits = DA.split_count(capacity, cfg)
    # one counter per (sequence, KV head) for the split combine, one for the rank (fused)
    part, counts = G.workspace(q.device, DA.workspace_floats(b * kv_heads, splits, meta), b * kv_heads + 1)
    args = (q, k, v, positions, out, part, counts, stage, slot_elems, tile_flags, kv_heads, splits,
            shard_block, q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
            v.stride(2), out.stride(0), out.stride(1), positions.stride(0), DA.LOG2E / math.sqrt(d))
    grid = (b * kv_heads, splits)
    if channel is None:
        _sp_kernel[grid](*args, stage, stage, stage, ctx.rank, ctx.size, 1, FORM=form, **meta)
    else:
        channel.launch(_sp_kernel, grid, *args, *channel.args(), FORM=form, **meta)


def _partials(q, k, v, positions, ctx, cfg, shard_block) -> torch.Tensor:
    """This rank's partials [batch * heads, head_dim + 1] (fp32; o, then the base-2 lse)."""
    b, heads, d = q.shape
    mine = torch.empty((b * heads, d + 1), dtype=torch.float32, device=q.device)
    _run(q, k, v, positions, ctx, q, cfg, shard_block, PARTIAL.value, mine, 0, mine, None)
    return mine


def _check(q, k, v, positions, ctx, out, shard_block) -> Problem:
    b, heads, kv_heads, d, capacity = DA._check(q, k, v, positions, out, OP)
    if isinstance(shard_block, bool) or not isinstance(shard_block, int) or shard_block < 1:
        raise InputError(f"{OP}: shard_block must be a positive int, got {shard_block!r}")
    if capacity % shard_block:
        raise InputError(f"{OP}: the shard holds {capacity} slots, not a multiple of shard_block={shard_block}")
    return Problem.make(OP, DTYPE_NAMES[q.dtype], ctx.size, m=b, heads=heads, kv_heads=kv_heads, head_dim=d,
                        ctx=capacity * ctx.size)


def decode_attention_sp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, *, ctx,
                        out: Optional[torch.Tensor] = None, config: Optional[dict] = None,
                        shard_block: int = SHARD_BLOCK) -> torch.Tensor:
    """Attention of ``q`` [batch, heads, head_dim] (replicated) over the whole cache, of which this rank
    holds the shard ``k``, ``v`` [batch, kv_heads, capacity, head_dim] (``place``; capacity a multiple of
    ``shard_block``); keys ``[0, positions[b]]`` (global positions, ``< world * capacity``; not checked on
    the device). Collective; every rank gets the whole ``out``."""
    problem = _check(q, k, v, positions, ctx, out, shard_block)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if q.shape[0] == 0:
        return out
    cfg = config or default_config(problem, launch_spec(q.device))
    b, heads, d = q.shape
    world = ctx.size
    if cfg["form"] == "two_step":
        gathered = AG.allgather(_partials(q, k, v, positions, ctx, cfg, shard_block), ctx=ctx, m=world * b * heads)
        meta = DA.kernel_meta(q, heads // k.shape[1], d, cfg)
        _combine_kernel[(b * k.shape[1],)](gathered, out, k.shape[1], world, out.stride(0), out.stride(1),
                                           GROUP=meta["GROUP"], BLOCK_G=meta["BLOCK_G"], HEAD_DIM=d,
                                           BLOCK_D=meta["BLOCK_D"])
        return out
    elems = b * heads * (d + 1)
    ch = ctx.channel(OP, world * elems * 4)
    fused_tiles = cfg["form"] == "fused_tiles"
    tile_flags = ch.tile_flags(world * b * k.shape[1]) if fused_tiles else ch.flags
    _run(q, k, v, positions, ctx, out, cfg, shard_block, (FUSED_TILES if fused_tiles else FUSED).value,
         ch.staging(torch.float32), ch.nbytes // 4, tile_flags, ch)
    return out


def _full_cache(shards: list[torch.Tensor], shard_block: int) -> torch.Tensor:
    """The unsharded cache [batch, kv_heads, world * capacity, head_dim] from every rank's shard."""
    stacked = torch.stack(shards)
    world, capacity = stacked.shape[0], stacked.shape[3]
    rank, slot = place(torch.arange(world * capacity), world, shard_block)
    return stacked[rank, :, :, slot].permute(1, 2, 0, 3)


def reference(q, k, v, positions, ctx, shard_block=SHARD_BLOCK) -> torch.Tensor:
    """fp64 attention over the whole cache, reassembled from every rank's shard."""
    full = [_full_cache(ctx.world.all_gather(t), shard_block) for t in (k, v)]
    return DA.reference(q.cpu(), *full, positions.cpu())


def baseline(q, k, v, positions, ctx, shard_block=SHARD_BLOCK) -> torch.Tensor:
    """What a torch user runs: the same partials computed in torch over this rank's shard (fp32 scores,
    slots past the rank's share of each sequence masked; an empty share: o = 0, lse = -inf), gathered
    through torch.distributed and combined in torch. No host sync."""
    b, heads, d = q.shape
    _check(q, k, v, positions, ctx, None, shard_block)
    kv_heads, capacity = k.shape[1], k.shape[2]
    length, world = positions + 1, ctx.size
    whole = length // shard_block           # shard_length, in torch
    mine = (whole - ctx.rank + world - 1) // world * shard_block + torch.where(
        whole % world == ctx.rank, length - whole * shard_block, 0)
    scores = torch.einsum("bhgd,bhnd->bhgn", q.float().view(b, kv_heads, heads // kv_heads, d), k.float())
    valid = (torch.arange(capacity, device=q.device) < mine[:, None])[:, None, None, :]
    scores = (scores * (DA.LOG2E / math.sqrt(d))).masked_fill(~valid, float("-inf"))
    lse = torch.logsumexp(scores * math.log(2), -1) / math.log(2)
    weights = torch.exp2(scores - torch.where(lse.isinf(), 0.0, lse)[..., None])      # all 0 when empty
    o = torch.einsum("bhgn,bhnd->bhgd", weights, v.float())
    partial = torch.cat([o.reshape(b * heads, d), lse.reshape(b * heads, 1)], 1)
    parts = AG.baseline(partial, ctx, ctx.size * b * heads).view(ctx.size, b, heads, d + 1)
    lse = parts[..., d]
    weight = torch.exp2(lse - lse.amax(0))
    return ((weight[..., None] * parts[..., :d]).sum(0) / weight.sum(0)[..., None]).to(q.dtype)


def make_inputs(problem: Problem, device, seed: int, ctx) -> dict:
    """decode_attention's inputs for the whole cache (the same on every rank: q is replicated), this
    rank's shard of them (``place``)."""
    if ctx is None or ctx.size != problem.world:
        raise InputError(f"{OP} {problem.key} needs a world of {problem.world} ranks (ctx)")
    ctx_len = problem["ctx"]
    whole = DA.make_inputs(problem, torch.device("cpu"), seed)
    rank, slot = place(torch.arange(ctx_len), ctx.size)
    mine = rank == ctx.rank
    shards = []
    for t in (whole["k"], whole["v"]):
        shard = torch.zeros((*t.shape[:2], shard_capacity(ctx_len, ctx.size), t.shape[3]), dtype=t.dtype)
        shard[:, :, slot[mine]] = t[:, :, mine]
        shards.append(shard.to(device))
    return {"q": whole["q"].to(device), "k": shards[0], "v": shards[1], "positions": whole["positions"].to(device),
            "ctx": ctx, "shard_block": SHARD_BLOCK, "out": torch.empty_like(whole["q"]).to(device)}


# --- the template ------------------------------------------------------------------------------------------

# decode_attention's tiles; not its TMA loads (this kernel's shard views are read through pointers)
SPLIT_KEYS = ("splits", "block_n", "num_warps", "num_stages")


def space(problem: Problem) -> Space:
    return Space(categorical("form", list(FORMS)), *(p for p in DA.space(_local(problem)).params if p.name in SPLIT_KEYS))


def default_config(problem: Problem, spec) -> dict:
    """Per-tile combine (no rank waits for a whole peer), the attention split of the shard."""
    split = DA.default_config(_local(problem), spec)
    return {"form": "fused_tiles", **{key: split[key] for key in SPLIT_KEYS}}


def block_fits(config: dict, problem: Problem, spec) -> str | None:
    return DA.block_fits(config, _local(problem), spec)


def work(problem: Problem) -> tuple[float, float]:
    """One rank's shard read, its partials pushed to every peer and the peers' read back."""
    flops, nbytes = DA.work(_local(problem))
    partials = problem["m"] * problem["heads"] * (problem["head_dim"] + 1) * 4
    return flops, nbytes + 2 * (problem.world - 1) * partials


def cost(problem: Problem, config: Optional[dict], spec) -> float:
    """The shard's attention, then the partials' exchange: NCCL plus torch's combine kernels for the
    baseline, the heap all-gather plus a combine launch for two_step, one signal round for the fused
    forms (fused: one program combines every tile)."""
    local = _local(problem)
    partials = problem["m"] * problem["heads"] * (problem["head_dim"] + 1) * 4
    combine = problem.world * partials / spec.hbm_bytes_per_s
    if config is None:
        attention = DA.cost(local, DA.default_config(local, spec), spec)
        return attention + nccl_time("allgather", partials, problem.world, spec) + combine + 6 * spec.launch_us * 1e-6
    attention = DA.cost(local, config, spec)
    exchange = alpha_beta(partials, problem.world, spec, "allgather")
    if config["form"] == "two_step":
        return attention + exchange + combine + 2 * spec.launch_us * 1e-6
    if config["form"] == "fused":
        return attention + exchange + combine * spec.sms
    return attention + exchange + combine


TEMPLATE = register(Template(
    op=OP, space=space, make_inputs=make_inputs, launch=decode_attention_sp, reference=reference,
    baseline=baseline, default_config=default_config, work=work, cost=cost, constraints=(block_fits,),
    multi_rank=True, doc=__doc__.split("\n")[0]))
