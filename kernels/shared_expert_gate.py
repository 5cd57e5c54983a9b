"""Shared-expert combine of Qwen3-Next / Qwen3.5 MoE layers: ``out = final + sigmoid(gate_logits) * shared_out``.

``final`` is the routed experts' output [tokens, hidden], ``shared_out`` the shared expert's output
[tokens, hidden] and ``gate_logits`` the shared-expert gate's logit per token ([tokens, 1] or [tokens]).
Torch runs three kernels (sigmoid, a broadcast multiply, an add: 5 passes over [tokens, hidden]); the
fused kernel reads ``final`` and ``shared_out`` once and writes ``out`` once, in fp32 math.

``out=None`` allocates the result; ``out=final`` combines in place (each element is read before it is
written by the same lane); any other ``out`` of the same shape and dtype is written. Inputs may have any
row stride (views into wider buffers) but must be contiguous along hidden.

The row tiling here (``ROWS`` x ``BLOCK_N`` tiles, one program each in row-major order, so a hidden size
wider than one tile is covered by more column programs) is shared with ``silu_mul`` through ``tile_space``,
``tile_constraints``, ``tile_default``, ``tile_grid`` and ``row_tile``.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import triton
import triton.language as tl

import tuneforge
from tuneforge.dsl import Problem, Space, Template, categorical, pow2, register
from tuneforge.errors import InputError
from tuneforge.tune.costmodel import elementwise_time, roofline
from tuneforge.tune.devices import DEFAULT_TARGET, local_device, spec as device_spec

OP = "shared_expert_gate"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# A tile holds at most this many elements per live fp32 tensor: more spills registers on every target.
MAX_TILE_ELEMENTS = 16384
# Elements one thread handles per tensor: below 1 lanes idle, above 64 registers spill.
MAX_ELEMENTS_PER_THREAD = 64


# --- the shared 2-D row tiling --------------------------------------------------------------------

def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def tile_space(n: int) -> Space:
    """BLOCK_N columns x ROWS rows per program; tiles wider than the (padded) row are pure waste."""
    return Space(pow2("BLOCK_N", 128, max(128, min(4096, next_pow2(n)))),
                 categorical("ROWS", (1, 2, 4, 8)),
                 categorical("num_warps", (1, 2, 4, 8, 16)))


def tile_reject_reason(block_n: int, rows: int, num_warps: int, m: int) -> Optional[str]:
    elements = block_n * rows
    if elements > MAX_TILE_ELEMENTS:
        return f"tile {rows}x{block_n} = {elements} elements > {MAX_TILE_ELEMENTS} (register spills)"
    if num_warps > 1 and num_warps * 32 > elements:
        return f"{num_warps} warps ({num_warps * 32} threads) for a {elements}-element tile leave lanes idle"
    if elements / (num_warps * 32) > MAX_ELEMENTS_PER_THREAD:
        return f"{elements // (num_warps * 32)} elements per thread > {MAX_ELEMENTS_PER_THREAD} (register spills)"
    if rows > 1 and rows > next_pow2(m):
        return f"ROWS={rows} exceeds the {m} tokens (idle rows)"
    return None


def tile_constraints(config: dict, problem: Problem, spec) -> Optional[str]:
    return tile_reject_reason(config["BLOCK_N"], config["ROWS"], config["num_warps"], problem["m"])


def tile_default(m: int, n: int, spec) -> dict:
    """~1024-column tiles; fewer columns when few tokens leave SMs idle, more rows when tokens abound."""
    sms = spec.sms if spec is not None else 132
    block_n = min(max(128, next_pow2(n)), 1024)
    while block_n > 256 and max(m, 1) * math.ceil(n / block_n) < sms:
        block_n //= 2
    rows = 1
    while (rows < 8 and block_n * rows * 2 <= 4096
           and math.ceil(m / (rows * 2)) * math.ceil(n / block_n) >= 4 * sms):
        rows *= 2
    # 16 elements per thread per tensor: two 16-byte vectors of bf16 in flight per load
    num_warps = max(1, min(8, block_n * rows // 512))
    return {"BLOCK_N": block_n, "ROWS": rows, "num_warps": num_warps}


def tile_grid(m: int, n: int, config: dict) -> tuple[tuple[int], int]:
    """(1-D launch grid, column tiles per row tile) of ``row_tile``'s tiling."""
    tiles_n = triton.cdiv(n, config["BLOCK_N"])
    return (triton.cdiv(m, config["ROWS"]) * tiles_n,), tiles_n


