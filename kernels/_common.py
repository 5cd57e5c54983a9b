"""Host and device helpers every op imports: tensor checks, the launch-time device spec, and the row
tiling of the one-pass row ops (``shared_expert_gate``, ``silu_mul``; ``rmsnorm`` and ``rope_qk_norm``
share its limits and constraints).

Collectives: ``comm_tile_space`` / ``comm_tile_default``, the block/warp/program parameters every
collective's space has.

Row tiling: ``rows`` x ``block_n`` tiles, one program each in row-major order, so a hidden size wider
than one tile is covered by more column programs (``tile_space``, ``tile_constraints``, ``tile_default``,
``tile_grid`` and the device side ``row_tile``). Powers of two are ``triton.next_power_of_2``.

Device side: ``copy_rows``, a flat copy (``allgather_gemm``'s shares, ``moe_alltoall``'s staged rows).

Chained launches: ``chained(t)`` (host, the launch's keyword arguments) and ``await_previous(PDL)``
(device, a kernel's first step), programmatic dependent launch for the kernels of a decode step.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import replace
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

import tuneforge
from tuneforge.dsl import Problem, Space, Template, categorical, pow2
from tuneforge.errors import ConfigRejected, InputError
from tuneforge.dsl.roofline import eager_time, elementwise_time
from tuneforge.dsl.comm import MAX_SLOTS
from tuneforge.dsl.devices import DEFAULT_TARGET, SPECS, DeviceSpec, local_device

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# A tile holds at most this many elements per live fp32 tensor: more spills registers on every target.
MAX_TILE_ELEMENTS = 16384
# Elements one thread handles per tensor: below 1 lanes idle, above 64 registers spill.
MAX_ELEMENTS_PER_THREAD = 64


# --- tensor checks ------------------------------------------------------------------------------------

def check_tensor(op: str, name: str, t, shape: tuple, dtype: Optional[torch.dtype] = None, device=None,
                 layout: str = "rows") -> None:
    """One-line InputError naming what is wrong with ``t``: type, shape, dtype, device, layout
    (``rows``: stride 1 along the last dimension, any row stride; ``contiguous``; ``any``)."""
    if not isinstance(t, torch.Tensor):
        raise InputError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise InputError(f"{op}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise InputError(f"{op}: {name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
    if dtype is not None and t.dtype != dtype:
        raise InputError(f"{op}: {name} has dtype {t.dtype}, expected {dtype}")
    if device is not None and t.device != device:
        raise InputError(f"{op}: {name} is on {t.device} but this call runs on {device}")
    if not tuneforge.INTERPRETED and t.device.type != "cuda":
        raise InputError(f"{op}: {name} is on {t.device}; Triton kernels need GPU tensors")
    if layout == "rows" and t.dim() >= 1 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise InputError(f"{op}: {name} must be contiguous in its last dimension (stride 1), "
                         f"got strides {tuple(t.stride())}")
    if layout == "contiguous" and not t.is_contiguous():
        raise InputError(f"{op}: {name} must be contiguous, got strides {tuple(t.stride())}")


def check_linear(op: str, x, w, device=None) -> None:
    """One-line InputError unless ``x`` [m, k] and ``w`` [n, k] (nn.Linear layout) are 2-D tensors of one
    supported dtype on ``device`` (default: x's) with unit stride along k."""
    for name, t in (("x", x), ("w", w)):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise InputError(f"{op}: {name} must be 2-D, got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise InputError(f"{op}: {name} dtype {t.dtype} is not one of float16, bfloat16, float32")
        if t.shape[1] > 1 and t.stride(1) != 1:
            raise InputError(f"{op}: {name} needs unit stride along k, got strides {tuple(t.stride())} "
                             f"(call .contiguous())")
    if x.shape[1] != w.shape[1]:
        raise InputError(f"{op}: x is [m, k]={tuple(x.shape)} but w is [n, k]={tuple(w.shape)} (nn.Linear layout): "
                         f"k differs")
    if w.dtype != x.dtype:
        raise InputError(f"{op}: w dtype {w.dtype} differs from x dtype {x.dtype}")
    device = x.device if device is None else device
    for name, t in (("x", x), ("w", w)):
        if t.device != device:
            raise InputError(f"{op}: {name} is on {t.device} but this call runs on {device}")


def output_tensor(op: str, out: Optional[torch.Tensor], shape: tuple, like: torch.Tensor,
                  layout: str = "rows") -> torch.Tensor:
    """``out`` checked to be ``shape`` with ``like``'s dtype and device and ``layout`` (``check_tensor``),
    or a new such tensor when None."""
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    check_tensor(op, "out", out, shape, like.dtype, like.device, layout)
    return out


def seeded_randn(device, seed: int, dtype: torch.dtype):
    """``rand(*shape, scale=1.0)``: normal draws (fp32, times ``scale``, cast to ``dtype``) from one
    generator seeded ``seed``, in call order: the single-device ops' random inputs."""
    g = torch.Generator(device=device).manual_seed(seed)
    return lambda *shape, scale=1.0: torch.randn(*shape, generator=g, device=device,
                                                 dtype=torch.float32).mul_(scale).to(dtype)


def rank_generator(problem: Problem, seed: int, ctx, stream: int = 0) -> torch.Generator:
    """The generator of this rank's inputs in a multi-rank template's ``make_inputs`` (seeded by the
    trial's seed, ``stream`` and the rank); InputError unless ``ctx`` is a world of ``problem.world`` ranks."""
    if ctx is None or ctx.size != problem.world:
        raise InputError(f"{problem.op} {problem.key} needs a world of {problem.world} ranks (ctx)")
    return torch.Generator().manual_seed(seed * 7919 + stream + ctx.rank)


# --- the device a launch plans for --------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def launch_spec(device: torch.device, persistent: bool = True) -> DeviceSpec:
    """The spec launch-time defaults are computed for: ``device``'s GPU. Under the interpreter, for
    ``persistent`` kernels (gemm and the fused ones) a stand-in of the default target with 4 SMs (so
    the persistent loop runs several tiles per program) and no TMA; for the others the default target."""
    if device.type == "cuda" and not tuneforge.INTERPRETED:
        with torch.cuda.device(device):
            return local_device()
    if persistent:
        return replace(SPECS[DEFAULT_TARGET], name="interpreter", sms=4, features=frozenset())
    return SPECS[DEFAULT_TARGET]


# --- chained launches ------------------------------------------------------------------------------
# On sm_90+ the one-launch kernels of a decode step (GEMMs, row ops, routing, experts, attention) launch
# as programmatic dependents of the kernel before them, in CUDA graphs too: a kernel's launch and its
# programs' start overlap the previous kernel's tail, and each program waits (``await_previous``) for
# that kernel's stores before it touches memory. Kernels launched the ordinary way (torch's, the
# collectives) simply start after the one before them ends. TUNEFORGE_PDL=0 launches every kernel the
# ordinary way; ``CHAINED`` is read at each launch.
CHAINED = os.environ.get("TUNEFORGE_PDL", "1") != "0"


@functools.lru_cache(maxsize=None)
def _has_dependent_launch(index: Optional[int]) -> bool:
    return torch.version.cuda is not None and torch.cuda.get_device_capability(index)[0] >= 9


def chained(t: torch.Tensor) -> dict:
    """The launch keywords of a kernel that calls ``await_previous``: a programmatic dependent launch
    where ``t``'s device has it (Hopper and later; never under the interpreter)."""
    on = CHAINED and t.is_cuda and not tuneforge.INTERPRETED and _has_dependent_launch(t.device.index)
    return {"PDL": on, "launch_pdl": on}


@triton.jit
def await_previous(PDL: tl.constexpr):
    """A chained kernel's first step: wait until the kernel before it has finished and its stores are
    visible (nothing before this may load what another kernel writes, or store), then let the next
    kernel launch while this one runs."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


# --- configs at launch ---------------------------------------------------------------------------

def first_rejection(config: dict, problem: Problem, spec, constraints) -> Optional[str]:
    """The reason of the first of ``constraints`` that ``config`` violates, or None."""
    for c in constraints:
        why = c(config, problem, spec)
        if why:
            return why
    return None


def tile_past_problem(config: dict, tiles, prefix: str = "") -> Optional[str]:
    """The first tile parameter wider than useful: ``tiles`` holds (parameter, dimension's name, its
    size, the smallest tile); a tile past max(smallest, next power of 2 of the size) only adds
    zero-filled work."""
    for name, dim, size, smallest in tiles:
        limit = max(smallest, triton.next_power_of_2(size))
        if config[name] > limit:
            return f"{prefix}{name}={config[name]} exceeds {dim}={size} (at most {limit} is useful)"
    return None


def tma_rows_fit(op: str, tensors, row_stride: int, rows: int) -> None:
    """A one-line ConfigRejected unless ``tensors`` can be TMA descriptors of ``rows`` rows ``row_stride``
    elements apart: a 16-byte aligned base and row stride, and a row count Triton's i32 shape holds."""
    for t in tensors:
        if t.data_ptr() % 16 or row_stride * t.element_size() % 16 or rows >= 2 ** 31:
            raise ConfigRejected(f"{op}: tma needs a 16-byte aligned base and row stride and < 2^31 rows, got base "
                                 f"offset {t.data_ptr() % 16}, a row stride of {row_stride * t.element_size()} bytes, "
                                 f"{rows} rows")


def checked_config(space: Space, config: dict, problem: Problem, spec, launch_constraints) -> dict:
    """``config`` checked against ``space`` and the constraints that make a launch impossible: a
    one-line ConfigRejected naming the op, the config and the reason (``Template.reject_reason``
    checks the same plus the fit constraints, for the tuner)."""
    try:
        space.validate(config)
    except ValueError as e:
        raise ConfigRejected(f"{problem.op} config {config}: {e}") from None
    refuse_unrunnable(config, problem, spec, launch_constraints)
    return config


def refuse_unrunnable(config: dict, problem: Problem, spec, constraints) -> None:
    """A one-line ConfigRejected naming the op, the config and the reason where ``config`` violates one
    of ``constraints`` on ``spec``."""
    why = first_rejection(config, problem, spec, constraints)
    if why:
        raise ConfigRejected(f"{problem.op} config {config} cannot run {problem.key}: {why}")


# --- the shared 2-D row tiling --------------------------------------------------------------------

def tile_space(n: int) -> Space:
    """block_n columns x rows rows per program; tiles wider than the (padded) row are pure waste."""
    return Space(pow2("block_n", 128, max(128, min(4096, triton.next_power_of_2(n)))),
                 categorical("rows", (1, 2, 4, 8)),
                 categorical("num_warps", (1, 2, 4, 8, 16)))


def tile_reject_reason(block_n: int, rows: int, num_warps: int, m: int) -> Optional[str]:
    elements = block_n * rows
    if elements > MAX_TILE_ELEMENTS:
        return f"tile {rows}x{block_n} = {elements} elements > {MAX_TILE_ELEMENTS} (register spills)"
    if num_warps > 1 and num_warps * 32 > elements:
        return f"{num_warps} warps ({num_warps * 32} threads) for a {elements}-element tile leave lanes idle"
    if elements / (num_warps * 32) > MAX_ELEMENTS_PER_THREAD:
        return f"{elements // (num_warps * 32)} elements per thread > {MAX_ELEMENTS_PER_THREAD} (register spills)"
    if rows > 1 and rows > triton.next_power_of_2(m):
        return f"rows={rows} exceeds the {m} tokens (idle rows)"
    return None


def tile_constraints(config: dict, problem: Problem, spec) -> Optional[str]:
    return tile_reject_reason(config["block_n"], config["rows"], config["num_warps"], problem["m"])


def tile_default(m: int, n: int, spec) -> dict:
    """~1024-column tiles; fewer columns when few tokens leave SMs idle, more rows when tokens abound."""
    sms = spec.sms if spec is not None else 132
    block_n = min(max(128, triton.next_power_of_2(n)), 1024)
    while block_n > 256 and max(m, 1) * math.ceil(n / block_n) < sms:
        block_n //= 2
    rows = 1
    while (rows < 8 and block_n * rows * 2 <= 4096
           and math.ceil(m / (rows * 2)) * math.ceil(n / block_n) >= 4 * sms):
        rows *= 2
    # 16 elements per thread per tensor: two 16-byte vectors of bf16 in flight per load
    num_warps = max(1, min(8, block_n * rows // 512))
    return {"block_n": block_n, "rows": rows, "num_warps": num_warps}


def tile_grid(m: int, n: int, config: dict) -> tuple[tuple[int], int]:
    """(1-D launch grid, column tiles per row tile) of ``row_tile``'s tiling."""
    tiles_n = triton.cdiv(n, config["block_n"])
    return (triton.cdiv(m, config["rows"]) * tiles_n,), tiles_n


@triton.jit
def row_tile(tiles_n, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """(rows, cols) of this program's tile, the tiles in row-major order: consecutive programs stream
    consecutive addresses (2-3 % faster than row tiles fastest, the order of a 2-D grid, on an H100 at
    4096-65536 tokens: bench_gate_launch)."""
    tile = tl.program_id(0)
    rows = (tile // tiles_n) * ROWS + tl.arange(0, ROWS)
    cols = (tile % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, cols


@triton.jit
def copy_rows(src, dst, length, BLOCK: tl.constexpr):
    """dst[:length] = src[:length] (flat elements)."""
    offs = tl.arange(0, BLOCK)
    for o in range(0, length, BLOCK):
        mask = o + offs < length
        tl.store(dst + o + offs, tl.load(src + o + offs, mask=mask), mask=mask)


def row_bytes(problem: Problem, passes: int, per_row: int = 0, per_col: int = 0) -> float:
    """Bytes a row op moves: ``passes`` whole [m, n] tensors read or written, plus ``per_row`` m-vectors
    and ``per_col`` n-vectors, in the problem's dtype."""
    m, n = problem["m"], problem["n"]
    return float((passes * m * n + per_row * m + per_col * n) * problem.torch_dtype.itemsize)


def row_tile_cost(work, baseline_bytes, baseline_launches: int, baseline_strided: bool = False):
    """The cost-model entry of a one-pass row-tile op: the fused kernel's tile-aware time, or the
    torch baseline's ``baseline_launches`` kernels moving ``baseline_bytes`` (config None; ``eager_time``,
    ``baseline_strided``: on strided views)."""
    def cost(problem: Problem, config: Optional[dict], spec) -> float:
        flops, nbytes = work(problem)
        if config is None:
            return eager_time(flops, baseline_bytes(problem), spec, baseline_launches, baseline_strided, problem.dtype)
        return elementwise_time(problem["m"], problem["n"], nbytes, spec, config, flops, problem.dtype)
    return cost


def row_tile_template(op: str, *, launch, make_inputs, reference, baseline, work, baseline_bytes,
                      baseline_launches: int, doc: str, baseline_strided: bool = False) -> Template:
    """The template of a one-pass row-tile op: ``tile_space`` over its n, ``tile_default``,
    ``tile_constraints`` and ``row_tile_cost``; the op gives its launch, inputs, references and traffic."""
    return Template(op=op, space=lambda problem: tile_space(problem["n"]), make_inputs=make_inputs,
                    launch=launch, reference=reference, baseline=baseline,
                    default_config=lambda problem, spec: tile_default(problem["m"], problem["n"], spec),
                    work=work, cost=row_tile_cost(work, baseline_bytes, baseline_launches, baseline_strided),
                    constraints=(tile_constraints,), doc=doc)


# --- the tiles of the collectives ---------------------------------------------------------------------

def comm_tile_space(numel: int) -> list:
    """The tile/warp/program parameters every collective's space has, clipped to the message:
    ``block`` elements per tile, num_warps, and comm_sms programs (= signal slots: the signal
    granularity; each program signals once per phase for the tiles it moved)."""
    top = max(128, min(8192, triton.next_power_of_2(max(1, numel))))
    tiles = triton.cdiv(max(1, numel), 128)
    return [pow2("block", 128, top), categorical("num_warps", [4, 8, 16]),
            pow2("comm_sms", 1, max(1, min(MAX_SLOTS.value // 2, triton.next_power_of_2(tiles))))]


def comm_tile_default(numel: int, spec) -> dict:
    """A sensible start: 2K-element tiles (fewer for small messages), up to a quarter of the SMs."""
    block = max(128, min(2048, triton.next_power_of_2(max(1, numel))))
    sms = spec.sms if spec is not None else 32
    programs = max(1, min(triton.cdiv(numel, block), sms // 4, MAX_SLOTS.value // 2))
    return {"block": block, "num_warps": 8 if block >= 1024 else 4,
            "comm_sms": min(triton.next_power_of_2(programs), MAX_SLOTS.value // 2)}
