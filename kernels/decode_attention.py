"""Decode attention (flash-decoding): one new query token per sequence against its KV cache.

``out[b, h] = softmax(q[b, h] . k[b, g(h), :len_b].T * d^-0.5) @ v[b, g(h), :len_b]`` with grouped-query
heads (``g(h) = h // (heads / kv_heads)``) and ``len_b = positions[b] + 1`` (a token's cache slot is its
position, sequences right-padded, so the valid keys of sequence b are slots ``[0, positions[b]]``).

Grid: (sequence x KV head, split). A program takes the query heads that share one KV head as the rows
of its tiles (so K and V are read once per KV head, not once per query head) and one chunk of the
keys, and keeps an online softmax over ``BLOCK_N``-key tiles. The config's ``splits`` cut every
(sequence, KV head) into that many chunks, sized on the device from the sequence's own length
(``chunk_bounds``): one short sequence still has programs for every SM, and a sequence shorter than its
step's cache view (a power-of-two bucket) spreads its keys over all of them, not over the first few.
Each split stores its (max, sum, accumulator) in fp32 and a second, tiny kernel combines them: a program
per (sequence, query head) loads all its splits at once (one round trip); on sm_90+ it is a programmatic
dependent launch, so its launch overlaps the split kernel's run. The H200 showed an in-launch
combine by the last split to arrive costing about 1.3 us per split (bench_decode, 2026-12-02: 16 -> 32
splits at batch 1 cost +26 us at every context), far more than the second launch. Splits past a
sequence's length find no keys and contribute nothing.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import tuneforge
from tuneforge.dsl import Problem, Space, Template, categorical, register
from tuneforge.dsl.problem import DTYPE_NAMES
from tuneforge.errors import ConfigRejected, InputError
from tuneforge.kernels import gemm as G
from tuneforge.kernels._common import (await_previous, chained, check_tensor, launch_spec, refuse_unrunnable, seeded_randn,
                                       tma_rows_fit)
from tuneforge.dsl.roofline import HBM_LATENCY_S, kernel_floor, roofline

OP = "decode_attention"
LOG2E = 1.4426950408889634
MIN_ROWS = 16          # tl.dot's smallest M: the query heads of a group are padded to it
KEY_ALIGN = tl.constexpr(16)     # a split's keys start on a multiple of this


@triton.jit
def chunk_bounds(length, split, splits):
    """Keys ``[start, end)`` of split ``split`` of a sequence's ``length`` keys: ``splits`` chunks of
    equal whole ``KEY_ALIGN``-key blocks (the last shorter, splits past the length empty). Cut from the
    sequence's own length on the device, so every split of a sequence shorter than the cache view
    (a step's view is its batch's power-of-two bucket) still gets keys to read."""
    chunk = tl.cdiv(tl.cdiv(length, splits), KEY_ALIGN) * KEY_ALIGN
    start = split * chunk
    return start, tl.minimum(start + chunk, length)


@triton.jit
def online_softmax_step(q_tile, k_tile, v_tile, n0, end, m_i, l_i, acc, scale_log2, MASKED: tl.constexpr,
                        BLOCK_N: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """The online softmax's (max, sum, accumulator) after the keys ``n0 .. n0 + BLOCK_N`` (K as
    [BLOCK_D, BLOCK_N], V as [BLOCK_N, BLOCK_D]); ``MASKED``: the keys from ``end`` on score -inf."""
    s = tl.dot(q_tile, k_tile, input_precision=INPUT_PRECISION) * scale_log2
    if MASKED:
        s = tl.where((n0 + tl.arange(0, BLOCK_N) < end)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v_tile.dtype), v_tile, input_precision=INPUT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def split_attention(q, k, v, b, h, length, split, splits, stride_qb, stride_qh, stride_kb, stride_kh, stride_kn,
                    stride_vb, stride_vh, stride_vn, scale_log2,
                    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                    USE_TMA: tl.constexpr = False, head_rows=0, kv_heads=1):
    """(running max in the log2 domain, sum, fp32 accumulator) of the online softmax of the query heads
    of KV head ``h`` of sequence ``b`` over split ``split`` of its ``length`` keys (``chunk_bounds``):
    [BLOCK_G], [BLOCK_G], [BLOCK_G, BLOCK_D]. No key: max -inf, sum 0, accumulator 0. ``USE_TMA``: ``k``
    and ``v`` are tensor descriptors over the cache's rows ([BLOCK_N, BLOCK_D] blocks; KV head ``bh``'s
    keys start at row ``bh * head_rows``); the split's last tile, if partial, has rows of other keys (or
    TMA's zeros past the last row): their scores are masked and their values zeroed, as the masked loads
    do; whole tiles go unmasked."""
    rows = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < GROUP
    dim_ok = dims < HEAD_DIM
    heads = h * GROUP + rows
    q_tile = tl.load(q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + dims[None, :],
                     mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    if not USE_TMA:
        k_base = k + b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh
        v_base = v + b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh
    else:
        row0 = (b * kv_heads + h) * head_rows
    if UPCAST:
        q_tile = q_tile.to(tl.float32)
    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)     # running max, log2 domain
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    start, end = chunk_bounds(length, split, splits)
    if USE_TMA:
        # whole tiles unmasked (their values go from shared memory to the dot as loaded); the split's
        # last, partial tile masked
        whole = start + (end - start) // BLOCK_N * BLOCK_N
        for n0 in tl.range(start, whole, BLOCK_N):
            m_i, l_i, acc = online_softmax_step(q_tile, tl.trans(k.load([row0 + n0, 0])), v.load([row0 + n0, 0]),
                                                n0, end, m_i, l_i, acc, scale_log2, False, BLOCK_N, INPUT_PRECISION)
        if whole < end:
            key_ok = whole + tl.arange(0, BLOCK_N) < end
            v_tile = tl.where(key_ok[:, None], v.load([row0 + whole, 0]), 0.0)
            m_i, l_i, acc = online_softmax_step(q_tile, tl.trans(k.load([row0 + whole, 0])), v_tile, whole, end,
                                                m_i, l_i, acc, scale_log2, True, BLOCK_N, INPUT_PRECISION)
    else:
        for n0 in tl.range(start, end, BLOCK_N):
            keys = n0 + tl.arange(0, BLOCK_N)
            key_ok = keys < end
            if HEAD_DIM == BLOCK_D:     # no mask along the contiguous dim: the loads stay vectorized
                k_mask = key_ok[None, :]
                v_mask = key_ok[:, None]
            else:
                k_mask = key_ok[None, :] & dim_ok[:, None]
                v_mask = key_ok[:, None] & dim_ok[None, :]
            k_tile = tl.load(k_base + keys[None, :].to(tl.int64) * stride_kn + dims[:, None], mask=k_mask,
                             other=0.0)                                                # [BLOCK_D, BLOCK_N]
            v_tile = tl.load(v_base + keys[:, None].to(tl.int64) * stride_vn + dims[None, :], mask=v_mask,
                             other=0.0)                                                # [BLOCK_N, BLOCK_D]
            if UPCAST:
                k_tile = k_tile.to(tl.float32)
                v_tile = v_tile.to(tl.float32)
            m_i, l_i, acc = online_softmax_step(q_tile, k_tile, v_tile, n0, end, m_i, l_i, acc, scale_log2, True,
                                                BLOCK_N, INPUT_PRECISION)
    return m_i, l_i, acc


@triton.jit
def store_split(part, bh, split, splits, m_i, l_i, acc, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """Store this split's (max, sum, accumulator) in the fp32 workspace of (sequence, KV head) ``bh``:
    splits x [m | l | acc]; the accumulator's padding rows (past ``GROUP``) are not stored."""
    rows = tl.arange(0, BLOCK_G)
    tile = rows[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]
    mine = part + (bh.to(tl.int64) * splits + split) * (2 * BLOCK_G + BLOCK_G * BLOCK_D)
    tl.store(mine + rows, m_i)
    tl.store(mine + BLOCK_G + rows, l_i)
    tl.store(mine + 2 * BLOCK_G + tile, acc, mask=(rows < GROUP)[:, None])


