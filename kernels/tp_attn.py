"""Tensor-parallel attention block (Qwen3): qkv column-parallel projection, the engine's attention
core, o_proj row-parallel.

The attention core (q/k norm, RoPE, KV cache, SDPA) is the engine's, so the block is exposed as
its two halves, called around it:

    qkv = qkv_half(x, qkv_w, ctx=ctx, config=config, m=m)     # [m, qkv]: all m tokens, this rank's heads
    attn = <the engine's attention on qkv>                    # [m, o_in]
    out = o_half(attn, o_w, ctx=ctx, config=config)           # gemm_ar: [m, hidden]; ag_rs: this rank's rows

with the strategies of ``kernels/tp_mlp`` (``gemm_ar``: replicated ``x``, GEMM, ..., GEMM +
all-reduce; ``ag_rs``: row-sharded ``x``, AllGather-GEMM, ..., GEMM-ReduceScatter). Problem dims:
``qkv`` = this rank's fused q|k|v width, ``o_in`` = this rank's o_proj in-features.

The template times the two halves with the first ``o_in`` columns of ``qkv`` (the query heads)
standing in for the attention output (the attention core is timed as its own op), so the tuner
compares the strategies on the block's linears and communication alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tuneforge.dsl import Problem, Space, register
from tuneforge.errors import InputError
from tuneforge.kernels._common import rank_generator
from tuneforge.kernels.tp_mlp import (all_reduced_rows, block_cost, block_default, block_space, block_template,
                                      first_half, rounded, run_block, second_half, summed_rows)


def qkv_half(x: torch.Tensor, qkv_w: torch.Tensor, *, ctx, config: dict | None = None, m: int | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """The fused q|k|v projection of all ``m`` tokens for this rank's heads: [m, qkv]. gemm_ar (also
    ``config`` None): ``x`` is the replicated [m, hidden]; ag_rs: ``x`` is this rank's rows, ``m`` the
    total. Collective under ag_rs."""
    return first_half(x, qkv_w, ctx=ctx, config=config, m=m, out=out)


def o_half(attn: torch.Tensor, o_w: torch.Tensor, *, ctx, config: dict | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """o_proj of the attention output ``attn`` [m, o_in] (any row stride) with this rank's ``o_w``
    [hidden, o_in], summed over ranks: gemm_ar -> [m, hidden] on every rank; ag_rs -> this rank's
    rows. Collective."""
    return second_half(attn, o_w, ctx=ctx, config=config, out=out)


def tp_attn(x: torch.Tensor, qkv_w: torch.Tensor, o_w: torch.Tensor, *, ctx, config: dict | None = None,
            m: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The block with the query heads standing in for the attention core (what the template times)."""
    if not isinstance(o_w, torch.Tensor) or o_w.dim() != 2 or o_w.shape[1] > qkv_w.shape[0]:
        raise InputError(f"tp_attn: o_w must be [hidden, o_in] with o_in <= qkv={qkv_w.shape[0]}")
    qkv = qkv_half(x, qkv_w, ctx=ctx, config=config, m=m)
    return o_half(qkv[:, :o_w.shape[1]], o_w, ctx=ctx, config=config, out=out)


def _gemms(problem: Problem) -> list[tuple[int, int]]:
    return [(problem["qkv"], problem["hidden"]), (problem["hidden"], problem["o_in"])]


def _launch(x: torch.Tensor, qkv_w: torch.Tensor, o_w: torch.Tensor, *, ctx, out: torch.Tensor,
            config: dict | None = None) -> torch.Tensor:
    return run_block(tp_attn, x, (qkv_w, o_w), ctx, out, config)


def reference(x: torch.Tensor, qkv_w: torch.Tensor, o_w: torch.Tensor, ctx) -> torch.Tensor:
    """fp64; the qkv output and each rank's partial sum rounded to the activation dtype; this rank's
    rows of the sum over ranks."""
    qkv = rounded(x.double() @ qkv_w.double().T, x.dtype)
    return summed_rows((qkv[:, :o_w.shape[1]] @ o_w.double().T).to(x.dtype), ctx)


def baseline(x: torch.Tensor, qkv_w: torch.Tensor, o_w: torch.Tensor, ctx) -> torch.Tensor:
    """F.linear, F.linear, dist.all_reduce (this rank's rows)."""
    return all_reduced_rows(F.linear(F.linear(x, qkv_w)[:, :o_w.shape[1]], o_w), ctx)


def baseline_ag_rs(x_rows: torch.Tensor, qkv_w: torch.Tensor, o_w: torch.Tensor, ctx, m: int) -> torch.Tensor:
    """all_gather_into_tensor, F.linear, F.linear, reduce_scatter_tensor (this rank's rows)."""
    from tuneforge.kernels.allgather import baseline as gather
    from tuneforge.kernels.reducescatter import baseline as scatter
    return scatter(F.linear(F.linear(gather(x_rows, ctx, m), qkv_w)[:, :o_w.shape[1]], o_w), ctx)


def make_inputs(problem: Problem, device, seed: int, ctx) -> dict:
    m, hidden, qkv, o_in = problem["m"], problem["hidden"], problem["qkv"], problem["o_in"]
    if o_in > qkv:
        raise InputError(f"tp_attn: o_in={o_in} exceeds qkv={qkv} (o_proj reads the attention of the q heads)")
    dt = problem.torch_dtype
    x = torch.randn(m, hidden, generator=torch.Generator().manual_seed(seed)).to(dt).to(device)
    g = rank_generator(problem, seed, ctx, stream=1)
    qkv_w = (torch.randn(qkv, hidden, generator=g) / hidden ** 0.5).to(dt).to(device)
    o_w = (torch.randn(hidden, o_in, generator=g) / (o_in * ctx.size) ** 0.5).to(dt).to(device)
    return {"x": x, "qkv_w": qkv_w, "o_w": o_w, "ctx": ctx, "out": torch.empty((m, hidden), dtype=dt, device=device)}


def space(problem: Problem) -> Space:
    return block_space(problem["m"], problem.world, _gemms(problem))


def default_config(problem: Problem, spec=None, strategy: str = "gemm_ar") -> dict:
    return block_default(problem, spec, _gemms(problem), strategy)


def work(problem: Problem) -> tuple[float, float]:
    m, h, q, o = problem["m"], problem["hidden"], problem["qkv"], problem["o_in"]
    return 2.0 * m * h * (q + o), float((h * (q + o) + 2 * m * h + m * q) * problem.torch_dtype.itemsize)


def cost(problem: Problem, config: dict | None, spec) -> float:
    return block_cost(problem, config, spec, _gemms(problem), lambda cfg: 0.0)


TEMPLATE = register(block_template(
    "tp_attn", _gemms, "TP attention linears: qkv-half and o-half as gemm + all-reduce (replicated rows) or "
    "AG-GEMM + GEMM-RS (row-sharded), strategy in the space; the engine's attention core runs between the halves",
    space=space, make_inputs=make_inputs, launch=_launch, reference=reference, baseline=baseline,
    default_config=default_config, work=work, cost=cost))