@triton.jit
def row_tile(tiles_n, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """(rows, cols) of this program's tile, the tiles in row-major order: consecutive programs stream
    consecutive addresses (2-3 % faster than row tiles fastest, the order of a 2-D grid, on an H100 at
    4096-65536 tokens: bench_gate_launch)."""
    tile = tl.program_id(0)
    rows = (tile // tiles_n) * ROWS + tl.arange(0, ROWS)
    cols = (tile % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, cols


@functools.lru_cache(maxsize=None)
def launch_spec():
    """The device spec launch-time defaults are computed for: the local GPU, else the default target."""
    return local_device() or device_spec(DEFAULT_TARGET)


def check_tensor(op: str, name: str, t, shape: tuple, dtype: Optional[torch.dtype], device,
                 unit_last_stride: bool = True) -> None:
    """One-line InputError naming what is wrong with ``t``: type, shape, dtype, device, last-dim stride."""
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise InputError(f"{op}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise InputError(f"{op}: {name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
    if dtype is not None and t.dtype != dtype:
        raise InputError(f"{op}: {name} has dtype {t.dtype}, expected {dtype}")
    if device is not None and t.device != device:
        raise InputError(f"{op}: {name} is on {t.device} but the other tensors are on {device}")
    if not tuneforge.INTERPRETED and t.device.type != "cuda":
        raise InputError(f"{op}: {name} is on {t.device}; Triton kernels need GPU tensors")
    if unit_last_stride and t.dim() >= 1 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise InputError(f"{op}: {name} must be contiguous in its last dimension (stride 1), "
                         f"got strides {tuple(t.stride())}")



def output_tensor(op: str, out: Optional[torch.Tensor], shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """``out`` checked to be ``shape`` with ``like``'s dtype and device (``check_tensor``), or a new such
    tensor when None."""
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    check_tensor(op, "out", out, shape, like.dtype, like.device)
    return out

# --- the op -----------------------------------------------------------------------------------------

@triton.jit
def _shared_expert_gate_kernel(final_ptr, gate_ptr, shared_ptr, out_ptr, m, n, tiles_n,
                               stride_final, stride_gate, stride_shared, stride_out,
                               BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
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
    check_tensor(OP, "gate_logits", gate_logits, gate_shape, None, final.device, unit_last_stride=False)
    return m, n


def shared_expert_gate(final: torch.Tensor, gate_logits: torch.Tensor, shared_out: torch.Tensor, *,
                       out: Optional[torch.Tensor] = None, config: Optional[dict] = None) -> torch.Tensor:
    """``out = final + sigmoid(gate_logits) * shared_out`` (fp32 math); ``out=final`` works in place."""
    m, n = _check_inputs(final, gate_logits, shared_out)
    out = output_tensor(OP, out, (m, n), final)
    if m == 0 or n == 0:
        return out
    cfg = config or tile_default(m, n, launch_spec())
    grid, tiles_n = tile_grid(m, n, cfg)
    _shared_expert_gate_kernel[grid](final, gate_logits, shared_out, out, m, n, tiles_n,
                                     final.stride(0), gate_logits.stride(0), shared_out.stride(0), out.stride(0),
                                     BLOCK_N=cfg["BLOCK_N"], ROWS=cfg["ROWS"], num_warps=cfg["num_warps"])
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
    g = torch.Generator(device=device).manual_seed(seed)
    rand = lambda *shape, scale=1.0: torch.randn(*shape, generator=g, device=device, dtype=torch.float32).mul_(scale).to(dtype)
    return {"final": rand(m, n), "gate_logits": rand(m, 1, scale=3.0), "shared_out": rand(m, n),
            "out": torch.empty(m, n, dtype=dtype, device=device)}



def work(problem: Problem) -> tuple[float, float]:
    """Read final and shared_out, write out, read one logit per token."""
    m, n, size = problem["m"], problem["n"], problem.torch_dtype.itemsize
    return 3.0 * m * n, float((3 * m * n + m) * size)


def baseline_bytes(problem: Problem) -> float:
    """sigmoid (m in, m out) + broadcast mul (m*n + m in, m*n out) + add (2 m*n in, m*n out)."""
    m, n, size = problem["m"], problem["n"], problem.torch_dtype.itemsize
    return float((5 * m * n + 3 * m) * size)


def row_tile_cost(work, baseline_bytes, baseline_launches: int):
    """The cost-model entry of a one-pass row-tile op: the fused kernel's tile-aware time, or the
    torch baseline's ``baseline_launches`` kernels moving ``baseline_bytes`` (config None)."""
    def cost(problem: Problem, config: Optional[dict], spec) -> float:
        flops, nbytes = work(problem)
        if config is None:
            return roofline(flops, baseline_bytes(problem), spec, problem.dtype, launches=baseline_launches)
        return elementwise_time(problem["m"], problem["n"], nbytes, spec, config, flops, problem.dtype)
    return cost


TEMPLATE = register(Template(
    op=OP,
    space=lambda problem: tile_space(problem["n"]),
    make_inputs=make_inputs,
    launch=shared_expert_gate,
    reference=reference,
    baseline=baseline,
    default_config=lambda problem, spec: tile_default(problem["m"], problem["n"], spec),
    work=work,
    cost=row_tile_cost(work, baseline_bytes, baseline_launches=3),
    constraints=(tile_constraints,),
    doc=__doc__.split("\n")[0],
))
