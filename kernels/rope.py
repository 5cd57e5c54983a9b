"""Qwen3 attention prologue on the fused qkv projection: per-head RMSNorm of q and k, then RoPE.

Input ``qkv`` is [tokens, (heads + 2 * kv_heads) * head_dim] laid out q | k | v, as a fused
q/k/v GEMM writes it. For every token and every q and k head, in fp32 math:

1. ``q_norm`` / ``k_norm``: ``x * rsqrt(mean(x^2) + eps) * weight`` over ``head_dim``;
2. rotary embedding, rotate-half convention of HF Qwen3 (``x * cos + rotate_half(x) * sin`` with
   ``cos = cos(pos * inv_freq)`` repeated over both halves, ``inv_freq = 1 / theta^(2i / head_dim)``
   computed exactly as transformers does, in fp32 on the CPU). ``positions`` is an int tensor
   [tokens], so a decode batch may mix positions. ``scaling`` (a config's ``rope_scaling``:
   linear, dynamic or YaRN) changes ``inv_freq`` and multiplies cos and sin by an attention
   factor, as transformers.modeling_rope_utils does.

Output: ``out`` [tokens, (heads + kv_heads) * head_dim] = rotated q | rotated k, rounded once to the
dtype. Without a KV cache v is neither read nor written; with ``kv_cache`` (the fused cache store)
v is read and stored, as it is, into the cache beside rotated k (``qkv``'s v columns are never
written). ``out=None`` allocates; for in place, pass the q|k columns of ``qkv`` itself,
``out=qkv[:, :(heads + kv_heads) * head_dim]`` (a strided view: any row stride is accepted), after
which ``qkv`` holds rotated q | rotated k | v. A program handles ``heads`` heads of ``rows`` tokens;
``head_dim`` need not be a power of two (even is required).
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tuneforge.dsl import Problem, Space, Template, categorical, pow2, register
from tuneforge.errors import InputError
from tuneforge.kernels._common import (MAX_ELEMENTS_PER_THREAD, MAX_TILE_ELEMENTS, await_previous, chained, check_tensor, launch_spec,
                                       output_tensor)
from tuneforge.dsl.roofline import eager_time, elementwise_time

OP = "rope_qk_norm"
QWEN3_THETA = 1_000_000.0
QWEN3_EPS = 1e-6


@triton.jit
def _rope_qk_norm_kernel(qkv_ptr, out_ptr, pos_ptr, inv_freq_ptr, q_w_ptr, k_w_ptr, cache_ptr, rows_ptr, m, heads,
                         qk_heads, all_heads, stride_qkv, stride_out, stride_pos, stride_rows, stride_ckv, stride_cb,
                         stride_ch, stride_cs, eps, attention_factor, HEAD_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr,
                         HEADS: tl.constexpr, ROWS: tl.constexpr, CACHE: tl.constexpr, PDL: tl.constexpr):
    """Heads [0, heads) are q, [heads, qk_heads) k, and with CACHE [qk_heads, all_heads) v: q and k are
    normed, rotated and stored in ``out``; with CACHE k and v (v as it is) are also stored in the KV
    cache at (``rows_ptr[token]``, slot = the token's position)."""
    await_previous(PDL)
    half = HEAD_DIM // 2
    head = tl.program_id(1) * HEADS + tl.arange(0, HEADS)
    col = tl.arange(0, BLOCK_HALF)
    col_ok = col < half
    mask = (head < all_heads)[:, None] & col_ok[None, :]
    # the norm weight of each head: q_norm for the first `heads`, k_norm for the kv heads after them
    is_q = (head < heads)[:, None]
    w1 = tl.where(is_q, tl.load(q_w_ptr + col, mask=col_ok, other=0.0).to(tl.float32)[None, :],
                  tl.load(k_w_ptr + col, mask=col_ok, other=0.0).to(tl.float32)[None, :])
    w2 = tl.where(is_q, tl.load(q_w_ptr + half + col, mask=col_ok, other=0.0).to(tl.float32)[None, :],
                  tl.load(k_w_ptr + half + col, mask=col_ok, other=0.0).to(tl.float32)[None, :])
    inv_freq = tl.load(inv_freq_ptr + col, mask=col_ok, other=0.0)
    offs = head[:, None] * HEAD_DIM + col[None, :]
    is_v = (head >= qk_heads)[:, None]
    # the cache place of a k or v head: [k | v] plane, then its KV head
    plane = (head >= qk_heads).to(tl.int64)
    cache_head = (head - heads - plane * (qk_heads - heads)).to(tl.int64)
    for i in tl.static_range(ROWS):
        row = tl.program_id(0) * ROWS + i
        row_mask = mask & ((head * 0 + row) < m)[:, None]   # a tensor mask (the interpreter rejects scalar & tensor)
        src = qkv_ptr + row.to(tl.int64) * stride_qkv + offs   # int64: offsets pass 2^31 on long prefills
        x1 = tl.load(src, mask=row_mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + half, mask=row_mask, other=0.0).to(tl.float32)
        rstd = tl.math.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / HEAD_DIM + eps)
        n1 = x1 * rstd[:, None] * w1
        n2 = x2 * rstd[:, None] * w2
        # the angle in fp32 exactly as transformers forms it: float(position) * inv_freq
        position = tl.load(pos_ptr + row * stride_pos, mask=row < m, other=0)
        angle = position.to(tl.float32) * inv_freq
        cos = (tl.cos(angle) * attention_factor)[None, :]
        sin = (tl.sin(angle) * attention_factor)[None, :]
        y1 = (n1 * cos - n2 * sin).to(out_ptr.dtype.element_ty)
        y2 = (n2 * cos + n1 * sin).to(out_ptr.dtype.element_ty)
        dst = out_ptr + row.to(tl.int64) * stride_out + offs
        qk_mask = row_mask & (head < qk_heads)[:, None]
        tl.store(dst, y1, mask=qk_mask)
        tl.store(dst + half, y2, mask=qk_mask)
        if CACHE:
            cache_row = tl.load(rows_ptr + row * stride_rows, mask=row < m, other=0).to(tl.int64)
            place = cache_ptr + plane[:, None] * stride_ckv + cache_row * stride_cb + cache_head[:, None] * stride_ch \
                + position.to(tl.int64) * stride_cs + col[None, :]
            kv_mask = row_mask & (head >= heads)[:, None]
            tl.store(place, tl.where(is_v, x1.to(out_ptr.dtype.element_ty), y1), mask=kv_mask)
            tl.store(place + half, tl.where(is_v, x2.to(out_ptr.dtype.element_ty), y2), mask=kv_mask)