@triton.jit
def combine_splits(part, bh, splits, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """(max, sum, accumulator) of all ``splits`` of ``bh`` from the workspace, for an in-launch combine
    (``decode_attention_sp``'s): called by the last split to arrive (``G.last_to_arrive``), which sees
    every other split's stores. An online softmax over
    blocks of splits: each block is one load of [splits, rows(, dims)] (about 8k fp32 words), so the
    combine's latency is a round trip per block, not per split; the blocks are software-pipelined
    (``num_stages``: the next blocks' loads are in flight while one is summed)."""
    BLOCK_S: tl.constexpr = (8192 + BLOCK_G * BLOCK_D - 1) // (BLOCK_G * BLOCK_D)     # a power of 2, >= 1
    rows = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    slot_size = 2 * BLOCK_G + BLOCK_G * BLOCK_D
    base = part + bh.to(tl.int64) * splits * slot_size
    m_all = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_G,), tl.float32)
    result = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    for s0 in tl.range(0, splits, BLOCK_S, num_stages=3):
        block = s0 + tl.arange(0, BLOCK_S)
        split_ok = block < splits
        slots = base + block * slot_size
        # a split without keys (or past ``splits``) holds m = -inf, l = 0, acc = 0: weight 0
        m = tl.load(slots[:, None] + rows[None, :], mask=split_ok[:, None], other=float("-inf"),
                    cache_modifier=".cg")                                                  # [S, G]
        l = tl.load(slots[:, None] + BLOCK_G + rows[None, :], mask=split_ok[:, None], other=0.0, cache_modifier=".cg")
        acc = tl.load(slots[:, None, None] + 2 * BLOCK_G + rows[None, :, None] * BLOCK_D + dims[None, None, :],
                      mask=split_ok[:, None, None] & (rows < GROUP)[None, :, None], other=0.0,
                      cache_modifier=".cg")                                                # [S, G, D]
        m_new = tl.maximum(m_all, tl.max(m, 0))
        # no key yet in any split (a rank's empty shard in decode_attention_sp): weights 0, not -inf - -inf
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_all - m_ref)
        weight = tl.exp2(m - m_ref[None, :])
        total = total * alpha + tl.sum(weight * l, 0)
        result = result * alpha[:, None] + tl.sum(weight[:, :, None] * acc, 0)
        m_all = m_new
    return m_all, total, result


