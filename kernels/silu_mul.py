"""SwiGLU activation of a fused gate_up projection: ``y[m, n] = silu(x[:, :n]) * x[:, n:]``.

``x`` is the [tokens, 2 * inter] output of the fused gate/up GEMM (gate columns first, as in
Qwen3's ``act_fn(gate_proj(x)) * up_proj(x)``); ``y`` is [tokens, inter]. fp32 math inside, one
rounding at the store. Torch runs two kernels (silu, multiply: 5 passes over [tokens, inter]); the
fused kernel reads ``x`` once and writes ``y`` once. Rows may have any stride; columns must be contiguous.
Tiling: ``kernels/_common.py``'s row tiles (``rows`` x ``block_n`` of the output per program).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tuneforge.dsl import Problem, register
from tuneforge.errors import InputError
from tuneforge.kernels._common import (await_previous, chained, check_tensor, launch_spec, output_tensor, row_bytes, row_tile,
                                       row_tile_template, seeded_randn, tile_default, tile_grid)

OP = "silu_mul"


@triton.jit
def _silu_mul_kernel(x_ptr, y_ptr, m, n, tiles_n, stride_x, stride_y,
                     BLOCK_N: tl.constexpr, ROWS: tl.constexpr, PDL: tl.constexpr):
    await_previous(PDL)
    rows, cols = row_tile(tiles_n, ROWS, BLOCK_N)
    mask = (rows < m)[:, None] & (cols < n)[None, :]
    x_row = x_ptr + rows.to(tl.int64)[:, None] * stride_x   # int64: offsets pass 2^31 on long prefills
    gate = tl.load(x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_row + n + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = gate * tl.sigmoid(gate) * up
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def silu_mul(x: torch.Tensor, *, out: Optional[torch.Tensor] = None, config: Optional[dict] = None) -> torch.Tensor:
    """``silu(x[:, :n]) * x[:, n:]`` for ``x`` [tokens, 2n] -> ``out`` [tokens, n] (allocated when None)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"{OP}: x must be a 2-D [tokens, 2 * inter] tensor (gate | up), got {got}")
    m, width = x.shape
    if width % 2:
        raise InputError(f"{OP}: x's last dimension must be even (gate | up halves), got {width}")
    n = width // 2
    check_tensor(OP, "x", x, (m, width), None, None)
    out = output_tensor(OP, out, (m, n), x)
    if m == 0 or n == 0:
        return out
    cfg = config or tile_default(m, n, launch_spec(x.device, persistent=False))
    grid, tiles_n = tile_grid(m, n, cfg)
    _silu_mul_kernel[grid](x, out, m, n, tiles_n, x.stride(0), out.stride(0),
                           BLOCK_N=cfg["block_n"], ROWS=cfg["rows"], num_warps=cfg["num_warps"], **chained(x))
    return out


def reference(x) -> torch.Tensor:
    gate, up = x.float().chunk(2, dim=-1)
    return F.silu(gate) * up


def propagated_error(atol: float, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """What ``silu(gate) * up`` may err beyond the checker's table when gate and up are GEMM outputs each
    off by up to ``atol``: that absolute error carried through the product,
    ``atol * (|silu'(gate) * up| + |silu(gate)|)``. (The table's rtol already bounds the product's relative
    error: a factor's rounding, 2^-9 in bf16, sits 8x below it; an absolute error in one factor is what
    the other amplifies.) bf16 norm + gate_up at Qwen3-32B's K = 5120 exceeds the table alone at ~1
    element in 10^6, where |up| ~ 5 and silu(gate) ~ 0: the fused kernel and the unfused bf16 chain
    (``baseline``) alike (H200 2026-12-04; reproduced in fp64 on the host)."""
    gate, up = gate.double(), up.double()
    sig = torch.sigmoid(gate)
    return atol * ((sig * (1 + gate * (1 - sig)) * up).abs() + (gate * sig).abs())


def baseline(x) -> torch.Tensor:
    """What Qwen3's MLP runs on a fused gate_up output: ``F.silu`` then a multiply (two kernels)."""
    n = x.shape[-1] // 2
    return F.silu(x[:, :n]) * x[:, n:]


# --- the template -------------------------------------------------------------------------------------

def make_inputs(problem: Problem, device, seed: int = 0, ctx=None) -> dict:
    m, n, dtype = problem["m"], problem["n"], problem.torch_dtype
    x = seeded_randn(device, seed, dtype)(m, 2 * n, scale=2.0)
    return {"x": x, "out": torch.empty(m, n, dtype=dtype, device=device)}



def work(problem: Problem) -> tuple[float, float]:
    """Read gate and up, write y."""
    return 5.0 * problem["m"] * problem["n"], row_bytes(problem, 3)


def baseline_bytes(problem: Problem) -> float:
    """silu (m*n in, m*n out) + multiply (2 m*n in, m*n out)."""
    return row_bytes(problem, 5)


TEMPLATE = register(row_tile_template(
    OP, launch=silu_mul, make_inputs=make_inputs, reference=reference, baseline=baseline, work=work,
    baseline_bytes=baseline_bytes, baseline_launches=2, baseline_strided=True, doc=__doc__.split("\n")[0]))
