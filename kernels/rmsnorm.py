"""RMSNorm with an optional fused residual add: the op at every Qwen3 layer boundary.

``y = x * rsqrt(mean(x^2) + eps) * weight`` per row, in fp32 math. With ``residual``:
``h = x + residual`` is rounded to the activation dtype and written to ``residual_out`` (by default
``residual`` itself, updated in place, as the engine keeps its residual stream), and ``y = rmsnorm(h)``
is computed from the rounded ``h``, so ``y`` is exactly the norm of the stored residual.

One program normalizes ``rows`` rows. When ``block_n`` covers the row, the row stays in registers
(one read, one write); a narrower ``block_n`` loops over the row twice (sum of squares, then
normalize; the second pass re-reads ``x``/``h``, mostly from L2), which keeps register use bounded
for very wide rows.

The template times the fused-residual form (what the engine runs) with a separate ``residual_out``
buffer so the inputs survive for the reference; the plain form moves half the bytes with the same tiles.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tuneforge.dsl import Problem, Space, Template, categorical, pow2, register
from tuneforge.errors import InputError
from tuneforge.kernels._common import (await_previous, chained, check_tensor, launch_spec, output_tensor, row_bytes, row_tile_cost, seeded_randn,
                                       tile_constraints)
from tuneforge.dsl.roofline import elementwise_time

OP = "rmsnorm"
QWEN3_EPS = 1e-6


@triton.jit
def _load_h(x_ptr, res_ptr, res_out_ptr, r, cols, mask, stride_x, stride_res, stride_res_out,
            HAS_RESIDUAL: tl.constexpr):
    """One tile of the normalized input in fp32: x, or x + residual rounded as stored to residual_out
    (so y is computed from exactly what the residual stream keeps)."""
    h = tl.load(x_ptr + r * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h += tl.load(res_ptr + r * stride_res + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h_stored = h.to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + r * stride_res_out + cols[None, :], h_stored, mask=mask)
        h = h_stored.to(tl.float32)
    return h


@triton.jit
def _rmsnorm_kernel(x_ptr, res_ptr, res_out_ptr, w_ptr, y_ptr, m, n,
                    stride_x, stride_res, stride_res_out, stride_y, eps,
                    HAS_RESIDUAL: tl.constexpr, SINGLE_PASS: tl.constexpr,
                    BLOCK_N: tl.constexpr, ROWS: tl.constexpr, PDL: tl.constexpr):
    await_previous(PDL)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < m
    r = rows.to(tl.int64)[:, None]  # row offsets overflow int32 past 2^31 elements
    if SINGLE_PASS:
        cols = tl.arange(0, BLOCK_N)
        mask = row_ok[:, None] & (cols < n)[None, :]
        h = _load_h(x_ptr, res_ptr, res_out_ptr, r, cols, mask, stride_x, stride_res, stride_res_out, HAS_RESIDUAL)
        rstd = tl.math.rsqrt(tl.sum(h * h, axis=1) / n + eps)
        w = tl.load(w_ptr + cols, mask=cols < n, other=0.0).to(tl.float32)
        y = h * rstd[:, None] * w[None, :]
        tl.store(y_ptr + r * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        sum_sq = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        for start in range(0, n, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = row_ok[:, None] & (cols < n)[None, :]
            h = _load_h(x_ptr, res_ptr, res_out_ptr, r, cols, mask, stride_x, stride_res, stride_res_out, HAS_RESIDUAL)
            sum_sq += h * h
        rstd = tl.math.rsqrt(tl.sum(sum_sq, axis=1) / n + eps)
        # the second pass re-reads h from residual_out (residual may be overwritten by now):
        # make every thread's stores visible to the whole program first
        tl.debug_barrier()
        for start in range(0, n, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            mask = row_ok[:, None] & (cols < n)[None, :]
            if HAS_RESIDUAL:
                h = tl.load(res_out_ptr + r * stride_res_out + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            else:
                h = tl.load(x_ptr + r * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + cols, mask=cols < n, other=0.0).to(tl.float32)
            y = h * rstd[:, None] * w[None, :]
            tl.store(y_ptr + r * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = QWEN3_EPS, *,
            residual: Optional[torch.Tensor] = None, residual_out: Optional[torch.Tensor] = None,
            out: Optional[torch.Tensor] = None, config: Optional[dict] = None) -> torch.Tensor:
    """``rmsnorm(x (+ residual)) * weight`` -> ``out`` [tokens, hidden] (allocated when None).

    With ``residual``, ``x + residual`` (rounded to the dtype) goes to ``residual_out``, default
    ``residual`` itself (in place). ``weight`` [hidden] may have any supported float dtype.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"{OP}: x must be a 2-D [tokens, hidden] tensor, got {got}")
    m, n = x.shape
    check_tensor(OP, "x", x, (m, n), None, None)
    check_tensor(OP, "weight", weight, (n,), None, x.device)
    if residual_out is not None and residual is None:
        raise InputError(f"{OP}: residual_out given without residual")
    if residual is not None:
        check_tensor(OP, "residual", residual, (m, n), x.dtype, x.device)
        residual_out = residual if residual_out is None else residual_out
        check_tensor(OP, "residual_out", residual_out, (m, n), x.dtype, x.device)
    if not eps > 0:
        raise InputError(f"{OP}: eps must be > 0, got {eps}")
    out = output_tensor(OP, out, (m, n), x)
    if m == 0 or n == 0:
        return out
    cfg = config or default(m, n, launch_spec(x.device, persistent=False))
    has_res = residual is not None
    res, res_out = (residual, residual_out) if has_res else (x, x)   # unused pointers when not has_res
    _rmsnorm_kernel[(triton.cdiv(m, cfg["rows"]),)](
        x, res, res_out, weight, out, m, n,
        x.stride(0), res.stride(0), res_out.stride(0), out.stride(0), float(eps),
        HAS_RESIDUAL=has_res, SINGLE_PASS=cfg["block_n"] >= n,
        BLOCK_N=cfg["block_n"], ROWS=cfg["rows"], num_warps=cfg["num_warps"], **chained(x))
    return out