@triton.jit
def _decode_attention_kernel(q, k, v, pos, out, part, kv_heads, splits,
                             stride_qb, stride_qh, stride_kb, stride_kh, stride_kn,
                             stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_pos, scale_log2,
                             head_rows, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
                             BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
                             INPUT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, PDL: tl.constexpr):
    await_previous(PDL)
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // kv_heads
    h = bh - b * kv_heads
    length = tl.load(pos + b * stride_pos).to(tl.int32) + 1
    m_i, l_i, acc = split_attention(q, k, v, b, h, length, split, splits, stride_qb, stride_qh, stride_kb, stride_kh,
                                    stride_kn, stride_vb, stride_vh, stride_vn, scale_log2, GROUP, BLOCK_G,
                                    HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, INPUT_PRECISION, USE_TMA, head_rows, kv_heads)
    if splits == 1:         # an int argument of 1 is a constant: this branch compiles alone
        rows = tl.arange(0, BLOCK_G)
        dims = tl.arange(0, BLOCK_D)
        o_ptrs = out + b.to(tl.int64) * stride_ob + (h * GROUP + rows)[:, None] * stride_oh + dims[None, :]
        tl.store(o_ptrs, (acc / l_i[:, None]).to(out.dtype.element_ty),
                 mask=(rows < GROUP)[:, None] & (dims < HEAD_DIM)[None, :])
    else:
        store_split(part, bh, split, splits, m_i, l_i, acc, GROUP, BLOCK_G, BLOCK_D)


