"""What the fused GEMM + communication kernels (``allgather_gemm``, ``gemm_reducescatter``, and the
TP blocks built on them) share: the chunk order, the signal granularity, their search-space pieces and
defaults, gemm's constraints applied to one chunk's GEMM and the launch-time config check. The tile math itself is ``kernels/gemm.py``'s; the signal verbs, the channel (launch and warm
registry, ``tile_flags``) are ``tuneforge.dsl.comm``'s.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

import tuneforge
from tuneforge.dsl import Problem, Template, categorical, pow2
from tuneforge.dsl.problem import DTYPE_NAMES
from tuneforge.kernels import gemm as G
from tuneforge.kernels._common import checked_config, launch_spec
from tuneforge.dsl.roofline import gemm_config_time

STARTED = tl.constexpr(3)  # channel signal kind: "this rank started the launch" (the 'barrier' kind)
SIGNALS = ("rank", "chunk", "tile")
# Signal round-trips a fused kernel pays per flag it waits on (the model's per-step overhead).
FLAG_OVERHEAD_S = 0.3e-6
SMEM_RESERVE = 1024     # barriers and scratch beside the pipeline buffers
TILE_KEYS = ("block_m", "block_n", "block_k", "group_m", "num_warps", "num_stages", "tma")
GEMM_FIT = (G.register_pressure, G.tile_exceeds_problem)
COMM_SMS = categorical("comm_sms", [1, 2, 4, 8, 16, 32])


@triton.jit
def chunk_source(c, rank, world, PREV: tl.constexpr):
    """The rank whose chunk is the ``c``-th one processed (``c == 0``: this rank)."""
    if PREV:
        q = (rank - c + world) % world
    else:
        q = (rank + c) % world
    return q


# --- the search space and defaults -------------------------------------------------------------------

def seg_rows_of(config: dict, rows: int) -> int:
    """Rows per signal: the whole share, ``chunk_tiles`` row blocks, or one row block."""
    bm = config["block_m"]
    if config["signal"] == "rank":
        return max(bm, triton.cdiv(max(rows, 1), bm) * bm)
    if config["signal"] == "chunk":
        return bm * config["chunk_tiles"]
    return bm


def tile_space(problem_m: int, n: int, k: int) -> list:
    """The GEMM tile parameters of the fused kernels (the gemm template's, without split-K)."""
    def cap(v):
        return max(16, min(256, triton.next_power_of_2(max(1, v))))
    return [pow2("block_m", 16, cap(problem_m)), pow2("block_n", 16, cap(n)), pow2("block_k", 16, cap(k)),
            categorical("group_m", [1, 4, 8]), categorical("num_warps", [4, 8]),
            categorical("num_stages", [2, 3, 4]), categorical("tma", [False, True])]


def comm_space(when: dict | None = None) -> list:
    """The communication parameters of the fused kernels (``when``: the condition they live under)."""
    when = dict(when or {})
    return [categorical("variant", ["push", "pull"], when=when), categorical("signal", list(SIGNALS), when=when),
            categorical("chunk_tiles", [2, 4, 8], when={**when, "signal": ["chunk"]}),
            categorical("order", ["next", "prev"], when=when)]


def pipeline_spec(spec, pipelines: int):
    """The device as each of ``pipelines`` pipelined loops of one kernel sees it (its share of shared memory)."""
    if spec is None or pipelines == 1:
        return spec
    return dataclasses.replace(spec, smem_per_block=(spec.smem_per_block - SMEM_RESERVE) // pipelines)


def tile_defaults(m: int, n: int, k: int, dtype: str, spec, pipelines: int = 1) -> dict:
    """The gemm template's default tiles for one chunk-sized GEMM (no split-K, one program per SM)."""
    gemm_cfg = G.default_config(Problem.make("gemm", dtype, m=max(1, m), n=n, k=k),
                                pipeline_spec(spec, pipelines) if spec is not None
                                else launch_spec(torch.device("cpu")), programs_per_sm=1)
    return {key: gemm_cfg[key] for key in TILE_KEYS}


def default_comm_sms(shard_bytes: int, spec) -> int:
    """A program per 256 KiB moved, at most an eighth of the SMs (16 at most; 1 under the interpreter)."""
    sms = spec.sms if spec is not None else 8
    want = triton.next_power_of_2(max(1, shard_bytes >> 18))
    return max(1, min(16, sms // 8, want))


# --- constraints ---------------------------------------------------------------------------------------

def comm_sms_fit(config: dict, problem: Problem, spec) -> str | None:
    if spec is not None and config["comm_sms"] > spec.sms // 2:
        return f"comm_sms={config['comm_sms']} > half of the {spec.sms} SMs of {spec.name}"
    return None


def chunk_covers_share(config: dict, problem: Problem, spec) -> str | None:
    if config["signal"] == "chunk" and config["chunk_tiles"] * config["block_m"] >= triton.cdiv(problem["m"], problem.world):
        return f"signal=chunk with {config['chunk_tiles']} x {config['block_m']} rows covers a whole rank share"
    return None


def gemm_rejection(config: dict, dtype: str, m: int, n: int, k: int, spec, constraints,
                   pipelines: int = 1) -> str | None:
    """The first of gemm's ``constraints`` the tiles of ``config`` violate on an m x n x k GEMM inside
    a kernel with ``pipelines`` pipelined K loops (spec None: no device to fit, the interpreter's rules)."""
    cfg = G.whole_tiles_config({key: config[key] for key in TILE_KEYS})
    spec = pipeline_spec(spec, pipelines)
    problem = Problem.make("gemm", dtype, m=max(1, m), n=n, k=k)
    for c in constraints:
        if spec is None and c is G.smem_overflow:
            continue
        why = c(cfg, problem, spec if spec is not None else launch_spec(torch.device("cpu")))
        if why:
            return why
    return None


def fused_constraints(comm_fit, pipelines: int = 1):
    """(launch constraints, all constraints) of a fused GEMM + communication op: gemm's launch rules on
    one chunk's GEMM and ``comm_fit`` (what its comm programs need); then the chunk covering a share
    and gemm's fit rules on the chunk's GEMM."""
    def launchable(config, problem, spec):
        return gemm_rejection(config, problem.dtype, triton.cdiv(problem["m"], problem.world), problem["n"],
                              problem["k"], spec, G.LAUNCH_CONSTRAINTS, pipelines)

    def fits(config, problem, spec):
        return gemm_rejection(config, problem.dtype, triton.cdiv(problem["m"], problem.world), problem["n"],
                              problem["k"], spec, GEMM_FIT)
    launch = (launchable, comm_fit)
    return launch, launch + (chunk_covers_share, fits)


# --- launch ----------------------------------------------------------------------------------------------

_PLANS: dict = {}


def plan_config(template: Template, problem: Problem, config: dict | None, device: torch.device,
                launch_constraints) -> dict:
    """The config for one launch: the default, or ``config`` checked (``checked_config``) against the
    space and the constraints that make a launch impossible. Under the interpreter there is no device
    to fit (spec None). Cached: the hot path pays one dict lookup."""
    key = (template.op, problem, None if config is None else tuple(sorted(config.items())), device)
    plan = _PLANS.get(key)
    if plan is None:
        spec = None if tuneforge.INTERPRETED else launch_spec(device)
        plan = _PLANS[key] = (template.default_config(problem, spec) if config is None else
                              checked_config(template.space(problem), dict(config), problem, spec, launch_constraints))
    return plan


def fused_plan(template: Template, x: torch.Tensor, m: int, n: int, k: int, ctx, config: dict | None,
               launch_constraints) -> tuple[dict, int, int]:
    """A fused launch's plan for ``x``'s dtype: its config (``plan_config`` of the m x n x k problem on
    ``ctx``'s world), each rank's share of the m rows and the rows per signal."""
    problem = Problem.make(template.op, DTYPE_NAMES[x.dtype], ctx.size, m=m, n=n, k=k)
    config = plan_config(template, problem, config, x.device, launch_constraints)
    share = triton.cdiv(m, ctx.size)
    return config, share, seg_rows_of(config, share)


def compute_programs(tiles: int, comm_sms: int, device: torch.device) -> int:
    """Persistent compute programs: the SMs the communication programs leave (all co-resident)."""
    return max(1, min(tiles, launch_spec(device).sms - comm_sms))


def descriptor(t: torch.Tensor, rows: int, block: list):
    from triton.tools.tensor_descriptor import TensorDescriptor
    return TensorDescriptor(t, [rows, t.shape[1]], [t.stride(0), 1], block)


# --- cost ------------------------------------------------------------------------------------------------

def signal_steps(config: dict, rows: int, world: int) -> int:
    """Signals a chunk-by-chunk pipeline waits on (its number of overlap steps)."""
    return world * max(1, triton.cdiv(max(rows, 1), seg_rows_of(config, rows)))


def fused_gemm_time(problem: Problem, k: int, config: dict, spec, reserved_sms: int) -> float:
    """The compute part: gemm's tile model for the whole m x n, on the SMs the comm programs leave."""
    g = gemm_config_time(problem["m"], problem["n"], k, {**config, "split_k": 1}, spec, problem.dtype)
    return g * spec.sms / max(1, spec.sms - reserved_sms)
