"""A GEMM with its neighbours fused: the RMSNorm before it (prologue) and the SiLU-mul or the residual
add after it (epilogue), as one template the tuner accepts or rejects per shape.

``y = epilogue(rmsnorm(x) * norm_weight @ w.T)`` (the norm when the problem's ``norm`` is 1) with
``epi`` (``models.problems.GEMM_EPILOGUES``): ``none``; ``residual``: ``+ residual`` (o_proj and down_proj
writing the residual stream in place); ``silu_mul``: w is the [gate | up] projection and the tile
computes gate column j and up column j as two accumulators, ``y[:, j] = silu(gate_j) * up_j``
(gate_up_proj). The kernel is gemm's (``kernels/gemm.py``, constexpr paths); the norm's row scale
comes from the sum of squares a whole tile accumulates as it walks K, or for a K slice (split-K,
stream-K, hybrid's last wave) from a pass over its rows before its loop (slices scaled alike sum right);
the pair's K slices are stored gate and up interleaved, summed as one and split where the tile is
stored; the residual add is made by whoever stores the tile. Every fusion runs every schedule.

The baseline is the unfused pair a torch user runs (``F.rms_norm`` then ``F.linear``; ``F.linear``
then ``F.silu`` and a multiply, or an add), so a stored winner says whether fusing paid at that shape:
the engine fuses only where the kernel won, and runs the unfused ops (each tuned on its own) elsewhere.
At up to 64 rows the skinny family (``kernels/_gemm_skinny.py``) is in the space too: one row block over
column tiles x K slices (unsplit with the norm), with the same prologue and epilogues.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from tuneforge.dsl import Problem, Template, register
from tuneforge.dsl.devices import DeviceSpec
from tuneforge.dsl.roofline import gemm_config_time, roofline
from tuneforge.kernels import _gemm_skinny as SK
from tuneforge.kernels import gemm as G
from tuneforge.kernels import silu_mul as SILU
from tuneforge.kernels._common import seeded_randn
from tuneforge.kernels.rmsnorm import QWEN3_EPS

OP = "gemm_fused"


def gemm_fused(x: torch.Tensor, w: torch.Tensor, *, norm_weight: Optional[torch.Tensor] = None,
               eps: float = QWEN3_EPS, residual: Optional[torch.Tensor] = None, silu: bool = False,
               out: Optional[torch.Tensor] = None, config: Optional[dict] = None) -> torch.Tensor:
    """``G.gemm`` with its fusions (see there); ``out`` may be ``residual`` (the add in place)."""
    return G.gemm(x, w, out=out, config=config, norm_weight=norm_weight, eps=eps, residual=residual, silu=silu)


def _normed(x, norm_weight, eps):
    x = x.double()
    return x if norm_weight is None else x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.double()


def reference(x, w, norm_weight=None, eps=QWEN3_EPS, residual=None, silu=False) -> torch.Tensor:
    """fp64: the norm, the product, then the SiLU-mul or the residual add, with no rounding between."""
    y = _normed(x, norm_weight, eps) @ w.double().T
    if silu:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    return y if residual is None else y + residual.double()


def propagated_error(atol, x, w, norm_weight=None, eps=QWEN3_EPS, residual=None, silu=False):
    """The SiLU-mul's carried error (``silu_mul.propagated_error``) from the fp64 gate and up; None for the
    linear epilogues (the table alone)."""
    if not silu:
        return None
    return SILU.propagated_error(atol, *(_normed(x, norm_weight, eps) @ w.double().T).chunk(2, dim=-1))


def baseline(x, w, norm_weight=None, eps=QWEN3_EPS, residual=None, silu=False) -> torch.Tensor:
    """The unfused ops in torch: ``F.rms_norm``, ``F.linear``, then ``F.silu`` and a multiply or an add."""
    if norm_weight is not None:
        x = F.rms_norm(x, (x.shape[-1],), norm_weight.to(x.dtype), eps)
    y = F.linear(x, w)
    if silu:
        n = y.shape[-1] // 2
        return F.silu(y[:, :n]) * y[:, n:]
    return y if residual is None else y.add_(residual)


def make_inputs(problem: Problem, device, seed: int = 0, ctx=None) -> dict:
    """x ~ N(0, 1) (the residual stream's scale), w ~ N(0, 1/k), a norm weight near 1, a residual ~ N(0, 1)."""
    m, n, k = problem["m"], problem["n"], problem["k"]
    norm, epi = G.fusion_of(problem)
    dtype = problem.torch_dtype
    rand = seeded_randn(device, seed, dtype)
    inputs = {"x": rand(m, k), "w": rand(n, k, scale=1.0 / max(k, 1) ** 0.5), "eps": QWEN3_EPS,
              "silu": epi == "silu_mul", "out": torch.empty(m, G.out_width(problem), dtype=dtype, device=device)}
    if norm:
        inputs["norm_weight"] = (1.0 + 0.1 * rand(k).float()).to(dtype)
    if epi == "residual":
        inputs["residual"] = rand(m, n)
    return inputs


def work(problem: Problem) -> tuple[float, float]:
    """2mnk flops; x, w and the norm weight read once, the residual read and y written once."""
    m, n, k = problem["m"], problem["n"], problem["k"]
    norm, epi = G.fusion_of(problem)
    elems = m * k + n * k + m * G.out_width(problem) * (2 if epi == "residual" else 1) + (k if norm else 0)
    return 2.0 * m * n * k, float(elems * G.ELEM_SIZE[problem.dtype])


def cost(problem: Problem, config: Optional[dict], spec: DeviceSpec) -> float:
    """gemm's tile model (the pair: as wide a tile); the baseline adds the unfused ops' kernels: the norm
    (x read, written), the SiLU-mul (y read twice over, written) or the add (two reads, a write)."""
    m, n, k = problem["m"], problem["n"], problem["k"]
    if config is not None and config.get("kernel") == "skinny":
        return SK.cost(problem, config, spec)
    if config is not None:
        return gemm_config_time(m, n, k, G._pair(config, problem), spec, problem.dtype)
    norm, epi = G.fusion_of(problem)
    size = G.ELEM_SIZE[problem.dtype]
    t = gemm_config_time(m, n, k, None, spec, problem.dtype)
    if norm:    # torch's RMSNorm: fp32 cast, square-mean, rsqrt, two products, cast back (about 3 launches' time)
        t += roofline(4.0 * m * k, 2.0 * m * k * size, spec, problem.dtype, launches=3)
    if epi != "none":
        t += roofline(5.0 * m * n, 3.0 * m * G.out_width(problem) * size, spec, problem.dtype,
                      launches=2 if epi == "silu_mul" else 1)
    return t


def seeds(problem: Problem, spec: DeviceSpec) -> list[dict]:
    """The fused default, the skinny family's seeds (9-64 rows; with the norm the unsplit ones), then gemm's
    portfolio at this shape: power-of-two tiles, the pair's halves each half as wide (as wide in all as
    gemm's tile)."""
    norm, epi = G.fusion_of(problem)
    configs = [default_config(problem, spec)] + SK.seeds(problem, spec)
    for c in G.portfolio(problem, spec):
        c = {"kernel": "triton", **c}
        if norm or epi == "silu_mul":
            c = {**c, "block_n": max(16, G.split_width(c["block_n"])[0] // (2 if epi == "silu_mul" else 1))}
        if c not in configs and TEMPLATE.reject_reason(c, problem, spec) is None:
            configs.append(c)
    return configs


def default_config(problem: Problem, spec: DeviceSpec) -> dict:
    """The Triton kernel's fused default, named as such (an enqueued trial without ``kernel`` would
    have the family sampled)."""
    return {"kernel": "triton", **G.fused_default_config(problem, spec)}


TEMPLATE = register(Template(
    op=OP, space=G.fused_space, make_inputs=make_inputs, launch=gemm_fused, reference=reference, baseline=baseline,
    default_config=default_config, work=work, cost=cost, constraints=G.FUSED_FAMILY_CONSTRAINTS, seeds=seeds,
    propagated_error=propagated_error, doc=__doc__.split("\n")[0]))