@triton.jit
def _combine_kernel(part, out, kv_heads, splits, stride_ob, stride_oh, GROUP: tl.constexpr,
                    BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
                    PDL: tl.constexpr):
    """Query head ``row`` of the group of (sequence, KV head) ``bh``: all ``splits`` of its
    ``store_split`` partials in one load of [BLOCK_S, BLOCK_D], rescaled to their common max and summed."""
    await_previous(PDL)
    bh = tl.program_id(0)
    row = tl.program_id(1)
    b = bh // kv_heads
    h = bh - b * kv_heads
    block = tl.arange(0, BLOCK_S)
    dims = tl.arange(0, BLOCK_D)
    split_ok = block < splits
    slots = part + (bh.to(tl.int64) * splits + block) * (2 * BLOCK_G + BLOCK_G * BLOCK_D)
    # a split without keys holds m = -inf, l = 0, acc = 0: weight 0; split 0 holds key 0, so the max is finite
    m = tl.load(slots + row, mask=split_ok, other=float("-inf"), cache_modifier=".cg")      # L2: the other grid's
    l = tl.load(slots + BLOCK_G + row, mask=split_ok, other=0.0, cache_modifier=".cg")
    acc = tl.load(slots[:, None] + 2 * BLOCK_G + row * BLOCK_D + dims[None, :], mask=split_ok[:, None], other=0.0,
                  cache_modifier=".cg")
    weight = tl.exp2(m - tl.max(m, 0))
    result = tl.sum(weight[:, None] * acc, 0) / tl.sum(weight * l, 0)
    tl.store(out + b.to(tl.int64) * stride_ob + (h * GROUP + row) * stride_oh + dims,
             result.to(out.dtype.element_ty), mask=dims < HEAD_DIM)