@functools.lru_cache(maxsize=64)
def inv_freq(head_dim: int, theta: float, device: torch.device, scaling=None) -> torch.Tensor:
    """transformers' RoPE frequencies, bit for bit: fp32 ``1 / theta ** (arange(0, d, 2) / d)`` on the CPU,
    rescaled as ``scaling`` (a models.configs.RopeScaling, or None for default RoPE) says, then moved.
    Cached, so call once before CUDA-graph capture (the engine's warm-up does)."""
    freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    kind = scaling.rope_type if scaling is not None else "default"
    if kind == "linear":
        freq = freq / scaling.factor
    elif kind == "yarn":
        freq = _yarn_inv_freq(head_dim, theta, scaling)
    # "dynamic" (NTK) rescales only past max_position_embeddings, which the engine never reaches
    # (Generator refuses a longer context), so its frequencies are the default ones.
    return freq.to(device)


def _yarn_inv_freq(dim: int, base: float, s) -> torch.Tensor:
    """transformers' ``_compute_yarn_parameters``: interpolated frequencies (/ factor) for the slow
    dimensions, the original ones for the fast, a linear ramp between the correction dims of
    ``beta_fast`` and ``beta_slow`` rotations over ``original_max_position_embeddings``."""
    def correction_dim(rotations):
        return dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001      # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation = 1 - ramp
    return (1.0 / (s.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def attention_factor(scaling) -> float:
    """The factor transformers multiplies cos and sin by: YaRN's (given, or from ``factor``, ``mscale``
    and ``mscale_all_dim``), 1 for every other RoPE type."""
    if scaling is None or scaling.rope_type != "yarn":
        return 1.0
    if scaling.attention_factor is not None:
        return float(scaling.attention_factor)

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if scaling.mscale and scaling.mscale_all_dim:
        return float(mscale(scaling.factor, scaling.mscale) / mscale(scaling.factor, scaling.mscale_all_dim))
    return float(mscale(scaling.factor))


def _check(qkv, positions, q_weight, k_weight, heads, kv_heads) -> tuple[int, int]:
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 2:
        got = tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__
        raise InputError(f"{OP}: qkv must be a 2-D [tokens, (heads + 2 * kv_heads) * head_dim] tensor, got {got}")
    if not isinstance(q_weight, torch.Tensor) or q_weight.dim() != 1:
        raise InputError(f"{OP}: q_weight must be a 1-D [head_dim] tensor")
    head_dim = q_weight.shape[0]
    if head_dim < 2 or head_dim % 2:
        raise InputError(f"{OP}: head_dim (q_weight's length) must be even and >= 2 for rotate-half, got {head_dim}")
    if int(heads) < 1 or int(kv_heads) < 1:
        raise InputError(f"{OP}: heads and kv_heads must be >= 1, got heads={heads}, kv_heads={kv_heads}")
    m, width = qkv.shape
    if width != (heads + 2 * kv_heads) * head_dim:
        raise InputError(f"{OP}: qkv has {width} columns, expected (heads {heads} + 2 * kv_heads {kv_heads}) * "
                         f"head_dim {head_dim} = {(heads + 2 * kv_heads) * head_dim}")
    check_tensor(OP, "qkv", qkv, (m, width), None, None)
    check_tensor(OP, "q_weight", q_weight, (head_dim,), None, qkv.device)
    check_tensor(OP, "k_weight", k_weight, (head_dim,), None, qkv.device)
    if not isinstance(positions, torch.Tensor) or tuple(positions.shape) != (m,):
        got = tuple(positions.shape) if isinstance(positions, torch.Tensor) else type(positions).__name__
        raise InputError(f"{OP}: positions must be a [{m}] int tensor (one position per token), got {got}")
    if positions.dtype not in (torch.int32, torch.int64):
        raise InputError(f"{OP}: positions has dtype {positions.dtype}, expected torch.int32 or torch.int64")
    if positions.device != qkv.device:
        raise InputError(f"{OP}: positions is on {positions.device} but qkv is on {qkv.device}")
    return m, head_dim


def rope_qk_norm(qkv: torch.Tensor, positions: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor, *,
                 heads: int, kv_heads: int, theta: float = QWEN3_THETA, eps: float = QWEN3_EPS,
                 scaling=None, out: Optional[torch.Tensor] = None, config: Optional[dict] = None,
                 kv_cache: Optional[torch.Tensor] = None, cache_rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Normalized, rotated q | k of ``qkv`` -> ``out`` [tokens, (heads + kv_heads) * head_dim].

    In place: ``out=qkv[:, :(heads + kv_heads) * head_dim]``. ``q_weight``/``k_weight`` are the
    [head_dim] q_norm/k_norm weights; ``positions`` the int32/int64 position of every token;
    ``scaling`` the model's RopeScaling (None: default RoPE).

    ``kv_cache`` [2, batch, kv_heads, slots, head_dim] (a layer's k | v planes, unit stride along
    head_dim) with ``cache_rows`` [tokens]: the same launch also stores each token's rotated k and its v
    at ``kv_cache[:, cache_rows[t], :, positions[t]]`` (the decode step's cache write, one kernel
    fewer; ``positions[t] < slots`` is not checked on the device).
    """
    m, head_dim = _check(qkv, positions, q_weight, k_weight, heads, kv_heads)
    qk_heads = heads + kv_heads
    if not eps > 0 or not theta > 0:
        raise InputError(f"{OP}: eps and theta must be > 0, got eps={eps}, theta={theta}")
    if (kv_cache is None) != (cache_rows is None):
        raise InputError(f"{OP}: kv_cache and cache_rows go together (the rows say where each token's k and v go)")
    if kv_cache is not None:
        _check_cache(kv_cache, cache_rows, m, kv_heads, head_dim, qkv)
    out = output_tensor(OP, out, (m, qk_heads * head_dim), qkv)
    if m == 0:
        return out
    cfg = config or default(m, heads, kv_heads, head_dim, launch_spec(qkv.device, persistent=False))
    all_heads = qk_heads + (kv_heads if kv_cache is not None else 0)
    grid = (triton.cdiv(m, cfg["rows"]), triton.cdiv(all_heads, cfg["heads"]))
    cache_strides = (kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3)) \
        if kv_cache is not None else (0, 0, 0, 0)
    _rope_qk_norm_kernel[grid](qkv, out, positions, inv_freq(head_dim, float(theta), qkv.device, scaling), q_weight,
                               k_weight, kv_cache if kv_cache is not None else qkv,
                               cache_rows if cache_rows is not None else positions, m, heads, qk_heads, all_heads,
                               qkv.stride(0), out.stride(0), positions.stride(0),
                               cache_rows.stride(0) if cache_rows is not None else 0, *cache_strides, float(eps),
                               attention_factor(scaling),
                               HEAD_DIM=head_dim, BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
                               HEADS=cfg["heads"], ROWS=cfg["rows"], CACHE=kv_cache is not None,
                               num_warps=cfg["num_warps"], **chained(qkv))
    return out


def _check_cache(kv_cache, cache_rows, m: int, kv_heads: int, head_dim: int, qkv) -> None:
    if not isinstance(kv_cache, torch.Tensor) or kv_cache.dim() != 5 or kv_cache.shape[0] != 2 \
            or kv_cache.shape[2] != kv_heads or kv_cache.shape[4] != head_dim:
        got = tuple(kv_cache.shape) if isinstance(kv_cache, torch.Tensor) else type(kv_cache).__name__
        raise InputError(f"{OP}: kv_cache must be [2, batch, kv_heads={kv_heads}, slots, head_dim={head_dim}], got {got}")
    if kv_cache.dtype != qkv.dtype or kv_cache.device != qkv.device or kv_cache.stride(4) != 1:
        raise InputError(f"{OP}: kv_cache must be {qkv.dtype} on {qkv.device} with unit stride along head_dim, got "
                         f"{kv_cache.dtype} on {kv_cache.device}, strides {kv_cache.stride()}")
    if not isinstance(cache_rows, torch.Tensor) or tuple(cache_rows.shape) != (m,) or cache_rows.is_floating_point() \
            or cache_rows.device != qkv.device:
        got = (tuple(cache_rows.shape), cache_rows.dtype, str(cache_rows.device)) \
            if isinstance(cache_rows, torch.Tensor) else type(cache_rows).__name__
        raise InputError(f"{OP}: cache_rows must be an integer [{m}] tensor on {qkv.device} (each token's cache row), "
                         f"got {got}")


def cache_reference(kv_cache: torch.Tensor, cache_rows: torch.Tensor, positions: torch.Tensor,
                    kv: torch.Tensor) -> None:
    """The fused cache store in torch: ``kv`` [tokens, 2 * kv_heads * head_dim] (rotated k | v, as
    ``qkv``'s columns past q hold them after an in-place launch) into ``kv_cache`` at (``cache_rows``,
    ``positions``), as the engine's ``KVCache.write`` indexes it."""
    kv_cache[:, cache_rows, :, positions] = kv.reshape(kv.shape[0], 2, kv_cache.shape[2], kv_cache.shape[-1])


def cache_expected(qkv, positions, q_weight, k_weight, heads, kv_heads, theta=QWEN3_THETA, eps=QWEN3_EPS,
                   scaling=None, kv_cache=None, cache_rows=None) -> dict:
    """The template's ``side_outputs``: with ``kv_cache``, the cache the launch leaves (fp32, NaN where
    nothing is stored): ``reference``'s rotated k and ``qkv``'s v at (``cache_rows``, ``positions``)."""
    if kv_cache is None:
        return {}
    head_dim = q_weight.shape[0]
    ref = reference(qkv, positions, q_weight, k_weight, heads, kv_heads, theta, eps, scaling)
    expected = torch.full(kv_cache.shape, float("nan"), dtype=torch.float32, device=kv_cache.device)
    cache_reference(expected, cache_rows, positions,
                    torch.cat((ref[:, heads * head_dim:], qkv[:, (heads + kv_heads) * head_dim:].float()), 1))
    return {"kv_cache": expected}


def _split_heads(qkv, heads, kv_heads, head_dim):
    m = qkv.shape[0]
    q = qkv[:, :heads * head_dim].reshape(m, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].reshape(m, kv_heads, head_dim)
    return q, k


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _cos_sin(positions, head_dim, theta, scaling, device):
    """transformers' rotary embedding: fp32 cos and sin of ``position * inv_freq`` over both halves,
    times the attention factor, [tokens, 1, head_dim]."""
    angle = positions.float()[:, None] * inv_freq(head_dim, float(theta), device, scaling)[None, :]
    emb = torch.cat((angle, angle), dim=-1)
    factor = attention_factor(scaling)
    return (emb.cos() * factor)[:, None, :], (emb.sin() * factor)[:, None, :]


def reference(qkv, positions, q_weight, k_weight, heads, kv_heads, theta=QWEN3_THETA, eps=QWEN3_EPS,
              scaling=None, kv_cache=None, cache_rows=None) -> torch.Tensor:
    """fp32 math with transformers' fp32 angles: q_norm/k_norm, then apply_rotary_pos_emb. The rotated
    q | k only: the template checks the cache store (``kv_cache``) against ``cache_expected``."""
    head_dim = q_weight.shape[0]
    q, k = _split_heads(qkv.float(), heads, kv_heads, head_dim)
    cos, sin = _cos_sin(positions, head_dim, theta, scaling, qkv.device)

    def norm_rope(x, w):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.float()
        return x * cos + _rotate_half(x) * sin

    return torch.cat((norm_rope(q, q_weight), norm_rope(k, k_weight)), dim=1).reshape(qkv.shape[0],
                                                                                      (heads + kv_heads) * head_dim)


def baseline(qkv, positions, q_weight, k_weight, heads, kv_heads, theta=QWEN3_THETA, eps=QWEN3_EPS,
             scaling=None, kv_cache=None, cache_rows=None) -> torch.Tensor:
    """What a torch Qwen3 runs: ``F.rms_norm`` per head, cos/sin in fp32 cast to the dtype, rotate-half
    in the dtype, q and k concatenated into one [tokens, (heads + kv_heads) * head_dim] tensor; with
    ``kv_cache``, then the indexed cache write of rotated k and v (the engine's unfused write)."""
    head_dim = q_weight.shape[0]
    q, k = _split_heads(qkv, heads, kv_heads, head_dim)
    cos, sin = (t.to(qkv.dtype) for t in _cos_sin(positions, head_dim, theta, scaling, qkv.device))
    q = F.rms_norm(q, (head_dim,), q_weight.to(qkv.dtype), eps)
    k = F.rms_norm(k, (head_dim,), k_weight.to(qkv.dtype), eps)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    out = torch.cat((q, k), dim=1).reshape(qkv.shape[0], (heads + kv_heads) * head_dim)
    if kv_cache is not None:
        cache_reference(kv_cache, cache_rows, positions,
                        torch.cat((out[:, heads * head_dim:], qkv[:, (heads + kv_heads) * head_dim:]), 1))
    return out


# --- the template -------------------------------------------------------------------------------------

def space(problem: Problem) -> Space:
    qk_heads = problem["heads"] + problem["kv_heads"]
    return Space(pow2("heads", 1, max(1, min(16, triton.next_power_of_2(qk_heads)))),
                 categorical("rows", (1, 2, 4)),
                 categorical("num_warps", (1, 2, 4, 8)))


def constraint(config: dict, problem: Problem, spec) -> Optional[str]:
    # x1, x2 are [heads, head_dim / 2] fp32 tiles each
    elements = config["heads"] * triton.next_power_of_2(problem["head_dim"] // 2)
    threads = config["num_warps"] * 32
    if 2 * elements > MAX_TILE_ELEMENTS:
        return f"{config['heads']} heads x head_dim {problem['head_dim']} > {MAX_TILE_ELEMENTS} elements (register spills)"
    if config["num_warps"] > 1 and threads > elements:
        return f"{config['num_warps']} warps ({threads} threads) for {elements}-element half-head tiles leave lanes idle"
    if 2 * elements / threads > MAX_ELEMENTS_PER_THREAD:
        return f"{2 * elements // threads} elements per thread > {MAX_ELEMENTS_PER_THREAD} (register spills)"
    if config["rows"] > 1 and config["rows"] > triton.next_power_of_2(problem["m"]):
        return f"rows={config['rows']} exceeds the {problem['m']} tokens (idle rows)"
    return None


def default(m: int, heads: int, kv_heads: int, head_dim: int, spec) -> dict:
    """~1024 elements (8 heads of 128) per program; fewer heads when few tokens leave SMs idle."""
    sms = spec.sms if spec is not None else 132
    qk_heads = heads + kv_heads
    half = triton.next_power_of_2(head_dim // 2)
    heads_per = max(1, min(triton.next_power_of_2(qk_heads), 16, 1024 // (2 * half)))
    while heads_per > 1 and m * math.ceil(qk_heads / heads_per) < 2 * sms:
        heads_per //= 2
    num_warps = max(1, min(8, heads_per * half // 128))   # ~4 elements per thread per half tile
    return {"heads": heads_per, "rows": 1, "num_warps": num_warps}


def make_inputs(problem: Problem, device, seed: int = 0, ctx=None) -> dict:
    m, heads, kv_heads, head_dim = problem["m"], problem["heads"], problem["kv_heads"], problem["head_dim"]
    dtype = problem.torch_dtype
    g = torch.Generator(device=device).manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, device=device, dtype=torch.float32)
    return {"qkv": rand(m, (heads + 2 * kv_heads) * head_dim).to(dtype),
            # decode batches mix positions; large ones exercise fp32 angle rounding
            "positions": torch.randint(0, 32768, (m,), generator=g, device=device, dtype=torch.int64),
            "q_weight": (1.0 + 0.2 * rand(head_dim)).to(dtype), "k_weight": (1.0 + 0.2 * rand(head_dim)).to(dtype),
            "heads": heads, "kv_heads": kv_heads, "theta": QWEN3_THETA, "eps": QWEN3_EPS,
            "out": torch.empty(m, (heads + kv_heads) * head_dim, dtype=dtype, device=device),
            **(cache_inputs(m, kv_heads, head_dim, dtype, device, g) if problem.shape.get("cache") else {})}


CACHE_ROWS = 32     # sequences of a cache problem's inputs
CACHE_BASE = 512    # a cache problem's sequences start at a random slot below this (positions past 0 rotate)


def cache_inputs(m: int, kv_heads: int, head_dim: int, dtype, device, generator=None) -> dict:
    """A NaN-poisoned cache of up to ``CACHE_ROWS`` sequences that the ``m`` tokens fill slot by slot
    from a random base slot per sequence (below ``CACHE_BASE``, drawn from ``generator``): token t at
    row t % rows, slot base[row] + t // rows (every written slot distinct), and the tokens' positions
    (their slots: the kernel stores at the position) in place of the random ones. The slot dimension
    covers the last written slot: max(base) + ceil(m / rows)."""
    rows = max(1, min(m, CACHE_ROWS))
    t = torch.arange(m, device=device)
    base = torch.randint(0, CACHE_BASE, (rows,), generator=generator, device=device, dtype=torch.int64)
    slots = int(base.max()) + -(-m // rows)
    return {"kv_cache": torch.full((2, rows, kv_heads, slots, head_dim), float("nan"), dtype=dtype, device=device),
            "cache_rows": t % rows, "positions": base[t % rows] + t // rows}


def _qk_elements(problem: Problem) -> int:
    return problem["m"] * (problem["heads"] + problem["kv_heads"]) * problem["head_dim"]


def _cache_elements(problem: Problem) -> int:
    """k and v elements a cache problem's launch stores (and v read for it)."""
    return 2 * problem["m"] * problem["kv_heads"] * problem["head_dim"] if problem.shape.get("cache") else 0


def work(problem: Problem) -> tuple[float, float]:
    """Read q and k, write them rotated; with the cache, read v and store k and v there; positions
    (int64) and the weights are noise."""
    size = problem.torch_dtype.itemsize
    elements, cached = _qk_elements(problem), _cache_elements(problem)
    return 12.0 * elements, float((2 * elements + 1.5 * cached) * size + 8 * problem["m"]
                                  + 2 * problem["head_dim"] * size)


# Passes over the q|k bytes and kernel launches of the torch baseline: rms_norm q, k (read+write each,
# plus a copy to make the strided head views contiguous), then per q and k: x*cos, rotate_half (neg +
# cat), *sin, add; and the final cat. cos/sin of [tokens, head_dim] are noise.
BASELINE_PASSES, BASELINE_LAUNCHES = 16, 20
# its cache write: k | v concatenated, then the indexed copy (each a read and a write of the cached elements)
CACHE_PASSES, CACHE_LAUNCHES = 4, 2


def cost(problem: Problem, config: Optional[dict], spec) -> float:
    flops, nbytes = work(problem)
    cached = _cache_elements(problem)
    if config is None:
        size = problem.torch_dtype.itemsize
        return eager_time(flops, (BASELINE_PASSES * _qk_elements(problem) + CACHE_PASSES * cached) * size, spec,
                          BASELINE_LAUNCHES + (CACHE_LAUNCHES if cached else 0), strided=True, dtype=problem.dtype)
    cols = (problem["heads"] + problem["kv_heads"] * (2 if cached else 1)) * problem["head_dim"]
    tile = {"block_n": config["heads"] * problem["head_dim"], "rows": config["rows"], "num_warps": config["num_warps"]}
    return elementwise_time(problem["m"], cols, nbytes, spec, tile, flops, problem.dtype)


TEMPLATE = register(Template(
    op=OP,
    space=space,
    make_inputs=make_inputs,
    launch=rope_qk_norm,
    reference=reference,
    side_outputs=cache_expected,
    baseline=baseline,
    default_config=lambda problem, spec: default(problem["m"], problem["heads"], problem["kv_heads"],
                                                 problem["head_dim"], spec),
    work=work,
    cost=cost,
    constraints=(constraint,),
    doc=__doc__.split("\n")[0],
))