def reference(x, weight, eps=QWEN3_EPS, residual=None, residual_out=None) -> torch.Tensor:
    """fp32 math; with a residual, the norm of ``x + residual`` rounded to the dtype (what is stored)."""
    h = x.float() if residual is None else (x.float() + residual.float()).to(x.dtype).float()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def baseline(x, weight, eps=QWEN3_EPS, residual=None, residual_out=None) -> torch.Tensor:
    """torch: an add into the residual stream, then ``F.rms_norm``."""
    if residual is not None:
        x = torch.add(x, residual, out=residual if residual_out is None else residual_out)
    return F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps)


# --- the template -------------------------------------------------------------------------------------

def space(problem: Problem) -> Space:
    return Space(pow2("block_n", 128, max(128, min(16384, triton.next_power_of_2(problem["n"])))),
                 categorical("rows", (1, 2, 4, 8)),
                 categorical("num_warps", (1, 2, 4, 8, 16)))


def default(m: int, n: int, spec) -> dict:
    """The whole row in registers (up to 8192 columns), ~16 elements per thread; short rows batched."""
    sms = spec.sms if spec is not None else 132
    block_n = min(max(128, triton.next_power_of_2(n)), 8192)
    rows = 1
    while rows < 8 and block_n * rows * 2 <= 2048 and math.ceil(m / (rows * 2)) >= 4 * sms:
        rows *= 2
    num_warps = max(1, min(16, block_n * rows // 512))
    return {"block_n": block_n, "rows": rows, "num_warps": num_warps}


def make_inputs(problem: Problem, device, seed: int = 0, ctx=None) -> dict:
    m, n, dtype = problem["m"], problem["n"], problem.torch_dtype
    rand = seeded_randn(device, seed, dtype)
    return {"x": rand(m, n), "weight": (1.0 + 0.1 * rand(n).float()).to(dtype), "eps": QWEN3_EPS,
            "residual": rand(m, n), "residual_out": torch.empty(m, n, dtype=dtype, device=device),
            "out": torch.empty(m, n, dtype=dtype, device=device)}



def work(problem: Problem) -> tuple[float, float]:
    """Fused residual form: read x and residual, write residual_out and y, read weight once."""
    return 6.0 * problem["m"] * problem["n"], row_bytes(problem, 4, per_col=1)


def baseline_bytes(problem: Problem) -> float:
    """add (2 m*n in, m*n out) + a fused rms_norm (m*n in, m*n out, weight)."""
    return row_bytes(problem, 5, per_col=1)


# the add, then rms_norm's reduction and its scaling: three kernel floors (5.6 us at 1 token, bench_gate)
_one_pass_cost = row_tile_cost(work, baseline_bytes, baseline_launches=3)


def cost(problem: Problem, config: Optional[dict], spec) -> float:
    """``row_tile_cost``'s estimate, plus the second pass of rows wider than one tile."""
    t = _one_pass_cost(problem, config, spec)
    m, n = problem["m"], problem["n"]
    if config is not None and config["block_n"] < n:   # the second pass re-reads the row (from L2 at best)
        t += elementwise_time(m, n, m * n * problem.torch_dtype.itemsize, spec, config, 0.0, problem.dtype) \
             - spec.launch_us * 1e-6
    return t


TEMPLATE = register(Template(
    op=OP,
    space=space,
    make_inputs=make_inputs,
    launch=rmsnorm,
    reference=reference,
    baseline=baseline,
    default_config=lambda problem, spec: default(problem["m"], problem["n"], spec),
    work=work,
    cost=cost,
    constraints=(tile_constraints,),
    doc=__doc__.split("\n")[0],
))