def _check(q, k, v, positions, out, op: str = OP) -> tuple[int, int, int, int, int]:
    """(batch, heads, kv_heads, head_dim, cache length) of valid operands, else a one-line InputError
    naming ``op``."""
    for name, t, dims in (("q", q, 3), ("k", k, 4)):
        if not isinstance(t, torch.Tensor) or t.dim() != dims:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise InputError(f"{op}: {name} must be a {dims}-D tensor, got {got}")
    b, heads, d = q.shape
    kv_heads, length = k.shape[1], k.shape[2]
    if kv_heads == 0 or heads % kv_heads:
        raise InputError(f"{op}: heads={heads} is not a multiple of kv_heads={kv_heads}")
    check_tensor(op, "q", q, (b, heads, d), None, None)
    for name, t in (("k", k), ("v", v)):       # [batch, kv_heads, length, head_dim] like q
        check_tensor(op, name, t, (b, kv_heads, length, d), q.dtype, q.device)
    if not isinstance(positions, torch.Tensor) or positions.shape != (b,) or positions.is_floating_point():
        got = (tuple(positions.shape), positions.dtype) if isinstance(positions, torch.Tensor) else type(positions)
        raise InputError(f"{op}: positions must be an integer tensor [batch={b}], got {got}")
    if positions.device != q.device:
        raise InputError(f"{op}: positions is on {positions.device}, q on {q.device}")
    if out is not None:
        check_tensor(op, "out", out, (b, heads, d), q.dtype, q.device)
    return b, heads, kv_heads, d, length


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, *,
                     out: Optional[torch.Tensor] = None, config: Optional[dict] = None) -> torch.Tensor:
    """Attention of ``q`` [batch, heads, head_dim] (one token per sequence) over the cache views ``k``,
    ``v`` [batch, kv_heads, length, head_dim] (any strides but the last), keys ``[0, positions[b]]``
    of sequence b (``positions[b] < length``; not checked on the device). Returns ``out``."""
    b, heads, kv_heads, d, length = _check(q, k, v, positions, out)
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if b == 0:
        return out
    problem = Problem.make(OP, DTYPE_NAMES[q.dtype], m=b, heads=heads, kv_heads=kv_heads, head_dim=d, ctx=length)
    cfg = config or default_config(problem, launch_spec(q.device))
    meta = kernel_meta(q, heads // kv_heads, d, cfg)
    splits = split_count(length, cfg)
    part = G.workspace(q.device, workspace_floats(b * kv_heads, splits, meta), 0)[0] if splits > 1 else out
    if cfg.get("tma"):
        refuse_unrunnable(cfg, problem, launch_spec(q.device), (tma_unavailable,))
        keys, values, head_rows = _descriptors(k, v, cfg["block_n"])
    else:
        keys, values, head_rows = k, v, 0
    _decode_attention_kernel[(b * kv_heads, splits)](
        q, keys, values, positions, out, part, kv_heads, splits,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), positions.stride(0), LOG2E / math.sqrt(d), head_rows, **meta,
        USE_TMA=bool(cfg.get("tma")), **chained(q))
    if splits > 1:
        _combine_kernel[(b * kv_heads, heads // kv_heads)](
            part, out, kv_heads, splits, out.stride(0), out.stride(1), GROUP=meta["GROUP"], BLOCK_G=meta["BLOCK_G"],
            HEAD_DIM=d, BLOCK_D=meta["BLOCK_D"], BLOCK_S=triton.next_power_of_2(splits), num_warps=4,
            **chained(q))
    return out


def _descriptors(k: torch.Tensor, v: torch.Tensor, block_n: int):
    """(TMA descriptors of ``k`` and ``v`` as rows of head_dim elements, [block_n, head_dim] blocks; the
    rows of one KV head). The views' sequence and head strides must be whole rows of one layout, as
    the engine's cache and make_inputs' are: else a one-line ConfigRejected."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    b, kv_heads, length, d = k.shape
    row = k.stride(2)
    if v.stride() != k.stride() or k.stride(1) % row or k.stride(0) != kv_heads * k.stride(1):
        raise ConfigRejected(f"{OP}: tma needs k and v of one layout whose heads and sequences are whole rows, "
                             f"got strides {k.stride()} and {v.stride()}")
    head_rows = k.stride(1) // row
    rows = (b * kv_heads - 1) * head_rows + length      # past the last head's last key: TMA's zeros
    tma_rows_fit(OP, (k, v), row, rows)
    return (*(TensorDescriptor(t, [rows, d], [row, 1], [block_n, d]) for t in (k, v)), head_rows)


def kernel_meta(q: torch.Tensor, group: int, d: int, cfg: dict) -> dict:
    """The constexprs and launch options of ``split_attention`` for a config (shared with
    ``decode_attention_sp``): query heads padded to ``tl.dot``'s smallest M, head dim to a power of 2."""
    interpreted = tuneforge.INTERPRETED
    return dict(GROUP=group, BLOCK_G=max(MIN_ROWS, triton.next_power_of_2(group)), HEAD_DIM=d,
                BLOCK_D=triton.next_power_of_2(d), BLOCK_N=cfg["block_n"],
                UPCAST=interpreted and q.dtype != torch.float32,
                INPUT_PRECISION="ieee" if q.dtype == torch.float32 or interpreted else "tf32",
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def split_count(length: int, cfg: dict) -> int:
    """Programs per (sequence, KV head) over a ``length``-slot cache view under ``cfg`` (shared with
    ``decode_attention_sp``): ``cfg['splits']``, fewer where the view has fewer ``KEY_ALIGN``-key blocks."""
    return max(1, min(cfg["splits"], triton.cdiv(length, KEY_ALIGN.value)))


def workspace_floats(tiles: int, splits: int, meta: dict) -> int:
    """fp32 words of ``store_split``'s workspace: splits x [m | l | acc] per (sequence, KV head)."""
    return tiles * splits * (2 + meta["BLOCK_D"]) * meta["BLOCK_G"]


def valid_slots_mask(positions: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask [batch, 1, 1, length] of the baseline: 0 on slots <= position, -inf after."""
    slots = torch.arange(length, device=positions.device)
    mask = torch.zeros((positions.shape[0], length), dtype=dtype, device=positions.device)
    return mask.masked_fill_(slots[None, :] > positions[:, None], float("-inf")).view(-1, 1, 1, length)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """torch SDPA the engine's way: each KV head's query heads as rows (no backend repeats K/V)."""
    b, heads, d = q.shape
    kv_heads = k.shape[1]
    out = F.scaled_dot_product_attention(q.reshape(b, kv_heads, heads // kv_heads, d), k, v, attn_mask=mask)
    return out.reshape(b, heads, d)


def baseline(q, k, v, positions) -> torch.Tensor:
    return sdpa(q, k, v, valid_slots_mask(positions, k.shape[2], q.dtype))


def reference(q, k, v, positions) -> torch.Tensor:
    """In fp64, per sequence over its valid keys: each KV head against its group of query heads (K and
    V not repeated per query head, so a 128k-key sequence fits on a GPU)."""
    heads, d = q.shape[1], q.shape[2]
    kv_heads = k.shape[1]
    outs = []
    for i, p in enumerate(positions.tolist()):
        keys, values = k[i, :, :p + 1].double(), v[i, :, :p + 1].double()          # [kv_heads, len, d]
        scores = torch.einsum("kgd,knd->kgn", q[i].double().reshape(kv_heads, heads // kv_heads, d), keys)
        outs.append(torch.einsum("kgn,knd->kgd", (scores / math.sqrt(d)).softmax(-1), values).reshape(heads, d))
    return torch.stack(outs)


# --- the template -------------------------------------------------------------------------------------

SPLITS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


def space(problem: Problem) -> Space:
    return Space(categorical("splits", list(SPLITS)),
                 categorical("block_n", [16, 32, 64, 128]),
                 categorical("num_warps", [2, 4, 8]),
                 categorical("num_stages", [1, 2, 3, 4]),
                 categorical("tma", [False, True]))


def default_config(problem: Problem, spec) -> dict:
    """Splits from batch x KV heads against the SM count (the largest of ``SPLITS`` that passes neither
    that many programs nor ``ctx / 64``: at the full context every split but the last gets 64 keys or
    more, its chunk cut on the device in whole ``KEY_ALIGN``-key blocks by ``chunk_bounds``, not in
    whole tiles); 64-key tiles. About two programs per SM and 3
    stages (two tiles of K and V in flight per program), but where (sequence, KV head) pairs are few
    (a quarter of the SMs or fewer: batch 1-4 at 8 KV heads) about four per SM and 2 stages, smaller
    programs that fit more to an SM: on the H200 at batch 1 (Qwen3-32B heads, 2026-12-03) 64 splits
    with 2 stages read the KV cache at 54 / 79 / 98 % of the floor at 8k / 32k / 128k keys, with 3
    stages at 45 / 68 / 86 % (``decode-gemv-sweep-NVIDIA_H200-2026-12-03.json``)."""
    pairs = problem["m"] * problem["kv_heads"]
    few = 4 * pairs <= spec.sms
    want = max(1, min((4 if few else 2) * spec.sms // pairs, problem["ctx"] // 64))
    block_n = min(64, max(16, triton.next_power_of_2(problem["ctx"])))       # a short cache: a shorter tile
    return dict(splits=max(s for s in SPLITS if s <= want), block_n=block_n, num_warps=4, num_stages=2 if few else 3,
                tma=False)


def block_fits(config: dict, problem: Problem, spec) -> str | None:
    """A tile within the context and staged K and V tiles within shared memory. More splits than the
    context has key blocks is allowed: ``split_count`` runs fewer (so a shrunken problem still takes the config)."""
    ctx, block_n = problem["ctx"], config["block_n"]
    if block_n > max(16, triton.next_power_of_2(ctx)):
        return f"block_n={block_n} exceeds ctx={ctx}"
    if spec is not None:
        staged = config["num_stages"] * 2 * block_n * triton.next_power_of_2(problem["head_dim"]) \
            * problem.torch_dtype.itemsize
        if staged > spec.smem_per_block:
            return f"num_stages={config['num_stages']} x K and V tiles of {block_n} keys = {staged} B of shared memory " \
                   f"> {spec.smem_per_block}"
    return None


def tma_unavailable(config: dict, problem: Problem, spec) -> str | None:
    if not config.get("tma"):
        return None
    if spec is None or "tma" not in spec.features:
        return f"tma: {getattr(spec, 'name', 'this device')} has no TMA"
    d = problem["head_dim"]
    if d != triton.next_power_of_2(d) or d * problem.torch_dtype.itemsize % 16:
        return f"tma: head_dim={d} is not a power of 2 of 16-byte rows"
    return None


def make_inputs(problem: Problem, device, seed: int = 0, ctx=None) -> dict:
    """A cache longer than ``ctx`` (its views are strided); sequences end in the last 8 slots of
    ``ctx`` (the last at ctx - 1), so timings read about ``ctx`` keys per sequence. Drawn on ``device``
    a plane at a time: 32 sequences of 128k keys are 8.6 GB, which a CPU generator took tens of seconds
    to draw (an H200 tune's one problem ran ~55 s past its budget share, tune-...-at-94a3777.json)."""
    b, heads, kv, d, length = (problem[key] for key in ("m", "heads", "kv_heads", "head_dim", "ctx"))
    dtype = problem.torch_dtype
    rand = seeded_randn(device, seed, dtype)
    cache = torch.empty(2, b, kv, length + 8, d, dtype=dtype, device=device)
    for plane in cache:
        plane.copy_(rand(b, kv, length + 8, d))
    positions = length - 1 - torch.randint(0, min(8, length), (b,), generator=torch.Generator().manual_seed(seed))
    positions[-1] = length - 1
    q = rand(b, heads, d)
    return {"q": q, "k": cache[0, :, :, :length], "v": cache[1, :, :, :length],
            "positions": positions.to(device), "out": torch.empty_like(q)}


def work(problem: Problem) -> tuple[float, float]:
    """QK and PV flops; K and V read once per KV head, q and out once."""
    b, heads, kv, d, ctx = (problem[key] for key in ("m", "heads", "kv_heads", "head_dim", "ctx"))
    size = problem.torch_dtype.itemsize
    return 4.0 * b * heads * ctx * d, float((2 * b * kv * ctx * d + 2 * b * heads * d) * size)


# SDPA's programs (one per sequence x KV head) each stream at this share of an SM's even share of HBM
# (the H200 tunes of 2026-12-02: 24-27 GB/s per program against 32 GB/s); its masked call is ~7 kernels
SDPA_PROGRAM_SHARE, SDPA_LAUNCHES = 0.8, 7


def cost(problem: Problem, config: Optional[dict], spec) -> float:
    """Roofline of the KV read at the share of the SMs the programs fill, plus the dependent round trips
    (the first tile, the partials' store and the combine's load) and the combine's launch; the baseline
    (SDPA with a mask) streams a program per (sequence, KV head) at SDPA_PROGRAM_SHARE of one SM's share
    and pays the mask's kernels."""
    flops, nbytes = work(problem)
    if config is None:
        # SDPA runs one program per (sequence, KV head), each streaming its keys at about one SM's share
        # of HBM (H100: 92 us for 8 programs x 4096 keys at batch 1, 2026-11-23 tunes)
        mask = problem["m"] * problem["ctx"] * problem.torch_dtype.itemsize
        programs = problem["m"] * problem["kv_heads"]
        per_program = 2 * problem["ctx"] * problem["head_dim"] * problem.torch_dtype.itemsize
        stream = -(-programs // spec.sms) * per_program * spec.sms \
            / (spec.hbm_bytes_per_s * spec.measured_hbm_fraction * SDPA_PROGRAM_SHARE)
        return max(stream, roofline(flops, nbytes + mask, spec, problem.dtype, efficiency=0.4, launches=0)) \
            + SDPA_LAUNCHES * kernel_floor(spec)
    programs = problem["m"] * problem["kv_heads"]
    splits = split_count(problem["ctx"], config)
    group = problem["heads"] // problem["kv_heads"]
    partial = group * (problem["head_dim"] + 2) * 4           # one split's fp32 (acc | m, l) per row
    partials = 2 * programs * splits * partial if splits > 1 else 0
    fill = min(1.0, programs * splits / spec.sms)
    # the combine is a second launch whose programs each load their splits' partials once
    combine = kernel_floor(spec) + 2 * HBM_LATENCY_S if splits > 1 else 0.0
    return roofline(flops, nbytes + partials, spec, problem.dtype, efficiency=0.4, mem_efficiency=fill,
                    launches=1) + HBM_LATENCY_S + combine


TEMPLATE = register(Template(
    op=OP, space=space, make_inputs=make_inputs, launch=decode_attention, reference=reference,
    baseline=baseline, default_config=default_config, work=work, cost=cost, constraints=(block_fits, tma_unavailable),
    doc=__doc__.split("\n")[0]))
