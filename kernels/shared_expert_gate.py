"""Shared-expert combine of Qwen3-Next / Qwen3.5 MoE layers: ``out = final + sigmoid(gate_logits) * shared_out``.

``final`` is the routed experts' output [tokens, hidden], ``shared_out`` the shared expert's output
[tokens, hidden] and ``gate_logits`` the shared-expert gate's logit per token ([tokens, 1] or [tokens]).
Torch runs three kernels (sigmoid, a broadcast multiply, an add: 5 passes over [tokens, hidden]); the
fused kernel reads ``final`` and ``shared_out`` once and writes ``out`` once, in fp32 math.

``out=None`` allocates the result; ``out=final`` combines in place (each element is read before it is
written by the same lane); any other ``out`` of the same shape and dtype is written. Inputs may have any
row stride (views into wider buffers) but must be contiguous along hidden.

Tiling: ``kernels/_common.py``'s row tiles (``rows`` x ``block_n`` of the output per program).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from tuneforge.dsl import Problem, register
from tuneforge.errors import InputError
from tuneforge.kernels._common import (await_previous, chained, check_tensor, launch_spec, output_tensor, row_bytes, row_tile,
                                       row_tile_template, seeded_randn, tile_default, tile_grid)

OP = "shared_expert_gate"


# --- the op -----------------------------------------------------------------------------------------

@triton.jit
def _shared_expert_gate_kernel(final_ptr, gate_ptr, shared_ptr, out_ptr, m, n, tiles_n,
                               stride_final, stride_gate, stride_shared, stride_out,
                               BLOCK_N: tl.constexpr, ROWS: tl.constexpr, PDL: tl.constexpr):
    await_previous(PDL)
    rows, cols = row_tile(tiles_n, ROWS, BLOCK_N)
    row_ok = rows < m
    mask = row_ok[:, None] & (cols < n)[None, :]
    r = rows.to(tl.int64)  # row offsets overflow int32 past 2^31 elements
    gate = tl.load(gate_ptr + r * stride_gate, mask=row_ok, other=0.0).to(tl.float32)
    final = tl.load(final_ptr + r[:, None] * stride_final + cols[None, :], mask=mask, other=0.0)
    shared = tl.load(shared_ptr + r[:, None] * stride_shared + cols[None, :], mask=mask, other=0.0)
    out = final.to(tl.float32) + tl.sigmoid(gate)[:, None] * shared.to(tl.float32)
    tl.store(out_ptr + r[:, None] * stride_out + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


def _check_inputs(final, gate_logits, shared_out) -> tuple[int, int]:
    if not isinstance(final, torch.Tensor) or final.dim() != 2:
        got = tuple(final.shape) if isinstance(final, torch.Tensor) else type(final).__name__
        raise InputError(f"{OP}: final must be a 2-D [tokens, hidden] tensor, got {got}")
    m, n = final.shape
    check_tensor(OP, "final", final, (m, n), None, None)
    check_tensor(OP, "shared_out", shared_out, (m, n), final.dtype, final.device)
    gate_shape = tuple(gate_logits.shape) if isinstance(gate_logits, torch.Tensor) else None
    if gate_shape not in ((m, 1), (m,)):
        raise InputError(f"{OP}: gate_logits must be [{m}, 1] or [{m}] (one logit per token), got {gate_shape}")
    # one logit per token at any token stride (e.g. a column of a wider router output)
    check_tensor(OP, "gate_logits", gate_logits, gate_shape, None, final.device, layout="any")
    return m, n


def shared_expert_gate(final: torch.Tensor, gate_logits: torch.Tensor, shared_out: torch.Tensor, *,
                       out: Optional[torch.Tensor] = None, config: Optional[dict] = None) -> torch.Tensor:
    """``out = final + sigmoid(gate_logits) * shared_out`` (fp32 math); ``out=final`` works in place."""
    m, n = _check_inputs(final, gate_logits, shared_out)
    out = output_tensor(OP, out, (m, n), final)
    if m == 0 or n == 0:
        return out
    cfg = config or tile_default(m, n, launch_spec(final.device, persistent=False))
    grid, tiles_n = tile_grid(m, n, cfg)
    _shared_expert_gate_kernel[grid](final, gate_logits, shared_out, out, m, n, tiles_n,
                                     final.stride(0), gate_logits.stride(0), shared_out.stride(0), out.stride(0),
                                     BLOCK_N=cfg["block_n"], ROWS=cfg["rows"], num_warps=cfg["num_warps"], **chained(final))
    return out


def reference(final, gate_logits, shared_out) -> torch.Tensor:
    gate = torch.sigmoid(gate_logits.float().reshape(-1, 1))
    return final.float() + gate * shared_out.float()


def baseline(final, gate_logits, shared_out) -> torch.Tensor:
    """What Qwen3-Next's modelling code runs: sigmoid, broadcast multiply, add (three kernels)."""
    return final + torch.sigmoid(gate_logits).reshape(-1, 1) * shared_out


# --- the template -------------------------------------------------------------------------------------

def make_inputs(problem: Problem, device, seed: int = 0, ctx=None) -> dict:
    m, n, dtype = problem["m"], problem["n"], problem.torch_dtype
    rand = seeded_randn(device, seed, dtype)
    return {"final": rand(m, n), "gate_logits": rand(m, 1, scale=3.0), "shared_out": rand(m, n),
            "out": torch.empty(m, n, dtype=dtype, device=device)}



def work(problem: Problem) -> tuple[float, float]:
    """Read final and shared_out, write out, read one logit per token."""
    return 3.0 * problem["m"] * problem["n"], row_bytes(problem, 3, per_row=1)


def baseline_bytes(problem: Problem) -> float:
    """sigmoid (m in, m out) + broadcast mul (m*n + m in, m*n out) + add (2 m*n in, m*n out)."""
    return row_bytes(problem, 5, per_row=3)


TEMPLATE = register(row_tile_template(
    OP, launch=shared_expert_gate, make_inputs=make_inputs, reference=reference, baseline=baseline, work=work,
    baseline_bytes=baseline_bytes, baseline_launches=3, doc=__doc__.split("\n")[0]))
